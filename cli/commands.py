"""``nanoshard``: run a swarm's coordinator, see its status, generate text, run the demo.

The parser (every flag) and the small commands; ``generate`` is in generate.py, the demo in
demo.py, the status tables in statusview.py.

nanoshard coordinator --model demo
nanoshard status
nanoshard generate "ROMEO:"                           # through the swarm (found by mDNS)
nanoshard generate --local "ROMEO:"                   # the reference path, in-process
nanoshard generate --route HOST:PORT,HOST:PORT "..."  # a fixed chain of nodes
nanoshard demo                                        # a whole swarm on this machine
nanoshard api                                         # OpenAI's HTTP API and the web view
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from nanoshard.client.checks import DEFAULT_CHECK_RATE
from nanoshard.cliutil import (
    API,
    COORDINATOR,
    add_verbose,
    add_version,
    address_arg,
    codec_arg,
    interruptible,
    listening_line,
    parse_command_line,
    port_arg,
    positive_seconds,
    positive_size_arg,
    run_cli,
    server_exit,
    setup_logging,
    share_arg,
)
from nanoshard.coordinator.server import CoordinatorConfig
from nanoshard.engine import DTYPES
from nanoshard.errors import InvalidArgument
from nanoshard.metrics import add_metrics_args, expose, metrics_from_args
from nanoshard.security import add_security_args, security_from_args

from .demo import DemoConfig, run_demo
from .generate import cmd_generate

MODEL_HELP = (
    "'demo' (default), a checkpoint path (nanoGPT ckpt.pt, Hugging Face GPT-2 directory), or "
    "a Hugging Face hub id (gpt2, gpt2-medium, owner/name; HF_HUB_OFFLINE, HF_HOME and "
    "HF_TOKEN are honoured)"
)
TRUST_PICKLE_HELP = (
    "load a pytorch_model.bin or nanoGPT ckpt.pt that holds Python objects besides tensors. "
    "RISK: unpickling runs code from the file, which can do anything your user can; only "
    "for files you trust"
)
CODECS_HELP = (
    "fp32 (lossless), fp16, bf16, int8 (blockwise, a bf16 scale per 32 values; also named "
    "int8-32), int8-64"
)


def add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "prompt", nargs="?", default=None, help="the text to continue (- reads it from stdin)"
    )
    p.add_argument(
        "--model",
        default=None,
        help="--local and --route: " + MODEL_HELP + " (a swarm serves its coordinator's model)",
    )
    p.add_argument("--revision", default=None, help="of a hub id: branch, tag or commit")
    p.add_argument(
        "-n", "--max-new-tokens", "--max-tokens", type=int, default=100, help="(default 100)"
    )  # (--max-tokens: OpenAI's name, which the API takes)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sampling is deterministic for a seed (default 0: the same text every run)",
    )
    p.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="end the text before this string (again for more than one)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, no streaming")


CHECK_RATE_HELP = (
    "share of sessions' hops a shadow replica follows and spot-checks "
    f"(default {DEFAULT_CHECK_RATE}; 0 = off, also for the hops the coordinator asks to check)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoshard", description="Run a GPT across machines.")
    add_version(parser)
    sub = parser.add_subparsers(dest="command")  # (required by parse_command_line)

    g = sub.add_parser("generate", help="generate text (through the swarm, a route, or locally)")
    where = g.add_mutually_exclusive_group()
    where.add_argument(
        "--coordinator",
        type=address_arg,
        metavar="HOST:PORT",
        help="the swarm's coordinator (default: find it by mDNS)",
    )
    where.add_argument("--local", action="store_true", help="run the whole model in this process")
    where.add_argument("--route", metavar="ADDR,ADDR,...", help="nodes from embed to head")
    add_generation_options(g)
    g.add_argument("--codec", default="fp32", type=codec_arg, help=CODECS_HELP)
    g.add_argument(
        "--check-rate",
        type=share_arg,
        default=DEFAULT_CHECK_RATE,
        help=CHECK_RATE_HELP,
    )
    g.add_argument("--device", default="auto", help="--local: cpu, cuda, mps or auto")
    g.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="--local: weights dtype")
    g.add_argument("--trust-pickle", action="store_true", help="--local: " + TRUST_PICKLE_HELP)
    add_mdns_options(g)
    add_security_args(g, server=False)

    c = sub.add_parser("coordinator", help="run a swarm's coordinator")
    d = CoordinatorConfig()
    c.add_argument("--model", default=d.model, help=MODEL_HELP)
    c.add_argument(
        "--revision", default=None, help="of a hub id: branch, tag or commit (default main)"
    )
    c.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    c.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    c.add_argument(
        "--port", type=port_arg, default=d.port, help=f"port (default {d.port}; 0 = any free)"
    )
    c.add_argument(
        "--replicas",
        type=int,
        default=d.replicas,
        help=f"copies of every unit to aim for (default {d.replicas})",
    )
    c.add_argument(
        "--swarm", default=d.swarm, help=f"swarm name nodes must match (default {d.swarm!r})"
    )
    c.add_argument(
        "--tp",
        default=str(d.tp),
        metavar="{auto,off,2,4}",
        help="tensor-parallel groups: auto (default: where a unit fits no node alone, or "
        "where predicted faster), off, or 2/4 (every stage in groups of that size)",
    )
    c.add_argument(
        "--heartbeat-interval",
        type=positive_seconds,
        default=d.heartbeat_interval,
        metavar="S",
        help=f"how often nodes report (default {d.heartbeat_interval:g})",
    )
    c.add_argument(
        "--heartbeat-timeout",
        type=positive_seconds,
        default=d.heartbeat_timeout,
        metavar="S",
        help=f"a node silent this long is out (default {d.heartbeat_timeout:g})",
    )
    c.add_argument(
        "--state-dir",
        type=Path,
        default=d.state_dir,
        help=f"where exclusions are kept across restarts (default {d.state_dir})",
    )
    c.add_argument(
        "--exclude-hours",
        type=float,
        default=d.exclude_hours,
        metavar="H",
        help="how long a node caught lying stays out (default 24)",
    )
    add_mdns_options(c, advertise=True)
    add_security_args(c)
    add_metrics_args(c)

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
    dm.add_argument("--codec", default=dd.codec, type=codec_arg, help=CODECS_HELP)
    dm.add_argument(
        "--api-port",
        type=port_arg,
        default=dd.api_port,
        help=f"the gateway's port (default {dd.api_port}, another if taken; 0 = any free)",
    )
    dm.add_argument(
        "--keep",
        action="store_true",
        help="keep the swarm, the web view and the API up after the generation, until Ctrl-C",
    )

    a = sub.add_parser("api", help="serve OpenAI's HTTP API and the live web view of a swarm")
    a.add_argument(
        "--coordinator", type=address_arg, metavar="HOST:PORT", help="default: find it by mDNS"
    )
    a.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    a.add_argument("--port", type=port_arg, default=8000, help="port (default 8000; 0 = any free)")
    a.add_argument("--codec", default="fp32", type=codec_arg, help=CODECS_HELP)
    a.add_argument(
        "--check-rate",
        type=share_arg,
        default=DEFAULT_CHECK_RATE,
        help=CHECK_RATE_HELP,
    )
    a.add_argument(
        "--route-wait",
        type=positive_seconds,
        default=20.0,
        metavar="S",
        help="how long a request waits for a route before 503 (default 20)",
    )
    a.add_argument(
        "--max-body",
        type=positive_size_arg,
        default="1M",
        metavar="SIZE",
        help="request bodies larger than this are refused with 413 (default 1M)",
    )
    add_mdns_options(a)
    add_security_args(a, server=False)

    st = sub.add_parser("status", help="show the swarm: nodes, coverage, throughput")
    st.add_argument(
        "--coordinator", type=address_arg, metavar="HOST:PORT", help="default: find it by mDNS"
    )
    st.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (--watch: a line of one every 2 s)",
    )
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
    add_verbose(parser, sub)
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


def check_swarm_flag(args: argparse.Namespace) -> None:
    """``--swarm`` picks among the coordinators mDNS finds: with an address (or none needed)
    it would be silently ignored, so say so."""
    if args.command in ("generate", "status", "api") and args.swarm:
        given = [f for f in ("coordinator", "route", "local") if getattr(args, f, None)]
        if given:
            raise InvalidArgument(
                f"--swarm chooses a coordinator found by mDNS; drop it with --{given[0]}"
            )


def cmd_coordinator(args: argparse.Namespace) -> int:
    from nanoshard.coordinator.groups import parse_mode
    from nanoshard.coordinator.server import serve

    if not args.swarm:
        raise InvalidArgument("--swarm needs a name (the default is 'default')")
    if not args.heartbeat_timeout > args.heartbeat_interval:
        raise InvalidArgument(
            f"--heartbeat-timeout {args.heartbeat_timeout:g} s must be longer than "
            f"--heartbeat-interval {args.heartbeat_interval:g} s, or every node times out"
        )
    config = CoordinatorConfig(
        model=args.model,
        revision=args.revision,
        trust_pickle=args.trust_pickle,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        tp=parse_mode(args.tp),
        swarm=args.swarm,
        mdns=not args.no_mdns,
        mdns_interfaces=args.mdns_interfaces,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        security=security_from_args(args, identity="coordinator"),
        state_dir=args.state_dir,
        exclude_hours=args.exclude_hours,
    )
    if config.replicas < 1:
        raise InvalidArgument("--replicas must be at least 1")
    if not 0 < config.exclude_hours <= 24 * 365 * 100:
        raise InvalidArgument("--exclude-hours must be more than 0 and at most 100 years")
    config.metrics = expose(metrics_from_args(args), COORDINATOR)

    def ready(address: str) -> None:
        print(listening_line(COORDINATOR, address), flush=True)

    return server_exit(asyncio.run(serve(config, ready)))


def cmd_api(args: argparse.Namespace) -> int:
    from nanoshard.api.app import GatewayOptions
    from nanoshard.api.server import GatewayConfig, serve
    from nanoshard.security import read_key

    config = GatewayConfig(
        coordinator=args.coordinator,
        host=args.host,
        port=args.port,
        mdns_interfaces=args.mdns_interfaces,
        swarm=args.swarm,
        swarm_key=read_key(args.swarm_key, args.swarm_key_file),
        tls_ca=args.tls_ca,
        codec=args.codec,
        check_rate=args.check_rate,
        route_wait_s=args.route_wait,
        options=GatewayOptions(max_body_bytes=args.max_body),
    )

    def ready(url: str) -> None:
        print(listening_line(API, url), flush=True)

    return server_exit(asyncio.run(serve(config, ready)))


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
        api_port=args.api_port,
        keep=args.keep,
    )
    return run_demo(config, Console())


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from nanoshard.client.swarm import open_coordinator
    from nanoshard.statusview import status_json

    from .statusview import StatusView

    coordinator = open_coordinator(
        args.coordinator,
        security_from_args(args),
        mdns_interfaces=args.mdns_interfaces,
        swarm=args.swarm,
    )
    if args.watch:
        interruptible()  # SIGTERM too leaves the terminal as it was (Live hides the cursor)
    if args.json:  # (with --watch: JSON Lines, one object a line, each as it comes)
        while True:
            print(json.dumps(status_json(coordinator.status())), flush=True)
            if not args.watch:
                return 0
            time.sleep(2)
    console = Console()
    if not args.watch:
        console.print(StatusView(coordinator.status()))
        return 0
    if not console.is_terminal:  # (a pipe, a file: Live would draw only its last frame)
        while True:
            console.print(StatusView(coordinator.status()))
            time.sleep(2)
    with Live(StatusView(coordinator.status()), console=console, refresh_per_second=1) as live:
        while True:
            time.sleep(2)
            live.update(StatusView(coordinator.status()))


def cmd_certs(args: argparse.Namespace) -> int:
    from nanoshard.certs import make_certs

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    for path in make_certs(args.folder, hosts, args.days):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_command_line(build_parser(), argv)
    setup_logging(args.verbose, quiet=args.command in ("generate", "status"))
    commands = {
        "generate": cmd_generate,
        "coordinator": cmd_coordinator,
        "status": cmd_status,
        "demo": cmd_demo,
        "api": cmd_api,
        "certs": cmd_certs,
    }

    def run() -> int:
        check_swarm_flag(args)
        return commands[args.command](args)

    run_cli("nanoshard", run)
