"""The coordinator at 1,000 and 10,000 nodes: a discrete-event simulation of a swarm.

    python benchmarks/swarm_sim.py                 # 1,000 and 10,000 nodes -> results/swarm_sim.*
    python benchmarks/swarm_sim.py --nodes 10000   # one size
    python benchmarks/swarm_sim.py --quick         # 200 nodes, half an hour: seconds

It drives the real ``coordinator.registry.Registry`` through its public methods with a
simulated clock: nodes ``join``, ``heartbeat`` (their ready stage and their live speed
ratio, ``LiveReport``, as ``node/live.py`` measures it), ``leave`` or crash (their
heartbeats stop and ``expire`` drops them); clients take routes as ``GetRoute`` does
(``registry.servers()``, ``routing.plan_route``, ``registry.handed_out``). Placement runs
off the event loop as ``coordinator/replanner.py`` runs it: the registry only records the
request (``Registry.defer``), one run at a time reads ``plan_input``, places, and ``apply``
puts the result in force after a simulated placement time; requests made meanwhile merge
into the next run.

The swarm (everything drawn up front from the seed, so two policies see the same trace):

- nodes: ``placement_sim``'s heterogeneous classes (laptops, desktops, GPUs; memory and
  block speed), each with its own download bandwidth;
- owner load: a diurnal sine over the simulated day (a phase and amplitude per node), and
  bursts (an owner starting a game: 3-10x slower for minutes), reported as the speed ratio;
- churn: Poisson joins, exponential lifetimes, ending in a graceful leave or a crash;
- sessions: Poisson arrivals, each holding its route for some tokens.

A node fetches the units of a new stage at its bandwidth and keeps serving its old stage
until they are loaded (then its next heartbeat reports the new one ready). The swarm is
taken to be busy (the throughput figure is the one for many concurrent sessions), so a
node serving a stage runs steps and reports a fresh speed ratio.

Two placement policies on the same trace, the hook called every 30 simulated seconds:
- ours: ``Registry.rebalance(now)`` (live speeds, hysteresis, a budget of units moved);
- petals: Petals-style threshold rebalancing: joiners take the weakest span, and each
  interval one server in turn moves if ``should_choose_other_blocks`` says so (balance
  quality 0.75, placement_sim's ``Petals``); it places by the nodes' measured speeds.

Reported: throughput (the weakest unit's steps/s from the nodes' current live speeds and
ready stages) against the upper bound (``placement_sim.work_bound`` on the same speeds),
as a series and its mean and min share; p50/p99 predicted ms per token of the routes
handed out (``routing.route_ms``); units moved per hour; the coordinator's CPU
(``time.process_time``) per heartbeat, route, placement, expire, rebalance and status
call (``CoordinatorService.GetStatus`` itself). Deterministic with a seed, CPU times aside.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import json
import logging
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

from placement_sim import MODELS, SWARMS, Petals, random_node, reach, work_bound

from nanoshard.coordinator import groups
from nanoshard.coordinator.load import LiveReport
from nanoshard.coordinator.placement import (
    NodeCapacity,
    Placement,
    coverage,
    unit_costs,
    unit_throughput,
)
from nanoshard.coordinator.registry import WEIGHT_SHARE, Capacity, Load, NodeRecord, Registry
from nanoshard.coordinator.routing import plan_route, route_ms
from nanoshard.coordinator.service import CoordinatorService
from nanoshard.coordinator.trust import Comparison, Ledger
from nanoshard.errors import Unavailable
from nanoshard.v1 import coordinator_pb2 as cpb

RESULTS = Path(__file__).resolve().parent / "results"
DAY_S = 86_400.0
MB = 1_000_000
DISK_BYTES_S = 500 * MB  # weights a volunteer cached from an earlier session


@dataclass(frozen=True)
class Settings:
    nodes: int = 1000
    hours: float = 2.0
    seed: int = 0
    model: str = "gpt2-1.5B"
    swarm: str = "mixed"
    heartbeat_s: float = 2.0  # the coordinator's defaults (coordinator/server.py)
    timeout_s: float = 6.0
    expire_every_s: float = 1.0  # the coordinator runs expire every heartbeat_s / 2
    policy_every_s: float = 30.0  # the placement policy's hook
    place_ms_per_node: float = 0.1  # simulated time a placement run takes (~1 s at 10,000)
    # The Replanner runs placements back to back (0); more coalesces requests for longer.
    place_gap_s: float = 0.0
    lifetime_h: float = 4.0  # a volunteer's mean time online
    crash_share: float = 0.3  # of departures, those without a Leave
    bursts_per_h: float = 0.5  # per node: its owner starts something heavy
    burst_min: tuple[float, float] = (2.0, 20.0)
    burst_factor: tuple[float, float] = (3.0, 10.0)
    diurnal: tuple[float, float] = (0.0, 1.0)  # amplitude: up to 1 + a times slower by day
    bandwidth_mb_s: tuple[float, float] = (10.0, 100.0)  # a volunteer's download
    load_s: float = 2.0  # loading fetched units into memory, on top of the fetch
    sessions_per_s: float = 1.0
    tokens: tuple[int, int] = (64, 512)
    sample_every_s: float = 60.0  # throughput against the bound
    status_every_s: float = 300.0  # a GetStatus call
    warmup_s: float = 300.0  # the first loads: left out of the means and the rates

    @property
    def horizon_s(self) -> float:
        return self.hours * 3600.0


# ---- the trace: drawn up front, the same for every policy -------------------------------


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    address: str
    true: NodeCapacity  # its speed on an idle machine, and its per-step overhead
    capacity: Capacity  # what it tells the coordinator at join
    bandwidth: float  # bytes/s it fetches weights at
    phase: float  # of the diurnal sine, in days
    amplitude: float
    joins_at: float
    leaves_at: float  # math.inf: stays past the horizon
    crashes: bool
    bursts: tuple[tuple[float, float, float], ...]  # (start, end, factor)
    cached: bool  # in the swarm before the simulation: its first stage loads from disk
    beat_offset: float  # its first heartbeat, after its join


@dataclass(frozen=True)
class SessionSpec:
    at: float
    tokens: int


@dataclass(frozen=True)
class Trace:
    settings: Settings
    nodes: tuple[NodeSpec, ...]
    sessions: tuple[SessionSpec, ...]


def make_trace(s: Settings) -> Trace:
    config = MODELS[s.model]
    rng = {k: random.Random(f"{s.seed}-{s.nodes}-{k}") for k in ("spec", "churn", "load", "use")}
    ids = itertools.count()

    def node(joins_at: float, cached: bool = False) -> NodeSpec:
        k = next(ids)
        node_id = f"n{k:06d}"
        true = random_node(rng["spec"], node_id, config, SWARMS[s.swarm])
        life = rng["churn"].expovariate(1.0 / (s.lifetime_h * 3600.0))
        leaves_at = joins_at + life if joins_at + life < s.horizon_s else math.inf
        bursts, t = [], joins_at
        while s.bursts_per_h > 0:
            t += rng["load"].expovariate(s.bursts_per_h / 3600.0)
            if t >= min(leaves_at, s.horizon_s):
                break
            length = 60.0 * rng["load"].uniform(*s.burst_min)
            bursts.append((t, t + length, rng["load"].uniform(*s.burst_factor)))
            t += length
        return NodeSpec(
            node_id=node_id,
            address=f"10.{k >> 16 & 255}.{k >> 8 & 255}.{k & 255}:7961",
            true=true,
            capacity=Capacity(
                device="cpu",
                dtype="fp32",
                memory_bytes=math.ceil(true.memory_bytes / WEIGHT_SHARE),
                block_ms=true.block_ms,
                head_ms=true.head_ms or true.block_ms,
            ),
            bandwidth=rng["spec"].uniform(*s.bandwidth_mb_s) * MB,
            phase=rng["load"].random(),
            amplitude=rng["load"].uniform(*s.diurnal),
            joins_at=joins_at,
            leaves_at=leaves_at,
            crashes=rng["churn"].random() < s.crash_share,
            bursts=tuple(bursts),
            cached=cached,
            beat_offset=rng["spec"].uniform(0.1, s.heartbeat_s),
        )

    nodes = [node(0.0, cached=True) for _ in range(s.nodes)]
    t = 0.0
    while True:  # joins keep the swarm at its size on average
        t += rng["churn"].expovariate(s.nodes / (s.lifetime_h * 3600.0))
        if t >= s.horizon_s:
            break
        nodes.append(node(t))
    sessions, t = [], 0.0
    while s.sessions_per_s > 0:
        t += rng["use"].expovariate(s.sessions_per_s)
        if t >= s.horizon_s:
            break
        sessions.append(SessionSpec(t, rng["use"].randint(*s.tokens)))
    return Trace(s, tuple(nodes), tuple(sessions))


def speed_ratio(spec: NodeSpec, t: float) -> float:
    """How many times its idle speed a node's steps take at ``t``: its owner's day, and a
    burst if one is on."""
    day = 1.0 + spec.amplitude * max(0.0, math.sin(2 * math.pi * (t / DAY_S + spec.phase)))
    k = bisect.bisect_right(spec.bursts, (t, math.inf, math.inf)) - 1
    burst = spec.bursts[k][2] if k >= 0 and t < spec.bursts[k][1] else 1.0
    return day * burst


def live_capacity(spec: NodeSpec, t: float) -> NodeCapacity:
    """The node's speed now (its true capacity slowed by its owner's load)."""
    r = speed_ratio(spec, t)
    head = spec.true.head_ms or spec.true.block_ms
    return NodeCapacity(
        spec.node_id,
        spec.true.memory_bytes,
        spec.true.block_ms * r,
        head * r,
        spec.true.overhead_ms,
    )


# ---- policies ---------------------------------------------------------------------------


def petals_plan(
    petals: Petals, nodes: list[NodeCapacity], previous: Placement, turn: bool
) -> groups.Plan:
    """Petals-style: stages stay; a node without one takes the weakest span; on a ``turn``
    one server in turn moves if Petals' ``should_choose_other_blocks`` says so."""
    by_id = {n.node_id: n for n in nodes}
    for n in nodes:
        if n.node_id not in petals.reach:
            petals.reach[n.node_id] = reach(petals.units, n.memory_bytes)
    placement = {i: st for i, st in previous.items() if i in by_id}
    h = unit_throughput(placement, petals.units, nodes)
    for n in nodes:
        if n.node_id not in placement:
            stage = petals.best_start(h, n.node_id)
            if stage is not None:
                placement[n.node_id] = stage
                rate = petals.rates({n.node_id: stage}, by_id)[n.node_id]
                for u in range(*stage):
                    h[u] += rate
    servers = sorted(placement)
    if turn and servers:
        me = servers[petals.turn % len(servers)]
        petals.turn += 1
        if petals.should_move(me, placement, by_id):
            others = {i: st for i, st in placement.items() if i != me}
            h = unit_throughput(others, petals.units, nodes)
            placement[me] = petals.best_start(h, me) or placement[me]
    gaps = sum(1 for c in coverage(placement, len(petals.units)) if c == 0)
    return groups.Plan(placement, {}, 0.0, 0.0, gaps)


