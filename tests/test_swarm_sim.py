"""benchmarks/swarm_sim.py's core on a small swarm: a simulated hour of churn, owner load
and sessions against the real registry, in a few seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import swarm_sim

SMALL = swarm_sim.Settings(
    nodes=50,
    hours=1.0,
    seed=3,
    lifetime_h=1.0,  # churn: about 50 joins and 50 departures in the hour
    bursts_per_h=2.0,
    sessions_per_s=0.5,
    status_every_s=600.0,
)


@pytest.fixture(scope="module")
def ours() -> swarm_sim.Sim:
    sim = swarm_sim.Sim(swarm_sim.make_trace(SMALL), "ours")
    sim.run()
    return sim


def test_churn_happened(ours: swarm_sim.Sim) -> None:
    trace = ours.trace
    joined_late = [n for n in trace.nodes if n.joins_at > 0]
    crashed = [n for n in trace.nodes if n.crashes and n.leaves_at < SMALL.horizon_s]
    left = [n for n in trace.nodes if not n.crashes and n.leaves_at < SMALL.horizon_s]
    assert len(joined_late) >= 20 and len(crashed) >= 5 and len(left) >= 10
    assert any(n.bursts for n in trace.nodes)
    assert ours.tally.placements >= 10


def test_every_unit_covered_once_churn_settles(ours: swarm_sim.Sim) -> None:
    # After the warm-up every sample has every unit served by a live node's ready stage.
    warm = [x for x in ours.tally.series if x["t_s"] >= SMALL.warmup_s]
    assert warm and all(x["weakest"] > 0 for x in warm)
    assert all(0 < x["share"] <= 1.0 + 1e-9 for x in warm)
    # And the registry agrees at the end: nodes it knows are the live ones, and its
    # servers cover every unit.
    live = {nid for nid, n in ours.nodes.items() if n.alive}
    assert set(ours.registry.nodes) <= live
    assert min(ours.registry.coverage()) >= 1


def test_routes_go_only_through_ready_nodes(ours: swarm_sim.Sim) -> None:
    tally = ours.tally
    assert len(tally.route_ms) > 1000
    assert tally.through_unready == 0  # every hop's node serves that hop's units
    # (a crashed node stays in routes until expire drops it: counted, not a bug)


def test_units_moved_are_counted_as_apply_reports(ours: swarm_sim.Sim) -> None:
    tally = ours.tally
    assert tally.moved + tally.first_loads == tally.applied
    assert tally.first_loads > 0


def test_petals_runs_on_the_same_trace() -> None:
    trace = swarm_sim.make_trace(SMALL)
    petals = swarm_sim.Sim(trace, "petals")
    petals.run()
    assert petals.tally.moved + petals.tally.first_loads == petals.tally.applied
    assert petals.tally.through_unready == 0
    warm = [x for x in petals.tally.series if x["t_s"] >= SMALL.warmup_s]
    assert all(x["weakest"] > 0 for x in warm)


def test_deterministic_with_a_seed(ours: swarm_sim.Sim) -> None:
    assert swarm_sim.make_trace(SMALL) == ours.trace
    again = swarm_sim.Sim(swarm_sim.make_trace(SMALL), "ours")
    again.run()
    assert again.tally.series == ours.tally.series
    assert again.tally.route_ms == ours.tally.route_ms
    assert (again.tally.moved, again.tally.first_loads) == (
        ours.tally.moved,
        ours.tally.first_loads,
    )
    other = swarm_sim.make_trace(swarm_sim.Settings(**{**SMALL.__dict__, "seed": 4}))
    assert other != ours.trace
