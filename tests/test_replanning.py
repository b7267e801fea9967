"""Re-placement while the swarm runs: placement weighs live speeds with hysteresis and a
budget (``Registry.rebalance``, ``load.placement_slowdown``), and runs off the event loop
(``coordinator/replanner.py``) without losing what changed meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from routes import fixed_session
from test_live_load import GPT2, record, six_nodes

from nanoshard.checkpoint import open_checkpoint
from nanoshard.client.loop import LoopThread
from nanoshard.client.route import route_from_addresses
from nanoshard.coordinator import groups
from nanoshard.coordinator.load import (
    RECHECK_S,
    RECOVERED,
    SLOW,
    LiveReport,
    placement_slowdown,
    shared_ratios,
)
from nanoshard.coordinator.placement import coverage
from nanoshard.coordinator.registry import MIN_REBALANCE_S, REBALANCE_S, Load, Registry
from nanoshard.coordinator.replanner import Replanner
from nanoshard.errors import NanoshardError
from nanoshard.generation import LocalSession, generate
from nanoshard.modelcard import quick_model_id
from nanoshard.node.server import DataPlane
from nanoshard.sampling import SamplingParams


def live(ratio: float, idle_s: float = 0.5) -> LiveReport:
    return LiveReport(decode_ms=10.0 * ratio, speed_ratio=ratio, idle_s=idle_s)


def test_placement_counts_a_slowdown_only_past_its_hysteresis() -> None:
    assert placement_slowdown(1.0, LiveReport()) == 1.0  # nothing measured
    assert placement_slowdown(1.0, live(2.0)) == 1.0  # a shared machine's noise
    assert placement_slowdown(1.0, live(5.0)) == 5.0  # an owner's game
    assert placement_slowdown(1.0, live(5.0, idle_s=100)) == 1.0  # old news is no news
    assert placement_slowdown(5.0, live(4.0)) == 5.0  # within the band: no change
    assert placement_slowdown(5.0, live(2.0)) == 2.0  # moved by more than half: followed
    assert placement_slowdown(5.0, live(RECOVERED - 0.1)) == 1.0  # recovered
    assert placement_slowdown(5.0, live(5.0, idle_s=60)) == 5.0  # idle: still slowed ...
    assert placement_slowdown(5.0, live(5.0, idle_s=RECHECK_S)) == 1.0  # ... until retried
    assert placement_slowdown(1.0, live(SLOW)) == SLOW
    assert placement_slowdown(1.0, live(5.0), shared=4.0) == 1.0  # everyone is as slow


def test_the_slowdown_nodes_share_is_not_their_own() -> None:
    assert shared_ratios([]) == []
    assert shared_ratios([live(5.0)]) == [None]  # nobody else has a figure: not judged
    assert shared_ratios([live(5.0), live(1.0), live(1.2)]) == [1.1, 3.1, 3.0]
    assert shared_ratios([live(4.0)] * 4 + [live(0.5)]) == [4.0] * 4 + [4.0]
    assert shared_ratios([live(9.0, idle_s=100), live(2.0)]) == [2.0, None]  # stale: not counted
    # ... but a node that ran no step lately counts at its rest: a tiny model's steps at
    # rest read 3.5 x on a busy machine everywhere, so the one node routes use is not slow
    idle = [live(3.6, idle_s=100), live(3.9, idle_s=100)]
    assert shared_ratios([live(3.5), *idle], [3.5, 3.4, 3.6]) == pytest.approx([3.5, 3.55, 3.45])
    assert placement_slowdown(1.0, live(3.5), shared=3.5) == 1.0
    # while one slowed 10 x from its first step (its rest: slow) stands out against them
    assert shared_ratios([live(35.0), *idle], [35.0, 3.4, 3.6])[0] == pytest.approx(3.5)
    assert placement_slowdown(1.0, live(35.0), shared=3.5) == 10.0


def three_stages() -> Registry:
    """Six equal nodes, each holding half of GPT-2 124M: two stages of three replicas."""
    return six_nodes(memory_mb=330)


def stages(registry: Registry) -> dict[str, tuple[int, int] | None]:
    return {r.name: r.assigned for r in registry.nodes.values()}


def report(registry: Registry, name: str, now: float, ratio: float) -> None:
    r = next(r for r in registry.nodes.values() if r.name == name)
    registry.heartbeat(r.node_id, now, r.ready, Load(live=live(ratio)))


def test_a_tiny_models_ratio_at_rest_moves_no_stage() -> None:
    """Every node's steps read 3.5 x at rest (a step's fixed cost): the one node routes use
    now is not counted slow against the others' rest, though none of them ran lately."""
    registry = three_stages()
    names = [r.name for r in registry.nodes.values()]
    for name in names:
        report(registry, name, 1.0, ratio=3.5)
    for r in registry.nodes.values():  # then none runs a step for a while ...
        registry.heartbeat(r.node_id, 100.0, r.ready, Load(live=live(3.5, idle_s=99)))
    assert min(r.rest_ratio for r in registry.nodes.values()) == 3.5
    report(registry, names[0], 101.0, ratio=3.6)  # ... but one: at its rest
    assert registry.rebalance(101.0 + MIN_REBALANCE_S) == 0
    assert {r.slowdown for r in registry.nodes.values()} == {1.0}


