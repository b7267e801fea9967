"""Volunteers and the coordinator killed while clients generate: every generation completes
and equals its fault-free output.

    python tests/soak/chaos.py                         # nodes: 60 s, a kill every 5 s
    python tests/soak/chaos.py --seconds 20
    python tests/soak/chaos.py --scenario coordinator  # the coordinator killed and restarted

``nodes``: a coordinator with ``--replicas 2`` and four volunteers that each hold about half
of the demo model; four clients generate greedily (48 tokens, a prompt each, again and
again); every 5 s, once the swarm is whole again after the last kill, a random volunteer
is SIGKILLed and started again (the same name and cache directory, on a new port).
``coordinator``: the same swarm; the coordinator is SIGKILLed in the middle of the clients'
generations and restarted on the same address a second later; measured is how long until
its status shows every node back and every unit served twice. Every output is compared with
the fault-free one (the same prompt through the swarm before any fault). Results go to
``tests/soak/results/chaos-SCENARIO.json``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the swarm helpers

from soak.common import save  # noqa: E402
from swarm import Swarm  # noqa: E402
from test_failover import DATA_PLANE, FourNodes  # noqa: E402
from test_swarm import HEARTBEAT  # noqa: E402

from nanoshard import Client  # noqa: E402
from nanoshard.client import RetryPolicy  # noqa: E402
from nanoshard.client.swarm import CoordinatorClient  # noqa: E402
from nanoshard.statusview import status_json  # noqa: E402

PROMPTS = ["KING HENRY:\n", "ROMEO:\n", "JULIET:\n", "HAMLET:\n"]
TOKENS = 48
HEARTBEAT_S = float(HEARTBEAT[1])


def whole(coordinator: CoordinatorClient, nodes: int = 4) -> bool:
    try:
        status = status_json(coordinator.status())
    except Exception:  # the coordinator is away, or not answering yet
        return False
    healthy = [n for n in status["nodes"] if n["healthy"]]
    return len(healthy) >= nodes and all(u["replicas"] >= 2 for u in status["units"])


def run(
    scenario: str, seconds: float, kill_every_s: float = 5.0, seed: int = 0, min_kills: int = 0
) -> dict:
    """``min_kills``: in the ``nodes`` scenario, go on past ``seconds`` until that many."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp, Swarm() as swarm:
        four = FourNodes(swarm, Path(tmp))
        with Client(four.address) as client:
            four.ready()
            expected = {p: client.generate(p, TOKENS, temperature=0).token_ids for p in PROMPTS}
        results: list[dict] = []
        lock = threading.Lock()
        stop = threading.Event()

        # While the coordinator is away, a generation that starts waits for it (up to the
        # retry policy's route_wait_s, 20 s by default): here up to 120 s, for the time a
        # restart takes on a loaded machine is no part of what is measured.
        retry = RetryPolicy(route_wait_s=120.0) if scenario == "coordinator" else None

        def generate(i: int) -> None:
            prompt = PROMPTS[i]
            with Client(four.address, retry=retry) as c:
                while not stop.is_set():
                    try:
                        got = c.generate(prompt, TOKENS, temperature=0)
                        row = {"client": i, "ok": True, "equal": got.token_ids == expected[prompt],
                               "recoveries": len(got.recoveries)}  # fmt: skip
                    except Exception as exc:
                        row = {"client": i, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
                    with lock:
                        results.append(row)

        clients = [threading.Thread(target=generate, args=(i,)) for i in range(len(PROMPTS))]
        for t in clients:
            t.start()
        events: list[str] = []
        began = time.monotonic()
        back_s = down_s = None
        try:
            if scenario == "nodes":
                kills = 0
                while time.monotonic() - began < seconds or kills < min_kills:
                    kills += 1  # on a fixed beat: a restart's own time does not stretch it
                    time.sleep(max(0.0, began + kills * kill_every_s - time.monotonic()))
                    # one loss at a time (what replicas promise to survive): the swarm is
                    # whole again, the last victim's successor serving, before the next kill
                    four.ready()
                    victim = rng.choice(sorted(four.nodes))
                    killed = four.nodes.pop(victim)
                    killed.kill()
                    # the same volunteer again: its name and cache (a new port, as after a reboot)
                    again = swarm.start(killed.args)
                    four.nodes[again.wait_for(DATA_PLANE).group(1)] = again
                    events.append(f"{time.monotonic() - began:5.1f} s: killed {victim}, restarted")
            else:
                time.sleep(min(3.0, seconds / 3))
                coordinator = next(p for p in swarm.procs if "coordinator" in p.args)
                port = int(four.address.rsplit(":", 1)[1])
                coordinator.kill()
                killed_at = time.monotonic()
                events.append(f"{killed_at - began:5.1f} s: killed the coordinator")
                time.sleep(1.0)
                swarm.coordinator("--swarm", four.name, "--replicas", "2", *HEARTBEAT, port=port)
                restarted = time.monotonic()
                down_s = round(restarted - killed_at, 2)
                events.append(f"{restarted - began:5.1f} s: restarted it on port {port}")
                watcher = CoordinatorClient(four.address, timeout_s=2)
                while time.monotonic() - restarted < 60:
                    if whole(watcher):
                        back_s = round(time.monotonic() - restarted, 2)
                        break
                    time.sleep(0.1)
                watcher.close()
                time.sleep(max(0.0, began + seconds - time.monotonic()))
        finally:
            stop.set()
            for t in clients:
                t.join(timeout=180)
    failed = [r for r in results if not r["ok"]]
    return {
        "scenario": scenario,
        "seconds": seconds,
        "generations": len(results),
        "completed": sum(r["ok"] for r in results),
        "equal_to_fault_free": sum(r.get("equal", False) for r in results),
        "with_recoveries": sum(r.get("recoveries", 0) > 0 for r in results),
        "errors": [r["error"] for r in failed],
        "events": events,
        "swarm_whole_again_s": back_s,
        "coordinator_down_s": down_s,
        "heartbeat_interval_s": HEARTBEAT_S,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=["nodes", "coordinator"], default="nodes")
    p.add_argument("--seconds", type=float, default=60.0)
    args = p.parse_args()
    result = run(args.scenario, args.seconds)
    save(f"chaos-{args.scenario}", result)


if __name__ == "__main__":
    main()
