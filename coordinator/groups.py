"""Tensor-parallel groups: which nodes serve a stage together, and whether they should.

A *group* is 2 or 4 nodes serving one stage together (``nanoshard/tp.py``: each member
holds its share of every block's heads and MLP and of the vocabulary, and the members sum
their partial results with two all-reduces per block). To placement a group is one
``NodeCapacity`` of ``size`` k (``group_capacity``); to routing it is one hop, its rank 0's.

Pure, like placement: nodes and the groups in force in, groups and stages out (``plan``).
``--tp`` chooses the policy:

- ``off``: no groups;
- ``2`` / ``4``: every eligible node (one with a ``store_port``) goes into a group of that
  size, as far as the count allows; the nodes left over (and those that take part in no
  group) stay idle while the groups alone serve every unit, else they serve alone too;
- ``auto``: groups where (a) some unit fits no single node (the model must still run) or
  (b) the cost model predicts a faster token than without them; never a group predicted
  slower than its own members serving its stage apart, unless it is what covers a unit.

The cost model, per decode step of one token (``predict`` gives both sides):

- a node alone on units U: ``sum(unit_ms(u))``, its measured ``block_ms`` (``head_ms`` for
  the head), plus ``routing.HOP_OVERHEAD_MS`` per hop;
- a group of k on a stage: per unit, its slowest member's time / k plus the unit's
  collectives (block 2, embed 1, head 1: the sampler's merge), each
  ``allreduce_ms = latency_ms * ceil(log2 k) + 2 (k-1)/k * n_embd * 4 B / bandwidth``
  (recursive doubling latency, ring bandwidth); plus, once per step, rank 0 sending the
  step's input on to the others: ``message_ms + (k-1) * n_embd * 4 B / bandwidth``; plus
  one ``HOP_OVERHEAD_MS`` (the hop into the group).

A group's members measure its links (an all-reduce probe at formation, then each
collective as steps run it, waits for the slower member included) and report them in
heartbeats; ``measured_link`` turns the reports into the group's ``Link``. Before a group
forms, its would-be members' pings to each other price it (``peer_link``: ``LINK``, this
machine's loopback costs, plus the network's share of their worst round trip, at their
slowest measured bandwidth); members that never measured each other are priced with
``LINK``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from nanoshard import tp
from nanoshard.errors import InvalidArgument, NanoshardError

from .placement import (
    NodeCapacity,
    Placement,
    Stage,
    UnitCost,
    coverage,
    longest_stages,
    place,
    stage_bytes,
    stage_ms,
)
from .routing import HOP_OVERHEAD_MS, Server, plan_route, route_ms

log = logging.getLogger(__name__)

MODES = ("auto", "off", *(str(k) for k in tp.SIZES))
Mode = str | int  # "auto", "off", or a group size from tp.SIZES


@dataclass(frozen=True)
class Link:
    """What a link between two members costs."""

    latency_ms: float  # one small gloo all-reduce step, members computing in between
    bytes_per_s: float  # bandwidth
    message_ms: float  # one data-plane message (Python gRPC), rank 0 to a member


# Measured on this project's 2-core machine, loopback (benchmarks/tp.py, benchmarks/echo.py):
# a gloo all-reduce of n_embd fp32 values costs 0.8 ms back to back but 1.7 ms between two
# members that compute in between (each wakes the other), and a data-plane message held
# while a hop computes ~1.1 ms. They price a group before its members measured its links.
LINK = Link(latency_ms=1.7, bytes_per_s=1e9, message_ms=1.1)
# A spare takes a slowed member's place in its group if it runs this many times faster than
# the member as slowed (``load.SLOW``, from which a node counts as slowed at all).
SPARE = 3.0


@dataclass(frozen=True)
class LinkReport:
    """What one member measured of its group's links (0: not measured)."""

    probe_ms: float = 0.0  # an all-reduce of n_embd values back to back, at formation
    bytes_per_s: float = 0.0  # all-reduce bandwidth, at formation
    live_ms: float = 0.0  # one collective as the group's steps run it (EWMA)


