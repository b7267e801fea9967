"""Run the gateway: one ``AsyncClient`` and the app on uvicorn's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import uvicorn

from nanoshard.client.checks import DEFAULT_CHECK_RATE
from nanoshard.client.sdk import AsyncClient
from nanoshard.client.session import RetryPolicy
from nanoshard.cliutil import hold_stop_signals
from nanoshard.errors import NanoshardError

from .app import Gateway, GatewayOptions, create_app

log = logging.getLogger(__name__)


@dataclass
class GatewayConfig:
    coordinator: str | None = None  # HOST:PORT; None: find it by mDNS
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    mdns_interfaces: list[str] | None = None
    swarm: str | None = None
    swarm_key: str | None = None
    tls_ca: Path | None = None
    codec: str = "fp32"
    check_rate: float = DEFAULT_CHECK_RATE
    route_wait_s: float = RetryPolicy.route_wait_s  # how long a request waits for a route
    options: GatewayOptions = field(default_factory=GatewayOptions)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for the gateway (uvicorn listens on it). Bound here,
    not by uvicorn, which exits the process when it cannot bind: a port in use or an
    address this machine does not have is a one-line NanoshardError instead."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise NanoshardError(f"the gateway cannot listen on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise NanoshardError(f"the gateway cannot listen on {host}:{port}: {why}") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, telling the gateway as soon as it is asked to stop (SIGINT,
    SIGTERM): uvicorn then waits for every request in flight, and a whole completion still
    running would hold the gateway up until its end; told, it ends at once (503)."""

    def __init__(self, config: uvicorn.Config, stopping: asyncio.Event) -> None:
        super().__init__(config)
        self._stopping = stopping
        self._loop = asyncio.get_running_loop()
        self.stopped_by: int | None = None  # the signal that stopped it

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():  # (which puts the handlers from before back)
            yield
        if self.stopped_by is not None:
            hold_stop_signals()  # (another signal changes nothing: it stopped cleanly)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again as its serve() ends, inside the event loop, where
        # asyncio's own SIGINT handler may turn it into a cancellation that a clean-up
        # absorbs (the gateway then exited 0 on Ctrl-C, under load): ``serve`` returns it
        # instead, and the command ends as the signal asks once the loop is closed.
        self._captured_signals.clear()
        self.stopped_by = self.stopped_by or sig
        self._loop.call_soon_threadsafe(self._stopping.set)  # (in a signal handler)


async def serve(config: GatewayConfig, ready: Callable[[str], None]) -> int | None:
    """Serve until SIGINT/SIGTERM; ``ready(url)`` once the server accepts connections.
    Returns the signal that stopped it."""
    client = AsyncClient(
        config.coordinator,
        mdns_interfaces=config.mdns_interfaces,
        swarm=config.swarm,
        codec=config.codec,
        swarm_key=config.swarm_key,
        tls_ca=config.tls_ca,
        check_rate=config.check_rate,
        retry=RetryPolicy(route_wait_s=config.route_wait_s),
    )
    gateway = Gateway(client, config.options)
    app = create_app(gateway)
    server = _Server(
        # (no lifespan: the app has no start-up or shut-down of its own, and a second Ctrl-C
        # cancelled uvicorn's lifespan task, which logged that as a traceback)
        uvicorn.Config(
            app, host=config.host, port=config.port, log_level="warning", lifespan="off"
        ),
        gateway.stopping,
    )
    listener = listen(config.host, config.port)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        while not server.started:
            if task.done():
                task.result()  # it could not start: say why
                raise NanoshardError(f"the gateway could not start on {config.host}:{config.port}")
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        # Find the swarm now, so the first request does not wait for it (a failure here is
        # not fatal: every request tries again, and answers 503 while there is no swarm).
        warm = asyncio.create_task(client.connect())
        warm.add_done_callback(_note)
        ready(f"http://{config.host}:{port}")
        await task
        return server.stopped_by
    finally:
        if not task.done():
            server.should_exit = True
            gateway.stopping.set()
            with contextlib.suppress(Exception):
                await task
        await client.close()


def _note(task: asyncio.Task) -> None:
    exc = None if task.cancelled() else task.exception()
    if exc is not None:
        log.warning("no swarm yet (requests answer 503 until there is one): %s", exc)
