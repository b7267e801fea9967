"""Routing by what the swarm measures while it runs: routing itself (``coordinator/routing.py``),
a node's live figures (``node/live.py``), how the coordinator weighs them and the routes it
handed out (``coordinator/load.py``, ``Registry.servers``), and what the wire carries."""

from __future__ import annotations

import asyncio
import math
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from routes import RouteSession, led_by
from swarm import Swarm, local_tokens, settled, wait_until

from nanoshard.checkpoint import open_checkpoint
from nanoshard.client.swarm import CoordinatorClient
from nanoshard.config import GPTConfig
from nanoshard.coordinator.load import (
    FADE_S,
    FRESH_S,
    OPEN_S,
    Handouts,
    LiveReport,
    partners_ratio,
    placement_slowdown,
    speed_factor,
)
from nanoshard.coordinator.registry import WEIGHT_SHARE, Capacity, Load, NodeRecord, Registry
from nanoshard.coordinator.routing import (
    AVOIDED_PENALTY_MS,
    HOP_OVERHEAD_MS,
    Server,
    format_units,
    plan_route,
    route_ms,
)
from nanoshard.coordinator.service import CoordinatorService
from nanoshard.errors import Unavailable
from nanoshard.generation import generate
from nanoshard.hop import SLOWER
from nanoshard.node.cli import build_parser as node_parser
from nanoshard.node.live import LATEST, RECENT, LiveStats
from nanoshard.statusview import status_json
from nanoshard.tokenizer import encoding_for
from nanoshard.v1 import coordinator_pb2 as cpb

GPT2 = GPTConfig()  # 14 units
STEADY = ["--heartbeat-interval", "0.5", "--heartbeat-timeout", "10"]
MB = 1_000_000

# ---- routing, a pure function -------------------------------------------------------------


def server(address: str, start: int, end: int, ms: float = 1.0, **kw: Any) -> Server:
    return Server(address, start, end, (ms,) * (end - start), **kw)


def test_the_fastest_chain_wins_and_every_holder_is_a_replica() -> None:
    servers = [server("a", 0, 4, 1.0), server("b", 4, 8, 1.0), server("c", 0, 8, 1.2)]
    hops = plan_route(servers, 8)  # one hop of 9.6 ms beats two of 4 ms and a hop more
    assert [(h.start, h.end, h.addresses) for h in hops] == [(0, 8, ("c",))]
    # a fast node entered part-way (its stage starts at 2, a hop reaches it at 4)
    servers.append(server("d", 2, 8, 0.5))
    hops = plan_route(servers, 8)
    assert [(h.start, h.end, h.addresses) for h in hops] == [
        (0, 4, ("a", "c")),  # every holder of the hop's units, best first
        (4, 8, ("d", "b", "c")),
    ]
    assert route_ms(servers, hops) == pytest.approx(4 * 1.0 + 4 * 0.5 + 2 * HOP_OVERHEAD_MS)


def test_load_and_avoidance_order_the_replicas() -> None:
    idle, busy = server("idle", 0, 4, 1.0), server("busy", 0, 4, 1.0, load=4.0)
    (hop,) = plan_route([busy, idle], 4)
    assert hop.addresses == ("idle", "busy")
    assert busy.ms(0, 4) == pytest.approx(4 * 1.0 * (1 + 0.25 * 4))
    (hop,) = plan_route([busy, idle], 4, avoid=["idle"])
    assert hop.addresses == ("busy", "idle")  # a failed node stays, as a last resort
    assert idle.ms(0, 4, frozenset({"idle"})) >= AVOIDED_PENALTY_MS


def test_a_group_is_entered_whole_only() -> None:
    group = server("g", 0, 8, 0.1, whole=True, size=2)
    single = server("s", 4, 8, 1.0)
    assert not group.enters(4) and group.holds(0, 8) and not group.holds(4, 8)
    hops = plan_route([group, single, server("e", 0, 4, 1.0)], 8)
    assert [(h.start, h.end, h.addresses) for h in hops] == [(0, 8, ("g",))]


def test_units_nobody_serves_are_named() -> None:
    with pytest.raises(Unavailable, match=re.escape("no ready node serves units [3, 6), [7, 8)")):
        plan_route([server("a", 0, 3), server("b", 6, 7)], 8)
    assert format_units([0, 1, 2, 7, 9, 10]) == "[0, 3), [7, 8), [9, 11)"


