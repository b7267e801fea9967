"""Concurrent sessions on one chain: aggregate tokens/s and per-token latency, with the
nodes batching decode steps (the default) and without (``nanoshard-node serve --batch 1``).

    python benchmarks/concurrency.py           # ~3 min on 2 busy cores; writes
                                               # benchmarks/results/concurrency.{json,md}
    python benchmarks/concurrency.py --quick   # one repeat, few tokens: checks the script runs

A chain of three ``nanoshard-node serve`` processes on 127.0.0.1 (default flags) splits
``--model`` (default GPT-2 124M's shape with random weights, made once under
``.cache/bench/gpt2-124m-random``) evenly; one chain runs as started by default (batches of
up to 16), one with ``--batch 1``.
Each configuration (batching on/off x 1 or ``--sessions`` concurrent sessions) opens its
sessions from threads of this process, prefills a ``--prompt-tokens`` prompt (a different
one per session), waits until every session has, then decodes ``--tokens`` greedy tokens in
each, all at once. Only that decode window counts: ``tokens_per_s`` is all sessions'
decode tokens over the window's wall time, latency the client's wall time of each decode
step (p50/p99 over every step of every session and repeat). Configurations run
interleaved in a rotated order, ``--repeats`` times; the median repeat is reported and
[min, max] shows the machine's noise.

A batched step gives each session exactly what it gets alone (``Stage.decode``), so
``same_tokens``, the sessions whose greedy tokens equal those the same prompt produced on
the unbatched chain, should be all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# isort: off
import nanoshard.threads  # noqa: F401  before torch: the nodes' thread policy (see there)

# isort: on
import torch
from common import (
    GREEDY,
    RESULTS,
    Nodes,
    even_splits,
    machine_info,
    markdown_table,
    median,
    raise_on_sigterm,
    save_results,
    speed_model,
    spread,
)

from nanoshard.checkpoint import open_checkpoint
from nanoshard.client.route import Route, route_from_addresses
from nanoshard.client.session import RetryPolicy, SwarmSession
from nanoshard.engine import Stage
from nanoshard.hop import Channels
from nanoshard.node.worker import MAX_BATCH

BATCH = MAX_BATCH  # the nodes' default
STAGES = 3
DEFINITIONS = {
    "tokens_per_s": "decode tokens of all sessions / wall time of the decode window",
    "speedup": "tokens_per_s / tokens_per_s of one session on the same chain",
    "p50_ms, p99_ms": "client wall time of one decode step, over every step of every session",
    "mean_batch": "mean over decode steps and hops of the trace's batch (steps per forward)",
    "same_tokens": "sessions whose tokens equal the same prompt's alone on the unbatched chain",
}


@dataclass(frozen=True)
class Config:
    batch: bool
    sessions: int

    @property
    def name(self) -> str:
        return f"{self.sessions} session{'s' if self.sessions > 1 else ''}, " + (
            f"batching (default, {BATCH})" if self.batch else "--batch 1"
        )


@dataclass
class Run:
    tokens_per_s: float
    step_ms: list[float]  # every decode step of every session
    batches: list[int]  # the trace's batch, per decode step per hop
    tokens: list[list[int]]  # per session: the prefill's token, then every decode token


def run_sessions(route: Route, prompts: list[list[int]], tokens: int, max_length: int) -> Run:
    """Open one session per prompt (each an asyncio task of one client loop, as a gateway
    would hold them), prefill all, then decode ``tokens`` greedy tokens in every one at once."""
    n = len(prompts)
    step_ms: list[list[float]] = [[] for _ in range(n)]
    batches: list[list[int]] = [[] for _ in range(n)]
    out: list[list[int]] = [[] for _ in range(n)]

    async def main() -> float:
        channels = Channels()
        sessions = [
            SwarmSession(channels, route, GREEDY, max_length, retry=RetryPolicy(attempts=0))
            for _ in range(n)
        ]
        try:
            for session in sessions:
                await session.open()
            for s, session in enumerate(sessions):
                out[s].append((await session.step(prompts[s], 0)).token)

            async def decode(s: int) -> None:
                ids = prompts[s]
                for k in range(tokens):
                    t0 = time.perf_counter()
                    result = await sessions[s].step([out[s][-1]], len(ids) + k)
                    step_ms[s].append((time.perf_counter() - t0) * 1e3)
                    batches[s].extend(h["batch"] for h in result.hops)
                    out[s].append(result.token)

            started = time.perf_counter()
            await asyncio.gather(*(decode(s) for s in range(n)))
            return time.perf_counter() - started
        finally:
            for session in sessions:
                await session.close()
            await channels.close()

    wall = asyncio.run(main())
    return Run(
        tokens_per_s=n * tokens / wall,
        step_ms=[ms for steps in step_ms for ms in steps],
        batches=[b for bs in batches for b in bs],
        tokens=out,
    )


def run_ceiling(stage: Stage, prompts: list[list[int]], tokens: int, max_length: int) -> Run:
    """The ceiling: the same sessions decoded in this process, each step one batched forward
    of the whole model (``Stage.decode``, as the nodes batch), no gRPC, no hops."""
    caches = [stage.new_cache(max_length) for _ in prompts]
    with torch.inference_mode():
        out = [
            [int(stage(torch.tensor(p), c, 0)[-1].argmax())]
            for p, c in zip(prompts, caches, strict=True)
        ]
        started = time.perf_counter()
        for k in range(tokens):
            x = torch.tensor([o[-1] for o in out])
            logits = stage.decode(x, caches, [len(p) + k for p in prompts])
            for o, token in zip(out, logits.argmax(dim=-1).tolist(), strict=True):
                o.append(token)
        wall = time.perf_counter() - started
    return Run(len(prompts) * tokens / wall, [], [len(prompts)], out)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def measure(opts: argparse.Namespace, nodes: Nodes) -> dict:
    ckpt = open_checkpoint(opts.model)
    config = ckpt.config
    if opts.prompt_tokens + opts.tokens + 1 > config.block_size:
        raise SystemExit(f"--prompt-tokens + --tokens must stay below {config.block_size}")
    splits = even_splits(config.n_units, STAGES)
    flags = {False: ("--batch", "1"), True: ()}
    for extra in flags.values():  # every node loads at once
        nodes.start(opts.model, splits, extra)
    routes = {b: route_from_addresses(nodes.chain(opts.model, splits, e)) for b, e in flags.items()}
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, config.vocab_size, (opts.prompt_tokens,), generator=gen).tolist()
        for _ in range(opts.sessions)
    ]
    max_length = opts.prompt_tokens + opts.tokens
    configs = [Config(b, n) for b in (False, True) for n in (1, opts.sessions)]

    def run(c: Config, tokens: int) -> Run:
        return run_sessions(routes[c.batch], prompts[: c.sessions], tokens, max_length)

    stage = ckpt.load_stage(0, config.n_units)  # the whole model here, for the ceiling
    ceiling: list[Run] = []
    for c in configs:  # warm-up: first calls, channels, allocator
        run(c, min(4, opts.tokens))
    run_ceiling(stage, prompts, min(4, opts.tokens), max_length)
    runs: dict[Config, list[Run]] = {c: [] for c in configs}
    for r in range(opts.repeats):
        shift = r % len(configs)  # rotate the order so no configuration always runs first
        for c in configs[shift:] + configs[:shift]:
            runs[c].append(run(c, opts.tokens))
        ceiling.append(run_ceiling(stage, prompts, opts.tokens, max_length))

    alone = runs[Config(False, opts.sessions)][0].tokens  # each prompt on the unbatched chain
    rows: list[dict[str, Any]] = []
    for c in configs:
        rates = [r.tokens_per_s for r in runs[c]]
        single = median([r.tokens_per_s for r in runs[Config(c.batch, 1)]])
        steps = [ms for r in runs[c] for ms in r.step_ms]
        batches = [b for r in runs[c] for b in r.batches]
        rows.append(
            {
                "name": c.name,
                "batch": BATCH if c.batch else 1,
                "sessions": c.sessions,
                "tokens_per_s": round(median(rates), 2),
                "tokens_per_s_spread": spread(rates),
                "speedup": round(median(rates) / single, 2),
                "p50_ms": round(percentile(steps, 50), 1),
                "p99_ms": round(percentile(steps, 99), 1),
                "mean_batch": round(sum(batches) / len(batches), 2),
                "same_tokens": sum(
                    r.tokens[s] == alone[s] for r in runs[c] for s in range(c.sessions)
                ),
                "sessions_run": c.sessions * len(runs[c]),
            }
        )
    unbatched_1 = rows[0]["tokens_per_s"]
    top = [r.tokens_per_s for r in ceiling]
    for row in rows:
        row["speedup_vs_unbatched_1"] = round(row["tokens_per_s"] / unbatched_1, 2)
        row["of_ceiling"] = round(row["tokens_per_s"] / median(top), 3)
    return {
        "ceiling": {
            "sessions": opts.sessions,
            "tokens_per_s": round(median(top), 2),
            "tokens_per_s_spread": spread(top),
            "same_tokens": sum(
                r.tokens[s] == alone[s] for r in ceiling for s in range(opts.sessions)
            ),
            "sessions_run": opts.sessions * len(ceiling),
        },
        "model": opts.model,
        "stages": [list(s) for s in splits],
        "prompt_tokens": opts.prompt_tokens,
        "tokens": opts.tokens,
        "repeats": opts.repeats,
        "configs": rows,
        "definitions": DEFINITIONS,
    }


def render_markdown(result: dict) -> str:
    m, r = result["machine"], result["concurrency"]
    top, best = r["ceiling"], r["configs"][-1]  # (the last: batching, many sessions)
    header = [
        "configuration",
        "tokens/s",
        "[min, max]",
        "vs 1 session",
        "p50 ms",
        "p99 ms",
        "mean batch",
        "same tokens",
    ]
    rows = [
        [
            c["name"],
            c["tokens_per_s"],
            c["tokens_per_s_spread"],
            f"{c['speedup']}x",
            c["p50_ms"],
            c["p99_ms"],
            c["mean_batch"],
            f"{c['same_tokens']}/{c['sessions_run']}",
        ]
        for c in r["configs"]
    ]
    return "\n".join(
        [
            "# Concurrent sessions: batched decode",
            "",
            f"{m['cpu']}, {m['cores']} cores (shared), torch {m['torch']}, nodes with default "
            f"flags; load average {m['load_average_start']} -> {m['load_average_end']}; "
            f"{m['runtime_s']} s.",
            "",
            f"Three nodes {r['stages']} on loopback, {r['prompt_tokens']}-token prompts, "
            f"{r['tokens']} greedy decode tokens per session, median of {r['repeats']} "
            "repeats.",
            "",
            markdown_table(header, rows),
            "",
            f"The ceiling, {top['sessions']} sessions decoded in this one process, each step "
            "one batched forward of the whole model (`Stage.decode`, no gRPC, no hops): "
            f"{top['tokens_per_s']} tokens/s ({top['tokens_per_s_spread']}; same tokens "
            f"{top['same_tokens']}/{top['sessions_run']}). {best['name']}: "
            f"**{best['speedup']} x one session, {best['of_ceiling']:.0%} of the ceiling**.",
            "",
            *[f"- **{k}**: {v}" for k, v in r["definitions"].items()],
            "",
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=8, help="concurrent sessions (default 8)")
    p.add_argument("--tokens", type=int, help="decode tokens per session (default 32; quick 4)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default 16)")
    p.add_argument("--repeats", type=int, help="interleaved repeats (default 3; quick 1)")
    p.add_argument("--quick", action="store_true", help="one repeat of a few tokens")
    p.add_argument("--model", help="checkpoint (default: random GPT-2 124M, made once)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for concurrency.{json,md}")
    opts = p.parse_args(argv)
    opts.tokens = opts.tokens or (4 if opts.quick else 32)
    opts.repeats = opts.repeats or (1 if opts.quick else 3)
    opts.model = speed_model(opts.model)
    return opts


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    raise_on_sigterm()
    started = time.perf_counter()
    result: dict = {"machine": machine_info()}
    nodes = Nodes()
    try:
        result["concurrency"] = measure(opts, nodes)
    finally:
        nodes.close()
    return save_results(result, started, opts.out, "concurrency", render_markdown)


if __name__ == "__main__":
    main()
