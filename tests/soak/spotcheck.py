"""How soon spot-checks at the default rate find a lying node, and that they never accuse
honest ones: the detection figures of issue 14.

    python tests/soak/spotcheck.py               # 5 trials per case -> results/spotcheck.json
    python tests/soak/spotcheck.py --trials 2

Each trial is a fresh swarm: a coordinator with ``--replicas N`` and N nodes that each hold
a tiny 4-block model (one hop: the head), one of them a liar; a client with the default
check rate generates greedily in sessions of 50 steps (49 new tokens each), and measured
is how many tokens the swarm generated from the moment the liar started lying until it was
excluded (counted up to the check point that excluded it). The cases:

- ``always``: ``perturb:0.1`` (noise of 10% of each output row's RMS on every step), from
  the start: a new node, which routes ask clients to follow always (its probation).
  Target: excluded before 200 tokens.
- ``trusted, then always``: the same lie from ``AFTER`` seconds on, once the liar has
  passed probation: clients follow it at their own rate (the default) from then on.
- ``10% of steps``: ``perturb:0.1:0.1``, from the start. Target: before 2,000 tokens.
- ``clean``: 100 sessions on N honest nodes: no one excluded.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the swarm helpers

from soak.common import save  # noqa: E402
from swarm import Swarm, wait_until  # noqa: E402
from test_spotchecks import PROMPT, STEPS, save_tiny_model  # noqa: E402
from test_swarm import STEADY  # noqa: E402

from nanoshard import Client  # noqa: E402
from nanoshard.client.checks import DEFAULT_CHECK_RATE  # noqa: E402
from nanoshard.coordinator.trust import PROBATION_PASSES  # noqa: E402

TOKENS = STEPS - 1  # per session
AFTER_S = 40.0  # the trusted liar's lie starts this long after it started
CASES = {
    "always": ("perturb:0.1", 2000),
    "trusted, then always": (f"perturb:0.1:1:{AFTER_S:g}", 2000),
    "10% of steps": ("perturb:0.1:0.1", 4000),
}


def swarm_of(swarm: Swarm, model: Path, nodes: int, fault: str | None) -> tuple[str, float]:
    """The coordinator's address, and a time by which the last node (the liar, with a
    ``fault``) had started: its fault's clock started before it listened."""
    _, address = swarm.coordinator("--model", str(model), "--replicas", str(nodes), *STEADY)
    for i in range(nodes):
        liar = fault is not None and i == nodes - 1
        env = {"NANOSHARD_FAULT": fault} if liar else None
        name = "liar" if liar else f"honest-{i}"
        last = swarm.join("--coordinator", address, "--name", name, env=env)
    last.wait_for(re.compile(r"joined the swarm at"), timeout=120)
    return address, time.monotonic()


def nodes_of(client: Client) -> dict[str, dict]:
    return {n["name"]: n for n in client.status()["nodes"]}


def liar_trial(model: Path, replicas: int, case: str, seed: int) -> dict:
    fault, cap = CASES[case]
    with Swarm() as swarm:
        address, started = swarm_of(swarm, model, replicas, fault)
        with Client(address, check_seed=seed) as client:
            wait_until(
                f"{replicas} replicas of every unit",
                lambda: all(u["replicas"] == replicas for u in client.status()["units"]),
                timeout=120,
            )
            lying_from = started
            if case.startswith("trusted"):  # honest traffic until its lie has started
                while time.monotonic() < started + AFTER_S:
                    client.generate(PROMPT, TOKENS, temperature=0)
                lying_from = time.monotonic()
            passed = nodes_of(client)["liar"]["checks"]["passed"]
            tokens = 0
            while tokens < cap:
                client.generate(PROMPT, TOKENS, temperature=0)
                checks = client.wait_for_checks()
                found = [c for c in checks if c.excluded]
                if found:
                    at = found[0].pos + found[0].tokens - len(PROMPT) + 1
                    tokens += max(at, 1)
                    break
                tokens += TOKENS
            nodes = nodes_of(client)
    return {
        "seed": seed,
        "excluded_after_tokens": tokens if nodes["liar"]["excluded"] else None,
        "liar_passed_checks_before": passed,
        "lying_from_s": round(lying_from - started, 1),  # since the liar listened
        "honest_excluded": sum(1 for n, v in nodes.items() if n != "liar" and v["excluded"]),
    }


def clean_trial(model: Path, replicas: int, sessions: int) -> dict:
    with Swarm() as swarm:
        address, _ = swarm_of(swarm, model, replicas, None)
        with Client(address) as client:
            wait_until(
                f"{replicas} replicas of every unit",
                lambda: all(u["replicas"] == replicas for u in client.status()["units"]),
                timeout=120,
            )
            for _ in range(sessions):
                client.generate(PROMPT, TOKENS, temperature=0)
            checks = client.wait_for_checks()
            nodes = nodes_of(client)
    return {
        "sessions": sessions,
        "check_points": len(checks),
        "positions_compared": sum(c.positions for c in checks),
        "disagreements": sum(not c.agree for c in checks),
        "excluded": [n for n, v in nodes.items() if v["excluded"]],
        "worst_distance_over_tolerance": max(
            (d / c.tolerance for c in checks for d in c.distances.values()), default=0.0
        ),
    }


def summary(trials: list[dict], target: int) -> dict:
    found = [t["excluded_after_tokens"] for t in trials if t["excluded_after_tokens"]]
    return {
        "excluded": f"{len(found)} of {len(trials)}",
        "within_target": sum(t <= target for t in found),
        "target_tokens": target,
        "median_tokens": statistics.median(found) if found else None,
        "max_tokens": max(found) if found else None,
        "honest_excluded": sum(t["honest_excluded"] for t in trials),
        "trials": trials,
    }


def run(trials: int, clean_sessions: int) -> dict:
    targets = {"always": 200, "trusted, then always": 200, "10% of steps": 2000}
    out: dict = {"check_rate": DEFAULT_CHECK_RATE, "probation_passes": PROBATION_PASSES}
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_model(Path(tmp))
        for replicas in (3, 2):
            cases = {
                case: summary(
                    [liar_trial(model, replicas, case, seed) for seed in range(trials)],
                    targets[case],
                )
                for case in CASES
            }
            cases["clean"] = clean_trial(model, replicas, clean_sessions)
            out[f"replicas_{replicas}"] = cases
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=5, help="trials per case and swarm size")
    p.add_argument("--clean-sessions", type=int, default=100)
    args = p.parse_args()
    save("spotcheck", run(args.trials, args.clean_sessions))


if __name__ == "__main__":
    main()