# ---- a node's live figures ------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stage(n_blocks: int, has_head: bool = False) -> Any:
    return SimpleNamespace(n_blocks=n_blocks, has_head=has_head, shard=None)


def test_a_nodes_steps_give_its_live_speed_rates_and_links() -> None:
    clock = Clock()
    live = LiveStats(clock)
    live.capacity = (2.0, 10.0)  # block_ms, head_ms as measured at start
    blocks = stage(3)  # predicted 6 ms a decode step
    for _ in range(10):
        live.step(blocks, 1, 6.0, sampled=False)
    live.step(blocks, 32, 64.0, sampled=False)  # a prompt chunk: 2 ms a token
    report = live.report()
    assert report.decode_ms == pytest.approx(6.0) and report.speed_ratio == pytest.approx(1.0)
    assert report.prefill_ms_per_token == pytest.approx(2.0)
    assert report.tokens_per_s == pytest.approx(42 / 10)  # positions over the 10 s window
    # one slow step (a pause) moves neither figure ...
    live.step(blocks, 1, 130.0, sampled=False)
    assert live.report().speed_ratio == 1.0 and live.report().decode_ms == 6.0
    # ... its owner starting a game does, within half the median's steps: 5 times slower
    for _ in range(5):
        live.step(blocks, 1, 30.0, sampled=False)
    report = live.report()
    assert report.speed_ratio == pytest.approx(5.0) and report.decode_ms == pytest.approx(30.0)
    assert report.decode_ms_p90 == pytest.approx(30.0)
    # a view with the head: priced with it
    assert live.expected_ms(stage(1, has_head=True)) == 12.0
    live.step(stage(1, has_head=True), 1, 12.0, sampled=True)
    assert live.report().sampled_per_s == pytest.approx(0.1)
    clock.now += 11  # the window moves on; the figures wait for the next step
    report = live.report()
    assert report.tokens_per_s == 0 and report.idle_s == pytest.approx(11)
    assert report.speed_ratio > 3.5  # kept as it was: the coordinator fades it by idle_s
    for i in range(10):  # next hops: the most recently used 8
        live.hop(f"10.0.0.{i}:1", 1.5, 3072)
    hops = live.report().next_hops
    assert [h.address for h in hops] == [f"10.0.0.{i}:1" for i in range(2, 10)]
    assert hops[0].rtt_ms == 1.5 and hops[0].bytes_per_s == pytest.approx(307.2)
    for _ in range(RECENT):  # the p90 is of the last RECENT decode steps
        live.step(blocks, 1, 6.0, sampled=False)
    assert len(live.recent) == RECENT and live.report().decode_ms_p90 == 6.0


def test_a_group_member_counts_its_share_and_not_the_wait_for_a_slow_member() -> None:
    """A member of a group of 2 computes half of each unit; the time its collectives take,
    waiting for a slower member, is not its own slowness."""
    live, slow = LiveStats(Clock()), LiveStats(Clock())
    live.capacity = slow.capacity = (2.0, 10.0)
    share = SimpleNamespace(n_blocks=3, has_head=False, shard=SimpleNamespace(size=2))
    assert live.expected_ms(share) == 3.0  # half of 6 ms
    for _ in range(LATEST):
        live.step(share, 1, 30.0, sampled=False, collective_ms=27.0)  # waited 27 ms for it
        slow.step(share, 1, 30.0, sampled=False, collective_ms=0.5)  # (the other waited)
    assert live.report().speed_ratio == pytest.approx(1.0)
    assert slow.report().speed_ratio == pytest.approx(29.5 / 3)
    assert live.report().decode_ms == slow.report().decode_ms == 30.0  # (the step's own time)
    live.step(stage(3), 1, 6.0, sampled=False)  # alone again: another basis, a ratio anew
    assert live.report().speed_ratio == 1.0
    live.forget_ratio()  # (a node joining or leaving a group, before its next step)
    assert live.report().speed_ratio == 0