def measured_link(reports: Iterable[LinkReport], default: Link = LINK) -> Link:
    """A group's link from its members' reports. A collective waits for the slowest
    member, so the worst figure counts: the live one where steps have run (it holds the
    waits between members that compute in between), else the formation probe, which a
    back-to-back loop measures below that, so never under ``default``'s latency; what no
    member measured stays ``default``'s."""
    reports = list(reports)
    live = max((r.live_ms for r in reports), default=0.0)
    probe = max((r.probe_ms for r in reports), default=0.0)
    latency = live if live > 0 else max(probe, default.latency_ms)
    rates = [r.bytes_per_s for r in reports if r.bytes_per_s > 0]
    return Link(latency, min(rates) if rates else default.bytes_per_s, default.message_ms)


@dataclass(frozen=True)
class PeerReport:
    """One node's pings to a peer it may form a group with (``node/links.py``)."""

    rtt_ms: float  # an empty ping's round trip to the peer
    self_rtt_ms: float  # the same to itself: what the hosts' processes cost at no distance
    bytes_per_s: float  # a 1 MiB ping's payload over its time (its round trip included)

    @property
    def network_ms(self) -> float:
        """The distance's share of the round trip."""
        return max(0.0, self.rtt_ms - self.self_rtt_ms)


def peer_link(reports: Iterable[PeerReport], default: Link = LINK) -> Link:
    """A group not formed yet, from its members' pings to each other: ``default`` (what a
    collective and a message cost between processes that wake each other, measured at no
    distance) plus the worst network round trip, at the slowest bandwidth."""
    reports = list(reports)
    extra = max((r.network_ms for r in reports), default=0.0)
    rates = [r.bytes_per_s for r in reports if r.bytes_per_s > 0]
    return Link(
        default.latency_ms + extra,
        min(rates) if rates else default.bytes_per_s,
        default.message_ms + extra,
    )


def pair(a: str, b: str) -> tuple[str, str]:
    """The key of two nodes' link, whichever measured it."""
    return (a, b) if a <= b else (b, a)


def parse_mode(text: str) -> Mode:
    """``--tp``'s value: "auto", "off", or a group size (2 or 4)."""
    value = text.strip().lower()
    if value in ("auto", "off"):
        return value
    if value.isdigit() and int(value) in tp.SIZES:
        return int(value)
    raise InvalidArgument(f"--tp must be one of {', '.join(MODES)}, not {text[:20]!r}")


def check_mode(mode: Mode, n_head: int) -> Mode:
    """``mode`` if this model can run it: a forced size must divide its heads."""
    if mode in ("auto", "off"):
        return mode
    if not isinstance(mode, int) or mode not in tp.SIZES:
        raise InvalidArgument(f"tensor-parallel mode must be one of {', '.join(MODES)}: {mode!r}")
    if n_head % mode:
        raise InvalidArgument(
            f"--tp {mode}: groups of {mode} cannot split this model's {n_head} attention heads "
            "evenly (use --tp auto or off)"
        )
    tp.check_split(n_head, mode)
    return mode


def sizes(mode: Mode, n_head: int) -> list[int]:
    """The group sizes ``mode`` may form for a model of ``n_head`` heads."""
    if mode == "off":
        return []
    if mode == "auto":
        return [k for k in tp.SIZES if n_head % k == 0]
    return [int(check_mode(mode, n_head))]


def allreduce_ms(nbytes: int, size: int, link: Link = LINK) -> float:
    """One all-reduce of ``nbytes`` across ``size`` members."""
    if size <= 1:
        return 0.0
    steps = math.ceil(math.log2(size))
    return link.latency_ms * steps + 2 * (size - 1) / size * nbytes / link.bytes_per_s * 1e3


