"""Abandoned sessions cost nothing for long: open many, never close them, wait out the TTL.

    python tests/soak/leak.py                 # 1,000 sessions
    python tests/soak/leak.py --sessions 200

A node serving the whole demo model with a short session TTL (10 s: longer than opening
them all takes); each session is opened with 64 positions reserved and fed a 16-token
prefill, then dropped without Close. The node's own account (``Info``: sessions, KV bytes reserved) must show them all, then, once
the TTL has passed, none; its RSS is read at each point. Results go to
``tests/soak/results/leak.json``.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the swarm helpers

from soak.common import rss_mb, save  # noqa: E402
from swarm import Swarm  # noqa: E402

from nanoshard.v1 import node_pb2 as pb  # noqa: E402
from nanoshard.v1 import node_pb2_grpc as pb_grpc  # noqa: E402


def abandon(stub: pb_grpc.NodeStub) -> None:
    spec = pb.SessionSpec(session_id=secrets.token_bytes(16), max_length=64, codec="fp32")
    stub.Open(pb.OpenRequest(spec=spec), timeout=30)
    step = pb.StepRequest(
        session_id=spec.session_id, step_id=1, pos=0, tokens=pb.Tokens(ids=[5] * 16), sample=True
    )
    stub.Step(step, timeout=30)


def run(sessions: int, ttl_s: float = 10.0) -> dict:
    with Swarm() as swarm:
        (address,) = swarm.chain("demo", ["0:8"], "--session-ttl", str(ttl_s))
        pid = swarm.procs[-1].popen.pid
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.NodeStub(channel)
            abandon(stub)  # warm: first-call allocations are not a leak
            deadline = time.monotonic() + ttl_s * 4 + 10
            while stub.Info(pb.InfoRequest(), timeout=10).sessions and time.monotonic() < deadline:
                time.sleep(0.2)  # until the warm-up session has expired too ...
            time.sleep(ttl_s / 4 + 0.5)  # ... and the memory release at the next expiry tick
            baseline = rss_mb(pid)
            started = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda _: abandon(stub), range(sessions)))
            opened_s = time.perf_counter() - started
            full = stub.Info(pb.InfoRequest(), timeout=10)
            peak = rss_mb(pid)
            deadline = time.monotonic() + ttl_s * 4 + 10
            info = full
            while time.monotonic() < deadline:
                time.sleep(0.5)
                info = stub.Info(pb.InfoRequest(), timeout=10)
                if info.sessions == 0:
                    break
            freed_after_s = time.perf_counter() - started - opened_s
            time.sleep(1)
            after = rss_mb(pid)
    return {
        "sessions": sessions,
        "ttl_s": ttl_s,
        "open_seconds": round(opened_s, 1),
        "held_sessions": full.sessions,
        "held_kv_bytes": full.kv_bytes_used,
        "sessions_after_ttl": info.sessions,
        "kv_bytes_after_ttl": info.kv_bytes_used,
        "freed_within_s": round(freed_after_s, 1),
        "rss_mb": {
            "baseline": round(baseline, 1),
            "peak": round(peak, 1),
            "after": round(after, 1),
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--ttl", type=float, default=10.0, help="the node's session TTL, seconds")
    args = p.parse_args()
    result = run(args.sessions, args.ttl)
    save("leak", result)


if __name__ == "__main__":
    main()
