"""The engine against what a user would otherwise run, and the lighter weights.

    python benchmarks/engine.py           # ~4 min; writes benchmarks/results/engine.{json,md}
    python benchmarks/engine.py --quick   # few tokens, one repeat: checks the script runs

Peers (GPT-2 124M's shape, random weights saved as a Hugging Face checkpoint, made once
under ``.cache/bench/gpt2-124m-random``; greedy; the same torch thread count for all):

- ``nanoshard``: a ``Stage`` over every unit with its KV cache, the local path of
  ``nanoshard generate --local``; decode ms/token after a 32-token prompt, and at 500
  tokens of context;
- ``transformers``: ``GPT2LMHeadModel.generate`` with its KV cache on the same weights;
  decode ms/token = (time of ``generate(n + 1)`` - time of ``generate(1)``) / n, so the
  prompt's prefill is taken out as it is for ours;
- ``nanoGPT-style``: no cache, as nanoGPT's ``GPT.generate`` does: every token re-runs the
  whole context (500 tokens), with this engine's modules.

Weights (``--dtype`` of nodes and ``generate --local``): fp32, bf16 and int8 (weight-only:
int8 rows with a bf16 scale each; on CPU the products run in fbgemm's dynamic int8 Linear)
decode ms/token side by side on the same shape; and, on the demo model, how often each
picks fp32's token: teacher-forced (every position of fp32's own greedy texts, ≥ 512
positions) and free-running (each generates greedily from the same prompts).

Configurations are interleaved in a rotated order, ``--repeats`` times; ms/token is the
median decode step.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

# isort: off
import nanoshard.threads  # noqa: F401  before torch: the nodes' thread policy (see there)

# isort: on
import torch
from common import (
    GPT2_124M,
    PROMPTS,
    RESULTS,
    agreement,
    machine_info,
    markdown_table,
    median,
    raise_on_sigterm,
    save_results,
    speed_model,
)

from nanoshard.checkpoint import open_checkpoint
from nanoshard.engine import DTYPES, Stage
from nanoshard.tokenizer import encoding_for

PROMPT_TOKENS = 32
LONG_CONTEXT = 500
WEIGHTS = ("fp32", "bf16", "int8")


@torch.inference_mode()
def nanoshard_decode(stage: Stage, context: int, tokens: int) -> list[float]:
    """ms of each greedy decode step after a ``context``-token prefill, with the KV cache."""
    ids = torch.arange(context) % stage.config.vocab_size
    cache = stage.new_cache(context + tokens + 1)
    token = int(stage(ids, cache, 0).argmax())
    times = []
    for i in range(tokens):
        t0 = time.perf_counter()
        token = int(stage(torch.tensor([token]), cache, context + i).argmax())
        times.append((time.perf_counter() - t0) * 1e3)
    return times


@torch.inference_mode()
def nocache_decode(stage: Stage, context: int, tokens: int) -> list[float]:
    """nanoGPT's ``generate``: each token is one forward over the whole (cropped) context."""
    ids = (torch.arange(context) % stage.config.vocab_size).tolist()
    times = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        window = ids[-stage.config.block_size :]
        ids.append(int(stage(torch.tensor(window)).argmax()))
        times.append((time.perf_counter() - t0) * 1e3)
        ids.pop(0)  # keep the context at ``context`` tokens
    return times


def hf_decode(model: object, context: int, tokens: int) -> list[float]:
    """transformers' ``generate`` with its KV cache: per decode token, the prefill taken out."""
    ids = (torch.arange(context) % GPT2_124M.vocab_size)[None]
    kwargs = {"do_sample": False, "pad_token_id": 0, "use_cache": True}

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)  # type: ignore[attr-defined]
        return (time.perf_counter() - t0) * 1e3

    with torch.inference_mode():
        one, many = timed(1), timed(tokens + 1)
    return [(many - one) / tokens] * tokens


def interleaved(
    runs: dict[str, Callable[[], list[float]]], repeats: int
) -> dict[str, list[list[float]]]:
    """Each run ``repeats`` times, in an order rotated every repeat, after one warm-up."""
    names = list(runs)
    for name in names:
        runs[name]()
    out: dict[str, list[list[float]]] = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].append(runs[name]())
    return out


def row(name: str, samples: list[list[float]], reference: list[list[float]] | None) -> dict:
    per_repeat = [median(s) for s in samples]
    result = {"name": name, "ms_per_token": round(median([x for s in samples for x in s]), 3)}
    result["ms_per_token_repeats"] = [round(x, 3) for x in per_repeat]
    if reference is not None:  # ratio per repeat (same load), then the median
        ratios = [a / median(b) for a, b in zip(per_repeat, reference, strict=True)]
        result["ratio"] = round(median(ratios), 4)
    return result