def broadcast_ms(nbytes: int, size: int, link: Link = LINK) -> float:
    """Rank 0 sending a step's input (``nbytes``) on to the ``size - 1`` other members."""
    if size <= 1:
        return 0.0
    return link.message_ms + (size - 1) * nbytes / link.bytes_per_s * 1e3


def group_key(members: Sequence[str]) -> str:
    """The id a group stands under in placement: its members in rank order (node ids are
    hex, so it names no node)."""
    return "tp:" + "+".join(members)


def group_capacity(
    members: Sequence[NodeCapacity], hidden_bytes: int, link: Link = LINK
) -> NodeCapacity:
    """What ``members`` (in rank order) offer as one group: every member must hold its
    share (the smallest budget binds), and every collective waits for the slowest."""
    if len(members) not in tp.SIZES:
        raise InvalidArgument(f"a group has {' or '.join(map(str, tp.SIZES))} members")
    heads = [m.head_ms for m in members]
    size = len(members)
    return NodeCapacity(
        node_id=group_key([m.node_id for m in members]),
        memory_bytes=min(m.memory_bytes for m in members),
        block_ms=max(m.block_ms for m in members),
        head_ms=None if None in heads else max(h for h in heads if h is not None),
        overhead_ms=max(m.overhead_ms for m in members) + broadcast_ms(hidden_bytes, size, link),
        size=size,
        sync_ms=allreduce_ms(hidden_bytes, size, link),
        hosts=len({m.host or m.node_id for m in members}),
    )


@dataclass(frozen=True)
class Prediction:
    """Predicted ms per token of a stage: served by a group, and by the same nodes apart
    (a pipeline of them, or the fastest alone if it holds the stage; inf: they cannot)."""

    start: int
    end: int
    size: int
    group_ms: float
    pipeline_ms: float

    @property
    def faster(self) -> bool:
        return self.group_ms < self.pipeline_ms

    def __str__(self) -> str:
        apart = "cannot hold it" if math.isinf(self.pipeline_ms) else f"{self.pipeline_ms:.2f} ms"
        return (
            f"units [{self.start}, {self.end}) in a group of {self.size}: predicted "
            f"{self.group_ms:.2f} ms per token, its members apart {apart}"
        )


def predict(
    units: Sequence[UnitCost],
    members: Sequence[NodeCapacity],
    start: int,
    end: int,
    hidden_bytes: int,
    link: Link = LINK,
) -> Prediction:
    """The cost model for one stage: ``members`` (rank order) as a group, and apart."""
    group = group_capacity(members, hidden_bytes, link)
    group_ms = stage_ms(units, group, start, end) + HOP_OVERHEAD_MS
    if stage_bytes(units, start, end, group.size) > group.memory_bytes:
        group_ms = math.inf
    return Prediction(start, end, group.size, group_ms, _apart_ms(units, members, start, end))


def _apart_ms(
    units: Sequence[UnitCost], nodes: Sequence[NodeCapacity], start: int, end: int
) -> float:
    """The fastest chain of ``nodes`` (each once, alone) through ``[start, end)``: each in
    turn takes the longest piece that fits it. Tried in every order (k <= 4: 24 orders)."""
    # Where each node's longest piece from each unit ends: found once, not per order.
    reach = [longest_stages(units, node.memory_bytes) for node in nodes]
    best = math.inf
    for order in itertools.permutations(range(len(nodes))):
        u, ms = start, 0.0
        for k in order:
            if u == end:
                break
            v = min(reach[k][u], end)
            if v > u:
                ms += stage_ms(units, nodes[k], u, v) + HOP_OVERHEAD_MS
                u = v
        if u == end:
            best = min(best, ms)
    return best


