"""Routing's index and skips: ``plan_route`` gives exactly the route of the plain dynamic
program that asks every server about every unit (kept here as the reference)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoshard.coordinator import routing
from nanoshard.coordinator.routing import HOP_OVERHEAD_MS, RouteHop, Server, plan_route
from nanoshard.errors import Unavailable
from nanoshard.rpc import MAX_REPLICAS_PER_HOP


def reference_route(
    servers: list[Server], n_units: int, avoid: tuple[str, ...] = ()
) -> list[RouteHop]:
    """The route by definition: every server asked about every unit, O(units x servers)."""
    pool = sorted(
        (
            s
            for s in servers
            if 0 <= s.start < s.end <= n_units and len(s.unit_ms) == s.end - s.start
        ),
        key=lambda s: (s.address, s.start),
    )
    avoided = frozenset(avoid)
    best = [float("inf")] * (n_units + 1)
    back: list[tuple[int, Server] | None] = [None] * (n_units + 1)
    best[0] = 0.0
    for u in range(n_units):
        for s in pool:
            if best[u] < float("inf") and s.enters(u):
                cost = best[u] + s.ms(u, s.end, avoided) + routing.HOP_OVERHEAD_MS
                if cost < best[s.end]:
                    best[s.end], back[s.end] = cost, (u, s)
    if best[n_units] == float("inf"):
        raise Unavailable("uncovered")
    hops, v = [], n_units
    while v > 0:
        u, _ = back[v]  # type: ignore[misc]
        holders = sorted(
            (s for s in pool if s.holds(u, v)), key=lambda s: (s.ms(u, v, avoided), s.address)
        )
        addresses = tuple(dict.fromkeys(s.address for s in holders))[:MAX_REPLICAS_PER_HOP]
        hops.append(RouteHop(u, v, addresses))
        v = u
    return hops[::-1]


def random_servers(rng: random.Random, n_units: int, count: int) -> list[Server]:
    """Few distinct times, shared addresses, groups, loads: ties everywhere."""
    out = []
    for _ in range(count):
        start = rng.choice([0, 0, rng.randrange(n_units)])
        end = rng.randint(start + 1, n_units)
        out.append(
            Server(
                f"10.0.0.{rng.randrange(6)}:5000",
                start,
                end,
                tuple(rng.choice([0.0, 0.5, 1.0, 1.0, 2.0]) for _ in range(end - start)),
                load=rng.choice([0.0, 0.0, 1.0, 4.0]),
                overhead_ms=rng.choice([0.0, 0.0, 0.5]),
                whole=rng.random() < 0.2,
            )
        )
    return out


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_units=st.integers(1, 8), count=st.integers(1, 25))
def test_the_route_is_the_plain_dynamic_programs(seed: int, n_units: int, count: int) -> None:
    rng = random.Random(seed)
    servers = random_servers(rng, n_units, count)
    avoid = tuple(rng.sample([s.address for s in servers], min(2, len(servers))))
    for skip in ((), avoid):
        try:
            expected = reference_route(servers, n_units, skip)
        except Unavailable:
            with pytest.raises(Unavailable):
                plan_route(servers, n_units, skip)
            continue
        assert plan_route(servers, n_units, skip) == expected


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_units=st.integers(1, 8),
    count=st.integers(1, 25),
    asked=st.sets(st.integers(0, 7)),
)
def test_the_index_lists_exactly_who_a_hop_may_enter(
    seed: int, n_units: int, count: int, asked: set[int]
) -> None:
    """Asked for units in increasing order, skipping some (the chain reaches few): a node
    whose stage ended among the skipped units is not listed (it once was, and its time for
    a hop that ends before it starts came out as nothing)."""
    pool = sorted(random_servers(random.Random(seed), n_units, count), key=lambda s: s.address)
    entries = routing._Entries(pool, n_units)
    for u in sorted(a for a in asked if a < n_units):
        assert entries.at(u) == [s for s in pool if s.enters(u)]


def test_a_negative_time_turns_the_skips_off_and_changes_nothing() -> None:
    """The skips assume no hop costs less than HOP_OVERHEAD_MS; a (bogus) negative load
    breaks that, and the route must still be the plain program's."""
    servers = [
        Server("a", 0, 4, (1.0,) * 4),
        Server("b", 0, 2, (1.0,) * 2),
        Server("c", 2, 4, (50.0,) * 2, load=-8.0),  # 1 + 0.25 * load < 0: a negative time
    ]
    assert plan_route(servers, 4) == reference_route(servers, 4)
    # without the guard the skips would keep "a" alone (6.5 ms "beats" the way on from unit 2)
    assert [h.addresses for h in plan_route(servers, 4)] == [("a", "b"), ("c", "a")]


def test_a_big_swarm_routes_as_the_plain_program_does() -> None:
    rng = random.Random(7)
    n_units = 50
    servers = []
    for k in range(2000):
        start = rng.choice([0, rng.randrange(n_units)])
        end = rng.randint(start + 1, n_units)
        servers.append(
            Server(
                f"10.0.{k // 256}.{k % 256}:5000",
                start,
                end,
                tuple(rng.uniform(0.5, 5.0) for _ in range(end - start)),
                load=rng.choice([0.0, 1.0, 3.0]),
            )
        )
    hops = plan_route(servers, n_units)
    assert hops == reference_route(servers, n_units)
    assert HOP_OVERHEAD_MS > 0  # (what the skips rely on)


def test_a_hop_names_its_best_few_replicas_avoided_ones_last() -> None:
    """A node takes at most MAX_REPLICAS_PER_HOP addresses a hop: a hop with more holders
    names the fastest, and an avoided address only if the others do not fill the list."""
    many = [Server(f"n{k:02d}", 0, 2, (1.0 + k, 1.0)) for k in range(MAX_REPLICAS_PER_HOP + 4)]
    (hop,) = plan_route(many, 2, avoid=["n00"])
    assert hop.addresses == tuple(f"n{k:02d}" for k in range(1, MAX_REPLICAS_PER_HOP + 1))
    few = many[:3]
    (hop,) = plan_route(few, 2, avoid=["n00"])
    assert hop.addresses == ("n01", "n02", "n00")
