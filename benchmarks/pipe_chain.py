"""The floor of a pipeline of processes: the same stages as ``bare_chain.py``, computed the
same way (its ``compute``), in one process each, but linked by OS pipes instead of gRPC.
Each pipe node reads a message from its stdin, computes it and writes the result to its
stdout, which is the next one's stdin; the last one's stdout comes back to the caller.
Blocking reads and writes on one thread: no event loop, no gRPC, no relay on the way back.

    python benchmarks/pipe_chain.py MODEL START END   # one pipe node (on stdin/stdout)

``hops.py`` runs it beside the bare gRPC chain and nanoshard's: what splitting the model
across processes costs on this machine by itself, so the bare chain above it is what
Python gRPC costs.
"""

from __future__ import annotations

# isort: off
import nanoshard.threads  # noqa: F401  before torch: the nodes' thread policy

# isort: on
import argparse
import os
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch
from bare_chain import HEADER, compute
from common import stop_processes

from nanoshard.checkpoint import open_checkpoint

LENGTH = struct.Struct("<I")  # each message: its length, then the bare chain's bytes


def read_message(stream: BinaryIO) -> bytes | None:
    """The next message on ``stream``; None when it ends."""
    head = _read_exactly(stream, LENGTH.size)
    if head is None:
        return None
    return _read_exactly(stream, LENGTH.unpack(head)[0])


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    """``size`` bytes from ``stream`` (a pipe hands over what it has: read until all came),
    or None if it ends first."""
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def write_message(stream: BinaryIO, message: bytes) -> None:
    stream.write(LENGTH.pack(len(message)) + message)
    stream.flush()


def serve(model: str, start: int, end: int) -> None:
    stage = open_checkpoint(model).load_stage(start, end)
    cache: list = []
    source = os.fdopen(sys.stdin.fileno(), "rb", buffering=0)
    sink = os.fdopen(sys.stdout.fileno(), "wb", buffering=0)
    with torch.inference_mode():
        while (message := read_message(source)) is not None:
            write_message(sink, compute(stage, cache, message))


class PipeChain:
    """Pipe nodes serving ``splits`` of ``model``, each one's stdout the next one's stdin.
    Stopped by their PIDs."""

    def __init__(self, model: str, splits: Sequence[tuple[int, int]]) -> None:
        self.procs: list[subprocess.Popen] = []
        self.compute_ms = 0.0
        try:
            source: int | BinaryIO = subprocess.PIPE
            for start, end in splits:
                args = [sys.executable, str(Path(__file__).resolve()), model, str(start), str(end)]
                proc = subprocess.Popen(args, stdin=source, stdout=subprocess.PIPE, bufsize=0)
                if self.procs:
                    assert self.procs[-1].stdout is not None
                    self.procs[-1].stdout.close()  # the next process holds it now
                self.procs.append(proc)
                assert proc.stdout is not None
                source = proc.stdout
        except BaseException:
            self.close()
            raise
        first, last = self.procs[0], self.procs[-1]
        assert first.stdin is not None and last.stdout is not None
        self._sink, self._source = first.stdin, last.stdout

    def step(self, ids: list[int], pos: int) -> int:
        """Feed ``ids`` at ``pos`` (0 starts the sequence); the next greedy token. Its
        nodes' compute, summed, is then ``compute_ms``."""
        write_message(self._sink, HEADER.pack(pos, -1, 0.0) + struct.pack(f"<{len(ids)}i", *ids))
        reply = read_message(self._source)
        if reply is None:
            raise RuntimeError("a pipe node ended: see its stderr")
        _, token, self.compute_ms = HEADER.unpack_from(reply)
        return int(token)

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        stop_processes(self.procs)
        for proc in self.procs:
            if proc.stdout is not None:
                proc.stdout.close()

    def __enter__(self) -> PipeChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("start", type=int)
    p.add_argument("end", type=int)
    opts = p.parse_args(argv)
    serve(opts.model, opts.start, opts.end)


if __name__ == "__main__":
    main()
