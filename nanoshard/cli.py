"""``nanoshard``: generate text, locally or through a swarm.

nanoshard generate --local "To be, or not"
nanoshard generate --route 127.0.0.1:7001,127.0.0.1:7002 "To be, or not"
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import tiktoken

from nanoshard.checkpoint import Checkpoint, open_checkpoint
from nanoshard.cliutil import run_cli, setup_logging
from nanoshard.engine import parse_dtype, pick_device
from nanoshard.errors import InvalidArgument
from nanoshard.generation import (
    Generation,
    LocalSession,
    Session,
    check_prompt,
    generate,
    max_length_for,
)
from nanoshard.sampling import SamplingParams
from nanoshard.tokenizer import encoding_for
from nanoshard.trace import summarize_hops

CODECS_HELP = "fp32 (lossless), fp16, bf16, int8 (blockwise, 64 values a scale), int8-32"


def add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default="", help="the text to continue")
    p.add_argument("--model", default="demo", help="checkpoint path, or 'demo' (default)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling is deterministic for a seed")
    p.add_argument("--json", action="store_true", help="print one JSON object, no streaming")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoshard", description="Run a GPT across machines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (locally, or through nodes)")
    where = g.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="run the whole model in this process")
    where.add_argument("--route", metavar="ADDR,ADDR,...", help="nodes from embed to head")
    add_generation_options(g)
    g.add_argument("--codec", default="fp32", help=CODECS_HELP)
    g.add_argument("--device", default="auto", help="--local: cpu, cuda, mps or auto")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="--local")
    return parser


def prompt_ids(enc: tiktoken.Encoding, prompt: str) -> list[int]:
    ids = enc.encode(prompt, allowed_special="all")
    if not ids and "<|endoftext|>" in enc.special_tokens_set:
        ids = [enc.eot_token]  # GPT-2 starts an unconditioned text at <|endoftext|>
    return ids


def run_generation(
    session: Session,
    checkpoint: Checkpoint,
    enc: tiktoken.Encoding,
    ids: list[int],
    args: argparse.Namespace,
) -> Generation:
    eot = enc.eot_token if "<|endoftext|>" in enc.special_tokens_set else None
    pending: list[int] = []

    def show(token: int) -> None:
        pending.append(token)
        text = enc.decode(pending, errors="replace")
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text)
            sys.stdout.flush()
            pending.clear()

    try:
        gen = generate(
            session,
            ids,
            args.max_new_tokens,
            block_size=checkpoint.config.block_size,
            eot_id=eot,
            on_token=None if args.json else show,
        )
    finally:
        session.close()
    gen.text = enc.decode(gen.token_ids, errors="replace")
    return gen


def report(gen: Generation, args: argparse.Namespace, with_hops: bool) -> None:
    step_ms = [gen.prefill_ms, *gen.decode_ms]
    out: dict[str, Any] = {
        "text": gen.text,
        "token_ids": gen.token_ids,
        "prompt_token_ids": gen.prompt_token_ids,
        "stop_reason": gen.stop_reason,
        "timings": {
            "prefill_ms": round(gen.prefill_ms, 3),
            "decode_ms": [round(ms, 3) for ms in gen.decode_ms],
            "decode_ms_mean": round(sum(gen.decode_ms) / len(gen.decode_ms), 3)
            if gen.decode_ms
            else None,
        },
    }
    if with_hops:
        out["hops"] = summarize_hops(gen.hops, step_ms)
    if args.json:
        print(json.dumps(out))
        return
    sys.stdout.write("\n")
    mean = out["timings"]["decode_ms_mean"]
    print(
        f"[{len(gen.token_ids)} tokens, {gen.note}; prefill {gen.prefill_ms:.1f} ms"
        + (f", decode {mean:.1f} ms/token]" if mean is not None else "]"),
        file=sys.stderr,
    )
    for row in out.get("hops", []):
        print(
            f"  {row['node']} units [{row['units'][0]}, {row['units'][1]}): compute "
            f"{row['compute_ms']:.1f} ms, queue {row['queue_ms']:.1f} ms, transfer "
            f"{row['transfer_ms']:.1f} ms, {row['bytes_out']} bytes out ({row['codec']})",
            file=sys.stderr,
        )


def cmd_generate(args: argparse.Namespace) -> int:
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    checkpoint = open_checkpoint(args.model)
    enc = encoding_for(checkpoint.path)
    ids = prompt_ids(enc, args.prompt)
    check_prompt(ids, checkpoint.config.vocab_size, checkpoint.config.block_size)
    max_length = max_length_for(len(ids), args.max_new_tokens, checkpoint.config.block_size)
    session: Session
    if args.local:
        device = pick_device(args.device)
        stage = checkpoint.load_stage(0, checkpoint.config.n_units, parse_dtype(args.dtype), device)
        session = LocalSession(stage, params, max_length)
    else:
        from nanoshard.client.route import RouteSession, route_from_addresses

        addresses = [a.strip() for a in args.route.split(",") if a.strip()]
        if not addresses:
            raise InvalidArgument("--route needs at least one ADDRESS")
        route = route_from_addresses(addresses)
        if route.n_units != checkpoint.config.n_units:
            raise InvalidArgument(
                f"the route's model has {route.n_units} units but --model {args.model} has "
                f"{checkpoint.config.n_units}: pass the model the nodes serve"
            )
        session = RouteSession(route, params, max_length, args.codec)
    if not args.json:
        sys.stdout.write(args.prompt)
    gen = run_generation(session, checkpoint, enc, ids, args)
    report(gen, args, with_hops=not args.local)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    commands = {"generate": cmd_generate}
    run_cli("nanoshard", lambda: commands[args.command](args))


if __name__ == "__main__":
    main(sys.argv[1:])
