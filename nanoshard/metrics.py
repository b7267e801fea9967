"""Prometheus metrics, the parts nodes and the coordinator share (``--metrics-port``).

Each process keeps its metrics in a ``CollectorRegistry`` of its own, never
``prometheus_client``'s global one, so several nodes or coordinators in one process (tests)
do not collide. Counters and histograms are bumped where their events happen, on the event
loop (a lock of prometheus_client's own, never contended: one thread bumps them); the
figures a process already keeps (sessions, queue, KV memory, the registry) are read when
Prometheus scrapes, by a collector running on the exposition server's thread. Those reads
go through ``on_loop``: the figures belong to the event loop, which runs the read between
two of its callbacks, so nothing is read half-changed.

The exposition server binds ``--metrics-host``, by default the process's own ``--host``
unless that is a wildcard (then 127.0.0.1): metrics leave the machine only when asked to.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server

log = logging.getLogger(__name__)
T = TypeVar("T")

# Step times in seconds: 0.5 ms (a tiny stage on a GPU) to 5 s (a big prompt on a laptop).
STEP_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
SCRAPE_TIMEOUT_S = 2.0  # how long a scrape waits for the event loop to read its figures
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def new_registry() -> CollectorRegistry:
    """A process's (or a test's) own registry."""
    return CollectorRegistry(auto_describe=True)


def units_label(start: int, end: int) -> str:
    """A stage's ``units`` label: ``"0-3"`` for units [0, 3)."""
    return f"{start}-{end}"


@dataclass(frozen=True)
class MetricsConfig:
    """Where to expose metrics: ``port`` 0 = not at all."""

    port: int = 0
    host: str = "127.0.0.1"

    @property
    def enabled(self) -> bool:
        return self.port > 0


def add_metrics_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("metrics")
    g.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default 0: off)",
    )
    g.add_argument(
        "--metrics-host",
        default=None,
        metavar="HOST",
        help="address the metrics listen on (default: --host, or 127.0.0.1 when --host is "
        "a wildcard such as 0.0.0.0)",
    )


def metrics_from_args(args: argparse.Namespace) -> MetricsConfig:
    from nanoshard.errors import InvalidArgument

    port = args.metrics_port
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"--metrics-port {port} is not a port (1 to 65535, or 0: off)")
    host = args.metrics_host
    if host is None:
        own = getattr(args, "host", "") or ""
        host = "127.0.0.1" if own in WILDCARDS else own
    return MetricsConfig(port, host)


def url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/metrics"


def metrics_line(who: str, host: str, port: int) -> str:
    """The line a server prints once its metrics answer (``who`` as in ``listening_line``)."""
    return f"{who}: metrics on {url(host, port)}"


class Exposition:
    """The HTTP server Prometheus scrapes (a daemon thread of prometheus_client's)."""

    def __init__(self, registry: CollectorRegistry, config: MetricsConfig) -> None:
        from nanoshard.errors import Unavailable

        self.config = config
        host = config.host.strip("[]")
        try:
            self.server, self.thread = start_http_server(config.port, addr=host, registry=registry)
        except OSError as exc:
            raise Unavailable(
                f"cannot serve metrics on {config.host}:{config.port}: {exc.strerror or exc}"
            ) from None
        self.port = self.server.server_port
        self.url = url(config.host, self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def on_loop(loop: asyncio.AbstractEventLoop | None, read: Callable[[], T]) -> T:
    """``read()`` run on ``loop``'s thread, between two of its callbacks; its result here.
    Run in place when there is no loop running elsewhere (a test without one, or a call
    from the loop's own thread). Raises ``TimeoutError`` if the loop does not get to it
    within ``SCRAPE_TIMEOUT_S`` (it is stuck, or stopping)."""
    if loop is None or loop.is_closed() or not loop.is_running() or _on_thread_of(loop):
        return read()
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(read())
        except BaseException as exc:
            future.set_exception(exc)

    try:
        loop.call_soon_threadsafe(run)
    except RuntimeError:  # closed meanwhile: nothing changes any more
        return read()
    try:
        return future.result(SCRAPE_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError("the event loop did not answer the scrape in time") from None


def _on_thread_of(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The loop running on this thread, if any (what a collector's reads go through)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def expose(config: MetricsConfig, who: str) -> CollectorRegistry | None:
    """For a command line: when ``config`` asks for metrics, a new registry served at its
    address, announced on stdout (``metrics_line``); else None."""
    if not config.enabled:
        return None
    disable_created_metrics()  # no ``_created`` series beside every counter: half the noise
    registry = new_registry()
    exposition = Exposition(registry, config)
    print(metrics_line(who, config.host, exposition.port), flush=True)
    return registry
