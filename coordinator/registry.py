"""The coordinator's soft state: who is in the swarm, what each node was assigned, what
it serves now, how loaded it is. Everything here can be rebuilt from the nodes' next
join or heartbeat, so a restarted coordinator loses nothing.

Tensor-parallel groups (``groups.py`` decides them): each formation gets an id of its own
(the coordinator's salt, the placement version, an index), so a re-formed group never
reuses one. A group is servable while every member heartbeats ready on its stage with
``tp_group`` = its id; a member that leaves, times out, is excluded, or stops serving a
group that was up breaks it, and so does a member that gives it up (its collectives failed,
or the group did not form: ``gave_up``); placement runs again (the group is re-formed with
a new id, or dissolved).

No gRPC and no wall clock: the servicer passes ``now`` in, so tests can drive time.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from nanoshard.cliutil import format_size
from nanoshard.config import GPTConfig
from nanoshard.tp import MAX_PEERS

from . import groups
from .load import (
    RECHECK_S,
    Handouts,
    LiveReport,
    fresh,
    partners_ratio,
    placement_slowdown,
    shared_ratios,
    speed_factor,
)
from .placement import NodeCapacity, Placement, UnitCost, stage_bytes, unit_costs, units_moved
from .routing import Server, prefix_sums

log = logging.getLogger(__name__)

# A group not up this long after its members first heartbeat since its formation (weights
# fetched, shards loaded, process group joined) is taken for broken and formed again.
FORM_TIMEOUT_S = 300.0
# Re-placement from live speeds (``rebalance``): when a node's slowdown for placement
# changed, at most every MIN_REBALANCE_S; without a change, every REBALANCE_S (a group's
# live link may have changed); at most MOVE_SHARE of the units the swarm holds (and at
# least a model's worth) to load per run.
MIN_REBALANCE_S = 10.0
REBALANCE_S = 120.0
MOVE_SHARE = 0.1
WEIGHT_SHARE = 0.8  # of a node's memory, what placement may fill with weights (rest: KV)
# Bytes a weight takes in a node's memory, by the dtype it runs (placement sizes units at
# fp32): int8 rows carry a scale each, and LayerNorms, biases and wpe stay fp32.
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.1}


@dataclass
class Capacity:
    device: str
    dtype: str
    memory_bytes: int
    block_ms: float
    head_ms: float


@dataclass
class Load:
    sessions: int = 0
    kv_bytes_used: int = 0
    kv_bytes_budget: int = 0
    queue_depth: int = 0
    step_ms_p50: float = 0.0
    tp_link: groups.LinkReport = field(default_factory=groups.LinkReport)  # a member's links
    # Its pings to the peers it may form a group with (``peers_of``), by their address.
    peer_links: dict[str, groups.PeerReport] = field(default_factory=dict)
    live: LiveReport = field(default_factory=LiveReport)  # what its steps measured


@dataclass
class NodeRecord:
    node_id: str
    name: str
    address: str
    capacity: Capacity
    last_heartbeat: float
    assigned: tuple[int, int] | None = None  # None = idle
    ready: tuple[int, int] | None = None  # the stage it serves now
    load: Load = field(default_factory=Load)
    held: tuple[int, int] | None = None  # what it had when it (re-)joined
    store_port: int = 0  # its torch.distributed store's port (0: it joins no group)
    group: str = ""  # the group (formation id) it is assigned to serve its stage in
    tp_group: str = ""  # the group it reports serving its ready stage in ("" = alone)
    slowdown: float = 1.0  # placement's factor on its measured step times (load.py)
    # Its live ratio over what the others share (its partners', in a group): its own
    # slowness, as placement reads it before its hysteresis (0: not judged).
    own_ratio: float = 0.0
    rest_ratio: float = 0.0  # the lowest live speed ratio it reported (0: none yet)
    public_key: bytes = b""  # its Ed25519 identity (nanoshard/identity.py), proven at join
    # A member of a group that broke, which may be the member that failed (a node cannot
    # tell which peer did): placement leaves it out until its next heartbeat shows it alive.
    # Else the survivors were grouped with a dead member again at once, and sat in its
    # rendezvous (20 s) while a volunteer that came to take its place waited behind them.
    suspect: bool = False


@dataclass
class Group:
    """One formation of a tensor-parallel group."""

    id: str
    members: tuple[str, ...]  # node ids, in rank order
    addresses: tuple[str, ...]  # their data-plane addresses, in rank order
    rendezvous: str  # rank 0's host : store_port
    stage: tuple[int, int]
    up: bool = False  # every member has reported it ready at least once
    first_heard: float | None = None  # a member's first heartbeat since it was formed


@dataclass(frozen=True)
class Seat:
    """A node's place in its group, as its Assignment carries it."""

    id: str
    rank: int
    size: int
    members: tuple[str, ...]  # data-plane addresses, rank order
    rendezvous: str
    backend: str  # "nccl" when every member runs on CUDA, else "gloo"


