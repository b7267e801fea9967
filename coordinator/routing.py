"""Routing: which chain of nodes a generation takes. A pure function of the ready nodes.

A route is a chain of hops from unit 0 to the head. Each hop is a stage that some ready
nodes serve exactly; its addresses are those nodes, best first, so a hop before it can
switch to a replica when the preferred one fails. Among all chains, the one with the least
estimated time per step wins: each hop costs its best node's step time, inflated by how
loaded that node is, plus a fixed transfer overhead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nanoshard.errors import Unavailable

HOP_OVERHEAD_MS = 1.0  # one more hop: serialization, loopback or LAN transfer, gRPC


@dataclass(frozen=True)
class Server:
    """A ready node as routing sees it."""

    address: str
    start: int
    end: int
    step_ms: float  # estimated time of one decode step over its whole stage
    load: float = 0.0  # open sessions + queued steps: more load, longer waits


@dataclass(frozen=True)
class RouteHop:
    start: int
    end: int
    addresses: tuple[str, ...]  # best first


def effective_ms(server: Server) -> float:
    return server.step_ms * (1.0 + 0.25 * server.load)


def plan_route(
    servers: Iterable[Server], n_units: int, avoid: Sequence[str] = ()
) -> list[RouteHop]:
    """The fastest chain of stages covering ``[0, n_units)``.

    Addresses in ``avoid`` (recently failed, as the client reports) are kept only as last
    resorts. Raises Unavailable naming the units no ready node serves.
    """
    groups: dict[tuple[int, int], list[Server]] = {}
    for s in servers:
        if 0 <= s.start < s.end <= n_units:
            groups.setdefault((s.start, s.end), []).append(s)
    avoided = set(avoid)

    def rank(s: Server) -> tuple[bool, float, str]:
        return (s.address in avoided, effective_ms(s), s.address)

    for members in groups.values():
        members.sort(key=rank)
    # Shortest path over unit boundaries: best[u] = cheapest chain reaching unit u.
    inf = float("inf")
    best: list[tuple[float, int]] = [(inf, 0)] * (n_units + 1)  # (cost, hops)
    back: list[tuple[int, int] | None] = [None] * (n_units + 1)
    best[0] = (0.0, 0)
    for u in range(n_units):
        if best[u][0] == inf:
            continue
        for (start, end), members in sorted(groups.items()):
            if start != u:
                continue
            top = members[0]
            penalty = 1e6 if top.address in avoided else 0.0
            cost = (best[u][0] + effective_ms(top) + HOP_OVERHEAD_MS + penalty, best[u][1] + 1)
            if cost < best[end]:
                best[end], back[end] = cost, (start, end)
    if best[n_units][0] == inf:
        raise Unavailable(uncovered_message(groups, n_units))
    hops: list[RouteHop] = []
    u = n_units
    while u > 0:
        start, end = back[u]  # type: ignore[misc]
        hops.append(RouteHop(start, end, tuple(s.address for s in groups[(start, end)])))
        u = start
    return hops[::-1]


def uncovered_message(groups: dict[tuple[int, int], list[Server]], n_units: int) -> str:
    covered = [False] * n_units
    for start, end in groups:
        for u in range(start, end):
            covered[u] = True
    gaps = [u for u in range(n_units) if not covered[u]]
    if gaps:
        return (
            f"no ready node serves units {format_units(gaps)}: the swarm cannot run the model now"
        )
    return "every unit is served, but the stages do not chain from embed to head (placement is changing): retry shortly"


def format_units(units: Sequence[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    parts, i = [], 0
    while i < len(units):
        j = i
        while j + 1 < len(units) and units[j + 1] == units[j] + 1:
            j += 1
        parts.append(str(units[i]) if i == j else f"{units[i]}-{units[j]}")
        i = j + 1
    return ", ".join(parts)