@dataclass(frozen=True)
class Plan:
    """What ``plan`` decided: the nodes serving alone, the groups, and why."""

    placement: Placement  # node_id -> stage, for nodes serving alone
    groups: dict[tuple[str, ...], Stage]  # members (node ids, rank order) -> their stage
    token_ms: float  # predicted ms per token along the best route (inf: a unit uncovered)
    baseline_ms: float  # the same without any group (inf: a unit uncovered)
    gaps: int  # units nobody serves
    predictions: dict[tuple[str, ...], Prediction] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """The group size in use (1: none)."""
        return max((len(m) for m in self.groups), default=1)


def plan(
    units: Sequence[UnitCost],
    nodes: Iterable[NodeCapacity],
    previous: Mapping[str, Stage] | None = None,
    previous_groups: Iterable[Sequence[str]] = (),
    *,
    mode: Mode = "auto",
    n_head: int,
    hidden_bytes: int,
    eligible: Collection[str] | None = None,
    replicas: int = 2,
    rebalance_threshold: float = 0.2,
    link: Link = LINK,
    measured: Mapping[tuple[str, ...], Link] | None = None,
    peers: Mapping[tuple[str, str], Sequence[PeerReport]] | None = None,
    slowed: Collection[str] = (),
) -> Plan:
    """Place ``nodes``, in groups as ``mode`` says.

    ``previous`` is the placement in force (node ids, and ``group_key``s for groups);
    ``previous_groups`` the groups in force (members in rank order): those whose members
    are all still here and eligible stay together, so a join or a leave elsewhere re-forms
    no group, but for a member ``slowed`` (counted slowed from its live speed), which a
    faster spare replaces (``_spared``). ``eligible``: the nodes that may join a group
    (None: all). A group is priced with its ``measured`` link where its members reported
    one, else from their pings to each other (``peers``, by ``pair``) where every pair
    measured its link, else with ``link``.
    """
    nodes = sorted(nodes, key=lambda n: n.node_id)
    if any(n.size != 1 for n in nodes):
        raise InvalidArgument("plan: nodes are single nodes (size 1)")
    by_id = {n.node_id: n for n in nodes}
    ok = set(by_id) if eligible is None else set(eligible) & set(by_id)
    previous = dict(previous or {})
    kept = [
        tuple(g)
        for g in previous_groups
        if len(g) in tp.SIZES and len(set(g)) == len(g) and all(m in ok for m in g)
    ]
    kept = _spared(kept, previous, set(slowed), ok, by_id, units)
    ctx = _Context(
        units,
        by_id,
        previous,
        replicas,
        rebalance_threshold,
        hidden_bytes,
        link,
        measured or {},
        peers or {},
    )
    allowed = sizes(mode, n_head)
    if not allowed or len(ok) < min(allowed):
        return ctx.evaluate([])
    forced = mode not in ("auto", "off")
    largest = max(u.weight_bytes for u in units)

    candidates: list[Plan] = []
    baseline = ctx.evaluate([])
    for k in allowed:
        variants = [_form(k, kept, ok, by_id, lambda n: True)]
        if not forced:  # also: only the nodes that hold no unit alone pooled
            small = _form(k, kept, ok, by_id, lambda n: n.memory_bytes < largest)
            if small and small != variants[0]:
                variants.append(small)
        for formation in variants:
            if formation:
                candidates.append(ctx.evaluate(formation, leftovers_idle=forced))
    if forced:
        return _against(ctx.predicted(candidates[0]), baseline) if candidates else baseline
    better = [c for c in candidates if (c.gaps, c.token_ms) < (baseline.gaps, baseline.token_ms)]
    if not better:
        return baseline
    best = min(better, key=lambda c: (c.gaps, c.token_ms))
    # Hysteresis: the group size in force stays while it is nearly as good.
    in_force = max((len(g) for g in kept), default=0)
    same = [c for c in better if c.size == in_force and c.gaps == best.gaps]
    if same and min(c.token_ms for c in same) <= best.token_ms * (1 + rebalance_threshold):
        best = min(same, key=lambda c: c.token_ms)
    # Refuse the groups predicted slower than their members apart (or left without a stage),
    # unless that leaves a unit uncovered.
    best = ctx.predicted(best)
    slow = [g for g in best.groups if not best.predictions[g].faster]
    if slow:
        refined = ctx.predicted(ctx.evaluate([g for g in best.groups if g not in slow]))
        if refined.gaps <= best.gaps:
            best = refined
        if (best.gaps, best.token_ms) >= (baseline.gaps, baseline.token_ms):
            return baseline
    return _against(best, baseline)