def test_a_group_member_is_judged_against_its_partners_once_they_have_figures() -> None:
    """Partners run the same shapes in step: what a step costs beyond its units' compute
    (most of a small model's) they share, so it slows no member on its own."""
    assert partners_ratio([]) is None
    assert partners_ratio([LiveReport(speed_ratio=9.0, idle_s=FRESH_S + 1)]) is None  # stale
    assert partners_ratio([LiveReport()]) is None  # no figure yet
    assert partners_ratio([LiveReport(speed_ratio=9.0)]) == 9.0
    assert partners_ratio([LiveReport(speed_ratio=0.5)]) == 1.0  # (at least 1)
    three = [LiveReport(speed_ratio=r) for r in (2.0, 9.0, 4.0)]
    assert partners_ratio(three) == 4.0
    # scaled by each partner's measurement over the member's: a partner measured 4 x slower
    # at 2 x its own figure computes what the member's measurement puts at 8 x
    assert partners_ratio([LiveReport(speed_ratio=2.0)], [4.0]) == 8.0
    # a member at a small model's 9 x beside a partner at 9 x is not slowed; at 90 x it is
    assert placement_slowdown(1.0, LiveReport(speed_ratio=9.0), 9.0) == 1.0
    assert placement_slowdown(1.0, LiveReport(speed_ratio=90.0), 9.0) == 10.0


def test_a_serve_node_without_a_capacity_reports_no_ratio() -> None:
    live = LiveStats(Clock())
    live.step(stage(2), 1, 5.0, sampled=False)
    assert live.report().speed_ratio == 0 and live.report().decode_ms == 5.0


# ---- how the coordinator weighs them ------------------------------------------------------


def test_a_slow_report_counts_fully_then_fades_with_its_age() -> None:
    assert speed_factor(LiveReport()) == 1.0
    assert speed_factor(LiveReport(speed_ratio=5.0)) == 5.0
    faded = speed_factor(LiveReport(speed_ratio=5.0, idle_s=FADE_S))
    assert faded == pytest.approx(1 + 4 / math.e)
    assert speed_factor(LiveReport(speed_ratio=1e9)) == 100.0  # bounded either way
    assert speed_factor(LiveReport(speed_ratio=0.01)) == 0.5


def test_routes_handed_out_count_until_the_nodes_report_them() -> None:
    handouts = Handouts()
    handouts.add(["a", "b"], 10.0)
    handouts.add(["a"], 11.0)
    assert handouts.pending("a", reported_at=9.0) == 2
    assert handouts.pending("a", reported_at=10.0 + OPEN_S) == 1  # the first is in its count
    assert handouts.pending("c", reported_at=0.0) == 0
    handouts.prune(500.0)
    assert handouts.times == {}


def record(i: int, memory_mb: float = 600, block_ms: float = 2.0) -> NodeRecord:
    return NodeRecord(
        node_id=f"{i:016x}",
        name=f"n{i}",
        address=f"10.0.0.{i + 1}:7961",
        capacity=Capacity("cpu", "fp32", int(memory_mb * MB / WEIGHT_SHARE), block_ms, 11.0),
        last_heartbeat=0.0,
    )


def six_nodes(memory_mb: float = 260) -> Registry:
    """Six equal nodes, each holding about a third of GPT-2 124M (by default): three stages,
    two replicas."""
    registry = Registry(GPT2, replicas=2, tp="off")
    for i in range(6):
        registry.join(record(i, memory_mb=memory_mb))
    for r in registry.nodes.values():
        registry.heartbeat(r.node_id, 1.0, r.assigned, Load())
    return registry


def first_choices(registry: Registry, routes: int, now: float) -> Counter[str]:
    chosen: Counter[str] = Counter()
    for _ in range(routes):
        hops = plan_route(registry.servers(), GPT2.n_units)
        firsts = [h.addresses[0] for h in hops]
        registry.handed_out(firsts, now)
        chosen.update(firsts)
    return chosen


def test_a_burst_of_sessions_spreads_over_the_replicas() -> None:
    registry = six_nodes()
    hops = plan_route(registry.servers(), GPT2.n_units)
    assert len(hops) == 3 and all(len(h.addresses) == 2 for h in hops)
    chosen = first_choices(registry, 8, now=1.1)  # 8 routes before any heartbeat shows them
    assert sorted(chosen.values()) == [4] * 6  # each replica takes half of its stage's


