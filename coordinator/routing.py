"""Routing: which chain of nodes a generation takes. A pure function of the ready nodes.

A route is a chain of hops from unit 0 to the head. A hop is a unit range ``[u, v)`` that
some ready nodes hold; a node may serve a hop that starts inside its stage (it runs only
the units asked for), so stages that overlap without lining up still chain, and every
node holding a hop's units is a replica the hop before can switch to. Among all chains,
the one with the least estimated time per step wins: each hop costs its best node's time
for those units, inflated by how loaded that node is, plus a fixed transfer overhead.

``plan_route`` weighs, at each unit a chain reaches, only the servers a hop may enter
there (an index), and skips the hops that cannot beat the chains found so far: a big
swarm's route costs about what its servers do, not units x servers.

A tensor-parallel group is one server: its rank 0's address, the group's stage and its
predicted times. It serves only its whole stage (its members run the stage they sharded
together), so a hop enters it at its first unit and leaves at its last.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nanoshard.errors import Unavailable
from nanoshard.rpc import MAX_REPLICAS_PER_HOP

# One more hop: serialization, transfer, gRPC and both ends' wake-ups. Measured on loopback
# on this project's 2-core machine: 2.84 ms a hop in benchmarks/hops.py (2026-12-02), 2.5 ms
# a hop between a 2-node pipeline and the local path in benchmarks/tp.py (2026-12-04).
HOP_OVERHEAD_MS = 2.5
AVOIDED_PENALTY_MS = 1e6  # an address the client saw fail is a last resort


@dataclass(frozen=True)
class Server:
    """A ready node as routing sees it."""

    address: str
    start: int
    end: int
    unit_ms: tuple[float, ...]  # estimated decode-step time of each unit of its stage
    load: float = 0.0  # open sessions + queued steps: more load, longer waits
    overhead_ms: float = 0.0  # paid once per step (a group's: rank 0 sending the input on)
    whole: bool = False  # serves only [start, end) whole (a tensor-parallel group)
    size: int = 1  # nodes serving together (a group's size)
    speed: float = 1.0  # how many times ``unit_ms`` its steps take now (its live slowdown)
    # prefix sums of ``unit_ms`` (made from it when not given): a hop's time in O(1). The
    # registry keeps them per node, so a route does not redo them for thousands of nodes.
    cum: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.cum) != len(self.unit_ms) + 1:
            object.__setattr__(self, "cum", prefix_sums(self.unit_ms))

    def holds(self, start: int, end: int) -> bool:
        if self.whole:
            return (self.start, self.end) == (start, end)
        return self.start <= start and end <= self.end

    def enters(self, u: int) -> bool:
        """Whether a hop may start at unit ``u`` here."""
        return u == self.start if self.whole else self.start <= u < self.end

    def ms(self, start: int, end: int, avoided: frozenset[str] = frozenset()) -> float:
        """Estimated time of units ``[start, end)`` here, speed, load and avoidance
        included."""
        cum = self.cum
        base = self.overhead_ms + self.speed * (cum[end - self.start] - cum[start - self.start])
        penalty = AVOIDED_PENALTY_MS if self.address in avoided else 0.0
        return base * (1.0 + 0.25 * self.load) + penalty


def prefix_sums(unit_ms: Sequence[float]) -> tuple[float, ...]:
    """``(0, t0, t0 + t1, ...)``: the time of units ``[a, b)`` is ``cum[b] - cum[a]``."""
    return (0.0, *itertools.accumulate(unit_ms))


@dataclass(frozen=True)
class RouteHop:
    start: int
    end: int
    # the best ready nodes holding [start, end), best first: at most MAX_REPLICAS_PER_HOP,
    # what a node takes in a route (a hop with more replicas switches among the best few,
    # and a client whose few all fail asks for a new route)
    addresses: tuple[str, ...]


def plan_route(
    servers: Iterable[Server], n_units: int, avoid: Sequence[str] = ()
) -> list[RouteHop]:
    """The fastest chain of hops covering ``[0, n_units)``.

    Addresses in ``avoid`` (recently failed, as the client reports) are kept only as last
    resorts, behind every other holder of their hop (so a hop with ``MAX_REPLICAS_PER_HOP``
    others does not name them). Raises Unavailable naming the units no ready node serves.
    """
    pool = sorted(
        (
            s
            for s in servers
            if 0 <= s.start < s.end <= n_units and len(s.unit_ms) == s.end - s.start
        ),
        key=operator.attrgetter("address", "start"),
    )
    avoided = frozenset(avoid)
    inf = float("inf")
    entering = _Entries(pool, n_units)
    # best[u]: the cheapest chain reaching unit u; a hop from u runs to the end of a stage
    # holding u (the longest hop: fewest transfers, and never fewer ways on).
    best: list[float] = [inf] * (n_units + 1)
    back: list[tuple[int, Server] | None] = [None] * (n_units + 1)
    best[0] = 0.0

    # Where no time is negative (measured ones never are) a hop from u costs at least
    # floor = best[u] + HOP_OVERHEAD_MS: a hop that cannot beat best[v] even so is not
    # timed, nor is any from a unit that cannot beat the whole chain found so far (what
    # keeps a big swarm's route cheap: most units it reaches are past that). Ties go to
    # the first found, so neither skips a chain that could win: the route is the same.
    @functools.cache
    def bounded() -> bool:  # asked only once a skip is possible: it reads every server
        return HOP_OVERHEAD_MS > 0 and all(
            s.overhead_ms >= 0 and s.load >= 0 and s.speed >= 0 and min(s.unit_ms, default=0.0) >= 0
            for s in pool
        )

    for u in range(n_units):
        if best[u] == inf:
            continue
        floor = best[u] + HOP_OVERHEAD_MS
        if floor >= best[n_units] and bounded():
            continue
        for s in entering.at(u):
            if floor >= best[s.end] and bounded():
                continue
            cost = best[u] + s.ms(u, s.end, avoided) + HOP_OVERHEAD_MS
            if cost < best[s.end]:
                best[s.end], back[s.end] = cost, (u, s)
    if best[n_units] == inf:
        raise Unavailable(uncovered_message(pool, n_units))
    hops: list[RouteHop] = []
    v = n_units
    while v > 0:
        u, _ = back[v]  # type: ignore[misc]
        ms: dict[str, float] = {}  # who holds [u, v) enters at u: each address's best time
        for s in entering.at(u):
            if s.holds(u, v):
                t = s.ms(u, v, avoided)
                if t < ms.get(s.address, inf):
                    ms[s.address] = t
        few = heapq.nsmallest(MAX_REPLICAS_PER_HOP, ms, key=lambda a: (ms[a], a))
        hops.append(RouteHop(u, v, tuple(few)))
        v = u
    return hops[::-1]


class _Entries:
    """The servers a hop may start on at unit u, in pool order (which breaks ties): a group
    only at its first unit, a node anywhere in its stage.

    An index, so that each unit the chain reaches weighs only the servers it may enter
    instead of asking every server about every unit. The chain reaches few units, so the
    lists are built as it asks, for units in increasing order (and kept for the way back).
    """

    def __init__(self, pool: Sequence[Server], n_units: int) -> None:
        self.pool = pool
        self.starting: list[list[int]] = [[] for _ in range(n_units)]  # pool indices by start
        for k, s in enumerate(pool):
            self.starting[s.start].append(k)
        self.nodes: list[int] = []  # nodes whose stage holds the unit last asked about
        self.merged = 0  # self.starting[: self.merged] is in self.nodes
        self.lists: dict[int, list[Server]] = {}

    def at(self, u: int) -> list[Server]:
        """Asked for units in increasing order (one asked before comes from the cache)."""
        if u not in self.lists:
            pool = self.pool
            fresh = itertools.chain.from_iterable(self.starting[self.merged : u + 1])
            self.nodes = [k for k in self.nodes if pool[k].end > u]
            self.nodes += (k for k in fresh if not pool[k].whole and pool[k].end > u)
            self.merged = u + 1
            groups = (k for k in self.starting[u] if pool[k].whole)
            self.lists[u] = [pool[k] for k in sorted(itertools.chain(self.nodes, groups))]
        return self.lists[u]


def route_ms(servers: Iterable[Server], hops: Sequence[RouteHop]) -> float:
    """Estimated time of one decode step along a route (its preferred nodes)."""
    by_address = {s.address: s for s in servers}
    return sum(by_address[h.addresses[0]].ms(h.start, h.end) + HOP_OVERHEAD_MS for h in hops)


def uncovered_message(servers: Sequence[Server], n_units: int) -> str:
    covered = [False] * n_units
    for s in servers:
        for u in range(s.start, s.end):
            covered[u] = True
    gaps = [u for u in range(n_units) if not covered[u]]
    return f"no ready node serves units {format_units(gaps)}: the swarm cannot run the model now"


def format_units(units: Sequence[int]) -> str:
    """[1, 2, 3, 7] -> '[1, 4), [7, 8)': stages, as everything else names units."""
    parts, i = [], 0
    while i < len(units):
        j = i
        while j + 1 < len(units) and units[j + 1] == units[j] + 1:
            j += 1
        parts.append(f"[{units[i]}, {units[j] + 1})")
        i = j + 1
    return ", ".join(parts)