def _against(chosen: Plan, baseline: Plan) -> Plan:
    """``chosen``, with the prediction without groups beside it."""
    return Plan(
        chosen.placement,
        chosen.groups,
        chosen.token_ms,
        baseline.token_ms,
        chosen.gaps,
        chosen.predictions,
    )


def _spared(
    kept: Sequence[tuple[str, ...]],
    previous: dict[str, Stage],
    slowed: Collection[str],
    ok: Collection[str],
    by_id: Mapping[str, NodeCapacity],
    units: Sequence[UnitCost],
) -> list[tuple[str, ...]]:
    """The groups in force, with spares in place of their members counted slowed: a spare
    is an eligible node that serves nothing (``previous`` has no stage for it) and is not
    slowed itself, has the memory for its share of the group's stage, and runs ``SPARE``
    times faster than the member as slowed (so no two slowed nodes are swapped back and
    forth). A group is given spares only for all its slowed members (it waits for its
    slowest), the fastest spare (on another host than the member's, where there is one)
    for the slowest member, and only where another server holds its stage meanwhile (a
    group formed anew serves nothing until its members have loaded their shares and met:
    the only one would leave its units without a route). It keeps its stage (in
    ``previous``, under its new key)."""
    taken = {m for g in kept for m in g} | set(previous) | set(slowed)
    spares = sorted((by_id[i] for i in ok if i not in taken), key=_speed)
    out = []
    forming: set[str] = set()  # the groups formed anew here, which serve nothing a while
    for group in kept:
        key = group_key(group)
        stage = previous.get(key)
        others = {k: s for k, s in previous.items() if k != key and k not in forming}
        if stage is not None and min(coverage(others, len(units))[slice(*stage)]) == 0:
            stage = None  # (no other server of its stage: it stays as it is)
        share = stage_bytes(units, *stage, len(group)) if stage else math.inf
        slow = sorted((m for m in group if m in slowed), key=lambda m: _speed(by_id[m]))
        swaps: dict[str, NodeCapacity] = {}
        for m in reversed(slow):  # the slowest first
            fit = [n for n in spares if n not in swaps.values() and n.memory_bytes >= share
                   and n.block_ms * SPARE <= by_id[m].block_ms]  # fmt: skip
            if not fit:
                break
            # (one on another host first: a machine busy as a whole slows every node on it)
            swaps[m] = min(fit, key=lambda n: bool(n.host) and n.host == by_id[m].host)
        if stage is not None and swaps and len(swaps) == len(slow):
            spares = [n for n in spares if n not in swaps.values()]
            group = tuple(swaps[m].node_id if m in swaps else m for m in group)
            forming |= {key, group_key(group)}
            previous[group_key(group)] = stage
        out.append(group)
    return out


def _form(
    k: int,
    kept: Sequence[tuple[str, ...]],
    ok: Collection[str],
    by_id: Mapping[str, NodeCapacity],
    wanted: Callable[[NodeCapacity], bool],
) -> list[tuple[str, ...]]:
    """Groups of ``k``: those in force, then the other ``wanted`` eligible nodes, fastest
    first, in runs of k (nodes of like speed together: a group waits for its slowest)."""
    groups = [g for g in kept if len(g) == k]
    taken = {m for g in groups for m in g}
    free = sorted(
        (by_id[i] for i in ok if i not in taken and wanted(by_id[i])),
        key=_speed,
    )
    for at in range(0, len(free) - k + 1, k):
        groups.append(tuple(n.node_id for n in free[at : at + k]))  # rank order: fastest first
    return groups