def test_a_node_whose_steps_slow_down_leaves_new_routes() -> None:
    registry = six_nodes()
    hops = plan_route(registry.servers(), GPT2.n_units)
    slowed = next(r for r in registry.nodes.values() if r.address == hops[1].addresses[0])
    before = route_ms(registry.servers(), hops)
    live = LiveReport(decode_ms=40.0, speed_ratio=5.0)
    registry.heartbeat(slowed.node_id, 2.0, slowed.assigned, Load(live=live))
    again = plan_route(registry.servers(), GPT2.n_units)
    assert slowed.address not in [h.addresses[0] for h in again]
    assert again[1].addresses[-1] == slowed.address  # still a replica, the last
    assert route_ms(registry.servers(), again) == pytest.approx(before)
    # a minute or two without steps and it is tried again
    faded = LiveReport(decode_ms=40.0, speed_ratio=5.0, idle_s=10 * FADE_S)
    registry.heartbeat(slowed.node_id, 3.0, slowed.assigned, Load(live=faded))
    server = {s.address: s for s in registry.servers()}[slowed.address]
    assert server.speed == pytest.approx(speed_factor(faded))
    start = slowed.ready[0]  # type: ignore[index]
    assert server.ms(start, start + 1) == pytest.approx(
        registry.unit_ms(slowed, start) * speed_factor(faded) * (1 + 0.25 * server.load)
    )


# ---- the wire -------------------------------------------------------------------------


class Context:
    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass


def test_heartbeats_carry_live_figures_to_routes_and_status() -> None:
    registry = six_nodes()
    svc = CoordinatorService(
        SimpleNamespace(model_id="ab" * 32, name="gpt2"),  # type: ignore[arg-type]
        registry,
        swarm="default",
        heartbeat_interval_s=2.0,
        epoch=b"\0" * 8,
        clock=lambda: 5.0,
    )

    async def run() -> None:
        heads = [r for r in registry.nodes.values() if r.assigned and r.assigned[1] == 14]
        for r in registry.nodes.values():
            assert r.assigned is not None
            live = cpb.LiveLoad(
                decode_ms=6.0,
                speed_ratio=1.0,
                sampled_per_s=3.0 if r in heads else 0.0,
                next_hops=[cpb.HopLink(address="10.0.0.9:7961", rtt_ms=1.2, bytes_per_s=9e3)],
            )
            request = cpb.HeartbeatRequest(
                node_id=r.node_id,
                ready=True,
                start=r.assigned[0],
                end=r.assigned[1],
                load=cpb.NodeLoad(sessions=1, live=live),
            )
            await svc.Heartbeat(request, Context())
        await svc.GetRoute(cpb.RouteRequest(peek=True), Context())  # only looking
        assert not any(registry._pending(r) for r in registry.nodes.values())
        route = await svc.GetRoute(cpb.RouteRequest(), Context())
        firsts = [h.addresses[0] for h in route.hops]
        assert all(registry._pending(r) == (r.address in firsts) for r in registry.nodes.values())
        status = status_json(await svc.GetStatus(cpb.StatusRequest(), Context()))
        assert status["measured_tokens_per_s"] == 6.0  # the two nodes holding the head
        node = status["nodes"][0]
        assert node["live"]["decode_ms"] == 6.0 and node["live"]["speed_ratio"] == 1.0
        assert (node["own_ratio"], node["slowdown"]) == (None, 1.0)  # (not judged yet)
        assert node["live"]["next_hops"] == [
            {"address": "10.0.0.9:7961", "rtt_ms": 1.2, "bytes_per_s": 9000}
        ]
        some = next(iter(registry.nodes.values()))
        for bad in (
            cpb.LiveLoad(decode_ms=float("nan")),
            cpb.LiveLoad(speed_ratio=-1.0),
            cpb.LiveLoad(next_hops=[cpb.HopLink(address="nowhere")]),
            cpb.LiveLoad(next_hops=[cpb.HopLink(address=f"10.0.0.1:{p}") for p in range(1, 10)]),
        ):
            request = cpb.HeartbeatRequest(node_id=some.node_id, load=cpb.NodeLoad(live=bad))
            with pytest.raises(RuntimeError, match="live"):
                await svc.Heartbeat(request, Context())
        # a node that has not measured its speed yet says so: null, not a ratio of 0
        unmeasured = cpb.NodeStatus(load=cpb.NodeLoad(live=cpb.LiveLoad(decode_ms=6.0)))
        node = status_json(cpb.SwarmStatus(nodes=[unmeasured]))["nodes"][0]
        assert (node["live"]["speed_ratio"], node["own_ratio"]) == (None, None)

    asyncio.run(run())


