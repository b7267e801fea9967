"""How soon spot-checks find a perturbing node, and that they never accuse honest ones.

    python tests/soak/spotcheck.py               # 20 trials with a liar, 20 clean ones,
                                                 # with 3 replicas and with 2
    python tests/soak/spotcheck.py --trials 5

Each trial is a fresh swarm: a coordinator with ``--replicas N`` and N nodes that each hold
a tiny 4-block model, one of them started with ``NANOSHARD_FAULT=perturb:0.1`` (noise of
10% of each output row's RMS) in the liar trials. Either way the coordinator excludes the
liar only on its own signed output, which the coordinator's re-run of the disputed step
contradicts (with three nodes the liar may also be caught as a replica). A client with ``check_rate=0.1`` and the trial's seed generates greedily in runs of
50 steps, up to four; measured is the step whose check got the liar excluded. A clean trial
is one 50-step run on N honest nodes: nobody may be excluded. Results go to
``tests/soak/results/spotcheck.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the swarm helpers

from soak.common import save  # noqa: E402
from swarm import Swarm  # noqa: E402
from test_spotchecks import (  # noqa: E402
    PROMPT,
    STEPS,
    run_checked,
    save_tiny_model,
    whole_model_swarm,
)

MAX_RUNS = 4  # 200 steps at most per liar trial


def step_of(pos: int, run: int) -> int:
    """The step (1-based, over the trial's runs) a check at position ``pos`` checked."""
    return run * STEPS + (1 if pos == 0 else pos - len(PROMPT) + 2)


def liar_trial(model: Path, replicas: int, seed: int) -> dict:
    with Swarm() as swarm:
        address = whole_model_swarm(swarm, model, replicas, liar=True)
        earlier = 0  # checks of the runs before
        for run in range(MAX_RUNS):
            checks, nodes = run_checked(address, replicas, seed=seed * 100 + run)
            found = [c for c in checks if c.excluded]
            if found:
                honest_out = [n for name, n in nodes.items() if name != "liar" and n["excluded"]]
                return {
                    "seed": seed,
                    "excluded_at_step": step_of(found[0].pos, run),
                    "checks_until_then": earlier + checks.index(found[0]) + 1,
                    "reason": nodes["liar"]["excluded"],
                    "honest_excluded": len(honest_out),
                }
            earlier += len(checks)
        return {"seed": seed, "excluded_at_step": None, "honest_excluded": 0}


def clean_trial(model: Path, replicas: int, seed: int) -> dict:
    with Swarm() as swarm:
        address = whole_model_swarm(swarm, model, replicas, liar=False)
        checks, nodes = run_checked(address, replicas, seed=seed)
        return {
            "seed": seed,
            "checks": len(checks),
            "disagreements": sum(not c.agree for c in checks),
            "excluded": [n for n in nodes if nodes[n]["excluded"]],
            "worst_distance_over_tolerance": max(
                (d / c.tolerance for c in checks for d in c.distances.values()), default=0.0
            ),
        }


def run(trials: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_model(Path(tmp))
        return {f"replicas_{n}": run_with(model, n, trials) for n in (3, 2)}


def run_with(model: Path, replicas: int, trials: int) -> dict:
    liars = [liar_trial(model, replicas, seed) for seed in range(trials)]
    cleans = [clean_trial(model, replicas, 1000 + seed) for seed in range(trials)]
    steps = [t["excluded_at_step"] for t in liars if t["excluded_at_step"] is not None]
    return {
        "replicas": replicas,
        "trials": trials,
        "check_rate": 0.1,
        "fault": "perturb:0.1",
        "liar": {
            "excluded": len(steps),
            "within_50_steps": sum(s <= 50 for s in steps),
            "median_step": statistics.median(steps) if steps else None,
            "max_step": max(steps) if steps else None,
            "honest_excluded": sum(t["honest_excluded"] for t in liars),
            "trials": liars,
        },
        "clean": {
            "checks": sum(t["checks"] for t in cleans),
            "disagreements": sum(t["disagreements"] for t in cleans),
            "excluded": sum(len(t["excluded"]) for t in cleans),
            "worst_distance_over_tolerance": max(
                t["worst_distance_over_tolerance"] for t in cleans
            ),
            "trials": cleans,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20)
    args = p.parse_args()
    save("spotcheck", run(args.trials))


if __name__ == "__main__":
    main()
