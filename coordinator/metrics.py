"""The coordinator's Prometheus metrics (``nanoshard coordinator --metrics-port N``).

Counted as they happen (on the event loop, by the servicer): routes handed out, nodes
joining, leaving and dropped, spot-check reports by what became of them, the comparisons
they carried, exclusions. Read when Prometheus scrapes (``CoordinatorCollector``): the
registry's nodes by health, each unit's replicas, sessions, KV memory and tokens per second
as the nodes' heartbeats report them, placements run and units moved, nodes excluded now.
The collector copies the registry on the event loop (``Registry.view``, as a status does)
and computes the figures from the copy on the scrape's own thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nanoshard.config import unit_name
from nanoshard.metrics import new_registry, on_loop, running_loop

from .registry import NodeRecord, Registry

if TYPE_CHECKING:
    from .service import CoordinatorService

log = logging.getLogger(__name__)

# A node's health, as the metrics count nodes (each node is in exactly one):
HEALTH = (
    "serving",  # ready on the stage it is assigned
    "loading",  # assigned a stage it does not serve yet (fetching, loading, forming a group)
    "idle",  # assigned nothing
    "late",  # its last heartbeat is older than two intervals and a second (status's rule)
    "excluded",  # caught by spot-checks: out of placement and routes
)
ROUTES = ("session", "peek", "none")
CHECK_OUTCOMES = ("tallied", "verified", "ignored", "refused", "false")
NODE_EVENTS = ("join", "leave", "expire")


def health(registry: Registry, record: NodeRecord, now: float, heartbeat_s: float) -> str:
    if record.address in registry.excluded:
        return "excluded"
    if now - record.last_heartbeat > 2 * heartbeat_s + 1:
        return "late"
    if record.assigned is None:
        return "idle"
    if record.ready is not None and (record.ready, record.tp_group) == (
        record.assigned,
        record.group,
    ):
        return "serving"
    return "loading"


class CoordinatorMetrics:
    """The counters the coordinator bumps, in ``registry`` (a new one of its own if None)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.routes = Counter(
            "nanoshard_coordinator_routes",
            "Route requests: handed out for a session, looked at only (peek), or none possible",
            ["result"],
            registry=r,
        )
        self.node_events = Counter(
            "nanoshard_coordinator_node_events",
            "Nodes that joined (again, too), left, or were dropped for missing heartbeats",
            ["event"],
            registry=r,
        )
        self.check_reports = Counter(
            "nanoshard_coordinator_check_reports",
            "Spot-check reports received, by outcome: tallied; verified (the coordinator "
            "re-ran the step); ignored (a caller not heard any more, or a node gone); "
            "refused (malformed, or over the rate limit); false (evidence that does not hold)",
            ["outcome"],
            registry=r,
        )
        self.comparisons = Counter(
            "nanoshard_coordinator_check_comparisons",
            "Comparisons of two outputs of one step, by who compared (a client, or the "
            "coordinator's re-run) and whether they agreed",
            ["by", "result"],
            registry=r,
        )
        self.exclusions = Counter(
            "nanoshard_coordinator_exclusions",
            "Nodes excluded for a signed output the coordinator's re-run contradicted",
            registry=r,
        )
        for labels, values in (
            (self.routes, ROUTES),
            (self.node_events, NODE_EVENTS),
            (self.check_reports, CHECK_OUTCOMES),
        ):
            for value in values:
                labels.labels(value)
        for by in ("client", "coordinator"):
            for result in ("agree", "disagree"):
                self.comparisons.labels(by=by, result=result)

    def watch(self, service: CoordinatorService) -> None:
        """Expose ``service``'s registry and placements too (read at each scrape)."""
        self.registry.register(CoordinatorCollector(service))


class CoordinatorCollector(Collector):
    """The registry's figures, from a copy made on the event loop at each scrape."""

    def __init__(self, service: CoordinatorService) -> None:
        self.service = service
        self.loop = running_loop()  # the loop the registry belongs to (None: tests)

    def describe(self) -> list[Metric]:
        return []

    def _read(self) -> tuple[Registry, float, int, int]:
        svc = self.service
        return svc.registry.view(), svc.clock(), svc.replanner.runs, svc.replanner.moved

    def collect(self) -> Iterator[Metric]:
        try:
            registry, now, runs, moved = on_loop(self.loop, self._read)
        except Exception as exc:  # a stuck or stopping loop: the counters still answer
            log.debug("could not read the registry for a scrape: %s", exc)
            return
        heartbeat_s = self.service.heartbeat_interval_s
        records = list(registry.nodes.values())
        counts = dict.fromkeys(HEALTH, 0)
        for record in records:
            counts[health(registry, record, now, heartbeat_s)] += 1
        nodes = GaugeMetricFamily(
            "nanoshard_coordinator_nodes", "Nodes in the swarm, by health", labels=["health"]
        )
        for state, n in counts.items():
            nodes.add_metric([state], n)
        yield nodes

        coverage = registry.coverage()
        config = registry.config
        units = GaugeMetricFamily(
            "nanoshard_coordinator_unit_replicas",
            "Servers (a node alone, or a tensor-parallel group) ready on each unit",
            labels=["unit", "name"],
        )
        for u, n in enumerate(coverage):
            units.add_metric([str(u), unit_name(config, u)], n)
        yield units
        yield GaugeMetricFamily(
            "nanoshard_coordinator_min_unit_replicas",
            "Replicas of the least served unit (0: no route)",
            value=min(coverage, default=0),
        )
        yield GaugeMetricFamily(
            "nanoshard_coordinator_replicas_target",
            "Replicas of every unit placement aims for (--replicas)",
            value=registry.replicas,
        )

        # A session is open on every hop of its route: counted once, where the route starts
        # (the nodes serving embed; a group's rank 0 reports for the group).
        sessions = 0
        for record in records:
            if record.ready is None or record.ready[0] != 0:
                continue
            seat = registry.seat(record)
            if seat is None or seat.rank == 0:
                sessions += record.load.sessions
        yield GaugeMetricFamily(
            "nanoshard_coordinator_sessions",
            "Sessions open on the swarm, as the nodes serving embed last reported them",
            value=sessions,
        )
        yield GaugeMetricFamily(
            "nanoshard_coordinator_kv_bytes_used",
            "KV memory reserved on every node, as last reported",
            value=sum(r.load.kv_bytes_used for r in records),
        )
        yield GaugeMetricFamily(
            "nanoshard_coordinator_kv_bytes_budget",
            "KV memory budget of every node, as last reported",
            value=sum(r.load.kv_bytes_budget for r in records),
        )
        yield GaugeMetricFamily(
            "nanoshard_coordinator_tokens_per_second",
            "Tokens the swarm sampled a second lately, as the nodes holding the head report",
            value=registry.measured_tokens_per_s(),
        )
        yield GaugeMetricFamily(
            "nanoshard_coordinator_placement_version",
            "The placement in force (bumped at every change)",
            value=registry.version,
        )
        yield CounterMetricFamily(
            "nanoshard_coordinator_placements", "Placements run and put in force", value=runs
        )
        yield CounterMetricFamily(
            "nanoshard_coordinator_units_moved",
            "Units nodes were given to newly load, over every placement",
            value=moved,
        )
        yield GaugeMetricFamily(
            "nanoshard_coordinator_excluded",
            "Node addresses excluded now (spot-checks; kept across restarts until they expire)",
            value=len(registry.excluded),
        )