def test_a_slowed_node_is_placed_by_its_live_speed_once_and_nothing_flaps() -> None:
    registry = three_stages()
    before = stages(registry)
    first = [name for name, s in before.items() if s == (0, 7)]
    assert len(first) == 2  # the first half is the thinner one: 2 against 4
    assert registry.rebalance(2.0) == 0  # nothing measured: nothing moves
    others = [name for name in before if name != first[0]]
    for name in others:  # the other nodes run as measured ...
        report(registry, name, 3.0, ratio=1.0)
    report(registry, first[0], 3.0, ratio=2.0)  # ... and this one with some noise
    assert registry.rebalance(3.0 + REBALANCE_S) == 0
    for name in others:
        report(registry, name, 200.0, ratio=1.0)
    report(registry, first[0], 200.0, ratio=5.0)  # its owner started a game
    moved = registry.rebalance(200.0 + MIN_REBALANCE_S)
    after = stages(registry)
    assert moved == 7  # one node of the other half loads the first half
    assert sorted(after.values()) == [(0, 7)] * 3 + [(7, 14)] * 3
    assert after[first[0]] == (0, 7)  # the slowed node keeps its stage (dropping is free)
    for r in registry.nodes.values():  # the nodes report their new stages ready
        registry.heartbeat(r.node_id, 215.0, r.assigned, r.load)
    for t in (220.0, 300.0, 220.0 + REBALANCE_S, 220.0 + 3 * REBALANCE_S):
        assert registry.rebalance(t) == 0  # the same figures: it stays
    assert stages(registry) == after


def test_the_first_node_to_report_is_not_judged_against_nothing() -> None:
    """A swarm's first steps: one node's report comes in before the others' (a tiny model's
    steps read 5 x at rest, its fixed cost). Against nobody it is not judged; the others'
    reports at rest then show it shares their ratio, and nothing moves."""
    registry = three_stages()
    before = stages(registry)
    first, *others = before
    report(registry, first, 2.0, ratio=5.0)
    assert registry.rebalance(2.0 + MIN_REBALANCE_S) == 0
    assert {r.slowdown for r in registry.nodes.values()} == {1.0}
    for name in others:
        report(registry, name, 3.0, ratio=4.5)
    report(registry, first, 4.0, ratio=5.0)
    assert registry.rebalance(4.0 + REBALANCE_S) == 0
    assert {r.slowdown for r in registry.nodes.values()} == {1.0}
    assert stages(registry) == before


def test_a_swarm_that_is_busy_all_over_moves_nothing() -> None:
    registry = three_stages()
    before = stages(registry)
    for name in before:
        report(registry, name, 2.0, ratio=4.0 if name != "n3" else 6.0)
    assert registry.rebalance(2.0) == 0
    assert all(r.slowdown == 1.0 for r in registry.nodes.values())
    assert stages(registry) == before


def test_a_rebalance_over_its_budget_waits() -> None:
    registry = three_stages()
    before, version = stages(registry), registry.version
    slowed = next(r for r in registry.nodes.values() if r.assigned == (0, 7))
    slowed.slowdown = 5.0  # what rebalance takes from its report (above)
    assert registry.replan(budget=6) == 0  # placing it would have a node load 7 units
    assert stages(registry) == before and registry.version == version
    assert registry.replan(budget=7) == 7
    assert registry.version == version + 1
    assert registry.move_budget() == GPT2.n_units  # 42 units held: a model's worth


