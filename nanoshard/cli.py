"""``nanoshard``: run a swarm's coordinator, see its status, generate text, run the demo.

nanoshard coordinator --model demo
nanoshard status
nanoshard generate "ROMEO:"                           # through the swarm (found by mDNS)
nanoshard generate --local "ROMEO:"                   # the reference path, in-process
nanoshard generate --route HOST:PORT,HOST:PORT "..."  # a fixed chain of nodes
nanoshard demo                                        # a whole swarm on this machine
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tiktoken

from nanoshard.checkpoint import open_checkpoint
from nanoshard.client.checks import DEFAULT_CHECK_RATE, CheckResult
from nanoshard.client.sdk import Client, GenerationResult, Token
from nanoshard.cliutil import run_cli, setup_logging
from nanoshard.coordinator.server import CoordinatorConfig
from nanoshard.demo import DemoConfig, run_demo
from nanoshard.engine import parse_dtype, pick_device
from nanoshard.errors import InvalidArgument
from nanoshard.generation import STOP_NOTES, LocalSession, check_prompt, generate, max_length_for
from nanoshard.sampling import SamplingParams
from nanoshard.security import add_security_args, read_key, security_from_args
from nanoshard.tokenizer import encoding_for

CODECS_HELP = "fp32 (lossless), fp16, bf16, int8 (blockwise, a bf16 scale per 32 values), int8-64"


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

    g = sub.add_parser("generate", help="generate text (through the swarm, a route, or locally)")
    where = g.add_mutually_exclusive_group()
    where.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="the swarm's coordinator (default: find it by mDNS)",
    )
    where.add_argument("--local", action="store_true", help="run the whole model in this process")
    where.add_argument("--route", metavar="ADDR,ADDR,...", help="nodes from embed to head")
    add_generation_options(g)
    g.add_argument("--codec", default="fp32", help=CODECS_HELP)
    g.add_argument(
        "--check-rate",
        type=float,
        default=DEFAULT_CHECK_RATE,
        help="share of steps spot-checked on a replica of their stage "
        f"(default {DEFAULT_CHECK_RATE}; 0 = off)",
    )
    g.add_argument("--device", default="auto", help="--local: cpu, cuda, mps or auto")
    g.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "int8"], help="--local"
    )
    add_mdns_options(g)
    add_security_args(g, server=False)

    c = sub.add_parser("coordinator", help="run a swarm's coordinator")
    d = CoordinatorConfig()
    c.add_argument("--model", default=d.model, help="checkpoint path, or 'demo' (default)")
    c.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    c.add_argument(
        "--port", type=int, default=d.port, help=f"port (default {d.port}; 0 = any free)"
    )
    c.add_argument(
        "--replicas", type=int, default=d.replicas, help="copies of every unit to aim for"
    )
    c.add_argument("--swarm", default=d.swarm, help="swarm name nodes must match")
    c.add_argument("--heartbeat-interval", type=float, default=d.heartbeat_interval, metavar="S")
    c.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=d.heartbeat_timeout,
        metavar="S",
        help="a node silent this long is out (default 6)",
    )
    add_mdns_options(c, advertise=True)
    add_security_args(c)

    dm = sub.add_parser("demo", help="a coordinator and N nodes on this machine, and a generation")
    dd = DemoConfig()
    dm.add_argument(
        "--nodes", type=int, default=dd.nodes, help=f"volunteer nodes to start (default {dd.nodes})"
    )
    dm.add_argument("--prompt", default=dd.prompt, help="the text to continue")
    dm.add_argument("--model", default=dd.model, help="checkpoint path, or 'demo' (default)")
    dm.add_argument("--max-new-tokens", type=int, default=dd.max_new_tokens)
    dm.add_argument("--temperature", type=float, default=dd.temperature)
    dm.add_argument("--seed", type=int, default=dd.seed)
    dm.add_argument("--codec", default=dd.codec, help=CODECS_HELP)

    st = sub.add_parser("status", help="show the swarm: nodes, coverage, throughput")
    st.add_argument("--coordinator", metavar="HOST:PORT", help="default: find it by mDNS")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.add_argument("--watch", action="store_true", help="refresh every 2 s until Ctrl-C")
    add_mdns_options(st)
    add_security_args(st, server=False)

    ce = sub.add_parser("certs", help="make a CA and TLS certificates for a LAN swarm")
    ce.add_argument("folder", type=Path, help="where to write ca.pem and HOST.{pem,key}")
    ce.add_argument(
        "--hosts",
        required=True,
        metavar="H1,H2,...",
        help="the names and IP addresses the swarm's servers are reached by",
    )
    ce.add_argument("--days", type=int, default=825, help="validity (default 825 days)")
    return parser


def add_mdns_options(p: argparse.ArgumentParser, advertise: bool = False) -> None:
    p.add_argument(
        "--mdns-interface",
        action="append",
        metavar="IP",
        dest="mdns_interfaces",
        help="interface address mDNS uses (repeatable; default: all)",
    )
    if advertise:
        p.add_argument("--no-mdns", action="store_true", help="do not advertise by mDNS")
    else:
        p.add_argument("--swarm", default=None, help="with mDNS: only a coordinator of this swarm")


def prompt_ids(enc: tiktoken.Encoding, prompt: str) -> list[int]:
    ids = enc.encode(prompt, allowed_special="all")
    if not ids and "<|endoftext|>" in enc.special_tokens_set:
        ids = [enc.eot_token]  # GPT-2 starts an unconditioned text at <|endoftext|>
    return ids


def generate_locally(
    args: argparse.Namespace, on_token: Callable[[Token], object] | None
) -> GenerationResult:
    """The reference path: the whole model in this process, the same loop as the swarm's."""
    checkpoint = open_checkpoint(args.model)
    config = checkpoint.config
    enc = encoding_for(checkpoint.path)
    ids = prompt_ids(enc, args.prompt)
    check_prompt(ids, config.vocab_size, config.block_size)
    stage = checkpoint.load_stage(
        0, config.n_units, parse_dtype(args.dtype), pick_device(args.device)
    )
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    session = LocalSession(
        stage, params, max_length_for(len(ids), args.max_new_tokens, config.block_size)
    )
    eot = enc.eot_token if "<|endoftext|>" in enc.special_tokens_set else None
    pending: list[int] = []

    def each_token(token: int) -> None:
        if on_token is not None:
            pending.append(token)
            text = enc.decode(pending, errors="replace")
            if not text.endswith("\ufffd"):
                pending.clear()
                on_token(Token(token, text))

    gen = generate(
        session,
        ids,
        args.max_new_tokens,
        block_size=config.block_size,
        eot_id=eot,
        on_token=each_token,
    )
    return GenerationResult(
        text=enc.decode(gen.token_ids, errors="replace"),
        token_ids=gen.token_ids,
        prompt_token_ids=gen.prompt_token_ids,
        stop_reason=gen.stop_reason,
        ttft_ms=gen.prefill_ms,
        token_ms=gen.decode_ms,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    started = False

    def show(token: Token) -> None:
        nonlocal started
        if not started:  # the prompt, once the request is known to be good
            sys.stdout.write(args.prompt)
            started = True
        sys.stdout.write(token.text)
        sys.stdout.flush()

    on_token = None if args.json else show
    checks: list[CheckResult] = []
    if args.local:
        result = generate_locally(args, on_token)
    else:
        route = [a.strip() for a in args.route.split(",") if a.strip()] if args.route else None
        if args.route is not None and not route:
            raise InvalidArgument("--route needs at least one HOST:PORT")
        with Client(
            args.coordinator,
            route=route,
            model=args.model,
            mdns_interfaces=args.mdns_interfaces,
            codec=args.codec,
            swarm_key=read_key(args.swarm_key, args.swarm_key_file),
            tls_ca=args.tls_ca,
            check_rate=args.check_rate,
        ) as client:
            result = client.generate(
                args.prompt,
                args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                on_token=on_token,
            )
            checks = client.wait_for_checks()
    report(result, args, with_hops=not args.local, checks=checks)
    return 0


def report(
    result: GenerationResult,
    args: argparse.Namespace,
    with_hops: bool,
    checks: list[CheckResult],
) -> None:
    out = result.to_dict()
    if not with_hops:
        del out["hops"]
    else:
        out["checks"] = [c.to_dict() for c in checks]
    if args.json:
        print(json.dumps(out))
        return
    sys.stdout.write("\n")
    mean = out["timings"]["decode_ms_mean"]
    print(
        f"[{len(result.token_ids)} tokens, {STOP_NOTES.get(result.stop_reason, result.stop_reason)}; "
        f"prefill {result.ttft_ms:.1f} ms"
        + (f", decode {mean:.1f} ms/token]" if mean is not None else "]"),
        file=sys.stderr,
    )
    for r in result.recoveries:
        print(
            f"  recovered at position {r.pos}: {r.kind} ({r.detail}), {r.ms:.0f} ms",
            file=sys.stderr,
        )
    for c in checks:
        verdict = "agree" if c.agree else "DISAGREE"
        distances = ", ".join(f"{a} {d:.2g}" for a, d in c.distances.items())
        print(
            f"  spot-check of {c.checked}, units [{c.start}, {c.end}) at position {c.pos}: "
            f"{verdict} ({distances}; tolerance {c.tolerance:.2g})",
            file=sys.stderr,
        )
    for row in out.get("hops", []):
        print(
            f"  {row['node']} units [{row['units'][0]}, {row['units'][1]}): compute "
            f"{row['compute_ms']:.1f} ms, queue {row['queue_ms']:.1f} ms, transfer "
            f"{row['transfer_ms']:.1f} ms, {row['bytes_out']} bytes out ({row['codec']})",
            file=sys.stderr,
        )


def cmd_coordinator(args: argparse.Namespace) -> int:
    from nanoshard.coordinator.server import serve

    config = CoordinatorConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        swarm=args.swarm,
        mdns=not args.no_mdns,
        mdns_interfaces=args.mdns_interfaces,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        security=security_from_args(args, identity="coordinator"),
    )
    if config.replicas < 1:
        raise InvalidArgument("--replicas must be at least 1")

    def ready(address: str) -> None:
        print(f"nanoshard coordinator: listening on {address}", flush=True)

    asyncio.run(serve(config, ready))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    config = DemoConfig(
        nodes=args.nodes,
        prompt=args.prompt,
        model=args.model,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        codec=args.codec,
    )
    return run_demo(config, Console())


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from nanoshard.client.swarm import CoordinatorClient, find_coordinator
    from nanoshard.statusview import status_json, status_table

    security = security_from_args(args)
    address = find_coordinator(
        args.coordinator,
        mdns_interfaces=args.mdns_interfaces,
        swarm=args.swarm,
        tls=security.tls_ca is not None,
    )
    coordinator = CoordinatorClient(address, security=security)
    if args.json:
        print(json.dumps(status_json(coordinator.status())))
        return 0
    console = Console()
    if not args.watch:
        console.print(status_table(coordinator.status()))
        return 0
    with Live(status_table(coordinator.status()), console=console, refresh_per_second=1) as live:
        while True:
            time.sleep(2)
            live.update(status_table(coordinator.status()))


def cmd_certs(args: argparse.Namespace) -> int:
    from nanoshard.certs import make_certs

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    for path in make_certs(args.folder, hosts, args.days):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    commands = {
        "generate": cmd_generate,
        "coordinator": cmd_coordinator,
        "status": cmd_status,
        "demo": cmd_demo,
        "certs": cmd_certs,
    }
    run_cli("nanoshard", lambda: commands[args.command](args))


if __name__ == "__main__":
    main(sys.argv[1:])
