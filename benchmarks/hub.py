"""Coordinator start-up: a Hugging Face hub id from the local hub cache against the same
checkpoint given as a path.

    python benchmarks/hub.py           # ~1-2 min; writes benchmarks/results/hub.{json,md}
    python benchmarks/hub.py --quick   # one round each

GPT-2 124M's shape (random weights as a Hugging Face directory, made once under
``.cache/bench``) is laid out in a hub cache under ``.cache/bench/hub-cache`` exactly as
``huggingface_hub`` writes a download (:func:`nanoshard.hub.add_to_cache`), as the repo
``nanoshard-bench/gpt2-124m``. Each round starts ``nanoshard coordinator --model ID`` with
``HF_HUB_OFFLINE=1 HF_HUB_CACHE=...`` and ``nanoshard coordinator --model PATH``, in turn
(the order alternating), and takes the wall time from ``Popen`` to its "listening on"
line: imports, resolving the model, opening it and hashing every tensor into the manifest.
A first round of each warms the page cache and is not counted. Target: the hub id takes
at most 1.2 × the path's time (the median of each round's ratio, the two starts of a round
back to back). This shared machine's load swings single starts by seconds, so the hub
id's own cost is also measured alone: a fresh process importing ``huggingface_hub`` and
resolving the id offline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    BENCH_CACHE,
    GPT2_124M,
    RESULTS,
    machine_info,
    markdown_table,
    raise_on_sigterm,
    random_checkpoint,
    save_results,
)
from join import Child

from nanoshard import hub
from nanoshard.cliutil import listening_pattern

BIN = Path(sys.executable).parent
LISTENING = listening_pattern()
REPO = "nanoshard-bench/gpt2-124m"
TARGET = 1.2


def start_once(model: str, state: Path, timeout_s: float) -> float:
    """Seconds from Popen to the coordinator's "listening on" line; then it is stopped."""
    child = Child(
        [
            str(BIN / "nanoshard"),
            "coordinator",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-mdns",
            "--state-dir",
            str(state),
        ]
    )
    try:
        at, _ = child.wait_for(LISTENING, timeout_s)
        return at
    finally:
        child.stop()


RESOLVE = """
import time
t0 = time.perf_counter()
from nanoshard.checkpoint import resolve_model
t1 = time.perf_counter()
resolve_model({repo!r})
print(t1 - t0, time.perf_counter() - t1)
"""


def resolve_once() -> float:
    """Seconds a fresh process takes to resolve the hub id offline (huggingface_hub's
    imports included), after nanoshard.checkpoint is imported: the hub id's own cost."""
    done = subprocess.run(
        [sys.executable, "-c", RESOLVE.format(repo=REPO)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.split()[1])


def measure(opts: argparse.Namespace) -> dict:
    path = Path(opts.model or random_checkpoint(GPT2_124M, BENCH_CACHE / "gpt2-124m-random"))
    cache = opts.hub_cache
    snapshot = hub.add_to_cache(path, REPO, cache)
    # both runs under the same environment (the children inherit it)
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    runs: dict[str, list[float]] = {"hub id": [], "path": []}
    ratios: list[float] = []
    with tempfile.TemporaryDirectory() as state:
        for round_ in range(opts.rounds + 1):  # round 0: warm-up, not counted
            order = [("hub id", REPO), ("path", str(path))]
            this = {}
            for name, model in order if round_ % 2 == 0 else order[::-1]:
                this[name] = start_once(model, Path(state), opts.timeout)
                print(f"round {round_} {name}: {this[name]:.2f} s", flush=True)
                if round_ > 0:
                    runs[name].append(round(this[name], 3))
            if round_ > 0:
                ratios.append(round(this["hub id"] / this["path"], 3))
    resolve = [round(resolve_once(), 4) for _ in range(opts.rounds)]
    medians = {name: statistics.median(times) for name, times in runs.items()}
    ratio = statistics.median(ratios)
    return {
        "model": str(path),
        "repo": REPO,
        "snapshot": str(snapshot),
        "nbytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "runs": runs,
        "median_s": {k: round(v, 3) for k, v in medians.items()},
        "ratios": ratios,
        "ratio": round(ratio, 3),
        "resolve_s": resolve,
        "target": TARGET,
        "met": ratio <= TARGET,
    }


def render_markdown(result: dict) -> str:
    m = result["machine"]
    rows = [
        [
            name,
            result["median_s"][name],
            ", ".join(f"{t:.2f}" for t in result["runs"][name]),
        ]
        for name in ("path", "hub id")
    ]
    verdict = "met" if result["met"] else "missed"
    return (
        "# Coordinator start-up: hub id against path\n\n"
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}, load "
        f"{m['load_average_start']} -> {m['load_average_end']}. GPT-2 124M shape "
        f"({result['nbytes'] / 1e6:.0f} MB), `HF_HUB_OFFLINE=1`, from `Popen` to "
        '"listening on".\n\n'
        + markdown_table(["--model", "median s", "each round, s"], rows)
        + f"\n\nhub id / path, round by round: {', '.join(map(str, result['ratios']))}; "
        f"median **{result['ratio']:.3f} ×** (target ≤ {result['target']} ×: {verdict}).\n\n"
        "What the hub id itself costs (a fresh process importing huggingface_hub and "
        "resolving the id offline, median of "
        f"{len(result['resolve_s'])}): {statistics.median(result['resolve_s']) * 1000:.0f} ms.\n"
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one counted round each")
    p.add_argument("--rounds", type=int, default=None, help="counted rounds (default 7)")
    p.add_argument("--model", help="a Hugging Face GPT-2 directory (default: random 124M)")
    p.add_argument(
        "--hub-cache",
        type=Path,
        default=BENCH_CACHE / "hub-cache",
        help="the hub cache to lay the model out in (default .cache/bench/hub-cache)",
    )
    p.add_argument("--timeout", type=float, default=180.0, help="seconds a start may take")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for hub.json and hub.md")
    opts = p.parse_args(argv)
    opts.rounds = opts.rounds or (1 if opts.quick else 7)
    raise_on_sigterm()
    started = time.perf_counter()
    result: dict = {"machine": machine_info()}
    result.update(measure(opts))
    return save_results(result, started, opts.out, "hub", render_markdown)


if __name__ == "__main__":
    main()
