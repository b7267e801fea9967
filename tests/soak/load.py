"""Many clients at once on a three-node swarm: nothing fails, and what it costs.

    python tests/soak/load.py                      # 32 clients for 60 s
    python tests/soak/load.py --clients 8 --seconds 10

Three ``nanoshard-node serve`` processes split the demo model (0:3, 3:6, 6:8). Each client
is a thread with its own ``Client(route=...)`` streaming greedy generations of 32 tokens
from rotating prompts, one after another, until the time is up (the generation under way
then finishes). Reported: generations and tokens, errors (there must be none), aggregate
tokens/s, and per-token latency (the gap between consecutive streamed tokens) at p50/p99.
Results go to ``tests/soak/results/load.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the swarm helpers

from soak.common import save  # noqa: E402
from swarm import Swarm  # noqa: E402

from nanoshard import Client  # noqa: E402

PROMPTS = ["ROMEO:", "JULIET:", "HAMLET:", "KING LEAR:", "First Citizen:", "PORTIA:"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run(clients: int, seconds: float, tokens: int = 32) -> dict:
    gaps: list[float] = []
    errors: list[str] = []
    counts = {"generations": 0, "tokens": 0}
    lock = threading.Lock()
    with Swarm() as swarm:
        route = swarm.chain("demo", ["0:3", "3:6", "6:8"])
        start = threading.Barrier(clients + 1)
        go = threading.Event()  # set once the end time is known
        stop_at: list[float] = []

        def client(i: int) -> None:
            try:
                with Client(route=route, timeout_s=60) as c:
                    start.wait()
                    go.wait()
                    n = 0
                    while time.monotonic() < stop_at[0]:
                        last = time.perf_counter()
                        mine: list[float] = []
                        got = 0
                        prompt = PROMPTS[(i + n) % len(PROMPTS)]
                        for _ in c.stream(prompt, tokens, temperature=0):
                            now = time.perf_counter()
                            if got:
                                mine.append((now - last) * 1e3)
                            last, got = now, got + 1
                        n += 1
                        with lock:
                            gaps.extend(mine)
                            counts["generations"] += 1
                            counts["tokens"] += got
            except Exception as exc:  # every failure is counted and shown
                with lock:
                    errors.append(f"client {i}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        start.wait()
        began = time.monotonic()
        stop_at.append(began + seconds)
        go.set()
        for t in threads:
            t.join(timeout=seconds + 300)
        elapsed = time.monotonic() - began
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "generations": counts["generations"],
        "tokens": counts["tokens"],
        "errors": errors,
        "tokens_per_s": round(counts["tokens"] / elapsed, 1),
        "token_latency_ms": {
            "p50": round(percentile(gaps, 0.50), 1),
            "p99": round(percentile(gaps, 0.99), 1),
            "mean": round(statistics.fmean(gaps), 1) if gaps else None,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    args = p.parse_args()
    result = run(args.clients, args.seconds)
    save("load", result)


if __name__ == "__main__":
    main()
