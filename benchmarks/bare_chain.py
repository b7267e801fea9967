"""The floor of a pipeline hop: the same stages on the same machine with nothing of
nanoshard's data plane. Each bare node is one process holding its stage; it computes each
message in its gRPC handler, on the event loop (as a node runs a lone session's decode
step), sends the result on to the next bare node over a grpc.aio bidi stream and answers
with what comes back; the last one answers the greedy token. Messages are raw bytes: the
position, then token ids or fp32 activations. No sessions, validation, codecs, traces,
signatures, KV handles, replay or repair.

    python benchmarks/bare_chain.py             # 3 bare nodes against the local path
    python benchmarks/bare_chain.py --serve MODEL START END [NEXT]   # one bare node

``hops.py`` runs it beside nanoshard's chain on the same splits, each paired token by token
with the local path, so the difference per hop is what nanoshard's own hop costs above what
any Python gRPC pipeline with a compute thread pays on this machine (two processes woken
per message, gRPC's C core and poller thread, the event loops).
"""

from __future__ import annotations

# isort: off
import nanoshard.threads  # noqa: F401  before torch: the nodes' thread policy

# isort: on
import argparse
import asyncio
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import torch

from nanoshard.checkpoint import open_checkpoint
from nanoshard.engine import Stage

SERVICE, METHOD = "nanoshard.bench.Bare", "Step"
PATH = f"/{SERVICE}/{METHOD}"
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


async def serve(model: str, start: int, end: int, next_address: str | None) -> None:
    stage = open_checkpoint(model).load_stage(start, end)
    cache: list = []

    async def stream(requests, context):  # type: ignore[no-untyped-def]
        channel = grpc.aio.insecure_channel(next_address) if next_address else None
        call = channel.stream_stream(PATH)() if channel else None
        async for message in requests:
            with torch.inference_mode():
                out = compute(stage, cache, message)
            if call is not None:
                await call.write(out)
                out = await call.read()
            yield out

    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(stream)  # bytes in, bytes out
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"bare node {start}:{end}: listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


class BareChain:
    """Bare nodes serving ``splits`` of ``model``, started last to first (each needs the
    address of the next); ``address`` is the first one's. Stopped by their PIDs."""

    def __init__(self, model: str, splits: Sequence[tuple[int, int]]) -> None:
        self.procs: list[subprocess.Popen] = []
        address: str | None = None
        try:
            for start, end in reversed(splits):
                args = [sys.executable, str(Path(__file__).resolve()), "--serve", model]
                args += [str(start), str(end)] + ([address] if address else [])
                proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
                self.procs.append(proc)
                line = proc.stdout.readline() if proc.stdout else ""
                if "listening on" not in line:
                    raise RuntimeError(f"bare node {start}:{end} did not start: {line!r}")
                address = line.rsplit(" ", 1)[1].strip()
        except BaseException:
            self.close()
            raise
        assert address is not None
        self.address = address

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> BareChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BareSession:
    """A generation through the bare chain at ``address``: one stream, greedy tokens."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.call = self.channel.stream_stream(PATH)()
        self.compute_ms = 0.0

    async def step(self, ids: list[int], pos: int) -> int:
        """Feed ``ids`` at ``pos`` (0 starts the sequence); the next greedy token. Its
        nodes' compute, summed, is then ``compute_ms``."""
        await self.call.write(HEADER.pack(pos, -1, 0.0) + struct.pack(f"<{len(ids)}i", *ids))
        _, token, self.compute_ms = HEADER.unpack_from(await self.call.read())
        return int(token)

    async def close(self) -> None:
        await self.call.done_writing()
        await self.channel.close()


def run_paired(
    address: str, stage: Stage, ids: list[int], tokens: int
) -> tuple[list[float], list[float], bool]:
    """``tokens`` greedy decode steps through the bare chain at ``address``, each followed by
    the local path's step for the same token (``stage``: the whole model). Returns the
    chain's ms per step, the local path's, and whether both produced the same tokens."""

    async def main() -> tuple[list[float], list[float], bool]:
        chain_ms: list[float] = []
        local_ms: list[float] = []
        cache = stage.new_cache(stage.config.block_size)
        session = BareSession(address)
        token = await session.step(ids, 0)
        with torch.inference_mode():
            same = token == int(stage(torch.tensor(ids), cache, 0)[-1].argmax())
        for pos in range(len(ids), len(ids) + tokens):
            t0 = time.perf_counter()
            nxt = await session.step([token], pos)
            t1 = time.perf_counter()
            with torch.inference_mode():
                local = int(stage(torch.tensor([token]), cache, pos)[-1].argmax())
            chain_ms.append((t1 - t0) * 1e3)
            local_ms.append((time.perf_counter() - t1) * 1e3)
            token, same = nxt, same and local == nxt
        await session.close()
        return chain_ms, local_ms, same

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", nargs="+", metavar="ARG", help="MODEL START END [NEXT]: one node")
    p.add_argument("--nodes", type=int, default=3, help="bare nodes (3)")
    p.add_argument("--tokens", type=int, default=64, help="decode tokens per run (64)")
    p.add_argument("--repeats", type=int, default=3, help="runs (3)")
    opts = p.parse_args(argv)
    if opts.serve:
        model, start, end, *rest = opts.serve
        asyncio.run(serve(model, int(start), int(end), rest[0] if rest else None))
        return
    from common import BENCH_CACHE, GPT2_124M, even_splits, random_checkpoint

    model = str(random_checkpoint(GPT2_124M, BENCH_CACHE / "gpt2-124m-random"))
    ckpt = open_checkpoint(model)
    stage = ckpt.load_stage(0, ckpt.config.n_units)
    ids = list(range(100, 132))
    with BareChain(model, even_splits(ckpt.config.n_units, opts.nodes)) as chain:
        run_paired(chain.address, stage, ids, 4)  # warm-up
        for _ in range(opts.repeats):
            chain_ms, local_ms, same = run_paired(chain.address, stage, ids, opts.tokens)
            over = statistics.median(a - b for a, b in zip(chain_ms, local_ms, strict=True))
            print(
                f"{opts.nodes} bare nodes: {statistics.median(chain_ms):.2f} ms/token, local "
                f"{statistics.median(local_ms):.2f}, overhead per hop {over / opts.nodes:.2f} ms"
                f"{'' if same else ' (tokens differ from the local path!)'}"
            )


if __name__ == "__main__":
    main()
