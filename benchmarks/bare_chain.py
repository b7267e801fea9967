"""The floor of a pipeline hop: the same stages on the same machine with nothing of
nanoshard's data plane. Each bare node is one process holding its stage; it computes each
message in its gRPC handler, on the event loop (as a node runs a lone session's decode
step), sends the result on to the next bare node over a grpc.aio bidi stream and answers
with what comes back; the last one answers the greedy token. Messages are raw bytes: the
position, then token ids or fp32 activations. No sessions, validation, codecs, traces,
signatures, KV handles, replay or repair.

    python benchmarks/bare_chain.py MODEL START END [NEXT]   # one bare node

``hops.py`` runs a bare chain beside nanoshard's chain on the same splits, the two and the
local path taking each token in turn, so the difference per hop is what nanoshard's own hop
costs above what any Python gRPC pipeline pays on this machine (two processes woken per
message, gRPC's C core and poller thread, the event loops).

Two variants, for ``floors.py`` (what another transport or return path would buy the floor):
``--listen unix:PATH`` takes a Unix socket instead of loopback TCP; ``--direct`` sends the head's
answer straight back to the caller (on a ``Results`` stream the caller opens to the last
node) instead of along the chain, so a node forwards a message and is done with it.
"""

from __future__ import annotations

# isort: off
import nanoshard.threads  # noqa: F401  before torch: the nodes' thread policy

# isort: on
import argparse
import asyncio
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import torch
from common import stop_processes

from nanoshard.checkpoint import open_checkpoint
from nanoshard.engine import Stage

SERVICE, METHOD = "nanoshard.bench.Bare", "Step"
PATH = f"/{SERVICE}/{METHOD}"
RESULTS = f"/{SERVICE}/Results"  # (--direct) the head's answers, straight to the caller
# position, token (the head's answer; -1 before a payload), compute ms of the hops so far
HEADER = struct.Struct("<iif")


def compute(stage: Stage, cache: list, message: bytes) -> bytes:
    """One step of ``stage`` on ``message``; a new sequence starts at position 0."""
    started = time.perf_counter()
    pos, _, before_ms = HEADER.unpack_from(message)
    if pos == 0:
        cache[:] = [stage.new_cache(stage.config.block_size)]
    if stage.has_embed:
        x = torch.frombuffer(bytearray(message[HEADER.size :]), dtype=torch.int32).long()
    else:
        x = torch.frombuffer(bytearray(message[HEADER.size :]), dtype=torch.float32)
        x = x.view(-1, stage.config.n_embd)
    y = stage(x, cache[0], pos)
    if stage.has_head:
        token, payload = int(y[-1].argmax()), b""
    else:
        token, payload = -1, y.numpy().tobytes()
    ms = before_ms + (time.perf_counter() - started) * 1e3
    return HEADER.pack(pos, token, ms) + payload


async def serve(
    model: str,
    start: int,
    end: int,
    next_address: str | None,
    listen: str = "127.0.0.1:0",
    direct: bool = False,
) -> None:
    stage = open_checkpoint(model).load_stage(start, end)
    cache: list = []
    answers: asyncio.Queue[bytes] = asyncio.Queue()  # (--direct, the head) for ``results``

    async def stream(requests, context):  # type: ignore[no-untyped-def]
        channel = grpc.aio.insecure_channel(next_address) if next_address else None
        call = channel.stream_stream(PATH)() if channel else None
        async for message in requests:
            with torch.inference_mode():
                out = compute(stage, cache, message)
            if call is not None:
                await call.write(out)
                if direct:
                    continue  # the head answers the caller itself
                out = await call.read()
            if direct:
                answers.put_nowait(out)
            else:
                await context.write(out)

    async def results(request, context):  # type: ignore[no-untyped-def]
        while True:
            await context.write(await answers.get())

    server = grpc.aio.server()
    handlers = {
        METHOD: grpc.stream_stream_rpc_method_handler(stream),  # bytes in, bytes out
        "Results": grpc.unary_stream_rpc_method_handler(results),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port(listen)
    await server.start()
    address = listen if listen.startswith("unix:") else f"127.0.0.1:{port}"
    print(f"bare node {start}:{end}: listening on {address}", flush=True)
    await server.wait_for_termination()


class BareChain:
    """Bare nodes serving ``splits`` of ``model``, started last to first (each needs the
    address of the next); ``address`` is the first one's, ``last`` the head's. With
    ``unix`` they listen on Unix sockets in a folder of their own; with ``direct`` the head
    answers the caller itself (``BareSession(address, last)``). Stopped by their PIDs."""

    def __init__(
        self,
        model: str,
        splits: Sequence[tuple[int, int]],
        unix: bool = False,
        direct: bool = False,
    ) -> None:
        self.procs: list[subprocess.Popen] = []
        self.folder = tempfile.TemporaryDirectory(prefix="bare-") if unix else None
        address: str | None = None
        try:
            for start, end in reversed(splits):
                args = [sys.executable, str(Path(__file__).resolve()), model]
                args += [str(start), str(end)] + ([address] if address else [])
                if self.folder is not None:
                    args += ["--listen", f"unix:{self.folder.name}/{start}-{end}.sock"]
                args += ["--direct"] if direct else []
                proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
                self.procs.append(proc)
                line = proc.stdout.readline() if proc.stdout else ""
                if "listening on" not in line:
                    raise RuntimeError(f"bare node {start}:{end} did not start: {line!r}")
                address = line.rsplit(" ", 1)[1].strip()
                if len(self.procs) == 1:
                    self.last = address
        except BaseException:
            self.close()
            raise
        assert address is not None
        self.address = address

    def close(self) -> None:
        stop_processes(self.procs)
        if self.folder is not None:
            self.folder.cleanup()

    def __enter__(self) -> BareChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BareSession:
    """A generation through the bare chain at ``address``: one stream, greedy tokens; with
    ``results`` (a ``--direct`` chain's head), the answers come on a stream from there."""

    def __init__(self, address: str, results: str | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.call = self.channel.stream_stream(PATH)()
        self.head = grpc.aio.insecure_channel(results) if results else None
        self.answers = self.head.unary_stream(RESULTS)(b"") if self.head else self.call
        self.compute_ms = 0.0

    async def step(self, ids: list[int], pos: int) -> int:
        """Feed ``ids`` at ``pos`` (0 starts the sequence); the next greedy token. Its
        nodes' compute, summed, is then ``compute_ms``."""
        await self.call.write(HEADER.pack(pos, -1, 0.0) + struct.pack(f"<{len(ids)}i", *ids))
        _, token, self.compute_ms = HEADER.unpack_from(await self.answers.read())
        return int(token)

    async def close(self) -> None:
        await self.call.done_writing()
        await self.channel.close()
        if self.head is not None:
            await self.head.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("start", type=int)
    p.add_argument("end", type=int)
    p.add_argument("next", nargs="?", help="the next bare node's address (none: the head)")
    p.add_argument("--listen", default="127.0.0.1:0", help="address (default 127.0.0.1:0)")
    p.add_argument("--direct", action="store_true", help="the head answers the caller itself")
    opts = p.parse_args(argv)
    asyncio.run(serve(opts.model, opts.start, opts.end, opts.next, opts.listen, opts.direct))


if __name__ == "__main__":
    main()