# ---- the simulation ---------------------------------------------------------------------


@dataclass
class NodeState:
    spec: NodeSpec
    alive: bool = True
    serving: tuple[int, int] | None = None  # the stage it serves (reports ready)
    target: tuple[int, int] | None = None  # the assignment it last heard
    loaded_at: float = math.inf  # when ``target``'s units are in memory
    last_step: float = -math.inf  # when it last served (its live figures' age)
    ratio: float = 0.0  # the speed ratio its steps measured last
    sessions: int = 0
    loaded_once: bool = False
    stage_ms: float = 0.0  # a step of ``serving`` on an idle machine
    load: Load = field(default_factory=Load)  # what its last heartbeat reported


@dataclass
class Cpu:
    """CPU seconds one kind of coordinator call took: count, total, max."""

    n: int = 0
    total: float = 0.0
    max: float = 0.0

    def add(self, seconds: float) -> None:
        self.n += 1
        self.total += seconds
        self.max = max(self.max, seconds)

    def row(self) -> dict[str, float]:
        mean = self.total / self.n if self.n else 0.0
        return {"calls": self.n, "mean_ms": 1e3 * mean, "max_ms": 1e3 * self.max}


@dataclass
class Tally:
    series: list[dict[str, float]] = field(default_factory=list)  # throughput samples
    route_ms: list[float] = field(default_factory=list)
    unavailable: int = 0  # route requests no chain could answer
    through_crashed: int = 0  # routes whose preferred node had crashed (not yet expired)
    through_unready: int = 0  # routes through a live node not serving the hop: a bug
    moved: int = 0  # units nodes already serving must newly load (re-placement)
    first_loads: int = 0  # units nodes without a stage must load (joins)
    moved_after_warmup: int = 0
    first_after_warmup: int = 0
    applied: int = 0  # what ``apply`` returned, summed (checks the counts above)
    placements: int = 0
    status_nodes: list[int] = field(default_factory=list)
    cpu: dict[str, Cpu] = field(default_factory=dict)
    status_bytes: int = 0  # the last GetStatus reply, serialized

    def timed(self, kind: str, started: float) -> None:
        self.cpu.setdefault(kind, Cpu()).add(time.process_time() - started)