def measure_peers(opts: argparse.Namespace) -> dict:
    from transformers import GPT2LMHeadModel

    ckpt = open_checkpoint(opts.model)
    config = ckpt.config
    stage = ckpt.load_stage(0, config.n_units)
    hf = GPT2LMHeadModel.from_pretrained(ckpt.path, torch_dtype=torch.float32).eval()
    tokens, slow_tokens = opts.tokens, max(2, opts.tokens // 16)
    long = min(LONG_CONTEXT, config.block_size - tokens - 2)
    rows = []
    for threads in opts.threads:
        torch.set_num_threads(threads)
        runs = {
            "nanoshard": lambda: nanoshard_decode(stage, PROMPT_TOKENS, tokens),
            "transformers": lambda: hf_decode(hf, PROMPT_TOKENS, tokens),
            "nanoshard, long context": lambda: nanoshard_decode(stage, long, tokens),
            "transformers, long context": lambda: hf_decode(hf, long, tokens),
            "nanoGPT-style no cache, long context": lambda: nocache_decode(
                stage, long, slow_tokens
            ),
        }
        got = interleaved(runs, opts.repeats)
        for name, samples in got.items():
            ref = got["nanoshard, long context" if "long" in name else "nanoshard"]
            rows.append({"threads": threads, **row(name, samples, ref)})
    torch.set_num_threads(1)
    return {
        "model": str(ckpt.path),
        "config": config.to_dict(),
        "prompt_tokens": PROMPT_TOKENS,
        "long_context": long,
        "rows": rows,
    }


def measure_weights_speed(opts: argparse.Namespace) -> dict:
    ckpt = open_checkpoint(opts.model)
    config = ckpt.config
    stages = {w: ckpt.load_stage(0, config.n_units, DTYPES[w]) for w in WEIGHTS}
    torch.set_num_threads(1)
    runs = {
        w: (lambda s=s: nanoshard_decode(s, PROMPT_TOKENS, opts.tokens)) for w, s in stages.items()
    }
    got = interleaved(runs, opts.repeats)
    rows = [
        {"weights": w, "weight_mb": round(stages[w].weight_nbytes / 2**20, 1)}
        | row(w, got[w], got["fp32"])
        for w in WEIGHTS
    ]
    return {"model": str(ckpt.path), "threads": 1, "rows": rows}


@torch.inference_mode()
def greedy(stage: Stage, ids: list[int], tokens: int, eot: int | None) -> list[int]:
    cache = stage.new_cache(len(ids) + tokens)
    x, pos, out = torch.tensor(ids), 0, []
    for _ in range(tokens):
        token = int(stage(x, cache, pos).argmax())
        out.append(token)
        if token == eot:
            break
        pos += len(x)
        x = torch.tensor([token])
    return out


@torch.inference_mode()
def forced_logits(stage: Stage, prompt: list[int], text: list[int]) -> torch.Tensor:
    """The logits that predict each token of ``text`` after ``prompt``, run as generation
    runs them (the prompt as one prefill, then one token per step) but fed ``text``'s
    tokens rather than the stage's own picks (teacher forcing)."""
    cache = stage.new_cache(len(prompt) + len(text))
    rows = [stage(torch.tensor(prompt), cache, 0)]
    for i, token in enumerate(text[:-1]):
        rows.append(stage(torch.tensor([token]), cache, len(prompt) + i))
    return torch.cat(rows).float()


def measure_weights_quality(opts: argparse.Namespace) -> dict:
    ckpt = open_checkpoint(opts.agree_model)
    config = ckpt.config
    enc = encoding_for(ckpt.path)
    eot = enc.eot_token if "<|endoftext|>" in enc.special_tokens_set else None
    stages = {w: ckpt.load_stage(0, config.n_units, DTYPES[w]) for w in WEIGHTS}
    prompts: list[list[int]] = []
    texts: dict[str, list[list[int]]] = {w: [] for w in WEIGHTS}
    compared = 0
    for prompt in PROMPTS:
        if compared >= opts.agree_tokens:
            break
        ids = enc.encode(prompt)
        n = min(opts.agree_tokens - compared, config.block_size - len(ids))
        for w, stage in stages.items():
            texts[w].append(greedy(stage, ids, n, eot))
        prompts.append(ids)
        compared += len(texts["fp32"][-1])
    reference = [
        forced_logits(stages["fp32"], p, t) for p, t in zip(prompts, texts["fp32"], strict=True)
    ]
    top2 = torch.cat([r.topk(2, dim=-1).values for r in reference])
    margins = top2[:, 0] - top2[:, 1]  # how decided fp32 was at each position
    rows = []
    for w in WEIGHTS:
        top1, error = 0, 0.0
        for p, t, ref in zip(prompts, texts["fp32"], reference, strict=True):
            logits = forced_logits(stages[w], p, t)
            top1 += int((logits.argmax(-1) == ref.argmax(-1)).sum())
            error = max(error, float((logits - ref).abs().max()))
        rows.append(
            {
                "weights": w,
                "teacher_forced_top1": round(top1 / len(margins), 4),
                "positions": len(margins),
                "max_abs_logit_error": round(error, 4),
                # positions where fp32's own top two are closer than twice that error:
                # a perturbation of this size may swap them
                "near_ties": int((margins < 2 * error).sum()),
                **agreement(texts["fp32"], texts[w]),
            }
        )
    return {
        "model": str(ckpt.path),
        "prompts": len(prompts),
        "median_top2_margin": round(float(margins.median()), 3),
        "rows": rows,
    }


def render_markdown(result: dict) -> str:
    m = result["machine"]
    out = [
        "# Engine: peers and weights",
        "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}, "
        f"load {m['load_average_start']} -> {m['load_average_end']}",
        "",
        "## Decode ms/token against the peers (GPT-2 124M shape, random weights, greedy)",
        "",
        f"Context {result['peers']['prompt_tokens']} tokens, and {result['peers']['long_context']}"
        " for the long-context rows. x nanoshard: the row's ms/token over nanoshard's at the same"
        " context and threads (> 1: slower than nanoshard).",
        "",
    ]
    peers = result["peers"]["rows"]
    out.append(
        markdown_table(
            ["threads", "engine", "ms/token", "per repeat", "x nanoshard (same context)"],
            [
                [r["threads"], r["name"], r["ms_per_token"], r["ms_per_token_repeats"], r["ratio"]]
                for r in peers
            ],
        )
    )
    out += ["", "## Weights: speed (124M shape, 1 thread) and agreement with fp32 (demo model)", ""]
    quality = {r["weights"]: r for r in result["weights_quality"]["rows"]}
    out.append(
        markdown_table(
            [
                "weights",
                "MB",
                "ms/token",
                "x fp32",
                "teacher-forced top-1",
                "free-running agree",
                "max logit err",
                "near-ties",
            ],
            [
                [
                    r["weights"],
                    r["weight_mb"],
                    r["ms_per_token"],
                    r["ratio"],
                    f"{quality[r['weights']]['teacher_forced_top1']:.4f} "
                    f"of {quality[r['weights']]['positions']}",
                    quality[r["weights"]]["agreement"],
                    quality[r["weights"]]["max_abs_logit_error"],
                    quality[r["weights"]]["near_ties"],
                ]
                for r in result["weights_speed"]["rows"]
            ],
        )
    )
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few tokens, one repeat, 1 thread")
    p.add_argument("--tokens", type=int, help="decode tokens per run (default 32; quick 4)")
    p.add_argument("--repeats", type=int, help="interleaved repeats (default 3; quick 1)")
    p.add_argument("--threads", default="1,2", help="torch threads for the peers (default 1,2)")
    p.add_argument("--model", help="speed model (default: random GPT-2 124M, made once)")
    p.add_argument("--agree-model", default="demo", help="quality model (default: demo)")
    p.add_argument("--agree-tokens", type=int, help="positions compared (512; quick 64)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for engine.json and .md")
    opts = p.parse_args(argv)
    opts.tokens = opts.tokens or (4 if opts.quick else 32)
    opts.repeats = opts.repeats or (1 if opts.quick else 3)
    opts.agree_tokens = opts.agree_tokens or (64 if opts.quick else 512)
    opts.threads = [1] if opts.quick else [int(t) for t in opts.threads.split(",")]
    opts.model = speed_model(opts.model)
    return opts


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    raise_on_sigterm()
    started = time.perf_counter()
    result: dict = {"machine": machine_info(threads=1)}
    result["peers"] = measure_peers(opts)
    result["weights_speed"] = measure_weights_speed(opts)
    result["weights_quality"] = measure_weights_quality(opts)
    return save_results(result, started, opts.out, "engine", render_markdown)


if __name__ == "__main__":
    main()
