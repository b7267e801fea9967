"""The floor of a hop: Python gRPC itself. A minimal grpc.aio bidi-stream echo server in its
own process and a grpc.aio client that sends one message at a time and waits for it to
come back, each message as big as one decode step's activations (n_embd fp32 values), on
127.0.0.1. What nanoshard adds per hop above this round trip is its own cost; the
round trip itself is what any Python gRPC hop pays (two processes, two event loops,
gRPC's C core and its poller threads, loopback TCP).

    python benchmarks/echo.py                 # writes benchmarks/results/echo.{json,md}
    python benchmarks/echo.py --quick
    python benchmarks/echo.py --serve         # only the server: prints "listening on ..."

``hops.py`` measures the same floor interleaved with its chains (``measure_floor``), so the
per-hop figure and the floor see the same machine load; ``suite.py`` shows them side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc

METHOD = "/nanoshard.bench.Echo/Stream"
HOLD = struct.Struct("<f")  # a message's first bytes: how long the server holds it (ms)
HELD = struct.Struct("<d")  # then, in the reply, how long it did (s): not counted
N_EMBD = 768  # GPT-2 124M: one decode step's activations are 768 fp32 values


async def serve() -> None:
    async def stream(requests, context):  # type: ignore[no-untyped-def]
        async for message in requests:
            received = time.perf_counter()
            (hold_ms,) = HOLD.unpack_from(message)
            if hold_ms > 0:  # as a node computes before it answers (and sleeps meanwhile)
                await asyncio.sleep(hold_ms / 1e3)
            held = time.perf_counter() - received
            yield message[: HOLD.size] + HELD.pack(held) + message[HOLD.size + HELD.size :]

    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(stream)  # bytes in, bytes out
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("nanoshard.bench.Echo", {"Stream": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo: listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


class EchoServer:
    """``echo.py --serve`` as a child process, stopped by its PID."""

    def __init__(self) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve"],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.popen.stdout.readline() if self.popen.stdout else ""
        if "listening on" not in line:
            self.close()
            raise RuntimeError(f"the echo server did not start: {line!r}")
        self.address = line.rsplit(" ", 1)[1].strip()

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def round_trips(address: str, n_bytes: int, count: int, hold_ms: float = 0.0) -> list[float]:
    """ms of each of ``count`` round trips of an ``n_bytes`` message on one bidi stream
    (after 20 unmeasured ones: the connection, the stream, first calls), less the time the
    server held it (``hold_ms``: as a hop that computes for that long before answering)."""
    payload = HOLD.pack(hold_ms) + bytes(n_bytes - HOLD.size)
    times = []
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(METHOD)()
        for i in range(count + 20):
            t0 = time.perf_counter()
            await call.write(payload)
            reply = await call.read()
            if len(reply) != n_bytes:
                raise RuntimeError(f"the echo answered {len(reply)} bytes, not {n_bytes}")
            if i >= 20:
                (held_s,) = HELD.unpack_from(reply, HOLD.size)
                times.append((time.perf_counter() - t0 - held_s) * 1e3)
        await call.done_writing()
    return times


def measure_floor(
    address: str, n_embd: int = N_EMBD, count: int = 200, hold_ms: float = 0.0
) -> list[float]:
    """Round trips (ms) of n_embd fp32 values each way, through the server at ``address``,
    the server's hold of ``hold_ms`` taken out. Held, both processes sleep between a
    message and its answer, as on a hop; waking costs more than back-to-back calls do."""
    return asyncio.run(round_trips(address, 4 * n_embd, count, hold_ms))


def render_markdown(result: dict) -> str:
    m, e = result["machine"], result["echo"]
    return (
        "# gRPC echo floor\n\n"
        f"{m['cpu']}, {m['cores']} cores (shared), load {m['load_average_start']} -> "
        f"{m['load_average_end']}. A grpc.aio bidi-stream echo (server in its own process) "
        f"on 127.0.0.1, {e['bytes']}-byte messages ({e['n_embd']} fp32 values), one at a time: "
        f"**{e['round_trip_ms']:.3f} ms** per round trip (median of {e['count']} x "
        f"{e['repeats']}; p10 {e['p10_ms']:.3f}, p90 {e['p90_ms']:.3f}; per repeat "
        f"{e['per_repeat_ms']}).\n\n"
        f"Held: the server holds each message {e['hold_ms']:g} ms before answering (asleep, as "
        "a node waits for its compute), that time taken out: "
        f"**{e['held_round_trip_ms']:.3f} ms** (per repeat {e['held_per_repeat_ms']}). "
        "Both processes sleep between a message and its answer, as on a hop, and waking up "
        "costs more than calls back to back do.\n"
    )


def main(argv: list[str] | None = None) -> dict:
    # Imported here, not above: the --serve child needs neither torch nor nanoshard.
    from common import RESULTS, load_average, machine_info, save_results

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", action="store_true", help="run only the echo server")
    p.add_argument("--quick", action="store_true", help="one repeat of 100 round trips")
    p.add_argument("--n-embd", type=int, default=N_EMBD, help="values per message (768)")
    p.add_argument("--hold-ms", type=float, default=20.0, help="the held echo's hold (20)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for echo.{json,md}")
    opts = p.parse_args(argv)
    if opts.serve:
        asyncio.run(serve())
        return {}
    started = time.perf_counter()
    result: dict = {"machine": machine_info(threads=0)}
    repeats, count = (1, 100) if opts.quick else (5, 400)
    samples: list[list[float]] = []
    held: list[list[float]] = []
    with EchoServer() as server:
        for _ in range(repeats):
            samples.append(measure_floor(server.address, opts.n_embd, count))
            held.append(measure_floor(server.address, opts.n_embd, count // 4, opts.hold_ms))
    every = sorted(t for s in samples for t in s)
    result["echo"] = {
        "n_embd": opts.n_embd,
        "bytes": 4 * opts.n_embd,
        "count": count,
        "repeats": repeats,
        "round_trip_ms": round(statistics.median(every), 4),
        "p10_ms": round(every[len(every) // 10], 4),
        "p90_ms": round(every[9 * len(every) // 10], 4),
        "per_repeat_ms": [round(statistics.median(s), 3) for s in samples],
        "hold_ms": opts.hold_ms,
        "held_round_trip_ms": round(statistics.median([t for s in held for t in s]), 4),
        "held_per_repeat_ms": [round(statistics.median(s), 3) for s in held],
        "load_average": load_average(),
    }
    return save_results(result, started, opts.out, "echo", render_markdown)


if __name__ == "__main__":
    main()
