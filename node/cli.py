"""``nanoshard-node``: run a node.

nanoshard-node serve --model demo --units 0:3 --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path

import nanoshard.threads  # noqa: F401  first: OpenMP's wait policy, before torch loads
from nanoshard.cliutil import (
    NODE,
    add_verbose,
    add_version,
    address_arg,
    format_size,
    listening_line,
    memory_arg,
    parse_command_line,
    port_arg,
    positive_seconds,
    positive_size_arg,
    run_cli,
    server_exit,
    setup_logging,
    size_arg,
)
from nanoshard.engine import DTYPES
from nanoshard.errors import InvalidArgument
from nanoshard.hop import SLOWER
from nanoshard.metrics import add_metrics_args, expose, metrics_from_args
from nanoshard.security import add_security_args, security_from_args

from .faults import fault_from_env
from .join import Events, JoinConfig, join
from .quotas import QuotaLimits
from .server import ServeConfig, serve
from .worker import MAX_BATCH, MAX_QUEUE


class ConsoleEvents(Events):
    """The join lifecycle on the terminal: log lines, a progress bar for downloads, and
    the ready line on stdout."""

    def progress(self, what: str):  # type: ignore[no-untyped-def]
        from .weights import rich_progress

        return rich_progress(what)

    def ready(self, line: str) -> None:
        print(line, flush=True)


def memory_here(device: str = "auto") -> str:
    """What a node given no --max-memory would take on this machine, for --help."""
    from nanoshard.engine import pick_device

    from .capacity import available_memory

    try:
        chosen = pick_device(device)
        return f"{format_size(available_memory(chosen))} on {chosen}"
    except Exception as e:  # help must print whatever the machine says
        return f"unknown ({e})"


def batch_size(text: str) -> int:
    n = int(text)
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError(f"a batch of {n} steps: give 1 to 256")
    return n


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("limits (per caller: the client, or the node before this one)")
    g.add_argument(
        "--max-queue",
        type=int,
        default=MAX_QUEUE,
        metavar="N",
        help=f"compute jobs queued or running before new ones are refused (default {MAX_QUEUE})",
    )
    g.add_argument(
        "--quota-sessions",
        type=int,
        default=0,
        metavar="N",
        help="open sessions per caller (default 0: no limit)",
    )
    g.add_argument(
        "--quota-max-length",
        type=int,
        default=0,
        metavar="N",
        help="positions one session may reserve (default 0: the context)",
    )
    g.add_argument(
        "--quota-tokens-per-minute",
        type=int,
        default=0,
        metavar="N",
        help="positions computed per caller per minute (default 0: no limit)",
    )
    g.add_argument("--quota-kv-memory", type=size_arg, default=0, metavar="SIZE",
                   help="KV memory reserved per caller (default 0: no limit)")  # fmt: skip


def limits_from_args(args: argparse.Namespace) -> QuotaLimits:
    if args.max_queue < 1:
        raise InvalidArgument("--max-queue must be at least 1")
    values = (args.quota_sessions, args.quota_max_length, args.quota_tokens_per_minute)
    if min(*values, args.quota_kv_memory) < 0:
        raise InvalidArgument("quotas are counts or sizes: 0 (no limit) or more")
    return QuotaLimits(*values, kv_bytes=args.quota_kv_memory)


def add_batch_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch",
        type=batch_size,
        nargs="?",
        const=MAX_BATCH,
        default=MAX_BATCH,
        metavar="N",
        help=f"run the decode steps of up to N concurrent sessions as one forward (default "
        f"{MAX_BATCH}; 1: each alone). On a CPU each session gets exactly the output it gets "
        "alone",
    )


def slowdown(text: str) -> float:
    factor = float(text)
    if factor == 0:
        return math.inf
    if not 1 < factor < math.inf:
        raise argparse.ArgumentTypeError(f"a slowdown of {text}: give more than 1, or 0 (never)")
    return factor


def add_leave_slower_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--leave-slower",
        type=slowdown,
        default=SLOWER,
        metavar="FACTOR",
        help=f"move a session's next hop to a replica once that node's decode steps take "
        f"FACTOR times their first pace (default {SLOWER:g}; 0: never, the route stays as "
        "planned)",
    )


MAX_THREADS = 1024  # torch threads a node may be given (each is an OS thread)


def thread_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of threads: {text!r}") from None
    if not 0 <= n <= MAX_THREADS:
        raise argparse.ArgumentTypeError(
            f"{n} threads: give 1 to {MAX_THREADS}, or 0 (one per core)"
        )
    return n


def message_size(text: str) -> int:
    """A gRPC message limit: from 1 MiB (a step of one token, and room) to gRPC's 2 GiB."""
    n = size_arg(text)
    if not 2**20 <= n < 2**31:
        raise argparse.ArgumentTypeError(f"a message limit of {text}: give 1M to 2047M")
    return n


