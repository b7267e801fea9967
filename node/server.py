"""A node process: load a stage, serve it over gRPC until told to stop."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from nanoshard import rpc
from nanoshard.checkpoint import open_checkpoint
from nanoshard.config import describe_units, parse_units
from nanoshard.engine import parse_dtype, pick_device

from .service import NodeIdentity, NodeService
from .sessions import SessionTable
from .worker import ComputeWorker

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """``nanoshard-node serve``'s options, one field per flag."""

    model: str = "demo"  # checkpoint path or "demo"
    units: str = ""  # START:END
    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port
    name: str = ""  # defaults to host name + port
    device: str = "auto"
    dtype: str = "fp32"
    kv_memory: int = 1 << 30  # bytes of KV cache (and replay material) all sessions may hold
    session_ttl: float = 300.0  # seconds an idle session lives
    threads: int = 0  # torch threads; 0 = torch's default
    max_message_bytes: int = rpc.MAX_MESSAGE_BYTES


def model_id_of(config_dict: dict, path: str) -> str:
    """A short id for a model: which weights, as far as a node serving them can tell cheaply."""
    blob = json.dumps(config_dict, sort_keys=True) + "|" + os.path.basename(os.path.normpath(path))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


async def serve(config: ServeConfig, on_ready: Callable[[str], None] | None = None) -> None:
    checkpoint = open_checkpoint(config.model)
    start, end = parse_units(config.units, checkpoint.config)
    device = pick_device(config.device)
    worker = ComputeWorker(threads=config.threads or None)
    stage = (
        await worker.run(
            lambda: checkpoint.load_stage(start, end, parse_dtype(config.dtype), device)
        )
    ).value
    server = grpc.aio.server(options=rpc.server_options(config.max_message_bytes))
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    address = f"{config.host}:{port}"
    identity = NodeIdentity(
        name=config.name or f"{socket.gethostname()}:{port}",
        address=address,
        model_id=model_id_of(checkpoint.config.to_dict(), str(checkpoint.path)),
        epoch=secrets.token_bytes(8),
    )
    sessions = SessionTable(config.kv_memory, config.session_ttl)
    service = NodeService(
        stage, identity, worker, sessions, max_message_bytes=config.max_message_bytes
    )
    server.add_generic_rpc_handlers((service.rpc_handler(),))
    await server.start()
    expiry = asyncio.create_task(service.expire_forever(max(0.05, config.session_ttl / 4)))
    log.info(
        "serving units [%d, %d) (%s) of %s on %s, %s %s",
        start,
        end,
        describe_units(checkpoint.config, start, end),
        config.model,
        address,
        device,
        config.dtype,
    )
    if on_ready:
        on_ready(address)
    await _until_signal(server.wait_for_termination())
    expiry.cancel()
    await server.stop(grace=2)
    await service.channels.close()
    worker.close()


async def _until_signal(waiter: Awaitable[object]) -> None:
    """Wait for the server to end or for SIGINT/SIGTERM, whichever comes first."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    done_waiting = asyncio.ensure_future(waiter)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({done_waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    for task in (done_waiting, stopping):
        task.cancel()