class Sim:
    """One policy on one trace. ``run`` plays the events in time order; each handler is one
    thing a node, a client or the coordinator does."""

    def __init__(self, trace: Trace, policy: str) -> None:
        self.trace, self.policy, self.s = trace, policy, trace.settings
        config = MODELS[self.s.model]
        self.units = unit_costs(config)
        self.n_units = config.n_units
        self.registry = Registry(config, replicas=2, heartbeat_timeout_s=self.s.timeout_s, tp="off")
        self.registry.defer = self.request_placement
        self.petals = Petals(self.units)
        self.petals_turn = False
        self.nodes: dict[str, NodeState] = {}
        self.by_address: dict[str, NodeState] = {}
        self.ledger = Ledger()
        self.status = status_service(self.registry, self.ledger, self.s.heartbeat_s)
        self.tally = Tally()
        self.now = 0.0
        self.events: list[tuple[float, int, Callable[..., None], tuple]] = []
        self.seq = itertools.count()
        self.placing = False  # a placement run is under way, or due
        self.placed_at = -math.inf  # when the last run was put in force
        self.wanted = False  # placement was requested since the run under way read its input

    def at(self, t: float, handler: Callable[..., None], *args: object) -> None:
        heapq.heappush(self.events, (t, next(self.seq), handler, args))

    def run(self) -> Tally:
        s = self.s
        for spec in self.trace.nodes:
            self.at(spec.joins_at, self.join, spec)
        for session in self.trace.sessions:
            self.at(session.at, self.open_session, session)
        for every, handler in (
            (s.expire_every_s, self.expire),
            (s.policy_every_s, self.policy_hook),
            (s.sample_every_s, self.sample),
            (s.status_every_s, self.status_call),
        ):
            self.at(every, self.periodic, every, handler)
        while self.events and self.events[0][0] <= s.horizon_s:
            self.now, _, handler, args = heapq.heappop(self.events)
            handler(*args)
        return self.tally

    def periodic(self, every: float, handler: Callable[[], None]) -> None:
        handler()
        self.at(self.now + every, self.periodic, every, handler)

    # ---- nodes ----------------------------------------------------------------------

    def join(self, spec: NodeSpec) -> None:
        node = NodeState(spec)
        self.nodes[spec.node_id] = node
        self.by_address[spec.address] = node
        record = NodeRecord(
            spec.node_id, spec.node_id, spec.address, spec.capacity, last_heartbeat=self.now
        )
        started = time.process_time()
        self.registry.join(record)
        self.tally.timed("join", started)
        self.at(self.now + spec.beat_offset, self.heartbeat, node)
        if spec.leaves_at < math.inf:
            self.at(spec.leaves_at, self.depart, node)

    def depart(self, node: NodeState) -> None:
        node.alive = False
        if not node.spec.crashes:  # a crash just stops heartbeating: expire drops it
            started = time.process_time()
            self.registry.leave(node.spec.node_id)
            self.tally.timed("leave", started)

    def heartbeat(self, node: NodeState) -> None:
        if not node.alive:
            return
        spec, now = node.spec, self.now
        if node.loaded_at <= now:  # the new stage is in memory: serve it from now on
            node.serving, node.loaded_at = node.target, math.inf
            node.stage_ms = self.stage_ms(node)
        if node.serving is not None:  # a busy swarm: a node with a stage runs steps
            # (its EWMA, to 1 %: an unchanged report is the same object, as cheap as it is)
            node.last_step, node.ratio = now, round(speed_ratio(spec, now), 2)
        idle = now - node.last_step if node.last_step > -math.inf else 0.0
        if (node.ratio, idle, node.sessions) != (
            node.load.live.speed_ratio,
            node.load.live.idle_s,
            node.load.sessions,
        ):
            live = LiveReport(
                decode_ms=node.ratio * node.stage_ms, speed_ratio=node.ratio, idle_s=idle
            )
            node.load = Load(sessions=node.sessions, live=live)
        started = time.process_time()
        record = self.registry.heartbeat(spec.node_id, now, node.serving, node.load)
        self.tally.timed("heartbeat", started)
        if record is None:  # dropped (a missed heartbeat): a node joins again
            self.registry.join(
                NodeRecord(
                    spec.node_id, spec.node_id, spec.address, spec.capacity, now, held=node.serving
                )
            )
        elif record.assigned != node.target:
            self.assign(node, record.assigned)
        self.at(now + self.s.heartbeat_s, self.heartbeat, node)

    def assign(self, node: NodeState, stage: tuple[int, int] | None) -> None:
        """The heartbeat's reply names a new stage: fetch what it lacks, keep serving the
        old one meanwhile (a stage given up is dropped at the next heartbeat)."""
        node.target = stage
        if stage is None:
            node.loaded_at = self.now
            return
        have = range(*(node.serving or (0, 0)))
        fetch = sum(
            self.units[u].weight_bytes for u in range(*stage) if u not in have
        )  # (tied wte counted twice: a stage with embed and head fetches it once, but rarely)
        cached = node.spec.cached and node.serving is None and not node.loaded_once
        rate = DISK_BYTES_S if cached else node.spec.bandwidth
        node.loaded_at = self.now + (fetch / rate + self.s.load_s if fetch else 0)
        node.loaded_once = True

    def stage_ms(self, node: NodeState) -> float:
        """A decode step of the stage the node serves, on an idle machine."""
        start, end = node.serving or (0, 0)
        return sum(node.spec.true.unit_ms(u) for u in self.units[start:end])

    # ---- the coordinator ------------------------------------------------------------

    def expire(self) -> None:
        started = time.process_time()
        self.registry.expire(self.now)
        self.tally.timed("expire", started)

    def policy_hook(self) -> None:
        started = time.process_time()
        if self.policy == "ours":
            if hasattr(self.registry, "rebalance"):
                self.registry.rebalance(self.now)
        else:  # petals: the next run also checks one server's span
            self.petals_turn = True
            self.registry.replan()
        self.tally.timed("rebalance", started)

    def request_placement(self) -> None:
        """``Registry.defer``: as the Replanner, one run at a time; a request made while a
        run is under way is answered by the next one."""
        self.wanted = True
        if not self.placing:
            self.placing = True
            self.at(max(self.now, self.placed_at + self.s.place_gap_s), self.place)

    def place(self) -> None:
        self.wanted = False
        started = time.process_time()
        request = self.registry.plan_input()
        self.tally.timed("plan_input", started)
        started = time.process_time()
        if self.policy == "petals":
            kwargs = request.kwargs
            plan = petals_plan(self.petals, kwargs["nodes"], kwargs["previous"], self.petals_turn)
            self.petals_turn = False
        else:
            plan = groups.plan(**request.kwargs)
        self.tally.timed("placement", started)
        took = self.s.place_ms_per_node * len(request.nodes) / 1000
        self.at(self.now + took, self.apply, request, plan)

    def apply(self, request: object, plan: groups.Plan) -> None:
        before = {nid: r.assigned for nid, r in self.registry.nodes.items()}
        started = time.process_time()
        moved = self.registry.apply(request, plan)  # type: ignore[arg-type]
        self.tally.timed("apply", started)
        self.count_moves(before)
        self.tally.applied += moved
        self.tally.placements += 1
        self.placing, self.placed_at = False, self.now
        if self.wanted:
            self.request_placement()

    def count_moves(self, before: dict[str, tuple[int, int] | None]) -> None:
        """Units nodes must newly load: a node that had a stage is re-placed, one that had
        none makes its first load (what ``placement.units_moved`` counts, split)."""
        warm = self.now >= self.s.warmup_s
        for nid, r in self.registry.nodes.items():
            old, new = before.get(nid), r.assigned
            if new is None or new == old:
                continue
            had = range(*(old or (0, 0)))
            units = sum(1 for u in range(*new) if u not in had)
            if old is None:
                self.tally.first_loads += units
                self.tally.first_after_warmup += units * warm
            else:
                self.tally.moved += units
                self.tally.moved_after_warmup += units * warm

    # ---- clients --------------------------------------------------------------------

    def open_session(self, session: SessionSpec) -> None:
        """``GetRoute``: the servers, the fastest chain, the hand-out."""
        started = time.process_time()
        servers = self.registry.servers()
        try:
            hops = plan_route(servers, self.n_units)
        except Unavailable:
            self.tally.timed("route", started)
            self.tally.unavailable += 1
            return
        preferred = [h.addresses[0] for h in hops]
        self.registry.handed_out(preferred, self.now)
        self.tally.timed("route", started)
        ms = route_ms(servers, hops)
        self.tally.route_ms.append(ms)
        nodes = [self.by_address[a] for a in preferred]
        for node, hop in zip(nodes, hops, strict=True):
            if not node.alive:
                self.tally.through_crashed += 1
            elif (
                node.serving is None
                or not node.serving[0] <= hop.start < hop.end <= node.serving[1]
            ):
                self.tally.through_unready += 1
            node.sessions += 1
        if len(hops[0].addresses) > 1:  # a client's spot-check of the first hop
            a, b = hops[0].addresses[:2]
            self.ledger.add([Comparison(a, b, hops[0].start, hops[0].end, 0, 0.0, 1.0, self.now)])
        self.at(self.now + session.tokens * ms / 1000, self.close_session, nodes)

    def close_session(self, nodes: list[NodeState]) -> None:
        for node in nodes:
            node.sessions -= 1

    def status_call(self) -> None:
        started = time.process_time()
        # GetStatus's work, as it runs it (its thread aside): a copy, the tallies, the reply
        tallies = self.status.ledger.tallies(0.0)
        reply = self.status._status(self.registry.view(), tallies, 0.0)
        self.tally.timed("status", started)
        self.tally.status_nodes.append(len(self.registry.nodes))
        self.tally.status_bytes = reply.ByteSize()  # type: ignore[attr-defined]

    # ---- measurement ----------------------------------------------------------------

    def sample(self) -> None:
        """The weakest unit's steps/s from the live nodes' speeds now and the stages they
        serve, against the bound for the same speeds."""
        live = [n for n in self.nodes.values() if n.alive]
        caps = [live_capacity(n.spec, self.now) for n in live]
        serving = {n.spec.node_id: n.serving for n in live if n.serving is not None}
        weakest = min(unit_throughput(serving, self.units, caps)) if serving else 0.0
        bound = work_bound(self.units, caps) if caps else 0.0
        self.tally.series.append(
            {
                "t_s": self.now,
                "nodes": len(live),
                "serving": len(serving),
                "weakest": weakest,
                "bound": bound,
                "share": weakest / bound if bound else 0.0,
            }
        )


