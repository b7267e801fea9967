"""A node process's data plane: a gRPC server around a NodeService whose stage can change.

``serve`` runs one fixed stage (``nanoshard-node serve``); ``nanoshard.node.join`` builds
on the same ``DataPlane`` and lets the coordinator choose the stage.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry

from nanoshard import rpc
from nanoshard.checkpoint import open_checkpoint
from nanoshard.cliutil import stop_on_signals
from nanoshard.config import describe_units, parse_units
from nanoshard.engine import Stage, parse_dtype, pick_device
from nanoshard.hop import SLOWER
from nanoshard.identity import NodeKey
from nanoshard.modelcard import quick_model_id
from nanoshard.security import Security

from .metrics import NodeMetrics
from .quotas import QuotaLimits, Quotas
from .service import RELEASE_EVERY_S, NodeIdentity, NodeService
from .sessions import SessionTable
from .worker import MAX_BATCH, MAX_QUEUE, ComputeWorker

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
    threads: int = 0  # torch threads; 0 = one per core (see nanoshard.threads)
    batch: int = MAX_BATCH  # decode steps of concurrent sessions per forward; 1 = each alone
    max_message_bytes: int = rpc.MAX_MESSAGE_BYTES
    security: Security = field(default_factory=Security)  # swarm key and TLS
    quotas: QuotaLimits = field(default_factory=QuotaLimits)  # per caller; 0 = no limit
    max_queue: int = MAX_QUEUE  # compute jobs queued or running before new ones are refused
    leave_slower: float = SLOWER  # a next-hop node this many times slower is left; inf: never
    metrics: CollectorRegistry | None = None  # where its metrics go (--metrics-port's)


class DataPlane:
    """The gRPC server, its service, the compute worker and the session table of a node."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        name: str,
        model_id: str,
        kv_memory: int,
        session_ttl: float,
        threads: int = 0,
        batch: int = MAX_BATCH,
        max_message_bytes: int = rpc.MAX_MESSAGE_BYTES,
        advertise_host: str | None = None,
        security: Security | None = None,
        quotas: QuotaLimits | None = None,
        max_queue: int = MAX_QUEUE,
        leave_slower: float = SLOWER,
        key: NodeKey | None = None,
        metrics: CollectorRegistry | None = None,
    ) -> None:
        security = security or Security()
        self.key = key or NodeKey.generate()  # what its steps are signed with
        self.worker = ComputeWorker(threads=threads or None, max_batch=batch, max_queue=max_queue)
        self.server = grpc.aio.server(options=rpc.server_options(max_message_bytes))
        self.port = rpc.add_port(self.server, f"{host}:{port}", security)
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port} (in use?)")
        self.address = f"{advertise_host or host}:{self.port}"
        identity = NodeIdentity(
            # (by default its host's name and its id's first digits: the same each time
            # it joins from its cache folder, as its id is, where a port is not)
            name=name or f"{socket.gethostname()}-{self.key.node_id[:6]}",
            address=self.address,
            model_id=model_id,
            epoch=secrets.token_bytes(8),
        )
        self.sessions = SessionTable(kv_memory, session_ttl)
        self.service = NodeService(
            None,
            identity,
            self.worker,
            self.sessions,
            max_message_bytes=max_message_bytes,
            leave_slower=leave_slower,
            security=security,
            quotas=Quotas(quotas or QuotaLimits()),
            key=self.key,
            metrics=NodeMetrics(metrics),
        )
        self.server.add_generic_rpc_handlers((self.service.rpc_handler(),))
        self._expiry: asyncio.Task | None = None
        self._ttl = session_ttl

    @property
    def name(self) -> str:
        return self.service.identity.name

    async def start(self) -> None:
        await self.server.start()
        every_s = min(RELEASE_EVERY_S, max(0.05, self._ttl / 4))
        self._expiry = asyncio.create_task(self.service.expire_forever(every_s))

    async def load(self, build: Callable[[], Stage]) -> Stage:
        """Build a stage on the compute worker (torch stays off the event loop)."""
        return (await self.worker.run(build)).value

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self.service.stop_streams()
        await self.server.stop(grace=2)
        await self.service.channels.close()
        self.worker.close()


async def serve(config: ServeConfig, on_ready: Callable[[str], None] | None = None) -> int | None:
    """Serve one stage until SIGINT/SIGTERM; ``on_ready(address)`` once it answers.
    Returns the signal that stopped it."""
    checkpoint = open_checkpoint(config.model)
    start, end = parse_units(config.units, checkpoint.config)
    device = pick_device(config.device)
    plane = DataPlane(
        host=config.host,
        port=config.port,
        name=config.name,
        model_id=quick_model_id(checkpoint),
        kv_memory=config.kv_memory,
        session_ttl=config.session_ttl,
        threads=config.threads,
        batch=config.batch,
        max_message_bytes=config.max_message_bytes,
        security=config.security,
        quotas=config.quotas,
        max_queue=config.max_queue,
        leave_slower=config.leave_slower,
        metrics=config.metrics,
    )
    stage = await plane.load(
        lambda: checkpoint.load_stage(start, end, parse_dtype(config.dtype), device)
    )
    plane.service.set_stage(stage)
    await plane.start()
    log.info(
        "serving units [%d, %d) (%s) of %s on %s, %s %s, batch %d",
        start,
        end,
        describe_units(checkpoint.config, start, end),
        config.model,
        plane.address,
        device,
        config.dtype,
        config.batch,
    )
    stop = asyncio.Event()
    received = stop_on_signals(stop)  # (first: once it says it is ready, a signal stops it)
    if on_ready:
        on_ready(plane.address)
    await stop.wait()
    await plane.stop()
    return received[0] if received else None