@dataclass(frozen=True)
class PlanInput:
    """What one placement reads (``Registry.plan_input``): ``groups.plan``'s arguments,
    copied out, and what ``Registry.apply`` needs to put the result in force."""

    kwargs: dict[str, Any]
    broken: frozenset[str]  # groups to re-form
    budget: int | None  # units nodes may newly load (None: as many as it takes)
    nodes: frozenset[str]  # the node ids placed


def host_of(address: str) -> str:
    """``"10.0.0.7:7961"`` -> ``"10.0.0.7"``; ``"[fd00::1]:7961"`` -> ``"[fd00::1]"``."""
    return address.rsplit(":", 1)[0]


class Registry:
    def __init__(
        self,
        config: GPTConfig,
        *,
        replicas: int = 2,
        heartbeat_timeout_s: float = 10.0,
        settle_until: float = 0.0,
        tp: groups.Mode = "auto",
        link: groups.Link = groups.LINK,
        group_salt: str = "",
        form_timeout_s: float = FORM_TIMEOUT_S,
    ) -> None:
        self.config = config
        self.replicas = replicas
        self.tp = groups.check_mode(tp, config.n_head)
        self.link = link
        self.group_salt = group_salt  # per coordinator process: ids never repeat a restart's
        self.form_timeout_s = form_timeout_s
        self.groups: dict[str, Group] = {}  # formations assigned, or still reported by a node
        self.handouts = Handouts()  # routes handed out, until the nodes' reports hold them
        self.heartbeat_timeout_s = heartbeat_timeout_s
        # A (re)started coordinator first lets the swarm re-register: until then, nodes that
        # still hold a stage keep it and nothing is re-placed, so a restart moves nothing.
        self.settle_until = settle_until
        self.settled = settle_until <= 0  # 0: no window (tests of placement alone)
        self.nodes: dict[str, NodeRecord] = {}
        self.version = 0  # placement version, bumped on every change
        self.excluded: dict[str, str] = {}  # address -> why spot-checks excluded it
        self.excluded_ids: dict[str, str] = {}  # node id -> the same: a key stays out
        # Records an exclusion (node id, address, why) and returns the why to show (the
        # coordinator's ``ExclusionStore``: it adds since and until when).
        self.on_exclude: Callable[[str, str, str], str] | None = None
        self.units: list[UnitCost] = unit_costs(config)
        # Placement requested and not run yet: the groups to re-form, and each request's
        # budget of units to load (None: as many as it takes).
        self._broken: set[str] = set()
        self._budgets: list[int | None] = []
        self.defer: Callable[[], None] | None = None  # set: placement runs off the loop
        self.rebalanced_at = -math.inf  # when live speeds were last placed by
        self._drifted = False  # a node's slowdown changed since
        self._times: dict[
            str, tuple[tuple, tuple[float, ...], tuple[float, ...]]
        ] = {}  # ``_unit_times``, by node

    # ---- membership -----------------------------------------------------------------

    def join(self, record: NodeRecord) -> None:
        for other in [r for r in self.nodes.values() if r.address == record.address]:
            if other.node_id != record.node_id:  # a node restarted on the same address
                del self.nodes[other.node_id]
        previous = self.nodes.get(record.node_id)
        broken: set[str] = set()
        if previous is not None:  # a re-join: keep what it is known to serve
            record.assigned = previous.assigned
            record.ready = record.ready or previous.ready
            record.group, record.tp_group = previous.group, previous.tp_group
            moved = (record.address, record.store_port) != (previous.address, previous.store_port)
            if record.group and moved:  # its group's members or rendezvous changed
                broken.add(record.group)
        elif record.held is not None and self._fits_alone(record, record.held):
            # Coordinator restarted: the node still holds a stage. (A group member's share
            # of a stage it could not hold alone is not adopted: its group is re-formed.)
            record.assigned = record.ready = record.held
        if record.node_id in self.excluded_ids:  # its key was caught: out, wherever it is
            self.excluded[record.address] = self.excluded_ids[record.node_id]
        if record.address in self.excluded:  # back under another id, same address: still out
            record.assigned = record.ready = None
            record.group = ""
        self.nodes[record.node_id] = record
        log.info("node %s (%s) joined from %s", record.name, record.node_id[:8], record.address)
        if self.settled:
            self.replan(broken)

    def _fits_alone(self, record: NodeRecord, stage: tuple[int, int]) -> bool:
        start, end = stage
        budget = self._budget(record)
        return 0 <= start < end <= len(self.units) and stage_bytes(self.units, *stage) <= budget

    def settle(self, now: float) -> None:
        """End the re-registration window after a start. If the stages the nodes came back
        with still serve every unit, they stay as they are (a restart moves nothing);
        otherwise, or if a newcomer waits for a stage, place everyone."""
        if self.settled or now < self.settle_until:
            return
        self.settled = True
        counts = [0] * self.config.n_units
        for r in self.nodes.values():
            for u in range(*(r.assigned or (0, 0))):
                counts[u] += 1
        if min(counts) == 0 or any(r.assigned is None for r in self.nodes.values()):
            self.replan()

    def leave(self, node_id: str) -> bool:
        record = self.nodes.pop(node_id, None)
        if record is None:
            return False
        log.info("node %s (%s) left", record.name, node_id[:8])
        self._suspect_peers(record)  # (it may be leaving a group a peer of it broke)
        self.replan()
        return True

    def _suspect_peers(self, record: NodeRecord) -> None:
        """``record``'s group broke: its other members are suspects (``NodeRecord.suspect``)."""
        group = self.groups.get(record.group)
        if group is None:
            return
        for m in group.members:
            peer = self.nodes.get(m)
            if peer is not None and peer is not record and not peer.suspect:
                peer.suspect = True
                log.info(
                    "group %s broke: %s is placed again once its next heartbeat shows it alive",
                    group.id,
                    peer.name,
                )

    def exclude(self, address: str, reason: str) -> None:
        """Take the node at ``address`` (and its id, wherever it comes back) out of
        placement and routes, for ``reason`` (``on_exclude`` records it)."""
        for record in self.nodes.values():
            if record.address == address:
                if self.on_exclude is not None:
                    reason = self.on_exclude(record.node_id, address, reason)
                self.excluded_ids[record.node_id] = reason
                log.warning("node %s (%s) excluded: %s", record.name, address, reason)
                record.ready = None  # out of routes at once
        self.excluded[address] = reason
        self.replan()

    def restore(self, exclusions: Iterable[tuple[str, str, str]]) -> None:
        """Put exclusions recorded before a restart back in force: (node id, address, why)."""
        for node_id, address, reason in exclusions:
            self.excluded_ids[node_id] = self.excluded[address] = reason

    def keep_excluded(self, kept: Collection[tuple[str, str]]) -> None:
        """Lift every exclusion recorded with ``on_exclude`` but not (node id, address) in
        ``kept`` (it expired); the nodes get stages again."""
        ids = {nid for nid, _ in kept}
        addresses = {a for _, a in kept}
        lifted = [a for a in self.excluded if a not in addresses]
        lifted_ids = [n for n in self.excluded_ids if n not in ids]
        for address in lifted:
            log.info("the exclusion of %s expired", address)
            del self.excluded[address]
        for node_id in lifted_ids:
            del self.excluded_ids[node_id]
        if lifted or lifted_ids:
            self.replan()

    def heartbeat(
        self,
        node_id: str,
        now: float,
        ready: tuple[int, int] | None,
        load: Load,
        tp_group: str = "",
        gave_up: str = "",
    ) -> NodeRecord | None:
        """A node's heartbeat: alive at ``now``, serving ``ready`` (in group ``tp_group``),
        under ``load``; ``gave_up``: the last group it gave up (broke, or did not form)."""
        record = self.nodes.get(node_id)
        if record is None:
            return None
        record.last_heartbeat = now
        alive_again, record.suspect = record.suspect, False
        record.ready = None if record.address in self.excluded else ready
        reported, record.tp_group = record.tp_group, tp_group if record.ready is not None else ""
        if reported != record.tp_group:
            record.rest_ratio = 0.0  # (of another basis: all of each unit, or a share)
        record.load = load
        if (ratio := load.live.speed_ratio) > 0:
            record.rest_ratio = min(record.rest_ratio or ratio, ratio)
        if reported != record.tp_group:
            self._prune()
        group = self.groups.get(record.group)
        if group is not None:
            if group.first_heard is None:
                group.first_heard = now
            broke = ""  # why the group no longer works
            if gave_up == group.id:  # its collectives failed (a peer died or hung), or never ran
                how = "a member failed" if group.up else "it did not form"
                broke = f"{record.name} gave it up: {how}"
            elif self._servable(group):
                if not group.up:
                    log.info("group %s is up: units [%d, %d)", group.id, *group.stage)
                group.up = True
            elif group.up and (record.ready, record.tp_group) != (group.stage, group.id):
                broke = f"{record.name} no longer serves it"  # a peer died or hung
            if broke:
                log.warning("group %s broke (%s): placing again", group.id, broke)
                self._suspect_peers(record)
                if self.settled:
                    self.replan({group.id})
                return record
        if alive_again and self.settled:
            self.replan()
        return record

    def expire(self, now: float) -> list[NodeRecord]:
        """Drop nodes silent for longer than the heartbeat timeout; re-place their units."""
        gone = [r for r in self.nodes.values() if now - r.last_heartbeat > self.heartbeat_timeout_s]
        for record in gone:
            log.warning(
                "node %s (%s) missed its heartbeats: dropped", record.name, record.node_id[:8]
            )
            del self.nodes[record.node_id]
        late = {
            g.id
            for g in self._assigned_groups()
            if not g.up and g.first_heard is not None and now - g.first_heard > self.form_timeout_s
        }
        for gid in sorted(late):
            log.warning("group %s is not up after %.0f s: placing again", gid, self.form_timeout_s)
        if (gone or late) and self.settled:
            self.replan(late)
        self.settle(now)
        return gone

    # ---- placement ------------------------------------------------------------------

    def rebalance(self, now: float) -> int:
        """Re-place the swarm from its live speeds (called periodically): take each node's
        newest report into its ``slowdown`` (``load.placement_slowdown``: beyond what the
        other nodes share, with hysteresis), and place again when one changed (at most
        every ``MIN_REBALANCE_S``) or every ``REBALANCE_S``, moving at most
        ``move_budget()`` units; placement itself keeps
        every stage unless a fresh placement would lift the weakest unit by 20 %. A node
        given a new stage keeps serving its old one until the new one is loaded, and
        sessions open on the old one finish there. Returns the units to load (0 as well
        when the placement is left to the ``Replanner``)."""
        alone = [r for r in self.nodes.values() if not r.tp_group]
        shared = shared_ratios([r.load.live for r in alone], [r.rest_ratio for r in alone])
        against = dict(zip([r.node_id for r in alone], shared, strict=True))
        for record in self.nodes.values():
            # (a group's member: against its partners, not the swarm)
            others = (
                against[record.node_id] if not record.tp_group else self._partners_ratio(record)
            )
            live = record.load.live
            # (``others`` is at least 1 where there is one)
            record.own_ratio = live.speed_ratio / others if others and fresh(live) else 0.0
            if others is None and fresh(live):
                continue  # (judged once another node's figure is in too)
            slowdown = placement_slowdown(record.slowdown, record.load.live, others or 1.0)
            if slowdown != record.slowdown:
                log.info(
                    "placement now counts node %s at %.1f x its measured step time (it "
                    "counted %.1f x): its slowdown beyond what %s",
                    record.name,
                    slowdown,
                    record.slowdown,
                    "its group's partners show" if record.tp_group else "the swarm's nodes share",
                )
                record.slowdown = slowdown
                self._drifted = True
        since = now - self.rebalanced_at
        if not self.settled or since < (MIN_REBALANCE_S if self._drifted else REBALANCE_S):
            return 0
        self.rebalanced_at, self._drifted = now, False
        return self.replan(budget=self.move_budget())

    def _partners_ratio(self, record: NodeRecord) -> float | None:
        """``load.partners_ratio`` of the group ``record`` reports serving in, each partner's
        ratio scaled by its measured step time on the group's stage over the member's."""
        group = self.groups.get(record.tp_group)
        if group is None:
            return None
        partners = [self.nodes[m] for m in group.members if m != record.node_id and m in self.nodes]
        own = self._stage_ms(record, group.stage)
        scales = [self._stage_ms(p, group.stage) / own if own > 0 else 1.0 for p in partners]
        return partners_ratio([p.load.live for p in partners], scales)

    def _stage_ms(self, record: NodeRecord, stage: tuple[int, int]) -> float:
        """A node's estimated decode-step time for the units of ``stage``."""
        return self._unit_times(record, *stage)[1][-1]

    def move_budget(self) -> int:
        """Units one re-placement may have nodes load: ``MOVE_SHARE`` of those held."""
        held = sum(e - s for r in self.nodes.values() if r.assigned for s, e in [r.assigned])
        return max(len(self.units), math.ceil(MOVE_SHARE * held))

    def _budget(self, r: NodeRecord) -> int:
        """Weight bytes (sized at fp32, as placement counts them) the node may hold."""
        return int(r.capacity.memory_bytes * WEIGHT_SHARE * 4 / WEIGHT_BYTES[r.capacity.dtype])

    def _capacity(self, r: NodeRecord) -> NodeCapacity:
        return NodeCapacity(
            node_id=r.node_id,
            memory_bytes=self._budget(r),
            block_ms=max(r.capacity.block_ms, 1e-3) * r.slowdown,
            head_ms=max(r.capacity.head_ms, 1e-3) * r.slowdown,
            host=host_of(r.address),
        )

    def capacities(self) -> list[NodeCapacity]:
        return [
            self._capacity(r)
            for r in sorted(self.nodes.values(), key=lambda r: r.node_id)
            if r.address not in self.excluded and not r.suspect
        ]

    @property
    def hidden_bytes(self) -> int:
        """What one token's hidden state is on the wire inside a group (fp32)."""
        return self.config.n_embd * 4

    def replan(self, broken: Collection[str] = (), *, budget: int | None = None) -> int:
        """Place the swarm again; the groups named in ``broken`` are re-formed or dissolved.
        With a ``budget``, a placement that would have nodes load more units than that is
        not applied. Returns the units nodes must newly load.

        With ``defer`` set (the coordinator's ``Replanner``), this only records the request
        and calls ``defer``: placement then runs off the event loop, ``plan_input`` /
        ``groups.plan`` / ``apply``, and requests made meanwhile are merged into one run."""
        self._broken |= set(broken)
        self._budgets.append(budget)
        if self.defer is not None:
            self.defer()
            return 0
        request = self.plan_input()
        return self.apply(request, groups.plan(**request.kwargs))

    def plan_input(self) -> PlanInput:
        """What the placement requested so far reads, copied out: ``groups.plan`` may run
        on another thread meanwhile. Takes the requests (a run answers all of them)."""
        broken = frozenset(self._broken)
        given = [b for b in self._budgets if b is not None]  # (None: no limit, which wins)
        budget = None if None in self._budgets else min(given, default=None)
        self._broken, self._budgets = set(), []
        active = {
            nid: r
            for nid, r in self.nodes.items()
            if r.address not in self.excluded and not r.suspect
        }
        previous: Placement = {
            nid: r.assigned for nid, r in active.items() if r.assigned is not None and not r.group
        }
        in_force = []
        for group in self._assigned_groups():
            if group.id not in broken and all(
                m in active and active[m].group == group.id for m in group.members
            ):
                in_force.append(group.members)
                previous[groups.group_key(group.members)] = group.stage
        kwargs = dict(
            units=self.units,
            nodes=self.capacities(),
            previous=previous,
            previous_groups=in_force,
            mode=self.tp,
            n_head=self.config.n_head,
            hidden_bytes=self.hidden_bytes,
            eligible={nid for nid, r in active.items() if r.store_port > 0},
            replicas=self.replicas,
            link=self.link,
            measured={g: self.link_of(g) for g in in_force},
            peers=self.peer_reports(),
            slowed={nid for nid, r in active.items() if r.slowdown > 1.0},
        )
        return PlanInput(kwargs, broken, budget, frozenset(self.nodes))

    def apply(self, request: PlanInput, plan: groups.Plan) -> int:
        """Put ``plan`` (placed from ``request``) in force; returns the units nodes must
        newly load. Membership may have changed since ``request`` was read: nodes gone are
        skipped, nodes new since keep what they have (their own request places them), and
        a group with a member gone is not formed (placement runs again)."""
        broken = request.broken
        current = {(g.members, g.stage): g for g in self._assigned_groups() if g.id not in broken}
        new: dict[str, tuple[tuple[int, int] | None, Group | None]] = {
            nid: (plan.placement.get(nid), None)
            if nid in request.nodes
            else (r.assigned, self.groups.get(r.group))
            for nid, r in self.nodes.items()
        }
        formed: list[tuple[tuple[str, ...], tuple[int, int]]] = []
        incomplete = False
        for members, stage in sorted(plan.groups.items(), key=lambda item: (item[1], item[0])):
            if not all(m in self.nodes for m in members):
                incomplete = True  # a member left while placement ran: place again
                for m in members:
                    if m in self.nodes:  # meanwhile, what it has
                        new[m] = (self.nodes[m].assigned, self.groups.get(self.nodes[m].group))
                continue
            kept = current.get((members, stage))
            if kept is None:
                formed.append((members, stage))
            for m in members:
                new[m] = (stage, kept)
        if incomplete:
            self.replan()
        changed = bool(formed) or any(
            (assigned, in_group.id if in_group else "")
            != (self.nodes[nid].assigned, self.nodes[nid].group)
            for nid, (assigned, in_group) in new.items()
        )
        if not changed:
            return 0
        moved = units_moved(
            {nid: r.assigned for nid, r in self.nodes.items() if r.assigned},
            {nid: stage for nid, (stage, _) in new.items() if stage},
        )
        if request.budget is not None and moved > request.budget:
            log.info(
                "re-placement would have nodes load %d units, over its budget of %d: not now",
                moved,
                request.budget,
            )
            return 0
        self.version += 1
        for index, (members, stage) in enumerate(formed):
            fresh = self._form(f"{self.group_salt}v{self.version}-{index}", members, stage)
            for m in members:
                new[m] = (stage, fresh)
            prediction = plan.predictions.get(members)
            log.info(
                "placement v%d forms group %s of %d (%s): %s; route %.2f ms per token "
                "(%s without groups)",
                self.version,
                fresh.id,
                len(members),
                ", ".join(self.nodes[m].name for m in members),
                prediction,
                plan.token_ms,
                _ms(plan.baseline_ms),
            )
        for nid, (assigned, in_group) in new.items():
            record = self.nodes[nid]
            record.assigned = assigned
            record.group = in_group.id if in_group else ""
        self._prune()
        log.info("placement v%d (%d units to load): %s", self.version, moved, self.describe())
        return moved

    def _form(self, gid: str, members: tuple[str, ...], stage: tuple[int, int]) -> Group:
        records = [self.nodes[m] for m in members]
        rendezvous = f"{host_of(records[0].address)}:{records[0].store_port}"
        group = Group(gid, members, tuple(r.address for r in records), rendezvous, stage)
        self.groups[gid] = group
        return group

    def _assigned_groups(self) -> list[Group]:
        ids = {r.group for r in self.nodes.values() if r.group}
        return [self.groups[gid] for gid in sorted(ids) if gid in self.groups]

    def _prune(self) -> None:
        """Forget formations that nobody is assigned to or reports serving any more."""
        named = {r.group for r in self.nodes.values()} | {r.tp_group for r in self.nodes.values()}
        for gid in [gid for gid in self.groups if gid not in named]:
            del self.groups[gid]

    def seat(self, record: NodeRecord) -> Seat | None:
        """The node's place in the group it is assigned to (None: it serves alone)."""
        group = self.groups.get(record.group)
        if group is None or record.node_id not in group.members:
            return None
        rank = group.members.index(record.node_id)
        devices = [self.nodes[m].capacity.device for m in group.members if m in self.nodes]
        cuda = len(devices) == len(group.members) and all(d.startswith("cuda") for d in devices)
        backend = "nccl" if cuda else "gloo"
        return Seat(group.id, rank, len(group.members), group.addresses, group.rendezvous, backend)

    def describe(self) -> str:
        parts = []
        for r in sorted(self.nodes.values(), key=lambda r: (r.assigned or (999, 999), r.name)):
            stage = "[{}, {})".format(*r.assigned) if r.assigned else "idle"
            seat = self.seat(r)
            where = f" in {seat.id} rank {seat.rank}/{seat.size}" if seat else ""
            parts.append(f"{r.name}={stage}{where}")
        return ", ".join(parts)

    # ---- routes and status ----------------------------------------------------------

    def view(self) -> Registry:
        """A copy to read on another thread while the event loop goes on changing this one
        (a status at 10,000 nodes takes a third of a second): its containers are copies,
        its records the same objects (a heartbeat replaces their fields whole)."""
        other = copy.copy(self)
        other.nodes, other.groups = dict(self.nodes), dict(self.groups)
        other.excluded, other.excluded_ids = dict(self.excluded), dict(self.excluded_ids)
        other.handouts = self.handouts.copy()
        other._times = dict(self._times)
        return other

    def unit_ms(self, record: NodeRecord, unit: int) -> float:
        """A node's estimated decode-step time for one unit, from its measured capacity."""
        if self.units[unit].kind == "head":
            return record.capacity.head_ms
        return record.capacity.block_ms * self.units[unit].cost

    def _unit_times(
        self, record: NodeRecord, start: int, end: int
    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``unit_ms`` of each unit of [start, end) and their prefix sums, kept per node
        until its stage or its capacity changes (routes and status ask for every node's,
        each time)."""
        key = (start, end, record.capacity.block_ms, record.capacity.head_ms)
        kept = self._times.get(record.node_id)
        if kept is None or kept[0] != key:
            if len(self._times) > 2 * len(self.nodes) + 64:  # nodes that left
                self._times = {n: t for n, t in self._times.items() if n in self.nodes}
            times = tuple(self.unit_ms(record, u) for u in range(start, end))
            kept = (key, times, prefix_sums(times))
            self._times[record.node_id] = kept
        return kept[1], kept[2]

    def _servable(self, group: Group) -> bool:
        """Every member here, not excluded, ready on the group's stage, in the group."""
        for m in group.members:
            r = self.nodes.get(m)
            if r is None or r.address in self.excluded:
                return False
            if (r.ready, r.tp_group) != (group.stage, group.id):
                return False
        return True

    def why_idle(self, record: NodeRecord) -> str:
        """Why placement gives ``record`` no stage now, in words for its owner."""
        if record.address in self.excluded:
            return f"spot-checks excluded it: {self.excluded[record.address]}"
        smallest = min(u.weight_bytes for u in self.units)
        if self._budget(record) < smallest:
            return (
                f"its memory holds no unit of this model (the smallest is {format_size(smallest)}"
                f" of weights, and weights may fill {WEIGHT_SHARE:.0%} of a node's memory)"
            )
        if not self.settled:
            return (
                "the coordinator has just started: for a heartbeat timeout and two intervals "
                "it waits for the nodes of a swarm it may have served to register again, "
                "then places"
            )
        if record.slowdown > 1.0:
            return (
                f"placement counts its steps {record.slowdown:.1f} x slower than it measured "
                "at start, beyond what the other nodes share: faster nodes serve its units "
                f"until it shows it recovered (or has run nothing for {RECHECK_S / 60:.0f} "
                "minutes)"
            )
        if self.tp not in ("auto", "off"):
            groups_of = (
                f"the coordinator forms tensor-parallel groups of {self.tp} (--tp {self.tp})"
            )
            if not record.store_port:
                return f"{groups_of}, which serve every unit, and this node joins no group"
            return f"{groups_of} and has no group for this node: it waits for another to pair with"
        return "placement has given it no stage yet"

    def peers_of(self, record: NodeRecord) -> list[str]:
        """The addresses of the nodes ``record`` may form a group with, for it to measure
        its links to (none while groups are off, or for a node that joins no group)."""
        if self.tp == "off" or not record.store_port:
            return []
        return sorted(
            r.address
            for r in self.nodes.values()
            if r is not record and r.store_port and r.address not in self.excluded
        )[:MAX_PEERS]

    def peer_reports(self) -> dict[tuple[str, str], list[groups.PeerReport]]:
        """What nodes measured of their links to each other, by ``groups.pair`` of ids."""
        by_address = {r.address: nid for nid, r in self.nodes.items()}
        out: dict[tuple[str, str], list[groups.PeerReport]] = {}
        for nid, record in self.nodes.items():
            for address, report in record.load.peer_links.items():
                other = by_address.get(address)
                if other is not None and other != nid:
                    out.setdefault(groups.pair(nid, other), []).append(report)
        return out

    def link_of(self, members: tuple[str, ...]) -> groups.Link:
        """The link of the group of ``members`` as they last measured it (``self.link``
        until they report)."""
        reports = [self.nodes[m].load.tp_link for m in members if m in self.nodes]
        return groups.measured_link(reports, self.link)

    def servers(self) -> list[Server]:
        """Ready nodes and servable groups as routing sees them: a group is one server at
        its rank 0's address (a node serving in a group serves nothing alone)."""
        out = []
        for r in self.nodes.values():
            if r.ready is None or r.tp_group:
                continue
            start, end = r.ready
            unit_ms, cum = self._unit_times(r, start, end)
            load = r.load.sessions + r.load.queue_depth + self._pending(r)
            # (its speed now, against its measurement: applied to the kept times)
            speed = speed_factor(r.load.live)
            out.append(Server(r.address, start, end, unit_ms, float(load), speed=speed, cum=cum))
        for group in sorted(self.groups.values(), key=lambda g: g.id):
            if not self._servable(group):
                continue
            records = [self.nodes[m] for m in group.members]
            cap = groups.group_capacity(
                [self._capacity(r) for r in records], self.hidden_bytes, self.link_of(group.members)
            )
            start, end = group.stage
            unit_ms = tuple(cap.unit_ms(self.units[u]) for u in range(start, end))
            load = max(r.load.sessions + r.load.queue_depth for r in records)
            load += self._pending(records[0])  # (routes name rank 0)
            out.append(
                Server(
                    group.addresses[0],
                    start,
                    end,
                    unit_ms,
                    float(load),
                    overhead_ms=cap.overhead_ms,
                    whole=True,
                    size=cap.size,
                )
            )
        return out

    def measured_tokens_per_s(self) -> float:
        """Tokens the swarm drew per second lately, as the nodes holding the head report
        them (a group's once: its rank 0's)."""
        total = 0.0
        for r in self.nodes.values():
            seat = self.seat(r)
            if seat is None or seat.rank == 0:
                total += r.load.live.sampled_per_s
        return total

    def handed_out(self, addresses: Collection[str], now: float) -> None:
        """A route through ``addresses`` went to a client: count it on them until their
        heartbeats can (``load.Handouts``)."""
        self.handouts.prune(now)
        self.handouts.add(addresses, now)

    def public_keys(self) -> dict[str, bytes]:
        """Each node's public key, by address: what checks a step's signature."""
        return {r.address: r.public_key for r in self.nodes.values() if r.public_key}

    def _pending(self, record: NodeRecord) -> int:
        return self.handouts.pending(record.address, record.last_heartbeat)

    def coverage(self, servers: list[Server] | None = None) -> list[int]:
        """Servers per unit (of ``servers()``, unless given): a node alone, or a group,
        counts once."""
        counts = [0] * self.config.n_units
        for s in self.servers() if servers is None else servers:
            for u in range(s.start, s.end):
                counts[u] += 1
        return counts


def _ms(value: float) -> str:
    return "no route" if value == float("inf") else f"{value:.2f} ms"
