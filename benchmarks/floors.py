"""What another transport or return path would buy a pipeline's floor on this machine: the
same three stages as ``hops.py``'s floors, token by token in turn with the local path, as

- the bare gRPC chain (``bare_chain.py``) on loopback TCP, answers relayed back along the
  chain: the floor ``hops.py`` measures nanoshard against;
- the same on Unix sockets;
- the same with the head answering the caller directly (a node forwards and is done);
- the same stages over OS pipes (``pipe_chain.py``): no gRPC at all, the last stage's answer
  straight back.

    python benchmarks/floors.py             # ~3 min here; writes results/floors.{json,md}
    python benchmarks/floors.py --quick

Every path computes with ``bare_chain.compute`` and every token must be equal on all of
them. The paths take turns going first (a fixed order would charge the cost of following
another process's compute to one path every time).
"""

from __future__ import annotations

# isort: off
import nanoshard.threads  # noqa: F401  before torch: the nodes' thread policy

# isort: on
import argparse
import asyncio
import contextlib
import time
from pathlib import Path
from statistics import median

import torch
from bare_chain import BareChain, BareSession
from common import (
    RESULTS,
    even_splits,
    machine_info,
    markdown_table,
    raise_on_sigterm,
    save_results,
    speed_model,
)
from pipe_chain import PipeChain

from nanoshard.checkpoint import open_checkpoint
from nanoshard.engine import Stage

PATHS = {
    "local": "local (one process)",
    "tcp": "bare gRPC, loopback TCP, answers along the chain (hops.py's floor)",
    "unix": "bare gRPC, Unix sockets, answers along the chain",
    "direct": "bare gRPC, loopback TCP, the head answers the caller directly",
    "pipes": "OS pipes, no gRPC, the last stage answers the caller directly",
}


class Local:
    """The local path: all units in this process, greedy."""

    def __init__(self, stage: Stage) -> None:
        self.stage, self.cache = stage, stage.new_cache(stage.config.block_size)

    def step(self, ids: list[int], pos: int) -> int:
        if pos == 0:
            self.cache = self.stage.new_cache(self.stage.config.block_size)
        with torch.inference_mode():
            return int(self.stage(torch.tensor(ids), self.cache, pos)[-1].argmax())


def measure(opts: argparse.Namespace, stack: contextlib.ExitStack) -> dict:
    ckpt = open_checkpoint(opts.model)
    splits = even_splits(ckpt.config.n_units, 3)
    chains = {
        "tcp": stack.enter_context(BareChain(opts.model, splits)),
        "unix": stack.enter_context(BareChain(opts.model, splits, unix=True)),
        "direct": stack.enter_context(BareChain(opts.model, splits, direct=True)),
    }
    pipes = stack.enter_context(PipeChain(opts.model, splits))
    local = Local(ckpt.load_stage(0, ckpt.config.n_units))
    ids = list(range(100, 100 + opts.prompt_tokens))
    names = list(PATHS)

    async def run() -> tuple[dict[str, list[float]], bool]:
        sessions = {
            k: BareSession(c.address, c.last if k == "direct" else None) for k, c in chains.items()
        }

        async def step(k: str, tokens: list[int], pos: int) -> int:
            if k == "local":
                return local.step(tokens, pos)
            if k == "pipes":
                return pipes.step(tokens, pos)
            return await sessions[k].step(tokens, pos)

        ms: dict[str, list[float]] = {k: [] for k in names}
        try:
            first = {k: await step(k, ids, 0) for k in names}
            same = len(set(first.values())) == 1
            token = first["local"]
            for i in range(opts.tokens):
                shift = i % len(names)  # each path goes first in turn
                got = {}
                for k in names[shift:] + names[:shift]:
                    t0 = time.perf_counter()
                    got[k] = await step(k, [token], len(ids) + i)
                    ms[k].append((time.perf_counter() - t0) * 1e3)
                same = same and len(set(got.values())) == 1
                token = got["local"]
        finally:
            for s in sessions.values():
                await s.close()
        return ms, same

    repeats = []
    for _ in range(opts.repeats):
        ms, same = asyncio.run(run())
        repeats.append({k: median(v) for k, v in ms.items()} | {"same": same})
    rows = []
    for k in names:
        per_repeat = [r[k] for r in repeats]
        ratios = [r[k] / r["local"] for r in repeats]
        rows.append(
            {
                "path": k,
                "what": PATHS[k],
                "ms_per_token": round(median(per_repeat), 3),
                "ratio_to_local": round(median(ratios), 3),
                "ratio_repeats": [round(min(ratios), 3), round(max(ratios), 3)],
                "ms_per_hop_over_local": round(
                    median([(r[k] - r["local"]) / len(splits) for r in repeats]), 3
                ),
            }
        )
    return {
        "units": [list(s) for s in splits],
        "tokens": opts.tokens,
        "repeats": opts.repeats,
        "tokens_equal": all(r["same"] for r in repeats),
        "rows": rows,
    }


def render_markdown(result: dict) -> str:
    m, f = result["machine"], result["floors"]
    rows = [
        [r["what"], r["ms_per_token"], r["ratio_to_local"], r["ratio_repeats"],
         "–" if r["path"] == "local" else r["ms_per_hop_over_local"]]
        for r in f["rows"]
    ]  # fmt: skip
    header = ["path", "ms/token", "× local", "[min, max]", "ms a hop over local"]
    return "\n".join(
        [
            "# Floors: what another transport or return path would buy a pipeline here",
            "",
            f"{m['cpu']}, {m['cores']} cores (shared), load {m['load_average_start']} -> "
            f"{m['load_average_end']}, {m['runtime_s']} s. Stages {f['units']}, greedy, "
            f"{f['tokens']} decode tokens taken by every path in turn, median of each of "
            f"{f['repeats']} repeats (then the median of those). Tokens equal on every "
            f"path: {'yes' if f['tokens_equal'] else '**no**'}.",
            "",
            markdown_table(header, rows),
            "",
            "Command: `python benchmarks/floors.py`.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, help="decode tokens per repeat (default 128; quick 8)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default 32)")
    p.add_argument("--repeats", type=int, help="repeats (default 3; quick 1)")
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    p.add_argument("--model", help="model (default: random GPT-2 124M, made once)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for floors.json and .md")
    opts = p.parse_args(argv)
    opts.tokens = opts.tokens or (8 if opts.quick else 128)
    opts.repeats = opts.repeats or (1 if opts.quick else 3)
    opts.model = speed_model(opts.model)
    raise_on_sigterm()
    started = time.perf_counter()
    result: dict = {"machine": machine_info()}
    with contextlib.ExitStack() as stack:  # every process is stopped, by its PID
        result["floors"] = measure(opts, stack)
    return save_results(result, started, opts.out, "floors", render_markdown)


if __name__ == "__main__":
    main()