class SlowPlan:
    """``groups.plan`` that takes ``seconds`` on its thread first, and says when it runs."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.real = seconds, groups.plan
        self.running = threading.Event()
        self.threads: set[str] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> groups.Plan:
        self.threads.add(threading.current_thread().name)
        self.running.set()
        time.sleep(self.seconds)
        return self.real(*args, **kwargs)


def test_placement_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = SlowPlan(0.5)
    monkeypatch.setattr(groups, "plan", slow)

    async def main() -> tuple[int, Registry]:
        registry = Registry(GPT2, replicas=2, tp="off")
        replanner = Replanner(registry)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        for i in range(4):
            registry.join(record(i))  # four requests, one after the other ...
        await replanner.placed()
        ticker.cancel()
        assert replanner.runs <= 2  # ... merged: the first run, and one for the rest
        return ticks, registry

    ticks, registry = asyncio.run(main())
    assert threading.main_thread().name not in slow.threads
    assert ticks >= 10  # the loop went on while placement ran (~50 ticks in 0.5 s or more)
    assert all(r.assigned == (0, 14) for r in registry.nodes.values())


def test_nodes_that_leave_while_placement_runs_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = SlowPlan(0.3)
    monkeypatch.setattr(groups, "plan", slow)

    async def main() -> Registry:
        registry = Registry(GPT2, replicas=2, tp="off")
        replanner = Replanner(registry)
        for i in range(6):
            registry.join(record(i, memory_mb=330))
        await replanner.placed()
        slow.running.clear()
        gone = next(iter(registry.nodes))
        registry.nodes[gone].capacity.block_ms = 9.0  # (so that placement changes)
        registry.replan()
        while not slow.running.is_set():  # placement runs on its thread ...
            await asyncio.sleep(0.01)
        registry.leave(gone)  # ... when a node leaves: its stage is not applied
        registry.join(record(9, memory_mb=330))  # and a newcomer waits for the next run
        assert registry.nodes[f"{9:016x}"].assigned is None
        await replanner.placed()
        assert gone not in registry.nodes
        return registry

    registry = asyncio.run(main())
    placement = {nid: r.assigned for nid, r in registry.nodes.items() if r.assigned}
    assert len(placement) == 6  # the newcomer too
    assert min(coverage(placement, GPT2.n_units)) >= 2


def test_a_node_given_a_new_stage_finishes_open_sessions_on_the_old_one() -> None:
    """Re-placement hands a node a new stage while sessions run through it: the new stage
    is loaded beside the old one, new sessions open on it, and open ones go on on the old
    one with their tokens unchanged (the old stage is freed when the last of them ends)."""
    ckpt = open_checkpoint("demo")
    n = ckpt.config.n_units
    prompt = [464, 3290, 373, 257, 1332]
    local = LocalSession(ckpt.load_stage(0, n), SamplingParams(0.0), 64)
    expected = generate(local, prompt, 30, block_size=ckpt.config.block_size).token_ids
    loop = LoopThread("node")

    async def new_plane() -> DataPlane:  # (its gRPC server belongs to the node's loop)
        return DataPlane(host="127.0.0.1", port=0, name="n", model_id=quick_model_id(ckpt),
                         kv_memory=64 * 2**20, session_ttl=60)  # fmt: skip

    plane = loop.run(new_plane())

    async def give(start: int, end: int) -> None:
        stage = await plane.load(lambda: ckpt.load_stage(start, end))
        plane.service.set_stage(stage)

    try:
        loop.run(give(0, n))
        loop.run(plane.start())
        route = route_from_addresses([plane.address])
        session = fixed_session(route, max_length=64)
        tokens = [session.step(prompt, 0).token]
        while len(tokens) < 10:
            tokens.append(session.step([tokens[-1]], len(prompt) + len(tokens) - 1).token)
        loop.run(give(0, n // 2))  # placement moved it: it now serves the first half
        while len(tokens) < 30:
            tokens.append(session.step([tokens[-1]], len(prompt) + len(tokens) - 1).token)
        assert tokens == expected
        with pytest.raises(NanoshardError, match="serves units"):
            fixed_session(route, max_length=64).step(prompt, 0)  # new sessions: the new stage
        session.close()
    finally:
        loop.run(plane.stop())
        loop.close()


def test_a_status_is_built_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """``GetStatus`` reads a copy of the registry on a thread: heartbeats that change the
    registry meanwhile neither wait nor break it."""
    from nanoshard.coordinator.service import CoordinatorService
    from nanoshard.v1 import coordinator_pb2 as cpb

    registry = three_stages()
    svc = CoordinatorService(SimpleNamespace(model_id="ab" * 32, name="gpt2"),  # type: ignore[arg-type]
                             registry, swarm="default", heartbeat_interval_s=2.0,
                             epoch=b"\0" * 8, clock=lambda: 1.0)  # fmt: skip
    built_on: list[str] = []
    real = svc._status

    def status(view: Registry, *args: Any) -> Any:
        built_on.append(threading.current_thread().name)
        assert view is not registry and view.nodes == registry.nodes
        registry.nodes.pop(next(iter(registry.nodes)))  # the loop changes the registry ...
        return real(view, *args)  # ... and the copy is read as it was

    monkeypatch.setattr(svc, "_status", status)
    reply = asyncio.run(svc.GetStatus(cpb.StatusRequest(), None))
    assert built_on and built_on[0] != threading.main_thread().name
    assert len(reply.nodes) == 6 and len(registry.nodes) == 5
