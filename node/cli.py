"""``nanoshard-node``: run a node.

nanoshard-node serve --model demo --units 0:3 --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from nanoshard.cliutil import parse_size, run_cli, setup_logging

from .server import ServeConfig, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoshard-node", description="Run a nanoshard node.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    d = ServeConfig()
    s = sub.add_parser("serve", help="serve one stage without a coordinator")
    s.add_argument("--model", default=d.model, help="checkpoint path, or 'demo' (default)")
    s.add_argument("--units", required=True, help="the stage, START:END (0 = embed, L+1 = head)")
    s.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    s.add_argument("--port", type=int, default=d.port, help="port; 0 picks a free one (default)")
    s.add_argument("--name", default=d.name, help="node name shown in traces and status")
    s.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, mps, or auto (default)")
    s.add_argument("--dtype", default=d.dtype, choices=["fp32", "bf16", "fp16"])
    s.add_argument(
        "--kv-memory",
        type=parse_size,
        default=d.kv_memory,
        metavar="SIZE",
        help="memory for the KV caches of all sessions (default 1G)",
    )
    s.add_argument(
        "--session-ttl",
        type=float,
        default=d.session_ttl,
        metavar="SECONDS",
        help=f"idle sessions expire after this long (default {d.session_ttl:.0f})",
    )
    s.add_argument("--threads", type=int, default=d.threads, help="torch threads (0 = default)")
    s.add_argument(
        "--max-message",
        type=parse_size,
        default=d.max_message_bytes,
        metavar="SIZE",
        help="largest gRPC message accepted (default 16M)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def run() -> int:
        if args.command == "serve":
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
                max_message_bytes=args.max_message,
            )

            def ready(address: str) -> None:
                print(f"nanoshard-node: listening on {address}", flush=True)

            asyncio.run(serve(config, ready))
        return 0

    run_cli("nanoshard-node", run)


if __name__ == "__main__":
    main(sys.argv[1:])
