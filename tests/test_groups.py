"""Tensor-parallel groups on the coordinator: which nodes placement groups and why (the cost
model), group ids, routes through groups, a group breaking, and what status shows."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nanoshard.config import GPTConfig
from nanoshard.coordinator import groups
from nanoshard.coordinator.groups import LINK, SPARE, allreduce_ms, broadcast_ms, plan, predict
from nanoshard.coordinator.load import LiveReport
from nanoshard.coordinator.placement import (
    NodeCapacity,
    coverage,
    stage_bytes,
    stage_ms,
    unit_costs,
)
from nanoshard.coordinator.registry import (
    MIN_REBALANCE_S,
    WEIGHT_SHARE,
    Capacity,
    Load,
    NodeRecord,
    Registry,
)
from nanoshard.coordinator.routing import HOP_OVERHEAD_MS, plan_route
from nanoshard.coordinator.service import CoordinatorService, assignment
from nanoshard.errors import InvalidArgument
from nanoshard.identity import NodeKey, join_proof_message
from nanoshard.node.join import Events, JoinConfig, Volunteer
from nanoshard.statusview import status_json
from nanoshard.v1 import coordinator_pb2 as cpb

GPT2 = GPTConfig()  # 124M: 14 units; a block 28 MB, embed 154 MB + wpe, head 154 MB (tied)
UNITS = unit_costs(GPT2)
HIDDEN = GPT2.n_embd * 4
MB = 1_000_000


def nodes(count: int, memory_mb: float, block_ms: float, head_ms: float | None = None) -> list:
    return [NodeCapacity(f"n{i}", int(memory_mb * MB), block_ms, head_ms) for i in range(count)]


def grouped(p: groups.Plan) -> set[str]:
    return {m for g in p.groups for m in g}


# ---- memory and the cost model ------------------------------------------------------


def test_a_member_holds_its_share_and_the_replicated_weights_whole() -> None:
    block, head = UNITS[1], UNITS[-1]
    d = GPT2.n_embd
    replicated = (2 * 2 * d + 2 * d) * 4  # two LayerNorms (weight, bias), two c_proj biases
    assert block.member_bytes(2) == replicated + (block.weight_bytes - replicated) // 2
    assert block.member_bytes(4) == replicated + (block.weight_bytes - replicated) // 4
    # wte's 50257 rows split 25129 + 25128: a member is sized by the larger share.
    assert head.member_bytes(2) == 2 * d * 4 + 25129 * d * 4
    whole = stage_bytes(UNITS, 0, 14)
    # The whole model in a group of 2: the embed and head share their wte rows, as alone.
    assert stage_bytes(UNITS, 0, 14, 2) == (
        UNITS[0].member_bytes(2) + 12 * block.member_bytes(2) + 2 * d * 4
    )
    assert whole / 2 < stage_bytes(UNITS, 0, 14, 2) < whole / 2 + 5 * MB
    assert stage_bytes(UNITS, 0, 14, 1) == whole


def test_the_cost_model_adds_collectives_to_the_share_of_compute() -> None:
    # One all-reduce of 768 fp32 values between 2 members: a link latency + bytes/bandwidth.
    assert allreduce_ms(HIDDEN, 2) == pytest.approx(
        LINK.latency_ms + HIDDEN / LINK.bytes_per_s * 1e3
    )
    assert allreduce_ms(HIDDEN, 4) > allreduce_ms(HIDDEN, 2) > allreduce_ms(HIDDEN, 1) == 0
    members = [NodeCapacity("a", 10**10, 20.0, 110.0), NodeCapacity("b", 10**10, 25.0, 120.0)]
    p = predict(UNITS, members, 1, 13, HIDDEN)  # the 12 blocks
    # The slowest member's time over 2, two all-reduces per block, rank 0 sending the input
    # on once, one hop; apart: the fastest member alone holds them all.
    expected = 12 * (25.0 / 2 + 2 * allreduce_ms(HIDDEN, 2)) + broadcast_ms(HIDDEN, 2)
    assert p.group_ms == pytest.approx(expected + HOP_OVERHEAD_MS)
    assert p.pipeline_ms == pytest.approx(12 * 20.0 + HOP_OVERHEAD_MS)
    assert p.faster and p.size == 2
    # A slower partner: the group waits for it at every all-reduce, and loses.
    members[1] = NodeCapacity("b", 10**10, 40.0, 120.0)
    assert not predict(UNITS, members, 1, 13, HIDDEN).faster
    # Members on one host share its cores: the group divides the work, not the time.
    shared = [
        NodeCapacity("a", 10**10, 20.0, 110.0, host="h"),
        NodeCapacity("b", 10**10, 20.0, 110.0, host="h"),
    ]
    assert not predict(UNITS, shared, 1, 13, HIDDEN).faster
    assert "predicted" in str(p) and f"{p.group_ms:.2f}" in str(p)
    # Members that cannot hold the stage apart: only the group can.
    small = [NodeCapacity("a", 100 * MB, 2.0, 11.0), NodeCapacity("b", 100 * MB, 2.0, 11.0)]
    p = predict(UNITS, small, 0, 1, HIDDEN)
    assert math.isinf(p.pipeline_ms) and p.faster
    # Apart, they chain: each takes what fits it.
    p = predict(UNITS, small, 1, 7, HIDDEN)
    assert p.pipeline_ms == pytest.approx(6 * 2.0 + 2 * HOP_OVERHEAD_MS)


# ---- the policy ----------------------------------------------------------------------


def test_forced_2_puts_every_stage_in_a_group() -> None:
    # Four nodes that each hold the model: two groups of two, each serving it whole (each
    # other's replica); none serves alone.
    p = plan(UNITS, nodes(4, 2000, 2.0, 11.0), mode=2, n_head=12, hidden_bytes=HIDDEN)
    assert p.groups == {("n0", "n1"): (0, 14), ("n2", "n3"): (0, 14)} and p.placement == {}
    # Two nodes: one group serving the whole model.
    p = plan(UNITS, nodes(2, 2000, 2.0, 11.0), mode=2, n_head=12, hidden_bytes=HIDDEN)
    assert p.groups == {("n0", "n1"): (0, 14)} and p.placement == {}
    # Where a member holds about half the model, the groups form a 2-stage pipeline.
    p = plan(UNITS, nodes(4, 200, 2.0, 11.0), mode=2, n_head=12, hidden_bytes=HIDDEN)
    assert len(p.groups) == 2 and p.placement == {} and p.gaps == 0
    assert sorted(p.groups.values())[0][0] == 0 and sorted(p.groups.values())[1][1] == 14
    assert sorted(p.groups.values())[0][1] == sorted(p.groups.values())[1][0]
    # Forced even where predicted slower: fast nodes, whose blocks cost less than a collective.
    p = plan(UNITS, nodes(2, 2000, 0.2, 1.1), mode=2, n_head=12, hidden_bytes=HIDDEN)
    assert p.groups == {("n0", "n1"): (0, 14)} and p.token_ms > p.baseline_ms


def test_forced_4_and_the_nodes_left_over() -> None:
    # Six nodes, --tp 4: one group of four; the two left over stay idle while it serves
    # every unit.
    p = plan(UNITS, nodes(6, 2000, 2.0, 11.0), mode=4, n_head=12, hidden_bytes=HIDDEN)
    assert list(p.groups.values()) == [(0, 14)] and p.size == 4 and p.placement == {}
    # Three nodes: too few for a group of four; they serve alone.
    p = plan(UNITS, nodes(3, 2000, 2.0, 11.0), mode=4, n_head=12, hidden_bytes=HIDDEN)
    assert p.groups == {} and set(p.placement) == {"n0", "n1", "n2"}


def test_a_group_size_must_divide_the_heads() -> None:
    with pytest.raises(InvalidArgument, match="cannot split this model's 6 attention heads"):
        groups.check_mode(4, 6)
    with pytest.raises(InvalidArgument):
        Registry(GPTConfig(n_head=6, n_embd=384), tp=4)
    with pytest.raises(InvalidArgument):
        plan(UNITS, nodes(4, 2000, 2.0), mode=4, n_head=6, hidden_bytes=HIDDEN)
    assert groups.sizes("auto", 12) == [2, 4] and groups.sizes("auto", 6) == [2]
    assert groups.sizes("auto", 25) == [] and groups.sizes("off", 12) == []
    # GPT-2 XL's 25 heads split no way: auto forms no group even for slow nodes.
    xl = GPTConfig(n_layer=48, n_head=25, n_embd=1600)
    p = plan(unit_costs(xl), nodes(4, 10_000, 20.0), n_head=25, hidden_bytes=1600 * 4)
    assert p.groups == {}


@pytest.mark.parametrize("text", ["8", "tp2", "", "1", "on"])
def test_a_bad_mode_is_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="--tp must be one of auto, off, 2, 4"):
        groups.parse_mode(text)
    assert groups.parse_mode("AUTO") == "auto" and groups.parse_mode("4") == 4


def test_nodes_without_a_store_never_join_a_group() -> None:
    swarm = nodes(4, 2000, 20.0, 110.0)
    for mode in (2, "auto"):
        p = plan(UNITS, swarm, mode=mode, n_head=12, hidden_bytes=HIDDEN, eligible={"n1", "n3"})
        assert p.groups == {("n1", "n3"): (0, 14)}
        assert not grouped(p) & {"n0", "n2"}
    p = plan(UNITS, swarm, mode=2, n_head=12, hidden_bytes=HIDDEN, eligible={"n1"})
    assert p.groups == {}  # one eligible node: no group


def test_auto_groups_nodes_that_cannot_hold_a_unit_alone() -> None:
    # 100 MB each: more than a block (28 MB), less than the embed or the head (154 MB). Alone
    # they leave the embed and head uncovered; in groups they serve the whole model.
    swarm = nodes(8, 100, 2.0, 11.0)
    off = plan(UNITS, swarm, mode="off", n_head=12, hidden_bytes=HIDDEN)
    assert off.gaps == 2 and math.isinf(off.token_ms)
    p = plan(UNITS, swarm, n_head=12, hidden_bytes=HIDDEN)
    assert p.gaps == 0 and math.isfinite(p.token_ms) and math.isinf(p.baseline_ms)
    served = coverage({**p.placement, **{groups.group_key(g): s for g, s in p.groups.items()}}, 14)
    assert min(served) >= 1
    for members, (start, end) in p.groups.items():  # every member holds its share
        assert stage_bytes(UNITS, start, end, len(members)) <= 100 * MB


def test_auto_covers_a_model_whose_every_block_is_bigger_than_any_node() -> None:
    # A model whose blocks are its largest units, and nodes smaller than one block: alone,
    # no node serves a block; in groups they serve the whole model.
    config = GPTConfig(vocab_size=1024, block_size=64, n_embd=256, n_head=4, n_layer=4)
    units = unit_costs(config)
    block = units[1].weight_bytes
    assert block == max(u.weight_bytes for u in units)
    swarm = [NodeCapacity(f"n{i}", int(block * 0.7), 1.0) for i in range(8)]
    assert plan(units, swarm, mode="off", n_head=4, hidden_bytes=256 * 4).gaps == 4
    p = plan(units, swarm, n_head=4, hidden_bytes=256 * 4)
    assert p.gaps == 0 and math.isfinite(p.token_ms) and p.groups
    assert all(e - s == 1 and s in (0, 5) for s, e in p.placement.values())  # embed, head alone
    assert all(stage_bytes(units, *s, len(g)) <= block * 0.7 for g, s in p.groups.items())


def test_auto_forms_a_group_predicted_faster() -> None:
    # Slow nodes (20 ms a block: a big model on a small machine) that each hold the model,
    # on two hosts: a group of two halves each block for two all-reduces of ~1.7 ms.
    p = plan(UNITS, nodes(2, 2000, 20.0, 110.0), n_head=12, hidden_bytes=HIDDEN)
    assert p.groups == {("n0", "n1"): (0, 14)}
    assert p.token_ms < p.baseline_ms
    assert p.predictions[("n0", "n1")].faster


def test_auto_refuses_a_group_predicted_slower() -> None:
    # Fast nodes (0.2 ms a block): two all-reduces cost more than half a block saves.
    swarm = nodes(4, 2000, 0.2, 1.1)
    p = plan(UNITS, swarm, n_head=12, hidden_bytes=HIDDEN)
    assert p.groups == {} and p.token_ms == p.baseline_ms
    assert not predict(UNITS, swarm[:2], 0, 14, HIDDEN).faster
    # A slower link refuses what a fast one forms.
    slow_link = groups.Link(latency_ms=5.0, bytes_per_s=1e7, message_ms=5.0)
    slow = nodes(2, 2000, 2.0, 11.0)
    assert plan(UNITS, slow, n_head=12, hidden_bytes=HIDDEN, link=slow_link).groups == {}


def test_auto_keeps_fast_nodes_alone_and_groups_only_where_it_pays() -> None:
    # One fast node holding the model beats any group of the slow ones: no group.
    swarm = [NodeCapacity("fast", 2000 * MB, 0.5, 3.0), *nodes(2, 2000, 4.0, 20.0)]
    p = plan(UNITS, swarm, n_head=12, hidden_bytes=HIDDEN)
    assert p.groups == {}


def test_a_groups_measured_link_is_its_slowest_members_figure() -> None:
    report = groups.LinkReport
    assert groups.measured_link([]) == LINK  # nobody measured: the default
    # at formation: the probe, never under the default latency (a back-to-back loop is
    # faster than collectives between computing members); the slowest bandwidth
    probed = groups.measured_link([report(0.8, 5e8), report(3.0, 2e8)])
    assert probed == groups.Link(3.0, 2e8, LINK.message_ms)
    assert groups.measured_link([report(0.8, 5e8)]).latency_ms == LINK.latency_ms
    # serving: the live figure, waits included, whatever the probe said
    live = groups.measured_link([report(0.8, 5e8, 4.5), report(0.9, 5e8, 2.0)])
    assert live.latency_ms == 4.5


def test_a_group_whose_measured_link_is_slow_is_dissolved_under_auto() -> None:
    swarm = nodes(2, 2000, 20.0, 110.0)
    first = plan(UNITS, swarm, n_head=12, hidden_bytes=HIDDEN)
    assert first.groups == {("n0", "n1"): (0, 14)}  # priced with LINK: it pays
    previous = {groups.group_key(g): s for g, s in first.groups.items()}
    slow = {("n0", "n1"): groups.Link(40.0, 1e9, 1.1)}  # what its members then measured
    again = plan(
        UNITS, swarm, previous, first.groups, n_head=12, hidden_bytes=HIDDEN, measured=slow
    )
    assert again.groups == {} and again.token_ms == again.baseline_ms


def test_a_group_not_formed_yet_is_priced_from_its_members_pings() -> None:
    ping = groups.PeerReport
    # At no distance (a round trip no longer than to itself) a group costs the constants.
    assert groups.peer_link([ping(0.4, 0.5, 9e8)]) == groups.Link(
        LINK.latency_ms, 9e8, LINK.message_ms
    )
    # Each millisecond of network round trip is a millisecond more per collective and message.
    far = groups.peer_link([ping(0.4, 0.4, 9e8), ping(10.4, 0.4, 1e7)])
    assert far == groups.Link(LINK.latency_ms + 10, 1e7, LINK.message_ms + 10)
    # The group `auto` forms between slow nodes at no distance (see above) ...
    swarm = nodes(2, 2000, 20.0, 110.0)
    near = {groups.pair("n1", "n0"): [ping(0.5, 0.5, 1e9)]}
    assert plan(UNITS, swarm, n_head=12, hidden_bytes=HIDDEN, peers=near).groups
    # ... it refuses between the same nodes 20 ms apart, measured either way round,
    apart = {("n0", "n1"): [ping(0.5, 0.5, 1e9), ping(20.5, 0.5, 1e7)]}
    p = plan(UNITS, swarm, n_head=12, hidden_bytes=HIDDEN, peers=apart)
    assert p.groups == {} and p.token_ms == p.baseline_ms
    # and prices a group with the constants while one of its pairs is unmeasured.
    four = nodes(4, 2000, 20.0, 110.0)
    some = {("n0", "n1"): [ping(20.5, 0.5, 1e7)]}
    partly = plan(UNITS, four, mode=4, n_head=12, hidden_bytes=HIDDEN, peers=some)
    unmeasured = plan(UNITS, four, mode=4, n_head=12, hidden_bytes=HIDDEN)
    assert partly.predictions and partly.predictions == unmeasured.predictions


def test_a_group_whose_every_member_runs_on_cuda_sums_on_nccl() -> None:
    registry = Registry(GPT2, tp=2)
    for i in range(4):
        r = record(i)
        if i < 2 or i == 3:
            r.capacity = dataclasses.replace(r.capacity, device=f"cuda:{i % 2}")
        registry.join(r)
    backends = {}
    for r in registry.nodes.values():
        seat = registry.seat(r)
        assert seat is not None
        backends.setdefault(seat.id, set()).add(seat.backend)
    assert sorted(b for (b,) in map(tuple, backends.values())) == ["gloo", "nccl"]


def test_a_member_is_counted_slowed_against_its_partners_and_a_spare_takes_its_place() -> None:
    """A small model's member reads 9 x at rest (fixed cost over its share): beside a
    partner at 9 x it is not slowed, at 90 x it is, and not before a partner has a figure.
    The next placement puts the spare in its place (the other group serves meanwhile)."""
    registry = Registry(GPT2, tp=2)
    for i in range(4):
        registry.join(record(i))
    serve_all(registry)
    registry.join(record(4))  # later: a spare (the groups in force stay)
    group = registry.groups[registry.nodes[nid(0)].group]
    slow, partner = group.members

    def report(node_id: str, ratio: float) -> None:
        r = registry.nodes[node_id]
        registry.heartbeat(
            node_id, 2.0, r.assigned, Load(live=LiveReport(speed_ratio=ratio)), r.group
        )

    report(slow, 90.0)
    registry.rebalance(3.0)  # (the partner has no figure yet: nobody is judged)
    assert registry.nodes[slow].slowdown == 1.0
    report(partner, 9.0)
    registry.rebalance(3.0)
    assert (registry.nodes[slow].slowdown, registry.nodes[partner].slowdown) == (10.0, 1.0)
    registry.rebalance(3.0 + MIN_REBALANCE_S)
    nodes = registry.nodes
    assert nodes[partner].group == nodes[nid(4)].group not in ("", group.id)
    assert nodes[slow].group == ""


def test_members_computing_alike_are_not_slowed_by_their_start_up_figures() -> None:
    """Tour D: processes on one host measured a block at 0.14 to 0.93 ms at start-up, so
    partners computing alike report ratios 4.7 x apart (each over its own figure). A member
    is judged against its partners' compute, scaled by their measurements: neither counts
    slowed, nor is the group broken; one computing 10 x slower than its partner still is."""
    registry = Registry(GPT2, tp=2)
    for i, block_ms in enumerate((0.14, 0.66)):
        registry.join(record(i, block_ms=block_ms))
    serve_all(registry)
    a, b = nid(0), nid(1)
    group = registry.nodes[a].group
    assert group and registry.nodes[b].group == group

    def expected(node_id: str) -> float:  # a decode step as its measurement prices it
        r = registry.nodes[node_id]
        return sum(registry.unit_ms(r, u) for u in range(*r.assigned))

    def report(node_id: str, own_ms: float, now: float) -> None:
        r = registry.nodes[node_id]
        ratio = own_ms / expected(node_id)  # as the node computes it
        live = LiveReport(speed_ratio=ratio)
        registry.heartbeat(node_id, now, r.assigned, Load(live=live), group)

    alike = 2.0 * expected(b)
    report(a, alike, 2.0)
    report(b, alike, 2.0)
    assert registry.nodes[a].load.live.speed_ratio == pytest.approx(2 * 0.66 / 0.14)
    registry.rebalance(3.0)
    registry.rebalance(3.0 + MIN_REBALANCE_S)
    assert (registry.nodes[a].slowdown, registry.nodes[b].slowdown) == (1.0, 1.0)
    assert registry.nodes[a].own_ratio == pytest.approx(1.0)  # what status shows
    assert registry.nodes[a].group == registry.nodes[b].group == group
    report(a, 10 * alike, 4.0)
    registry.rebalance(4.0)
    assert registry.nodes[a].slowdown == pytest.approx(10.0)
    assert registry.nodes[a].own_ratio == pytest.approx(10.0)
    assert registry.nodes[b].slowdown == 1.0


def test_nodes_are_asked_to_ping_the_peers_they_may_group_with() -> None:
    registry = Registry(GPT2, tp="auto")
    for i in range(11):
        registry.join(record(i, store_port=0 if i == 10 else 29500))
    asked = registry.peers_of(registry.nodes[nid(0)])
    assert len(asked) == 8  # at most 8, never itself, never a node that joins no group
    assert registry.nodes[nid(0)].address not in asked
    assert registry.nodes[nid(10)].address not in asked
    assert registry.peers_of(registry.nodes[nid(10)]) == []
    assert Registry(GPT2, tp="off").peers_of(registry.nodes[nid(0)]) == []
    # What they report reaches placement under the pair of node ids, whoever measured it.
    r0, r1 = registry.nodes[nid(0)], registry.nodes[nid(1)]
    report = groups.PeerReport(3.0, 0.5, 2e8)
    load = Load(peer_links={r1.address: report, "10.9.9.9:1": report})  # unknown: dropped
    registry.heartbeat(r0.node_id, 1.0, None, load)
    assert registry.peer_reports() == {groups.pair(nid(0), nid(1)): [report]}


def test_heartbeats_carry_a_groups_link_to_routing_and_status() -> None:
    registry = Registry(GPT2, tp=2)
    registry.join(record(0))
    registry.join(record(1))
    serve_all(registry)
    (before,) = registry.servers()
    members = (nid(0), nid(1))
    assert registry.link_of(members) == LINK
    for i, live in ((0, 6.0), (1, 3.0)):
        r = registry.nodes[nid(i)]
        load = Load(tp_link=groups.LinkReport(0.9, 4e8, live))
        registry.heartbeat(r.node_id, 2.0, r.assigned, load, r.group)
    assert registry.link_of(members) == groups.Link(6.0, 4e8, LINK.message_ms)
    (after,) = registry.servers()
    assert sum(after.unit_ms) > sum(before.unit_ms)  # routing prices the group as measured


def test_groups_in_force_stay_together_when_others_join() -> None:
    swarm = nodes(4, 2000, 2.0, 11.0)
    first = plan(UNITS, swarm, mode=2, n_head=12, hidden_bytes=HIDDEN)
    previous = {groups.group_key(g): s for g, s in first.groups.items()}
    # A newcomer faster than all: without the groups in force, it would pair with n0.
    newcomer = NodeCapacity("a-new", 2000 * MB, 1.0, 5.0)
    again = plan(
        UNITS, [*swarm, newcomer], previous, first.groups, mode=2, n_head=12, hidden_bytes=HIDDEN
    )
    assert set(first.groups) <= set(again.groups)


def test_a_spare_takes_the_place_of_a_member_counted_slowed() -> None:
    """Groups in force keep their members, but for one counted slowed: the fastest spare
    (serving nothing) takes its place where it is faster (its slowdown counted) and has the
    memory for its share of the group's stage, and another server holds that stage
    meanwhile; the slowed one is left out of the group."""
    swarm = nodes(5, 2000, 2.0, 11.0)
    ids = [n.node_id for n in swarm]
    in_force = [(ids[0], ids[1]), (ids[3], ids[4])]  # replicas of each other
    whole = (0, GPT2.n_units)
    previous = {groups.group_key(g): whole for g in in_force}
    slowed = NodeCapacity(ids[1], 2000 * MB, 2.0 * 50, 11.0 * 50)  # its owner's game
    now = [swarm[0], slowed, *swarm[2:]]
    kw: dict[str, Any] = dict(mode=2, n_head=12, hidden_bytes=HIDDEN, slowed={ids[1]})

    def formed(nodes: list, previous: dict, in_force: list = in_force, **over: Any) -> set:
        return set(plan(UNITS, nodes, previous, in_force, **{**kw, **over}).groups)

    assert formed(now, previous, slowed=()) == set(in_force)  # not counted slowed: kept
    spared = plan(UNITS, now, previous, in_force, **kw)
    assert set(spared.groups) == {(ids[0], ids[2]), in_force[1]}
    assert ids[1] not in spared.placement
    # the only server of its stage keeps its member: re-formed, it would serve nothing a while
    alone = {groups.group_key(in_force[0]): whole}
    assert formed(now[:3], alone, in_force[:1]) == set(in_force[:1])
    # and of two replicas each with a slowed member, one is re-formed, not both at once
    slowed4 = NodeCapacity(ids[4], 2000 * MB, 2.0 * 50, 11.0 * 50)
    spare2 = NodeCapacity("n9", 2000 * MB, 2.0, 11.0)
    both = formed([*now[:4], slowed4, spare2], previous, slowed={ids[1], ids[4]})
    assert len(both & set(in_force)) == 1
    # a spare needs the memory for its share of the group's stage, no more
    share = stage_bytes(UNITS, *whole, 2)
    for spare_bytes, swapped in ((share, True), (share - 1, False)):
        spare = NodeCapacity(ids[2], spare_bytes, 2.0, 11.0)
        assert (formed([*now[:2], spare, *now[3:]], previous) != set(in_force)) == swapped
    # a node serving a stage of its own is no spare, nor is a slowed one, nor one that
    # does not run SPARE times faster than the member as slowed
    assert formed(now, {**previous, ids[2]: (0, 4)}) == set(in_force)
    assert formed(now, previous, slowed={ids[1], ids[2]}) == set(in_force)
    near = NodeCapacity(ids[2], 2000 * MB, 2.0 * 50 / SPARE * 1.01, 11.0)
    assert formed([*now[:2], near, *now[3:]], previous) == set(in_force)
    # of two spares, one on the slowed member's host (busy as a whole, maybe) and a slower
    # one elsewhere, the one elsewhere
    on = [dataclasses.replace(n, host=h) for n, h in zip(now, "aaacd", strict=True)]
    there = NodeCapacity("n9", 2000 * MB, 2.5, 11.0, host="e")
    assert (ids[0], "n9") in formed([*on, there], previous)
    assert (ids[0], ids[2]) in formed([*on[:2], dataclasses.replace(on[2], host="c"), *on[3:],
                                       there], previous)  # fmt: skip


def test_a_group_of_4_is_given_spares_for_all_its_slowed_members_or_none() -> None:
    """It waits for its slowest member: one spare for two slowed members gains nothing, and
    re-forming it would cost a load and a rendezvous. With two, both are replaced, and the
    group keeps its stage."""
    swarm = nodes(10, 2000, 2.0, 11.0)
    ids = [n.node_id for n in swarm]
    first, second = tuple(ids[:4]), tuple(ids[4:8])
    whole = (0, GPT2.n_units)
    previous = {groups.group_key(first): whole, groups.group_key(second): whole}
    slow = [NodeCapacity(i, 2000 * MB, 100.0, 550.0) for i in ids[:2]]
    kw: dict[str, Any] = dict(mode=4, n_head=12, hidden_bytes=HIDDEN, slowed=set(ids[:2]))
    one = plan(UNITS, [*slow, *swarm[2:9]], previous, [first, second], **kw)
    assert set(one.groups) == {first, second}
    two = plan(UNITS, [*slow, *swarm[2:]], previous, [first, second], **kw)
    spared = {g: s for g, s in two.groups.items() if g != second}
    ((members, placed),) = spared.items()
    assert set(members) == {*ids[2:4], *ids[8:]} and placed == whole


def test_plan_is_deterministic_and_order_independent() -> None:
    swarm = [NodeCapacity(f"n{i}", (100 + 37 * i) * MB, 1.5 + i % 3, 11.0) for i in range(10)]
    first = plan(UNITS, swarm, n_head=12, hidden_bytes=HIDDEN)
    assert plan(UNITS, swarm[::-1], n_head=12, hidden_bytes=HIDDEN) == first


# ---- the registry: ids, routes, breaking ----------------------------------------------


def record(
    i: int,
    memory_mb: float = 4000,
    block_ms: float = 20.0,
    *,
    store_port: int = 29500,
    address: str | None = None,
) -> NodeRecord:
    return NodeRecord(
        node_id=nid(i),
        name=f"n{i}",
        address=address or f"10.0.0.{i + 1}:7961",
        capacity=Capacity(
            "cpu", "fp32", int(memory_mb * MB / WEIGHT_SHARE), block_ms, 5.5 * block_ms
        ),
        last_heartbeat=0.0,
        store_port=store_port,
    )


def ordered_keys(n: int) -> list[NodeKey]:
    """Node keys whose ids sort in the order of their index (as the tests' nodes rank)."""
    keys = [
        NodeKey(Ed25519PrivateKey.from_private_bytes(seed.to_bytes(32, "little")))
        for seed in range(1, n + 1)
    ]
    return sorted(keys, key=lambda k: k.node_id)


KEYS = ordered_keys(16)


def nid(i: int) -> str:
    return KEYS[i].node_id


def serve_all(registry: Registry, now: float = 1.0) -> None:
    """Every node reports ready on what it was assigned, in its group."""
    for r in list(registry.nodes.values()):
        registry.heartbeat(r.node_id, now, r.assigned, Load(), r.group)


def seats(registry: Registry) -> dict[str, tuple[str, int, int]]:
    out = {}
    for r in registry.nodes.values():
        seat = registry.seat(r)
        if seat is not None:
            out[r.name] = (seat.id, seat.rank, seat.size)
    return out


def test_a_group_gets_an_id_per_formation_a_rank_per_member_and_a_rendezvous() -> None:
    registry = Registry(GPT2, tp=2, group_salt="c0ffee-")
    for i in range(4):
        registry.join(record(i, block_ms=2.0 + i / 10))
    found = seats(registry)
    assert {(rank, size) for _, rank, size in found.values()} == {(0, 2), (1, 2)}
    assert found["n0"][0] == found["n1"][0] != found["n2"][0] == found["n3"][0]
    assert all(re.fullmatch(r"c0ffee-v\d+-\d+", gid) for gid, _, _ in found.values())
    seat = registry.seat(registry.nodes[nid(1)])
    assert seat is not None
    assert seat.members == ("10.0.0.1:7961", "10.0.0.2:7961")  # rank order: fastest first
    assert seat.rendezvous == "10.0.0.1:29500"  # rank 0's host, its store's port
    assert registry.nodes[nid(0)].assigned == (0, 14)


def test_the_rendezvous_of_an_ipv6_rank_0() -> None:
    registry = Registry(GPT2, tp=2)
    registry.join(record(0, store_port=29511, address="[fd00::1a]:7961"))
    registry.join(record(1, address="[fd00::1b]:7961"))
    seat = registry.seat(registry.nodes[nid(1)])
    assert seat is not None and seat.rendezvous == "[fd00::1a]:29511"


def test_routes_name_rank_0_only_and_a_group_counts_once() -> None:
    registry = Registry(GPT2, tp=2)
    for i in range(4):
        registry.join(record(i))
    assert registry.servers() == [] and registry.coverage() == [0] * 14  # nobody ready yet
    serve_all(registry)
    servers = registry.servers()
    assert len(servers) == 2 and all(s.whole and s.size == 2 for s in servers)
    hops = plan_route(servers, 14)
    assert len(hops) == 1 and (hops[0].start, hops[0].end) == (0, 14)
    assert sorted(hops[0].addresses) == ["10.0.0.1:7961", "10.0.0.3:7961"]  # the rank 0s
    assert registry.coverage() == [2] * 14  # two groups of two: two replicas, not four


def test_a_group_serves_only_when_every_member_serves_it() -> None:
    registry = Registry(GPT2, tp=2)
    registry.join(record(0))
    registry.join(record(1))
    r0, r1 = registry.nodes[nid(0)], registry.nodes[nid(1)]
    registry.heartbeat(r0.node_id, 1.0, r0.assigned, Load(), r0.group)
    registry.heartbeat(r1.node_id, 1.0, None, Load(), "")  # still loading its share
    assert registry.servers() == []
    registry.heartbeat(r1.node_id, 1.0, r1.assigned, Load(), "another-group")
    assert registry.servers() == []  # ready, but in another formation
    registry.heartbeat(r1.node_id, 1.0, r1.assigned, Load(), r1.group)
    assert [s.address for s in registry.servers()] == ["10.0.0.1:7961"]


def test_a_hops_replicas_are_groups_and_single_nodes_alike() -> None:
    # auto, three slow nodes that hold the model: a group of two (faster) and the third alone.
    registry = Registry(GPT2, tp="auto")
    for i in range(3):
        registry.join(record(i))
    assert sorted(
        len(registry.seat(r).members) if registry.seat(r) else 1 for r in registry.nodes.values()
    ) == [1, 2, 2]  # type: ignore[union-attr]
    serve_all(registry)
    (hop,) = plan_route(registry.servers(), 14)
    assert hop.addresses == ("10.0.0.1:7961", "10.0.0.3:7961")  # the group first: faster
    assert registry.coverage() == [2] * 14


def test_a_member_leaving_dissolves_its_group_and_ids_are_never_reused() -> None:
    registry = Registry(GPT2, tp=2)
    for i in range(4):
        registry.join(record(i))
    serve_all(registry)
    before = seats(registry)
    registry.leave(nid(1))
    after = seats(registry)
    assert "n0" not in after  # alone, it cannot form a group of two: idle (the other serves)
    assert registry.nodes[nid(0)].assigned is None
    assert after["n2"] == before["n2"] and after["n3"] == before["n3"]  # untouched
    assert [s.address for s in registry.servers()] == ["10.0.0.3:7961"]
    registry.join(record(4))  # a new member ...
    assert "n0" not in seats(registry)  # ... and n0, which may have failed: a suspect
    registry.heartbeat(nid(0), 2.0, None, Load(), "")  # alive: a new formation, a new id
    again = seats(registry)
    assert again["n0"][0] == again["n4"][0]
    assert again["n0"][0] not in {gid for gid, _, _ in before.values()}


def test_a_member_timing_out_reforms_the_group_with_a_new_id() -> None:
    registry = Registry(GPT2, tp=2, heartbeat_timeout_s=10)
    for i in range(5):
        registry.join(record(i))
    serve_all(registry, now=1.0)
    old = seats(registry)["n0"][0]
    for i in (0, 2, 3, 4):
        r = registry.nodes[nid(i)]
        registry.heartbeat(r.node_id, 20.0, r.ready, Load(), r.tp_group)
    assert [r.name for r in registry.expire(20.0)] == ["n1"]
    new = seats(registry)
    assert new["n0"][0] == new["n4"][0] != old  # n4, idle until now, takes n1's place


def test_a_group_that_broke_is_formed_again_under_a_new_id() -> None:
    registry = Registry(GPT2, tp=2)
    registry.join(record(0))
    registry.join(record(1))
    serve_all(registry)
    old = seats(registry)["n0"][0]
    assert registry.servers()
    # n1's collective failed (n0 hung?): it stops serving the group and waits. n0 is not
    # grouped again until a heartbeat shows it alive (a hung or dead n0 sends none).
    registry.heartbeat(nid(1), 2.0, None, Load(), "")
    assert seats(registry) == {} and registry.nodes[nid(0)].suspect
    registry.heartbeat(nid(0), 2.5, None, Load(), "")
    new = seats(registry)
    assert new["n0"][0] == new["n1"][0] != old
    assert registry.servers() == []  # until both serve the new formation
    serve_all(registry, 3.0)
    assert len(registry.servers()) == 1


def test_a_survivor_is_not_grouped_again_with_the_member_that_died() -> None:
    """Rank 1 of the only group dies. Rank 0's collective fails: it gives the group up
    (node/join.py) before the dead member's heartbeats time out, and stays in the swarm.
    The dead member is not grouped with it again (it would sit in a rendezvous nobody comes
    to for 20 s); a volunteer that comes to take its place is, at once."""
    registry = Registry(GPT2, tp=2, heartbeat_timeout_s=6)
    registry.join(record(0))
    registry.join(record(1))
    serve_all(registry)
    old = registry.nodes[nid(0)].group
    registry.heartbeat(nid(0), 2.0, None, Load(), "", gave_up=old)
    assert seats(registry) == {}  # n1 (dead) waits for a heartbeat that never comes
    registry.join(record(2))
    found = seats(registry)
    assert found["n0"][0] == found["n2"][0] != old and "n1" not in found


def test_a_group_given_up_before_it_formed_is_formed_again_at_once() -> None:
    """A member's rendezvous failed (its peer came late): it gives the group up, and the
    group is formed again now, not at the form timeout; a late report of it moves nothing."""
    registry = Registry(GPT2, tp=2, heartbeat_timeout_s=1e9, form_timeout_s=300)
    registry.join(record(0))
    registry.join(record(1))
    old = seats(registry)["n0"][0]
    for i in (0, 1):
        registry.heartbeat(nid(i), 1.0, None, Load(), "")  # fetching, forming
    registry.heartbeat(nid(0), 21.0, None, Load(), "", gave_up=old)
    assert seats(registry) == {}  # n1 is a suspect until it heartbeats
    registry.heartbeat(nid(1), 21.5, None, Load(), "", gave_up=old)  # (it gave up too)
    new = seats(registry)
    assert new["n0"][0] == new["n1"][0] != old
    registry.heartbeat(nid(0), 22.0, None, Load(), "", gave_up=old)
    assert seats(registry) == new


def test_rank_0_rejoining_with_another_store_re_forms_its_group() -> None:
    registry = Registry(GPT2, tp=2)
    registry.join(record(0))
    registry.join(record(1))
    serve_all(registry)
    old = registry.seat(registry.nodes[nid(1)])
    registry.join(record(0, store_port=29999))  # restarted its store: the rendezvous moved
    new = registry.seat(registry.nodes[nid(1)])
    assert old is not None and new is not None
    assert new.id != old.id and new.rendezvous == "10.0.0.1:29999"


def test_a_group_that_never_comes_up_is_formed_again() -> None:
    registry = Registry(GPT2, tp=2, heartbeat_timeout_s=1e9, form_timeout_s=60)
    registry.join(record(0))
    registry.join(record(1))
    old = seats(registry)["n0"][0]
    for now in (1.0, 30.0, 61.0):
        for i in (0, 1):
            registry.heartbeat(nid(i), now, None, Load(), "")  # rendezvous never completes
        registry.expire(now)
    assert seats(registry)["n0"][0] == old
    registry.expire(62.0 + 1)
    assert seats(registry)["n0"][0] != old


def test_forming_a_group_logs_its_prediction(caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry(GPT2, tp="auto")
    with caplog.at_level(logging.INFO, logger="nanoshard.coordinator.registry"):
        registry.join(record(0))
        registry.join(record(1))
    lines = [r.getMessage() for r in caplog.records if "forms group" in r.getMessage()]
    assert len(lines) == 1
    assert "predicted" in lines[0] and "without groups" in lines[0] and "n0, n1" in lines[0]


def test_off_dissolves_nothing_it_never_formed_and_store_port_0_stays_alone() -> None:
    registry = Registry(GPT2, tp="off")
    for i in range(2):
        registry.join(record(i))
    assert seats(registry) == {}
    registry = Registry(GPT2, tp=2)
    for i in range(2):
        registry.join(record(i, store_port=0))
    assert seats(registry) == {} and all(r.assigned == (0, 14) for r in registry.nodes.values())


def test_a_restarted_coordinator_adopts_no_share_as_a_whole_stage() -> None:
    # After a restart a node says what it holds. A member of a group held a share of its
    # stage: a stage it could not hold alone is not adopted.
    registry = Registry(GPT2, tp=2, settle_until=10.0)
    small = record(0, memory_mb=300)
    small.held = (0, 14)
    big = record(1)
    big.held = (0, 14)
    registry.join(small)
    registry.join(big)
    assert registry.nodes[nid(0)].assigned is None
    assert registry.nodes[nid(1)].assigned == (0, 14)


# ---- the servicer: join, heartbeat, route, status ---------------------------------------


class Context:
    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass


def service(registry: Registry) -> CoordinatorService:
    store = SimpleNamespace(model_id="ab" * 32, name="gpt2")
    return CoordinatorService(
        store,  # type: ignore[arg-type]
        registry,
        swarm="default",
        heartbeat_interval_s=2.0,
        epoch=b"\0" * 8,
        clock=lambda: 1.0,
    )


def join_request(i: int, store_port: int) -> cpb.JoinRequest:
    r = record(i)
    c = r.capacity
    from nanoshard import PROTOCOL_VERSION

    request = cpb.JoinRequest(
        node_id=r.node_id,
        name=r.name,
        address=r.address,
        protocol_version=PROTOCOL_VERSION,
        swarm="default",
        capacity=cpb.Capacity(
            device=c.device,
            dtype=c.dtype,
            memory_bytes=c.memory_bytes,
            block_ms=c.block_ms,
            head_ms=c.head_ms,
        ),
        store_port=store_port,
        public_key=KEYS[i].public_key,
        proof_ms=int(time.time() * 1000),
    )
    message = join_proof_message("default", r.node_id, r.address, request.proof_ms)
    request.proof = KEYS[i].sign(message)
    return request


def test_the_wire_carries_groups_to_members_routes_and_status() -> None:
    async def run() -> None:
        svc = service(Registry(GPT2, tp=2))
        ctx = Context()
        assignments = {}
        for i in range(4):
            reply = await svc.Join(join_request(i, 29500 + i), ctx)
            assignments[i] = reply.assignment
        # Joins place again: the last assignments are in the heartbeat replies.
        for i in range(4):
            a = (await svc.Heartbeat(cpb.HeartbeatRequest(node_id=nid(i)), ctx)).assignment
            assert (a.start, a.end, a.tp.size) == (0, 14, 2)
            assignments[i] = a
        a1 = assignments[1]
        assert a1.tp.rank == 1 and a1.tp.members == ["10.0.0.1:7961", "10.0.0.2:7961"]
        assert a1.tp.rendezvous == "10.0.0.1:29500" and a1.tp.id == assignments[0].tp.id
        assert a1.tp.backend == "gloo"  # (CPU members)
        # Each node is asked to ping the others; what it measured shows in status.
        ping = cpb.PeerLink(address="10.0.0.2:7961", rtt_ms=0.9, self_rtt_ms=0.4, bytes_per_s=5e8)
        for i, a in assignments.items():
            link = cpb.GroupLink(probe_ms=0.5, bytes_per_s=3e8, live_ms=2.5 + i)
            request = cpb.HeartbeatRequest(
                node_id=nid(i),
                ready=True,
                start=a.start,
                end=a.end,
                tp_group=a.tp.id,
                load=cpb.NodeLoad(tp_link=link, peer_links=[ping] if i == 0 else []),
            )
            reply = await svc.Heartbeat(request, ctx)
            others = [f"10.0.0.{j + 1}:7961" for j in range(4) if j != i]
            assert sorted(reply.peers) == others
        route = await svc.GetRoute(cpb.RouteRequest(), ctx)
        assert [list(h.addresses) for h in route.hops] == [["10.0.0.1:7961", "10.0.0.3:7961"]]
        status = status_json(await svc.GetStatus(cpb.StatusRequest(), ctx))
        tps = {n["name"]: n["tp"] for n in status["nodes"]}
        link = {"probe_ms": 0.5, "bytes_per_s": 3e8, "live_ms": 3.5}
        assert tps["n1"] == {"group": a1.tp.id, "rank": 1, "size": 2, "link": link}
        pings = {n["name"]: n["peer_links"] for n in status["nodes"]}
        assert pings["n1"] == [] and pings["n0"] == [
            {"address": "10.0.0.2:7961", "rtt_ms": 0.9, "self_rtt_ms": 0.4, "bytes_per_s": 5e8}
        ]
        assert {u["replicas"] for u in status["units"]} == {2}
        assert all(n["healthy"] for n in status["nodes"])

    asyncio.run(run())


def test_the_wire_refuses_a_bad_store_port_and_group_id() -> None:
    async def run() -> None:
        svc = service(Registry(GPT2, tp=2))
        with pytest.raises(RuntimeError, match="store_port 70000"):
            await svc.Join(join_request(0, 70000), Context())
        await svc.Join(join_request(0, 0), Context())
        bad = cpb.NodeLoad(tp_link=cpb.GroupLink(live_ms=float("nan")))
        with pytest.raises(RuntimeError, match="tp_link"):
            await svc.Heartbeat(cpb.HeartbeatRequest(node_id=nid(0), load=bad), Context())
        for bad_pings in (
            [cpb.PeerLink(address="nowhere", rtt_ms=1.0)],
            [cpb.PeerLink(address="10.0.0.2:7961", rtt_ms=-1.0)],
            [cpb.PeerLink(address=f"10.0.0.2:{p}", rtt_ms=1.0) for p in range(1, 10)],
        ):
            bad = cpb.NodeLoad(peer_links=bad_pings)
            with pytest.raises(RuntimeError, match="peer_links"):
                await svc.Heartbeat(cpb.HeartbeatRequest(node_id=nid(0), load=bad), Context())
        request = cpb.HeartbeatRequest(node_id=nid(0), ready=True, end=14, tp_group="x" * 65)
        with pytest.raises(RuntimeError, match="tp_group is longer"):
            await svc.Heartbeat(request, Context())
        request = cpb.HeartbeatRequest(node_id=nid(0), gave_up_group="x" * 65)
        with pytest.raises(RuntimeError, match="gave_up_group is longer"):
            await svc.Heartbeat(request, Context())
        status = status_json(await svc.GetStatus(cpb.StatusRequest(), Context()))
        assert status["nodes"][0]["tp"] == {"group": "", "rank": 0, "size": 1}

    asyncio.run(run())


def test_stage_ms_of_a_group_is_the_cost_model() -> None:
    cap = groups.group_capacity(nodes(2, 2000, 2.0, 11.0), HIDDEN)
    ms = stage_ms(UNITS, cap, 0, 14)
    sync = allreduce_ms(HIDDEN, 2)
    expected = (
        UNITS[0].cost * 2.0 / 2 + sync  # the embed: a lookup and an all-reduce
        + 12 * (2.0 / 2 + 2 * sync)  # blocks: half each, two all-reduces
        + 11.0 / 2 + sync  # the head: half the vocabulary, a merge of candidates
        + broadcast_ms(HIDDEN, 2)
    )  # fmt: skip
    assert ms == pytest.approx(expected)


def test_an_idle_node_is_told_why() -> None:
    """What `nanoshard-node join` prints when it stands by: the coordinator's reason."""
    registry = Registry(GPT2, tp=2)
    for i in range(3):  # groups of two: the third has no partner
        registry.join(record(i))
    (odd,) = [r for r in registry.nodes.values() if r.assigned is None]
    assert "groups of 2 (--tp 2)" in assignment(registry, odd).why_idle
    odd.slowdown = 10.0  # (what rebalance takes from its live reports)
    assert "counts its steps 10.0 x slower than it measured" in assignment(registry, odd).why_idle
    odd.slowdown = 1.0
    registry.join(record(3, memory_mb=1))  # 1 MB holds no unit of GPT-2
    tiny = registry.nodes[nid(3)]
    assert tiny.assigned is None
    assert "holds no unit of this model" in assignment(registry, tiny).why_idle
    registry.exclude(odd.address, "a forged trace")  # (spot-checks)
    assert "spot-checks excluded it: a forged trace" in assignment(registry, odd).why_idle
    settling = Registry(GPT2, tp="off", settle_until=math.inf)  # a coordinator just restarted
    settling.join(record(0))
    waiting = settling.nodes[nid(0)]
    assert "register again" in assignment(settling, waiting).why_idle


def test_a_standing_by_volunteer_is_told_each_new_reason(tmp_path: Path) -> None:
    """The volunteer says why it stands by when it starts to, and again each time the reason
    changes (a coordinator that has just started, then a group with no place for it), not
    once at every heartbeat."""
    said: list[str] = []

    class Told(Events):
        def info(self, message: str) -> None:
            said.append(message)

    volunteer = Volunteer(JoinConfig(cache_dir=tmp_path), Told())
    for why in ("it has just started", "it has just started", "no group for this node"):
        volunteer._follow(cpb.Assignment(idle=True, why_idle=why))
    assert said == [
        "assigned no stage for now: standing by (it has just started)",
        "assigned no stage for now: standing by (no group for this node)",
    ]


def test_an_excluded_volunteer_is_warned_with_what_to_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Excluded by spot-checks, a volunteer warns its owner and says what to look at; it
    said so among its routine lines, at INFO."""
    volunteer = Volunteer(JoinConfig(cache_dir=tmp_path))
    why = "spot-checks excluded it: its signed output differs from the coordinator's re-run"
    with caplog.at_level(logging.INFO, logger="nanoshard.node.join"):
        volunteer._follow(cpb.Assignment(idle=True, why_idle=why))
    (record,) = [r for r in caplog.records if "standing by" in r.getMessage()]
    assert record.levelno == logging.WARNING, record
    assert why in record.getMessage() and "check this machine's memory" in record.getMessage()
