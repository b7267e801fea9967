"""Placement: which stage each node of the swarm serves.

A pure, deterministic function (no I/O, clock or randomness): the model's units, the nodes
(memory budget, measured speed) and the previous placement in; one stage per node out. The
coordinator runs it when nodes join, leave or miss heartbeats. It aims, in order, for:

1. every unit served, as far as memory allows (memory is a hard limit, never exceeded);
2. ``replicas`` nodes on every unit where memory allows, so one node loss breaks no route;
3. the weakest unit's throughput as high as possible: a node runs its stage S at
   ``1000 / stage_ms(S)`` steps per second, and a unit's throughput is the sum over its
   nodes (a route may enter a node's stage part-way, as in Petals);
4. few units moved when membership changes (see ``place``).

How: two constructions, keep the better. The *sweep*: for a target throughput tau, walk the
units from embed to head and stack nodes' longest stages on the first unit below tau; a
bisection finds the largest tau that reaches the head. Petals' *greedy*: fastest first, each
node takes the stage that lifts the weakest unit most, so the slowest nodes, last, fill the
gaps finely. Then slow nodes move to units short of replicas, and a short local search
smooths what is left. Nodes that cannot hold a single unit stay idle.

A tensor-parallel group (``groups.py`` decides which nodes form one) enters placement as
one ``NodeCapacity`` of ``size`` k: each of its members holds ``UnitCost.member_bytes(k)``
of a unit (its share of the sharded weights, the replicated ones whole), so its memory is
its smallest member's, and a unit takes its slowest member's time over k plus the unit's
collectives (``syncs``) at ``sync_ms`` each.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nanoshard.config import GPTConfig
from nanoshard.errors import InvalidArgument

log = logging.getLogger(__name__)

_WINDOW = 16  # nodes the sweep weighs for each stage it hands out
_MOVES = 24  # local-search moves per placement
_CANDIDATES = 16  # nodes tried per move

Stage = tuple[int, int]  # half-open unit range [start, end)
Placement = dict[str, Stage]  # node_id -> stage; idle nodes are absent


@dataclass(frozen=True)
class UnitCost:
    """What one unit of the model costs to hold and to run."""

    kind: str  # "embed", "block" or "head"
    weight_bytes: int
    cost: float  # compute per decode step, in blocks (one block = 1.0)
    shared_bytes: int = 0  # bytes that are the embed's too (the head's tied wte)
    # In a tensor-parallel group: bytes every member holds whole (LayerNorms, wpe, biases
    # added after the all-reduce); the rest is split across the members in whole grains
    # (a row of wte: members 0 .. vocab % k - 1 hold one row more); collectives per step.
    replicated_bytes: int = 0
    grain_bytes: int = 1
    syncs: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.replicated_bytes <= self.weight_bytes:
            raise InvalidArgument(f"unit cost: need 0 <= replicated_bytes <= weight_bytes: {self}")
        if not 0 <= self.shared_bytes <= self.weight_bytes - self.replicated_bytes:
            raise InvalidArgument(
                f"unit cost: need 0 <= shared_bytes <= weight_bytes - replicated_bytes: {self}"
            )
        if not (math.isfinite(self.cost) and self.cost >= 0):
            raise InvalidArgument(f"unit cost: cost must be finite and >= 0: {self}")
        if self.grain_bytes < 1 or self.syncs < 0:
            raise InvalidArgument(f"unit cost: need grain_bytes >= 1 and syncs >= 0: {self}")

    def member_bytes(self, size: int = 1) -> int:
        """What one member of a group of ``size`` holds of this unit (the most any holds)."""
        if size <= 1:
            return self.weight_bytes
        return self.replicated_bytes + self._share(self.weight_bytes - self.replicated_bytes, size)

    def member_shared(self, size: int = 1) -> int:
        """The part of ``member_bytes(size)`` that is the embed's too."""
        return self.shared_bytes if size <= 1 else self._share(self.shared_bytes, size)

    def _share(self, nbytes: int, size: int) -> int:
        return -(-nbytes // (self.grain_bytes * size)) * self.grain_bytes


def unit_costs(config: GPTConfig, dtype_bytes: int = 4) -> list[UnitCost]:
    """The units of ``config`` (embed, blocks, head) with their weight bytes and relative cost.

    Compute counts the multiply-adds of one decode step: a block does 12 * n_embd^2, the head
    vocab * n_embd (5.45 blocks for GPT-2; measured here: 11 ms vs 2 ms), the embed a lookup.
    The head's weight is wte, which the embed holds too: a stage holding both stores it once.

    In a tensor-parallel group (``nanoshard/tp.py``) a block's heads and MLP columns are
    split and its LayerNorms and output-projection biases replicated, with two all-reduces
    per step; the embed and the head split wte by rows (one all-reduce at the lookup, one
    merge of the sampling candidates), wpe and ln_f replicated.
    """
    d, vocab = config.n_embd, config.vocab_size
    norm = (2 if config.bias else 1) * d  # a LayerNorm's weight (+ bias)
    linears = 12 * d * d + (9 * d if config.bias else 0)  # c_attn, c_proj, c_fc, mlp.c_proj
    after_reduce = 2 * d if config.bias else 0  # the two c_proj biases, added once
    wte = vocab * d * dtype_bytes
    row = d * dtype_bytes
    wpe = config.block_size * d * dtype_bytes
    embed = UnitCost(
        "embed", wte + wpe, 1 / (12 * d), replicated_bytes=wpe, grain_bytes=row, syncs=1
    )
    block = UnitCost(
        "block",
        (linears + 2 * norm) * dtype_bytes,
        1.0,
        replicated_bytes=(2 * norm + after_reduce) * dtype_bytes,
        grain_bytes=dtype_bytes,
        syncs=2,
    )
    head = UnitCost(
        "head",
        norm * dtype_bytes + wte,
        vocab / (12 * d),
        shared_bytes=wte,
        replicated_bytes=norm * dtype_bytes,
        grain_bytes=row,
        syncs=1,
    )
    return [embed, *([block] * config.n_layer), head]


@dataclass(frozen=True)
class NodeCapacity:
    """What a node offers, as measured by the node itself; or what a tensor-parallel group
    offers (``size`` >= 2; see ``groups.group_capacity``): then ``memory_bytes`` is each
    member's, ``block_ms``/``head_ms`` are a member's unsharded times (the slowest's) and
    ``sync_ms`` the cost of one of the group's collectives."""

    node_id: str
    memory_bytes: int  # budget for weights (the node keeps its KV-cache reserve out of it)
    block_ms: float  # one block's decode step on this node
    head_ms: float | None = None  # the head's decode step; None: block_ms times the head's cost
    overhead_ms: float = 0.0  # paid once per step by any stage: RPC, codec, Python
    size: int = 1  # nodes it stands for: 1 = a node, k >= 2 = a tensor-parallel group
    sync_ms: float = 0.0  # a group's: one all-reduce of the hidden state across its members
    host: str = ""  # where it runs (a node's address's host): nodes on one host share its cores
    hosts: int = 1  # a group's: the hosts its members run on (what its compute divides by)

    def __post_init__(self) -> None:
        # These arrive from remote nodes: validate, never assert.
        if not self.node_id:
            raise InvalidArgument("node capacity: node_id is empty")
        if self.memory_bytes < 0:
            raise InvalidArgument(f"node {self.node_id}: memory_bytes must be >= 0")
        if self.size < 1:
            raise InvalidArgument(f"node {self.node_id}: size must be >= 1")
        for name in ("block_ms", "head_ms", "overhead_ms", "sync_ms"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise InvalidArgument(f"node {self.node_id}: {name} must be finite and >= 0")
        if self.block_ms == 0 or self.head_ms == 0:
            raise InvalidArgument(f"node {self.node_id}: a measured step cannot take 0 ms")

    def unit_ms(self, unit: UnitCost) -> float:
        if unit.kind == "head" and self.head_ms is not None:
            ms = self.head_ms
        else:
            ms = unit.cost * self.block_ms
        if self.size > 1:  # members on one host share its cores: they divide its work, not its time
            return ms / min(self.hosts, self.size) + unit.syncs * self.sync_ms
        return ms


def stage_bytes(units: Sequence[UnitCost], start: int, end: int, size: int = 1) -> int:
    """Weight bytes of stage ``[start, end)`` (for one member of a group of ``size``); tied
    weights count once."""
    shared = sum(u.member_shared(size) for u in units[start:end]) if start == 0 else 0
    return sum(u.member_bytes(size) for u in units[start:end]) - shared


def stage_ms(units: Sequence[UnitCost], node: NodeCapacity, start: int, end: int) -> float:
    return node.overhead_ms + sum(node.unit_ms(u) for u in units[start:end])


def coverage(placement: Mapping[str, Stage], n_units: int) -> list[int]:
    """How many nodes serve each unit (0 = a gap: no route exists)."""
    changes = [0] * (n_units + 1)  # +1 where a stage starts, -1 where it ends: O(nodes)
    for start, end in placement.values():
        start, end = max(start, 0), min(end, n_units)
        if start < end:
            changes[start] += 1
            changes[end] -= 1
    return list(itertools.accumulate(changes[:n_units]))


def unit_throughput(
    placement: Mapping[str, Stage], units: Sequence[UnitCost], nodes: Iterable[NodeCapacity]
) -> list[float]:
    """Steps per second each unit can serve: the sum of its nodes' whole-stage rates."""
    by_id = {node.node_id: node for node in nodes}
    rates = [0.0] * len(units)
    for node_id in sorted(placement):  # a fixed summation order: same input, same floats
        if node_id not in by_id:
            raise InvalidArgument(f"placement names node {node_id!r}, which is not in the swarm")
        start, end = placement[node_id]
        rate = 1000.0 / max(stage_ms(units, by_id[node_id], start, end), 1e-9)
        for u in range(start, end):
            rates[u] += rate
    return rates


def weakest_throughput(
    placement: Mapping[str, Stage], units: Sequence[UnitCost], nodes: Iterable[NodeCapacity]
) -> float:
    """The swarm's throughput for many concurrent sessions: its weakest unit's (0: a gap)."""
    return min(unit_throughput(placement, units, nodes))


def units_moved(old: Mapping[str, Stage], new: Mapping[str, Stage]) -> int:
    """Units that nodes must newly load to go from ``old`` to ``new`` (dropping is free)."""
    moved = 0
    for node_id, (start, end) in new.items():
        before = range(*old.get(node_id, (0, 0)))
        moved += sum(1 for u in range(start, end) if u not in before)
    return moved


def place(
    units: Sequence[UnitCost],
    nodes: Iterable[NodeCapacity],
    previous: Mapping[str, Stage] | None = None,
    *,
    replicas: int = 2,
    rebalance_threshold: float = 0.2,
) -> Placement:
    """Give each node a stage, or none. A swarm too small is no error: ``coverage`` then
    shows the units nobody serves as 0.

    ``previous`` is the placement in force. Nodes keep their stage while it fits, and new
    nodes go where the swarm is weakest, as long as a fresh placement would lift the weakest
    unit by less than ``rebalance_threshold`` (0.2 = 20 %) and give no more replicas. Else
    the fewest nodes are released and placed again (1, 2, 4, ... and all but one; the most
    redundant first, or the weakest unit's holders first) that bring it within the
    threshold. Only if none does is the swarm placed from scratch, which may move every
    node.
    """
    nodes = list(nodes)
    if not units:
        raise InvalidArgument("placement: the model has no units")
    if replicas < 1:
        raise InvalidArgument(f"placement: replicas must be >= 1, got {replicas}")
    if not rebalance_threshold >= 0:
        raise InvalidArgument(f"placement: rebalance_threshold {rebalance_threshold} is < 0")
    if len({node.node_id for node in nodes}) != len(nodes):
        raise InvalidArgument("placement: node ids are not unique")
    sw = _Swarm(units, nodes)
    usable = sw.usable()
    holders = sw.holders(usable)

    # From scratch. Should fastest-first leave a unit short (its few possible holders spent
    # elsewhere), try smallest-first, which keeps big nodes for big units; then fewer replicas.
    # Of these, the one that serves the most units, then misses the fewest of ``replicas``
    # (the aims' order): asking fewer replicas everywhere because memory denies them on a few
    # units must not trade the others' redundancy for throughput.
    small_first = sorted(usable, key=lambda i: (sw.memory[i], i))
    served, full = [min(k, 1) for k in holders], [min(k, replicas) for k in holders]
    tried = []
    for r, order in itertools.product(range(replicas, 0, -1), (usable, small_first)):
        need = [min(k, r) for k in holders]
        fill = _fill(sw, {}, order, need)
        tried.append(((fill.short(served), fill.short(full)), need, fill))
        if fill.short(need) == 0:
            break
    _, need, fresh = min(tried, key=lambda t: t[0])  # (the first of equals: more replicas asked)
    if not previous:
        return sw.placement(fresh.stages)

    given = {i: _as_stage(previous.get(sw.ids[i]), sw.n) for i in usable}
    kept = {i: s for i, s in given.items() if s is not None and s[1] <= sw.reach[i][s[0]]}
    h, _ = sw.profile(kept)
    redundant = {i: min(h[slice(*s)]) - sw.rate(i, *s) for i, s in kept.items()}
    release = sorted(kept, key=lambda i: (-redundant[i], i))  # level its units keep without it
    # ... or the weakest unit's holders first (the slowest first), then the rest so: where
    # that unit's only holder is the trouble (slowed, say), releasing redundant nodes never
    # lifts it, and going back to scratch would move every node.
    low = min((x for x, k in zip(h, need, strict=True) if k), default=0.0)
    weak = sorted(
        (i for i, s in kept.items() if min(h[slice(*s)]) <= low),
        key=lambda i: (sw.rate(i, *kept[i]), i),
    )
    orders = [release, weak + [i for i in release if i not in weak]]
    target = fresh.weakest(need) / (1 + rebalance_threshold)
    kept_sets: set[frozenset[int]] = set()  # (those tried)
    for released in _release_sizes(len(kept)):
        for order in orders:
            base = {i: kept[i] for i in order[released:]}
            if frozenset(base) in kept_sets:
                continue
            kept_sets.add(frozenset(base))
            result = _fill(sw, base, [i for i in usable if i not in base], need)
            if result.short(need) <= fresh.short(need) and result.weakest(need) >= target:
                log.debug("placement: kept %d of %d stages", len(base), len(kept))
                return sw.placement(result.stages)
    log.debug("placement: placed again from scratch")
    return sw.placement(fresh.stages)


def _release_sizes(n: int) -> list[int]:
    """How many of ``n`` kept stages ``place`` releases in turn: 0, 1, 2, 4, ... and n - 1
    (all but one), short of going back to scratch."""
    sizes, k = [0] if n else [], 1
    while k < n:
        sizes.append(k)
        k *= 2
    if sizes and n - 1 > sizes[-1]:
        sizes.append(n - 1)
    return sizes


class _Swarm:
    """The inputs as plain lists, nodes indexed fastest first (ties by node_id).

    Per-node figures are computed for all nodes at once with numpy, then kept as lists
    (what the Python loops index fastest); each is the same float or int that the loops
    computing it node by node gave."""

    def __init__(self, units: Sequence[UnitCost], nodes: Sequence[NodeCapacity]) -> None:
        self.n = len(units)
        # A model repeats one block unit n_layer times: time each distinct unit once per node.
        distinct = list(dict.fromkeys(units))
        which = [distinct.index(u) for u in units]
        distinct_ms = [node.unit_ms(u) for node in nodes for u in distinct]
        times = np.array(distinct_ms, dtype=float).reshape(len(nodes), len(distinct))[:, which]
        # fastest first: the same sum() as over each node's list of unit times
        total = [node.overhead_ms + sum(ms) for node, ms in zip(nodes, _rows(times), strict=True)]
        order = sorted(range(len(nodes)), key=lambda j: (total[j], nodes[j].node_id))
        ordered = [nodes[j] for j in order]
        self.ids = [node.node_id for node in ordered]
        self.memory = [node.memory_bytes for node in ordered]
        self.overhead = [node.overhead_ms for node in ordered]
        # prefix[i][u]: node i's time for units [0, u) (cumsum adds in order, as accumulate)
        prefix = np.zeros((len(nodes), self.n + 1))
        np.cumsum(times[order], axis=1, out=prefix[:, 1:])
        self._prefix = prefix
        self.prefix = _rows(prefix)
        # reach[i][a]: the end of the longest stage from unit a that fits node i (a: none).
        self._reach = np.zeros((len(nodes), self.n), dtype=np.int64)
        for size in {node.size for node in ordered}:
            rows = [i for i, node in enumerate(ordered) if node.size == size]
            memory = [self.memory[i] for i in rows]
            self._reach[rows] = _reaches(_byte_sums(units, size), memory)
        self.reach = _rows(self._reach)
        # longest[i][a]: node i's rate on its longest stage from a, rate(i, a, reach[i][a])
        ends = np.take_along_axis(prefix, self._reach, axis=1)
        overhead = np.array(self.overhead).reshape(-1, 1)
        self.longest = _rows(1000.0 / np.maximum(overhead + ends - prefix[:, :-1], 1e-9))

    def usable(self) -> list[int]:
        """The nodes that hold at least one unit."""
        return np.flatnonzero((self._reach > np.arange(self.n)).any(axis=1)).tolist()

    def holders(self, nodes: Sequence[int]) -> list[int]:
        """How many of ``nodes`` can hold each unit."""
        return (self._reach[nodes] > np.arange(self.n)).sum(axis=0).tolist()

    def alone(self, nodes: Sequence[int]) -> list[float]:
        """Per unit, the sum of ``nodes``' rates serving that unit alone (summed by sum(),
        in the order given)."""
        p = self._prefix[nodes]
        overhead = np.array([self.overhead[i] for i in nodes])[:, None]
        rates = 1000.0 / np.maximum(overhead + p[:, 1:] - p[:, :-1], 1e-9)  # rate(i, u, u + 1)
        return [sum(column) for column in rates.T.tolist()]

    def rate(self, i: int, start: int, end: int) -> float:
        return 1000.0 / max(self.overhead[i] + self.prefix[i][end] - self.prefix[i][start], 1e-9)

    def profile(self, stages: Mapping[int, Stage]) -> tuple[list[float], list[int]]:
        h, cnt = [0.0] * self.n, [0] * self.n
        for i in sorted(stages):
            _add(h, cnt, stages[i], self.rate(i, *stages[i]))
        return h, cnt

    def placement(self, stages: Mapping[int, Stage]) -> Placement:
        return {self.ids[i]: stages[i] for i in sorted(stages, key=lambda i: self.ids[i])}


def _rows(table: np.ndarray) -> list[tuple]:
    """A 2-D array as a list of tuples of Python numbers: what loops index fastest, and
    (tuples of numbers, unlike lists) nothing the garbage collector keeps looking at."""
    return list(zip(*table.T.tolist(), strict=True)) if table.shape[1] else [()] * len(table)


def longest_stages(units: Sequence[UnitCost], memory_bytes: int, size: int = 1) -> list[int]:
    """reach[a]: the end of the longest stage from unit a that ``memory_bytes`` holds (for
    one member of a group of ``size``); a where not even unit a fits."""
    return _reach(_byte_sums(units, size), memory_bytes)


def _reaches(sums: tuple[list[int], list[int]], memory: Sequence[int]) -> np.ndarray:
    """``_reach`` for many budgets at once (a row per budget)."""
    plain, from_embed = sums
    # A budget past the model's bytes reaches as far as the model's bytes do: capped, the
    # sums below stay within int64.
    budget = np.array([min(m, plain[-1]) for m in memory], dtype=np.int64)[:, None]
    plain_np, from_embed_np = np.array(plain, dtype=np.int64), np.array(from_embed, dtype=np.int64)
    first = np.searchsorted(from_embed_np, budget, side="right") - 1
    rest = np.searchsorted(plain_np, plain_np[1:-1] + budget, side="right") - 1
    return np.concatenate([first, rest], axis=1)


def _reach(sums: tuple[list[int], list[int]], memory_bytes: int) -> list[int]:
    """``longest_stages`` from ``_byte_sums``: a binary search per start."""
    plain, from_embed = sums
    return [bisect.bisect_right(from_embed, memory_bytes) - 1] + [
        bisect.bisect_right(plain, plain[a] + memory_bytes) - 1 for a in range(1, len(plain) - 1)
    ]


def _byte_sums(units: Sequence[UnitCost], size: int) -> tuple[list[int], list[int]]:
    """Prefix sums of a member's bytes per unit (``size`` 1: a node's): plain, and from the
    embed on (a stage holding the embed stores tied weights once)."""
    plain = list(itertools.accumulate((u.member_bytes(size) for u in units), initial=0))
    from_embed = list(
        itertools.accumulate(
            (u.member_bytes(size) - u.member_shared(size) for u in units), initial=0
        )
    )
    return plain, from_embed


def _add(h: list[float], cnt: list[int], stage: Stage, rate: float, sign: int = 1) -> None:
    """Add (sign=1) or remove (sign=-1) a node serving ``stage`` at ``rate``."""
    for u in range(*stage):
        h[u] += sign * rate
        cnt[u] += sign


@dataclass
class _Result:
    stages: dict[int, Stage]
    h: list[float]  # throughput per unit
    cnt: list[int]  # replicas per unit

    def weakest(self, need: Sequence[int]) -> float:
        """Over the units someone can hold (need > 0)."""
        return min((x for x, k in zip(self.h, need, strict=True) if k), default=0.0)

    def short(self, need: Sequence[int]) -> int:
        """Replicas missing, summed over units."""
        return sum(max(k - c, 0) for c, k in zip(self.cnt, need, strict=True))

    def level(self, need: Sequence[int]) -> tuple[float, int]:
        """The weakest throughput, then (to break ties) how few units are that weak."""
        low = self.weakest(need)
        return low, -sum(1 for x, k in zip(self.h, need, strict=True) if k and x <= low * 1.000001)


def _fill(sw: _Swarm, base: Mapping[int, Stage], free: list[int], need: Sequence[int]) -> _Result:
    """Keep ``base`` as it is and place the ``free`` nodes on top of it."""
    h0, cnt0 = sw.profile(base)

    best = _Result(dict(base), h0[:], cnt0[:])
    left = _sweep(sw, best, free, 0.0, need)  # replicas only
    lo = best.weakest(need)
    if best.short(need) == 0 and lo > 0:
        # Bisect tau to 1 %. No unit can exceed every free node serving it alone.
        alone = sw.alone(free) if free else [0] * sw.n
        hi = min(h0[u] + alone[u] for u in range(sw.n) if need[u])
        while hi > lo * 1.01:
            mid = math.sqrt(lo * hi)
            result = _Result(dict(base), h0[:], cnt0[:])
            rest = _sweep(sw, result, free, mid, need, give_up=True)
            if result.short(need) == 0 and result.weakest(need) >= mid:
                best, left, lo = result, rest, result.weakest(need)
            else:
                hi = mid
    _greedy(sw, best, left, need)
    greedy = _Result(dict(base), h0[:], cnt0[:])
    _greedy(sw, greedy, free, need)
    _add_replicas(sw, greedy, free, need)
    best = min(best, greedy, key=lambda r: (r.short(need), -r.weakest(need)))
    _improve(sw, best, free, need)
    return best


def _sweep(
    sw: _Swarm,
    result: _Result,
    free: list[int],
    tau: float,
    need: Sequence[int],
    give_up: bool = False,
) -> list[int]:
    """Stack stages from the first unit below tau or short of replicas, until the head;
    return the nodes not used. A unit nobody left can hold stays short; with ``give_up``
    the sweep stops there, half done: stages start at the pointer, so no later one could
    lift that unit, and the result has failed tau whatever follows.

    Thousands of stages of dozens of units each: rather than adding each stage's rate to
    its units as it is given, a unit's throughput is settled when the pointer reaches it
    (no stage given later starts before it), as the rates of the stages given so far that
    cover it, summed in the order given: the same floats, in one numpy pass per unit."""
    h, cnt = result.h, result.cnt
    remaining = list(free)
    ends, rates = np.empty(len(free), dtype=np.intp), np.empty(len(free))
    given = 0  # stages given: (end, rate) in ends[:given], rates[:given]

    def settle(u: int) -> None:
        covering = rates[:given][ends[:given] > u]
        if len(covering):
            # accumulate adds in order, as h[u] += rate would (sum() may not: pairwise)
            h[u] = np.add.accumulate(np.concatenate(([h[u]], covering)))[-1].item()
            cnt[u] += len(covering)

    for ptr in range(sw.n):
        settle(ptr)
        while need[ptr] and (h[ptr] < tau or cnt[ptr] < need[ptr]):
            picked = _pick(sw, remaining, ptr, tau - h[ptr], untouched=h[ptr] == 0)
            if picked is None:
                if give_up:
                    for u in range(ptr + 1, sw.n):
                        settle(u)
                    return remaining
                break
            k, rate = picked
            i = remaining.pop(k)
            result.stages[i] = (ptr, sw.reach[i][ptr])
            h[ptr] += rate
            cnt[ptr] += 1
            ends[given], rates[given] = result.stages[i][1], rate
            given += 1
    return remaining


def _pick(
    sw: _Swarm, remaining: list[int], ptr: int, deficit: float, untouched: bool
) -> tuple[int, float] | None:
    """Which node (an index into ``remaining``, fastest first) adds its longest stage at ptr,
    and that stage's rate.

    On untouched ground, the fastest: a node too fast for any deficit wastes least there.
    Where a little is missing, the first of the next few that does not overshoot, else the
    one that overshoots least (plain fastest-first piles quick nodes where little was
    needed). Where only a replica is missing, the slowest: it costs the least throughput.
    """
    order = range(len(remaining)) if deficit > 0 else range(len(remaining) - 1, -1, -1)
    reach = sw.reach
    best: tuple[float, int, float] | None = None
    weighed = 0
    for k in order:
        i = remaining[k]
        if reach[i][ptr] <= ptr:  # cannot hold unit ptr
            continue
        rate = sw.longest[i][ptr]
        over = rate - deficit
        if over <= 0 or deficit <= 0 or untouched:
            return k, rate
        if best is None or (over, k) < best[:2]:
            best = (over, k, rate)
        weighed += 1
        if weighed == _WINDOW:
            break
    return (best[1], best[2]) if best else None


def _raise_weakest(sw: _Swarm, i: int, h: list[float], need: Sequence[int]) -> Stage | None:
    """Petals' rule: node i's stage that lifts the weakest unit most; ties go to the stage
    over the weakest, then on average weakest, units.

    Per start, the longest stage; and where its own units would stay the weakest, the
    shorter (faster) stage that lifts them level with the rest, found by bisection: the
    shorter the stage, the higher its units and the more units left out below.
    """
    n = sw.n
    if all(need):  # (the usual case, and the copies below cost as much as the search)
        level, finite = h, h
    else:
        level = [x if k else math.inf for x, k in zip(h, need, strict=True)]  # inf: nobody's
        finite = [x if k else 0.0 for x, k in zip(h, need, strict=True)]
    levels = np.array(level)  # running minima (numpy picks the same floats as min() would)
    before = [math.inf, *np.minimum.accumulate(levels).tolist()]
    after = [*np.minimum.accumulate(levels[::-1])[::-1].tolist(), math.inf]
    total = list(itertools.accumulate(finite, initial=0.0))
    reach, prefix, overhead = sw.reach[i], sw.prefix[i], sw.overhead[i]

    def own(a: int, e: int) -> tuple[float, float]:  # its weakest unit, before and after
        low = min(level[a:e])
        return low, low + 1000.0 / max(overhead + prefix[e] - prefix[a], 1e-9)  # sw.rate

    def key(a: int, e: int) -> tuple[float, float, float, int]:
        low, raised = own(a, e)
        return (-min(before[a], after[e], raised), low, (total[e] - total[a]) / (e - a), a)

    best: tuple[tuple[float, float, float, int], Stage] | None = None
    reached = -math.inf  # the level the best stage so far lifts the weakest unit to
    for a in range(n):
        # A stage from a leaves the units before a and after its end as they are, so the
        # weakest unit ends no higher than before[a] and after[e] (after[end] for a shorter
        # stage, no higher). A start that cannot reach the best's level is not weighed, and
        # since before[a] only falls as a grows, once it is below, no later start can.
        if before[a] < reached:
            break
        e = reach[a]
        if e <= a or after[e] < reached:
            continue
        bound = min(before[a], after[e])
        low, raised = own(a, e)  # (key(a, e), without calling it: most starts end here)
        k = (-min(bound, raised), low, (total[e] - total[a]) / (e - a), a)
        if raised < bound:  # its own units bind: try shorter stages
            lo, hi = a + 1, e  # the last end at which its units are not below those after
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if own(a, mid)[1] >= after[mid] else (lo, mid - 1)
            for end in (lo, lo + 1):
                if end < e:
                    shorter = key(a, end)
                    if shorter[0] < k[0]:
                        e, k = end, shorter
        if best is None or k < best[0]:
            best, reached = (k, (a, e)), -k[0]
    return best[1] if best else None


def _greedy(sw: _Swarm, result: _Result, nodes: Iterable[int], need: Sequence[int]) -> None:
    """Add the nodes one by one, each where it lifts the weakest unit most."""
    for i in nodes:
        stage = _raise_weakest(sw, i, result.h, need)
        if stage is not None:
            _add(result.h, result.cnt, stage, sw.rate(i, *stage))
            result.stages[i] = stage


def _add_replicas(sw: _Swarm, result: _Result, movable: Sequence[int], need: Sequence[int]) -> None:
    """Where a unit lacks replicas, move there the slowest node that no unit needs where it
    is: it adds a route while costing the least throughput."""
    h, cnt, stages = result.h, result.cnt, result.stages
    spare = sorted((i for i in movable if i in stages), reverse=True)  # slowest first
    for u in range(sw.n):
        while cnt[u] < need[u]:
            fits = (i for i in spare if sw.reach[i][u] > u)
            j = next((i for i in fits if all(cnt[v] > need[v] for v in range(*stages[i]))), None)
            if j is None:
                break
            spare.remove(j)
            _add(h, cnt, stages[j], sw.rate(j, *stages[j]), -1)
            stages[j] = (u, sw.reach[j][u])
            _add(h, cnt, stages[j], sw.rate(j, *stages[j]))


def _improve(sw: _Swarm, result: _Result, movable: Sequence[int], need: Sequence[int]) -> None:
    """Local search: move one node at a time, tried from the most redundant, to its best
    stage (Petals' rule, itself removed) while that lifts the weakest level and costs no
    replica. Bounded, so that 1000 nodes stay fast."""
    h, cnt, stages = result.h, result.cnt, result.stages
    placed = [i for i in movable if i in stages]  # (a move changes a stage, not who has one)
    rate = {i: sw.rate(i, *stages[i]) for i in placed}  # kept up to date as nodes move
    for _ in range(_MOVES):
        level, short = result.level(need), result.short(need)
        # Thousands of nodes share a few hundred stages: each stage's weakest unit once.
        low = {stage: min(h[slice(*stage)]) for stage in {stages[i] for i in placed}}
        redundant = {i: low[stages[i]] - rate[i] for i in placed}
        for i in heapq.nsmallest(_CANDIDATES, placed, key=lambda i: (-redundant[i], i)):
            old = stages[i]
            _add(h, cnt, old, sw.rate(i, *old), -1)
            new = _raise_weakest(sw, i, h, need)
            if new is not None and new != old:
                _add(h, cnt, new, sw.rate(i, *new))
                if result.level(need) > level and result.short(need) <= short:
                    stages[i], rate[i] = new, sw.rate(i, *new)
                    break
                _add(h, cnt, new, sw.rate(i, *new), -1)
            _add(h, cnt, old, sw.rate(i, *old))
        else:
            return


def _as_stage(value: object, n_units: int) -> Stage | None:
    """A previous stage as given (tuple, list), or None if it is not one of this model's."""
    try:
        start, end = (int(x) for x in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return (start, end) if 0 <= start < end <= n_units else None