def add_threads_flag(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument(
        "--threads",
        type=thread_count,
        default=default,
        metavar="N",
        help="torch threads (default 0: one per core; idle threads sleep, so several nodes "
        "can share a machine)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoshard-node", description="Run a nanoshard node.")
    add_version(parser)
    sub = parser.add_subparsers(dest="command")  # (required by parse_command_line)
    d = ServeConfig()
    s = sub.add_parser("serve", help="serve one stage without a coordinator")
    s.add_argument("--model", default=d.model, help="checkpoint path, or 'demo' (default)")
    s.add_argument("--units", required=True, help="the stage, START:END (0 = embed, L+1 = head)")
    s.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    s.add_argument(
        "--port", type=port_arg, default=d.port, help="port; 0 picks a free one (default)"
    )
    s.add_argument(
        "--name",
        default=d.name,
        help="node name shown in traces (default: this host's name and the first digits of "
        "the node's id)",
    )
    s.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, mps, or auto (default)")
    s.add_argument("--dtype", default=d.dtype, choices=list(DTYPES))
    s.add_argument(
        "--kv-memory",
        type=positive_size_arg,
        default=d.kv_memory,
        metavar="SIZE",
        help="memory for the KV caches of all sessions (default 1G)",
    )
    s.add_argument(
        "--session-ttl",
        type=positive_seconds,
        default=d.session_ttl,
        metavar="SECONDS",
        help=f"idle sessions expire after this long (default {d.session_ttl:.0f})",
    )
    add_threads_flag(s, d.threads)
    add_batch_flag(s)
    add_leave_slower_flag(s)
    add_limit_flags(s)
    add_security_args(s)
    s.add_argument(
        "--max-message",
        type=message_size,
        default=d.max_message_bytes,
        metavar="SIZE",
        help="largest gRPC message accepted (default 16M)",
    )
    add_metrics_args(s)

    j = sub.add_parser("join", help="join a swarm and serve the stage the coordinator assigns")
    jd = JoinConfig()
    j.add_argument(
        "--coordinator", type=address_arg, metavar="HOST:PORT", help="default: find it by mDNS"
    )
    j.add_argument(
        "--host", default=jd.host, help=f"address the data plane listens on (default {jd.host})"
    )
    j.add_argument(
        "--port", type=port_arg, default=jd.port, help="port; 0 picks a free one (default)"
    )
    j.add_argument(
        "--mdns-interface",
        action="append",
        metavar="IP",
        dest="mdns_interfaces",
        help="interface address mDNS uses (repeatable; default: all)",
    )
    j.add_argument("--no-mdns", action="store_true", help="neither browse nor advertise by mDNS")
    j.add_argument(
        "--model", default=None, help="a local copy of the swarm's checkpoint (skips the download)"
    )
    j.add_argument(
        "--max-memory",
        type=memory_arg,
        default=None,
        metavar="SIZE",
        help="memory for weights and KV caches (default: half of the free RAM, or 80%% of "
        f"a CUDA device's free memory; on this machine now: {memory_here().replace('%', '%%')})",
    )
    j.add_argument("--device", default=jd.device, help="cpu, cuda, cuda:1, mps, or auto (default)")
    j.add_argument("--dtype", default=jd.dtype, choices=list(DTYPES))
    j.add_argument(
        "--name",
        default=jd.name,
        help="node name shown in status and traces (default: this host's name and the first "
        "digits of the node's id, the same each time it starts from its cache folder)",
    )
    j.add_argument(
        "--cache-dir",
        type=Path,
        default=jd.cache_dir,
        help=f"weights and measurements (default {jd.cache_dir})",
    )
    j.add_argument("--swarm", default=jd.swarm, help="the swarm to join (default 'default')")
    add_threads_flag(j, jd.threads)
    add_batch_flag(j)
    add_leave_slower_flag(j)
    add_limit_flags(j)
    add_security_args(j)
    j.add_argument(
        "--session-ttl",
        type=positive_seconds,
        default=jd.session_ttl,
        metavar="SECONDS",
        help=f"idle sessions expire after this long (default {jd.session_ttl:.0f})",
    )
    add_metrics_args(j)
    add_verbose(parser, sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parse_command_line(build_parser(), argv)
    setup_logging(args.verbose)

    def run() -> int:
        fault_from_env()  # a test fault it cannot read is refused before anything starts
        metrics = expose(metrics_from_args(args), NODE)
        if args.command == "serve":
            if args.kv_memory <= 0:
                raise InvalidArgument("--kv-memory must be above 0: it holds every session")
            config = ServeConfig(
                model=args.model,
                units=args.units,
                host=args.host,
                port=args.port,
                name=args.name,
                device=args.device,
                dtype=args.dtype,
                kv_memory=args.kv_memory,
                session_ttl=args.session_ttl,
                threads=args.threads,
                batch=args.batch,
                max_message_bytes=args.max_message,
                security=security_from_args(args, identity=f"node:{args.name or args.port}"),
                quotas=limits_from_args(args),
                max_queue=args.max_queue,
                leave_slower=args.leave_slower,
                metrics=metrics,
            )

            def ready(address: str) -> None:
                print(listening_line(NODE, address), flush=True)

            return server_exit(asyncio.run(serve(config, ready)))
        elif args.command == "join":
            if args.no_mdns and not args.coordinator:
                raise InvalidArgument("--no-mdns needs --coordinator HOST:PORT")
            if not args.swarm:
                raise InvalidArgument("--swarm needs a name (the default is 'default')")
            join_config = JoinConfig(
                coordinator=args.coordinator,
                host=args.host,
                port=args.port,
                mdns=not args.no_mdns,
                mdns_interfaces=args.mdns_interfaces,
                model=args.model,
                max_memory=args.max_memory,
                device=args.device,
                dtype=args.dtype,
                name=args.name,
                cache_dir=args.cache_dir,
                swarm=args.swarm,
                threads=args.threads,
                batch=args.batch,
                session_ttl=args.session_ttl,
                security=security_from_args(args),
                quotas=limits_from_args(args),
                max_queue=args.max_queue,
                leave_slower=args.leave_slower,
                metrics=metrics,
            )
            return server_exit(asyncio.run(join(join_config, ConsoleEvents())))
        return 0

    run_cli("nanoshard-node", run)


if __name__ == "__main__":
    main(sys.argv[1:])
