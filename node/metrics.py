"""A node's Prometheus metrics (``nanoshard-node join --metrics-port N``).

Counted as they happen (on the event loop, by the servicer): steps and positions per stage,
tokens sampled, compute time per step, sessions opened, failovers of its next-hop links,
spot-check material answered. Read when Prometheus scrapes (``NodeCollector``, from what the
node keeps anyway): open sessions, the compute queue, KV memory, its live speed ratio.

A stage is labelled ``units="START-END"`` (the half-open unit range it ran); a step of one
position is a ``decode`` step, of several a ``prefill`` (a prompt, or a chunk of one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nanoshard.engine import Stage
from nanoshard.metrics import STEP_BUCKETS, new_registry, on_loop, running_loop, units_label

if TYPE_CHECKING:
    from .service import NodeService

log = logging.getLogger(__name__)

FAILOVERS = ("replica", "refill", "slow")  # nanoshard.hop.NextHop's on_repair kinds
CHECKS = ("output", "material")


class _StageMetrics:
    """One stage's children of the labelled metrics, looked up once."""

    def __init__(self, m: NodeMetrics, units: str, head: bool) -> None:
        self.decode = m.steps.labels(units=units, kind="decode")
        self.prefill = m.steps.labels(units=units, kind="prefill")
        self.decode_s = m.compute.labels(units=units, kind="decode")
        self.prefill_s = m.compute.labels(units=units, kind="prefill")
        self.positions = m.positions.labels(units=units)
        # (a stage without the head samples nothing: no series of zeros for it)
        self.tokens = m.tokens.labels(units=units) if head else None


class NodeMetrics:
    """The counters a node bumps, in ``registry`` (a new one of its own if None)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.steps = Counter(
            "nanoshard_node_steps",
            "Steps computed, by stage and kind (decode: one position; prefill: several)",
            ["units", "kind"],
            registry=r,
        )
        self.positions = Counter(
            "nanoshard_node_positions",
            "Positions (tokens of input) computed",
            ["units"],
            registry=r,
        )
        self.tokens = Counter(
            "nanoshard_node_tokens", "Tokens sampled (by a stage holding the head)", ["units"],
            registry=r,
        )  # fmt: skip
        self.compute = Histogram(
            "nanoshard_node_step_compute_seconds",
            "A step's compute on this node (its share of a batched forward), by stage and kind",
            ["units", "kind"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.sessions_opened = Counter(
            "nanoshard_node_sessions_opened", "Sessions opened here", registry=r
        )
        self.failovers = Counter(
            "nanoshard_node_failovers",
            "Repairs of this node's next-hop links: switched to a replica, refilled a node, "
            "or left a node whose steps slowed down",
            ["kind"],
            registry=r,
        )
        self.checks = Counter(
            "nanoshard_node_checks_answered",
            "Spot-check calls answered: a step's output returned (output), or the "
            "activations sent on, read back (material)",
            ["kind"],
            registry=r,
        )
        for kind in FAILOVERS:
            self.failovers.labels(kind=kind)
        for kind in CHECKS:
            self.checks.labels(kind=kind)
        self._stages: dict[tuple[int, int], _StageMetrics] = {}

    def serving(self, stage: Stage) -> _StageMetrics:
        """``stage``'s counters, shown at 0 from the moment the node serves it."""
        key = (stage.start, stage.end)
        s = self._stages.get(key)
        if s is None:
            s = self._stages[key] = _StageMetrics(self, units_label(*key), stage.has_head)
        return s

    def step(self, stage: Stage, n_tokens: int, compute_ms: float, sampled: bool) -> None:
        """A step of ``n_tokens`` positions ran on ``stage`` (sampling a token or not)."""
        s = self.serving(stage)
        if n_tokens == 1:
            s.decode.inc()
            s.decode_s.observe(compute_ms / 1e3)
        else:
            s.prefill.inc()
            s.prefill_s.observe(compute_ms / 1e3)
        s.positions.inc(n_tokens)
        if sampled and s.tokens is not None:
            s.tokens.inc()

    def failover(self, kind: str) -> None:
        self.failovers.labels(kind=kind).inc()

    def check_answered(self, kind: str) -> None:
        self.checks.labels(kind=kind).inc()

    def watch(self, service: NodeService) -> None:
        """Expose ``service``'s live figures too (read at each scrape)."""
        self.registry.register(NodeCollector(service))


class NodeCollector(Collector):
    """The figures a node keeps anyway, read at each scrape on its event loop."""

    def __init__(self, service: NodeService) -> None:
        self.service = service
        self.loop = running_loop()  # the loop the service's state belongs to (None: tests)

    def describe(self) -> list[Metric]:
        return []  # nothing to check against other collectors' names up front

    def _read(self) -> tuple:
        svc = self.service
        stage = svc.stage
        units = units_label(stage.start, stage.end) if stage is not None else ""
        return (
            svc.identity.name,
            svc.identity.address,
            units,
            len(svc.sessions),
            svc.worker.queue_depth,
            svc.sessions.used_bytes,
            svc.sessions.budget_bytes,
            svc.live.ratio.value,
        )

    def collect(self) -> Iterator[Metric]:
        try:
            name, address, units, sessions, queue, used, budget, ratio = on_loop(
                self.loop, self._read
            )
        except Exception as exc:  # a stuck or stopping loop: the counters still answer
            log.debug("could not read the node's figures for a scrape: %s", exc)
            return
        info = GaugeMetricFamily(
            "nanoshard_node_info",
            "This node: its name, address and the stage it serves now (units, '' if none)",
            labels=["name", "address", "units"],
        )
        info.add_metric([name, address, units], 1)
        yield info
        yield GaugeMetricFamily("nanoshard_node_sessions", "Sessions open here", value=sessions)
        yield GaugeMetricFamily(
            "nanoshard_node_queue_depth", "Compute jobs queued or running", value=queue
        )
        yield GaugeMetricFamily(
            "nanoshard_node_kv_bytes_used",
            "KV cache and replay memory reserved by open sessions",
            value=used,
        )
        yield GaugeMetricFamily(
            "nanoshard_node_kv_bytes_budget", "KV memory all sessions may reserve", value=budget
        )
        yield GaugeMetricFamily(
            "nanoshard_node_speed_ratio",
            "Decode compute now over what the capacity measurement predicts (0: unknown)",
            value=ratio,
        )