# ---- a swarm: real processes on loopback ------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "join"])
def test_a_node_may_keep_its_routes_as_planned(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--leave-slower`` sets the slowdown at which a node's links move a hop to a
    replica; 0 never moves one (a route kept as planned)."""
    parse = node_parser().parse_args
    units = ["--units", "0:2"] if command == "serve" else []
    assert parse([command, *units]).leave_slower == SLOWER
    assert parse([command, *units, "--leave-slower", "5"]).leave_slower == 5
    assert parse([command, *units, "--leave-slower", "0"]).leave_slower == math.inf
    for bad in ("1", "0.5", "-2", "inf", "nan", "x"):
        with pytest.raises(SystemExit):
            parse([command, *units, "--leave-slower", bad])
        assert "--leave-slower" in capsys.readouterr().err


@pytest.mark.slow
def test_routes_leave_a_volunteer_whose_steps_slow_down(tmp_path: Path) -> None:
    """Six volunteers, three stages, two replicas each; one computes 10 times slower than
    it measured at start (``slow:10:0``: its owner took the machine back). A greedy
    generation through it gives the local tokens; then the coordinator knows it from its
    live figures, shows them, and routes new sessions through its replica. (Ten, not five:
    six nodes measuring at once on a busy machine can measure themselves 2-3 x slow, and
    the status shows a node's speed against its own measurement.)"""
    ckpt = open_checkpoint("demo")
    memory = str(int(ckpt.stage_nbytes(0, ckpt.config.n_units) * 0.5 / 0.8))  # 3 stages
    with Swarm() as swarm:
        _, address = swarm.coordinator("--replicas", "2", "--tp", "off", *STEADY)
        for i in range(6):
            env = {"NANOSHARD_FAULT": "slow:10:0"} if i == 0 else None
            swarm.join("--coordinator", address, "--max-memory", memory, "--name", f"n{i}",
                       "--cache-dir", str(tmp_path / f"n{i}"), env=env)  # fmt: skip
        client = CoordinatorClient(address)
        status = wait_until(
            "three stages, two replicas",
            lambda: settled(status_json(client.status()), 6, replicas=2),
            timeout=240,
        )
        slowed = next(n for n in status["nodes"] if n["name"] == "n0")["address"]
        # The swarm's route with n0 first in its hop (routing alone may never pick it: its
        # replica measured faster at start, say), its replica behind it.
        route = wait_until("a route naming n0", lambda: led_by(client.route(peek=True), slowed))
        enc = encoding_for(ckpt.path)
        prompt = enc.encode("JULIET:")
        session = RouteSession(route, 256)  # (n0 is slow from its first step: it stays on)
        block, eot = ckpt.config.block_size, enc.eot_token
        try:
            tokens = generate(session, prompt, 200, block_size=block, eot_id=eot)
        finally:
            session.close()
        greedy = ["--max-new-tokens", "200", "--temperature", "0", "JULIET:"]
        assert tokens.token_ids == local_tokens(*greedy)

        def known_slow() -> dict | None:
            node = next(n for n in status_json(client.status())["nodes"] if n["name"] == "n0")
            return node if (node["live"]["speed_ratio"] or 0) >= 3 else None

        node = wait_until("n0's live speed in status", known_slow, timeout=30)
        assert node["live"]["decode_ms"] > 0

        # New routes go through its replica (it stays a last resort). Peeked, so that they
        # count on no node: handed out, a dozen in one heartbeat would load its replica
        # (1 + 0.25 x each) as much as n0 is slow, and routing rightly spreads them again.
        def around_n0() -> bool:
            return slowed not in [h.addresses[0] for h in client.route(peek=True).hops]

        wait_until("routes around n0", around_n0, timeout=30)
        assert all(around_n0() for _ in range(5))