def _speed(n: NodeCapacity) -> tuple[float, float, str]:
    return (n.block_ms, n.head_ms or 0.0, n.node_id)


@dataclass
class _Context:
    units: Sequence[UnitCost]
    by_id: Mapping[str, NodeCapacity]
    previous: Mapping[str, Stage]
    replicas: int
    rebalance_threshold: float
    hidden_bytes: int
    link: Link
    measured: Mapping[tuple[str, ...], Link]
    peers: Mapping[tuple[str, str], Sequence[PeerReport]]

    def link_of(self, group: tuple[str, ...]) -> Link:
        if group in self.measured:
            return self.measured[group]
        pairs = [pair(a, b) for a, b in itertools.combinations(group, 2)]
        if pairs and all(self.peers.get(p) for p in pairs):
            return peer_link([r for p in pairs for r in self.peers[p]], self.link)
        return self.link

    def evaluate(self, groups: Sequence[tuple[str, ...]], leftovers_idle: bool = False) -> Plan:
        """Place these groups and every other node alone (with ``leftovers_idle``: the
        groups alone first, and the rest too only if the groups leave a unit uncovered)."""
        n_units = len(self.units)
        caps = {
            group_key(g): group_capacity(
                [self.by_id[m] for m in g], self.hidden_bytes, self.link_of(g)
            )
            for g in groups
        }
        grouped = {m for g in groups for m in g}
        singles = {i: n for i, n in self.by_id.items() if i not in grouped}
        placement: Placement = {}
        if leftovers_idle and caps:
            placement = self._place(list(caps.values()))
            if min(coverage(placement, n_units)) == 0:
                placement = {}
        if not placement:
            placement = self._place([*caps.values(), *singles.values()])
        all_caps = {**caps, **singles}
        # A model repeats one block unit n_layer times: each server times each distinct unit
        # once.
        distinct = list(dict.fromkeys(self.units))
        which = [distinct.index(u) for u in self.units]

        def unit_ms(cap: NodeCapacity, start: int, end: int) -> tuple[float, ...]:
            ms = [cap.unit_ms(u) for u in distinct]
            return tuple([ms[j] for j in which[start:end]])

        servers = [
            Server(
                key,
                *stage,
                unit_ms(all_caps[key], *stage),
                overhead_ms=all_caps[key].overhead_ms,
                whole=all_caps[key].size > 1,
                size=all_caps[key].size,
            )
            for key, stage in placement.items()
        ]
        try:
            token_ms = route_ms(servers, plan_route(servers, n_units))
        except NanoshardError:
            token_ms = math.inf
        gaps = coverage(placement, n_units).count(0)
        by_key = {group_key(g): g for g in groups}
        placed_groups = {by_key[key]: stage for key, stage in placement.items() if key in by_key}
        # A group placement left without a stage is no group: its members serve alone.
        idle = [g for g in groups if g not in placed_groups]
        if idle and not leftovers_idle:
            return self.evaluate([g for g in groups if g in placed_groups])
        return Plan(
            {i: s for i, s in placement.items() if i in singles},
            placed_groups,
            token_ms,
            math.inf if placed_groups else token_ms,
            gaps,
        )

    def predicted(self, plan: Plan) -> Plan:
        """``plan`` with its groups' predictions, which ``evaluate`` leaves out: they cost a
        chain search per group, and most plans weighed are not chosen."""
        predictions = {
            g: predict(
                self.units, [self.by_id[m] for m in g], *stage, self.hidden_bytes, self.link_of(g)
            )
            for g, stage in plan.groups.items()
        }
        return replace(plan, predictions=predictions)

    def _place(self, caps: list[NodeCapacity]) -> Placement:
        return place(
            self.units,
            caps,
            self.previous,
            replicas=self.replicas,
            rebalance_threshold=self.rebalance_threshold,
        )