# ---- GetStatus, as the coordinator serves it --------------------------------------------


def status_service(registry: Registry, ledger: Ledger, heartbeat_s: float) -> CoordinatorService:
    """A ``CoordinatorService`` with just what ``GetStatus`` reads (no store, no arbiter, no
    Replanner: this simulation's placement shell stays the registry's ``defer``)."""
    svc = CoordinatorService.__new__(CoordinatorService)
    svc.registry, svc.ledger, svc.swarm = registry, ledger, "sim"
    svc.store = SimpleNamespace(model_id="sim", name="sim")
    svc.heartbeat_interval_s = heartbeat_s
    svc.clock = lambda: 0.0
    return svc


# ---- the coordinator's state, in bytes ---------------------------------------------------


def deep_size(obj: object, seen: set[int] | None = None) -> int:
    """Bytes of ``obj`` and everything it refers to (each object once)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
        size += sum(deep_size(x, seen) for x in obj)  # type: ignore[attr-defined]
    elif hasattr(obj, "__dict__"):
        size += deep_size(vars(obj), seen)
    return size


def state_sizes(sim: Sim) -> dict[str, float]:
    """What the coordinator holds, per node where it grows with nodes: its records in
    memory, a heartbeat on the wire (a real node id, 8 next hops), its status entry."""
    registry = sim.registry
    n = max(len(registry.nodes), 1)
    hops = [cpb.HopLink(address=f"10.0.0.{k}:7961", rtt_ms=3.0, bytes_per_s=1e5) for k in range(8)]
    beat = cpb.HeartbeatRequest(
        node_id="f" * 32,
        ready=True,
        start=10,
        end=30,
        load=cpb.NodeLoad(
            sessions=3,
            kv_bytes_used=1 << 30,
            kv_bytes_budget=1 << 32,
            queue_depth=1,
            step_ms_p50=20.0,
            live=cpb.LiveLoad(
                decode_ms=20.0,
                decode_ms_p90=25.0,
                tokens_per_s=50.0,
                speed_ratio=1.2,
                idle_s=0.5,
                next_hops=hops,
            ),
        ),
    )
    return {
        "nodes": len(registry.nodes),
        "record_bytes_per_node": deep_size(registry.nodes) / n,
        "handouts_bytes": deep_size(registry.handouts),
        "ledger_entries": len(sim.ledger._entries),
        "ledger_bytes": deep_size(sim.ledger),
        "heartbeat_wire_bytes": beat.ByteSize(),
        "status_wire_bytes_per_node": sim.tally.status_bytes / n,
        # What placement decides per node (hard state if replicated): a 32-hex-digit node
        # id, the stage's two units, the group id when in one (none here).
        "assignment_bytes_per_node": 32 + 2 * 4,
    }


# ---- report -----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(trace: Trace, tally: Tally) -> dict:
    s = trace.settings
    warm = [x for x in tally.series if x["t_s"] >= s.warmup_s] or tally.series
    hours = max(s.horizon_s - s.warmup_s, 1.0) / 3600
    status = tally.cpu.get("status", Cpu())
    per_node = status.total / max(sum(tally.status_nodes), 1)
    return {
        "share_mean": statistics.fmean(x["share"] for x in warm) if warm else 0.0,
        "share_min": min((x["share"] for x in warm), default=0.0),
        "weakest_mean": statistics.fmean(x["weakest"] for x in warm) if warm else 0.0,
        "bound_mean": statistics.fmean(x["bound"] for x in warm) if warm else 0.0,
        "route_ms_p50": percentile(tally.route_ms, 0.5),
        "route_ms_p99": percentile(tally.route_ms, 0.99),
        "routes": len(tally.route_ms),
        "routes_unavailable": tally.unavailable,
        "routes_through_crashed_hops": tally.through_crashed,
        "routes_through_unready_hops": tally.through_unready,
        "moved_per_h": tally.moved_after_warmup / hours,
        "first_loads_per_h": tally.first_after_warmup / hours,
        "moved_total": tally.moved,
        "first_loads_total": tally.first_loads,
        "placements": tally.placements,
        "status_us_per_node": 1e6 * per_node,
        "cpu": {k: c.row() for k, c in sorted(tally.cpu.items())},
        "series": [{k: round(v, 4) for k, v in x.items()} for x in tally.series],
    }


def simulate(s: Settings, policies: tuple[str, ...] = ("ours", "petals")) -> dict:
    trace = make_trace(s)
    out = {"settings": {**s.__dict__, "trace_nodes": len(trace.nodes)}}
    for policy in policies:
        started = time.process_time()
        sim = Sim(trace, policy)
        tally = sim.run()
        out[policy] = summary(trace, tally)
        out[policy]["state"] = state_sizes(sim)
        out[policy]["sim_cpu_s"] = time.process_time() - started
        print(f"  {s.nodes} nodes, {policy}: {out[policy]['sim_cpu_s']:.0f} s", file=sys.stderr)
    return out


def markdown(results: dict) -> str:
    lines = [
        "| nodes | policy | % of bound, mean (min) | steps/s (bound) | ms/token p50 / p99 "
        "| units moved / h (joins' loads / h) | placements | CPU ms: placement mean / max "
        "| heartbeat µs | route ms | expire ms | status ms (µs / node) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        n = run["settings"]["nodes"]
        for policy in ("ours", "petals"):
            if policy not in run:
                continue
            r, c = run[policy], run[policy]["cpu"]

            def ms(kind: str, key: str = "mean_ms", c: dict = c) -> float:
                return c.get(kind, {}).get(key, 0.0)

            lines.append(
                f"| {n} | {policy} | {100 * r['share_mean']:.1f} ({100 * r['share_min']:.1f}) "
                f"| {r['weakest_mean']:.0f} ({r['bound_mean']:.0f}) "
                f"| {r['route_ms_p50']:.0f} / {r['route_ms_p99']:.0f} "
                f"| {r['moved_per_h']:.0f} ({r['first_loads_per_h']:.0f}) | {r['placements']} "
                f"| {ms('placement'):.0f} / {ms('placement', 'max_ms'):.0f} "
                f"| {1000 * ms('heartbeat'):.1f} | {ms('route'):.2f} | {ms('expire'):.2f} "
                f"| {ms('status'):.1f} ({r['status_us_per_node']:.2f}) |"
            )
    lines.append("")
    for run in results["runs"]:
        s, state = run["settings"], run["ours"]["state"]
        lines.append(
            f"- {s['nodes']} nodes ({s['trace_nodes']} over the run), {s['model']} {s['swarm']}, "
            f"{s['hours']:g} h simulated (first {s['warmup_s']:g} s left out), lifetime "
            f"{s['lifetime_h']:g} h ({100 * s['crash_share']:.0f} % crash), "
            f"{s['sessions_per_s']:g} sessions/s, placement gap {s['place_gap_s']:g} s; "
            f"state: {state['record_bytes_per_node']:.0f} B/node in memory, heartbeat "
            f"{state['heartbeat_wire_bytes']} B, status {state['status_wire_bytes_per_node']:.0f} "
            f"B/node on the wire"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--hours", type=float, default=None, help="simulated (default by size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="200 nodes, half an hour")
    parser.add_argument("--no-petals", action="store_true", help="our policy only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.getLogger("nanoshard").setLevel(logging.ERROR)  # a node dropped is an event here
    sizes = [200] if args.quick else args.nodes
    policies = ("ours",) if args.no_petals else ("ours", "petals")
    runs = []
    for n in sizes:
        settings = Settings(nodes=n, seed=args.seed, **by_size(n))
        if args.quick:
            settings = replace(settings, hours=0.5)
        if args.hours:
            settings = replace(settings, hours=args.hours)
        runs.append(simulate(settings, policies))
    results = {"runs": runs}
    table = markdown(results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "swarm_sim.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "swarm_sim.md").write_text(table)
    print(f"wrote {args.out / 'swarm_sim.json'}")


def by_size(nodes: int) -> dict:
    """Defaults that keep a run to minutes. Past 2,000 nodes a route costs the coordinator
    ~0.2 s of CPU and a placement ~1 s, so: fewer sessions, a shorter run, and placement
    requests coalesced over 30 s (the Replanner would run them back to back)."""
    if nodes <= 2000:
        return {"hours": 1.0}
    return {"hours": 0.25, "sessions_per_s": 0.25, "place_gap_s": 30.0}


if __name__ == "__main__":
    main()
