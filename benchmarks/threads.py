"""The nodes' thread policy on one machine: a 3-node chain and its client sharing the cores,
for each policy one session's decode ms/token and ``--sessions`` concurrent sessions'
tokens/s; the local path (this process, default threads) runs in the same rotation.

    python benchmarks/threads.py            # ~10 min on 2 busy cores; writes results/threads.{json,md}
    python benchmarks/threads.py --quick

Policies: torch's default (a thread per core, OpenMP threads spinning after each parallel
region: what nodes did before ``nanoshard.threads``), the new default (a thread per core,
passive waits), and one thread per node with passive and with spinning waits (what the
benchmarks used to pass). "Spinning" is libgomp's own default, reached by giving
``OMP_WAIT_POLICY`` a value it ignores. Nodes are ``nanoshard-node serve`` with default
flags otherwise (batching on); every policy's three nodes run at once, rounds rotate.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

# isort: off
import nanoshard.threads  # noqa: F401  before torch: the nodes' thread policy (see there)

# isort: on
import torch
from common import (
    RESULTS,
    NodeProcess,
    even_splits,
    machine_info,
    markdown_table,
    median,
    raise_on_sigterm,
    run_chain,
    run_local,
    save_results,
    speed_model,
    spread,
)
from concurrency import run_sessions

from nanoshard.checkpoint import open_checkpoint
from nanoshard.client.route import route_from_addresses

SPIN = {"OMP_WAIT_POLICY": "spin"}  # not a value libgomp knows: its default, spinning
POLICIES = {  # name -> (--threads or None for the default, environment of the node)
    "torch's default: a thread per core, spinning (before)": (None, SPIN),
    "a thread per core, passive (the default)": (None, {}),
    "a thread per core, spinning 0.2 ms then passive": (None, {"GOMP_SPINCOUNT": "20000"}),
    "1 thread, passive": (1, {}),
    "1 thread, spinning (the benchmarks before)": (1, SPIN),
}


def start(model: str, splits: list[tuple[int, int]], threads: int | None, env: dict) -> list:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        flags = ["--threads", str(threads)] if threads is not None else []  # policies compared
        return [NodeProcess(model, units, flags) for units in splits]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def measure(opts: argparse.Namespace) -> dict:
    ckpt = open_checkpoint(opts.model)
    config = ckpt.config
    stage = ckpt.load_stage(0, config.n_units)
    splits = even_splits(config.n_units, 3)
    procs = {name: start(opts.model, splits, t, env) for name, (t, env) in POLICIES.items()}
    try:
        addresses = {name: [p.wait_listening() for p in ps] for name, ps in procs.items()}
        routes = {name: route_from_addresses(a) for name, a in addresses.items()}  # all loaded
        ids = list(range(100, 132))
        gen = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(0, config.vocab_size, (16,), generator=gen).tolist()
            for _ in range(opts.sessions)
        ]
        names = list(POLICIES)
        for name in names:  # warm-up
            run_chain(routes[name], ids, 4, "fp32", config.block_size)
        run_local(stage, ids, 4)
        one: dict[str, list[float]] = {n: [] for n in names}
        many: dict[str, list[float]] = {n: [] for n in names}
        local: list[float] = []
        for r in range(opts.repeats):
            local.append(median(run_local(stage, ids, opts.tokens).decode_ms))
            for name in names[r % len(names) :] + names[: r % len(names)]:
                gen_ = run_chain(routes[name], ids, opts.tokens, "fp32", config.block_size)
                one[name].append(median(gen_.decode_ms))
                run = run_sessions(routes[name], prompts, opts.tokens, 16 + opts.tokens)
                many[name].append(run.tokens_per_s)
    finally:
        for ps in procs.values():
            for p in ps:
                p.terminate()
        for ps in procs.values():
            for p in ps:
                p.stop()
    rows = [
        {
            "policy": name,
            "threads": POLICIES[name][0] or 0,
            "environment": POLICIES[name][1],
            "ms_per_token": round(median(one[name]), 2),
            "ms_per_token_repeats": spread(one[name]),
            "tokens_per_s": round(median(many[name]), 2),
            "tokens_per_s_repeats": spread(many[name]),
        }
        for name in names
    ]
    return {
        "model": opts.model,
        "units": [list(u) for u in splits],
        "sessions": opts.sessions,
        "tokens": opts.tokens,
        "repeats": opts.repeats,
        "local_ms_per_token": round(median(local), 2),
        "local_repeats": spread(local),
        "rows": rows,
    }


def render_markdown(result: dict) -> str:
    m, t = result["machine"], result["threads"]
    rows = [
        [r["policy"], r["ms_per_token"], r["ms_per_token_repeats"], r["tokens_per_s"],
         r["tokens_per_s_repeats"]]
        for r in t["rows"]
    ]  # fmt: skip
    header = ["nodes' policy", "1 session ms/token", "[min, max]", f"{t['sessions']} sessions "
              "tokens/s", "[min, max]"]  # fmt: skip
    return "\n".join(
        [
            "# Threads: several nodes on one machine",
            "",
            f"{m['cpu']}, {m['cores']} cores (shared), load {m['load_average_start']} -> "
            f"{m['load_average_end']}, {m['runtime_s']} s. Three nodes {t['units']} and the "
            f"client, greedy, {t['tokens']} decode tokens, median of {t['repeats']} rotated "
            f"rounds. The local path in this process (default threads): "
            f"{t['local_ms_per_token']} ms/token {t['local_repeats']}.",
            "",
            markdown_table(header, rows),
            "",
            "Command: `python benchmarks/threads.py`.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=8, help="concurrent sessions (default 8)")
    p.add_argument("--tokens", type=int, help="decode tokens per run (default 24; quick 4)")
    p.add_argument("--repeats", type=int, help="rotated rounds (default 3; quick 1)")
    p.add_argument("--quick", action="store_true", help="one round of a few tokens")
    p.add_argument("--model", help="checkpoint (default: random GPT-2 124M, made once)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for threads.{json,md}")
    opts = p.parse_args(argv)
    opts.tokens = opts.tokens or (4 if opts.quick else 24)
    opts.repeats = opts.repeats or (1 if opts.quick else 3)
    opts.model = speed_model(opts.model)
    raise_on_sigterm()
    started = time.perf_counter()
    result: dict = {"machine": machine_info()}
    result["threads"] = measure(opts)
    return save_results(result, started, opts.out, "threads", render_markdown)


if __name__ == "__main__":
    main()
