"""The coordinator process: load the model card, serve the control plane, advertise it."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from nanoshard import machine, rpc
from nanoshard.cliutil import stop_on_signals
from nanoshard.discovery import (
    Advert,
    Advertiser,
    coordinator_properties,
    instance_name,
    zeroconf_interfaces,
)
from nanoshard.security import Security

from . import groups
from .exclusions import ExclusionStore
from .metrics import CoordinatorMetrics
from .model import ModelStore
from .registry import Registry
from .service import CoordinatorService

log = logging.getLogger(__name__)

DEFAULT_PORT = 7960
# Where a coordinator keeps what must outlive it (the exclusions), per swarm name.
# (platformdirs: ~/.local/state/nanoshard on Linux, XDG_STATE_HOME honoured)
DEFAULT_STATE_DIR = machine.state_dir()
EXPIRY_CHECK_S = 60.0  # how often expired exclusions are lifted


@dataclass
class CoordinatorConfig:
    """``nanoshard coordinator``'s options, one field per flag."""

    model: str = "demo"  # "demo", a checkpoint path, or a Hugging Face hub id
    revision: str | None = None  # of a hub id: a branch, tag or commit (None: main)
    trust_pickle: bool = False  # load torch pickles that hold more than tensors (runs code)
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT  # 0 picks a free port
    replicas: int = 2  # copies of every unit placement aims for
    tp: str | int = "auto"  # tensor-parallel groups: "auto", "off", 2 or 4 (groups.parse_mode)
    swarm: str = "default"  # nodes and clients of another swarm are refused
    mdns: bool = True
    mdns_interfaces: list[str] | None = None  # None = every interface
    heartbeat_interval: float = 2.0  # seconds between a node's heartbeats
    heartbeat_timeout: float = 6.0  # a node silent this long is out
    state_dir: Path | None = DEFAULT_STATE_DIR  # exclusions are kept here (None: in memory)
    exclude_hours: float = 24.0  # how long an exclusion lasts
    name: str = "coordinator"
    max_message_bytes: int = rpc.MAX_MESSAGE_BYTES
    security: Security = field(default_factory=Security)  # swarm key and TLS
    metrics: CollectorRegistry | None = None  # where its metrics go (--metrics-port's)
    extra: dict = field(default_factory=dict)


async def serve(
    config: CoordinatorConfig,
    on_ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> int | None:
    """Serve until SIGINT/SIGTERM (or ``stop`` is set); ``on_ready(address)`` once it
    answers. Returns the signal that stopped it (None: ``stop``)."""
    if config.mdns:  # a wrong --mdns-interface is refused before anything starts
        zeroconf_interfaces(config.mdns_interfaces)
    rpc.check_listenable(f"{config.host}:{config.port}")  # (so is a port in use)
    store = await asyncio.to_thread(
        ModelStore.open, config.model, trust_pickle=config.trust_pickle, revision=config.revision
    )
    epoch = secrets.token_bytes(8)
    registry = Registry(
        store.config,
        replicas=config.replicas,
        heartbeat_timeout_s=config.heartbeat_timeout,
        settle_until=float("inf"),  # set once the coordinator answers, below
        tp=groups.parse_mode(str(config.tp)),
        group_salt=epoch.hex()[:6] + "-",  # a group id never repeats a previous process's
    )
    path = (
        ":memory:"
        if config.state_dir is None
        else config.state_dir / f"exclusions-{config.swarm}.sqlite"
    )
    exclusions = ExclusionStore(path, config.exclude_hours * 3600)

    def record(node_id: str, address: str, reason: str) -> str:
        return exclusions.add(node_id, address, reason).describe()

    registry.on_exclude = record
    registry.restore((e.node_id, e.address, e.describe()) for e in exclusions.active())
    checked_expiry = time.monotonic()
    service = CoordinatorService(
        store,
        registry,
        swarm=config.swarm,
        heartbeat_interval_s=config.heartbeat_interval,
        epoch=epoch,
        security=config.security,
        metrics=CoordinatorMetrics(config.metrics),
    )
    server = grpc.aio.server(options=rpc.server_options(config.max_message_bytes))
    server.add_generic_rpc_handlers((service.rpc_handler(),))
    port = rpc.add_port(server, f"{config.host}:{config.port}", config.security)
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port} (in use?)")
    await server.start()
    address = f"{config.host}:{port}"
    advertising = None  # mDNS probing takes about 1.5 s: the coordinator answers meanwhile
    if config.mdns:
        advert = Advert(
            "coordinator",
            instance_name(config.name, epoch.hex()[:8]),
            config.host,
            port,
            coordinator_properties(epoch.hex(), config.swarm, tls=config.security.tls),
        )
        advertising = asyncio.create_task(
            asyncio.to_thread(Advertiser, advert, config.mdns_interfaces)
        )
    log.info(
        "coordinator for %s (%d units, model %s…) on %s, swarm %r, replicas %d, --tp %s",
        store.name,
        store.config.n_units,
        store.model_id[:12],
        address,
        config.swarm,
        config.replicas,
        registry.tp,
    )
    # Nodes of a swarm that outlived a previous coordinator re-join at their next heartbeat
    # (a node still silent after a heartbeat timeout would count as gone anyway): until
    # then, nothing is re-placed.
    registry.settle_until = (
        time.monotonic() + config.heartbeat_timeout + 2 * config.heartbeat_interval
    )
    stop = stop or asyncio.Event()
    received = stop_on_signals(stop)  # (first: once it says it is ready, a signal stops it)
    if on_ready:
        on_ready(address)
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), config.heartbeat_interval / 2)
            except asyncio.TimeoutError:
                now = service.clock()
                gone = registry.expire(now)
                service.metrics.node_events.labels("expire").inc(len(gone))
                registry.rebalance(now)
                if now - checked_expiry >= EXPIRY_CHECK_S:
                    checked_expiry = now
                    registry.keep_excluded({(e.node_id, e.address) for e in exclusions.active()})
            if advertising is not None and advertising.done() and advertising.exception():
                raise advertising.exception()  # type: ignore[misc]  # e.g. a wrong interface
    finally:
        if advertising is not None and not (advertising.done() and advertising.exception()):
            advertiser = await advertising  # registering cannot be cut short
            await asyncio.to_thread(advertiser.close)
        await server.stop(grace=1)
        await service.replanner.close()
        exclusions.close()
    return received[0] if received else None
