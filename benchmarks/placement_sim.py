"""Placement under churn: nanoshard's placement against two baselines.

    python benchmarks/placement_sim.py          # ~2 CPU minutes -> benchmarks/results/placement.json
    python benchmarks/placement_sim.py --quick  # 10 and 100 nodes only, ~10 s

Random heterogeneous swarms of 10, 100 and 1000 nodes serve a GPT-2-124M-shaped model
(everyone can hold it) and a GPT-2-1.5B-shaped one (fp32, 6.2 GB): a "mixed" swarm of
laptops, desktops and GPUs (some hold the whole 1.5B model), and a "tight" one of laptops and
small GPUs (nobody does). Each swarm then lives through 50 membership events (a random node joins,
or leaves / misses its heartbeats). After every event each strategy places the swarm, and
we record:

- the weakest unit's throughput, also as a share of an upper bound (each node's time split
  at will between blocks and head, one overhead per step, memory ignored);
- whether any unit has no node (a gap) and whether every unit has two (then one node loss
  breaks no route);
- units moved: units nodes must newly load, the joiner's own stage included; "reshuffled"
  counts only nodes that were already there.

Strategies:
- ours: ``nanoshard.coordinator.placement.place`` with the previous placement, R=2.
- ours, from scratch: the same without the previous placement (what stickiness saves).
- petals: a joiner takes the span with the weakest units (Petals' ``_choose_best_start``,
  with the longest span its memory allows from each start); after each event the next
  server in turn runs Petals' ``should_choose_other_blocks`` (balance quality 0.75) and
  moves if it says so.
- exo: exo's ring memory-weighted partitioning, recomputed on every event: one chain, each
  node a share of the units proportional to its memory. A node given more than its memory
  cannot load its stage and serves nothing.

Everything is seeded: the same command prints the same table (the CPU times aside).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nanoshard.config import GPTConfig
from nanoshard.coordinator.placement import (
    NodeCapacity,
    Placement,
    UnitCost,
    coverage,
    place,
    stage_bytes,
    stage_ms,
    unit_costs,
    unit_throughput,
    units_moved,
    weakest_throughput,
)

MODELS = {
    "gpt2-124M": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-1.5B": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
}
GB = 1_000_000_000


@dataclass(frozen=True)
class DeviceClass:
    """A kind of volunteer machine: weight-memory budget and one 124M block's decode step."""

    name: str
    share: float
    memory_gb: tuple[float, float]
    block_ms_124m: tuple[float, float]
    head_speedup: float  # how much better than its block speed it runs the big head matmul


# Budgets are what a volunteer leaves to nanoshard, not the machine's total RAM.
SWARMS = {
    "mixed": (
        DeviceClass("laptop", 0.50, (1.0, 4.0), (2.0, 5.0), 1.0),
        DeviceClass("desktop", 0.35, (4.0, 16.0), (0.8, 2.0), 1.0),
        DeviceClass("gpu", 0.15, (4.0, 24.0), (0.1, 0.3), 2.0),
    ),
    # Nobody holds the 1.5B model: replicas and balance both depend on packing.
    "tight": (
        DeviceClass("laptop", 0.70, (1.0, 3.0), (2.0, 5.0), 1.0),
        DeviceClass("gpu", 0.30, (2.0, 6.0), (0.1, 0.3), 2.0),
    ),
}
SCENARIOS = [("gpt2-124M", "mixed"), ("gpt2-1.5B", "mixed"), ("gpt2-1.5B", "tight")]


def random_node(
    rng: random.Random, node_id: str, config: GPTConfig, devices: Sequence[DeviceClass]
) -> NodeCapacity:
    device = rng.choices(devices, weights=[d.share for d in devices])[0]
    scale = (config.n_embd / 768) ** 2  # a block's multiply-adds grow with n_embd^2
    block_ms = rng.uniform(*device.block_ms_124m) * scale
    head_cost = config.vocab_size / (12 * config.n_embd)
    return NodeCapacity(
        node_id=node_id,
        memory_bytes=int(rng.uniform(*device.memory_gb) * GB),
        block_ms=round(block_ms, 4),
        head_ms=round(block_ms * head_cost / device.head_speedup, 4),
        overhead_ms=round(rng.uniform(0.3, 1.0), 3),
    )


def reach(units: Sequence[UnitCost], memory: int) -> list[int]:
    """reach[a]: the end of the longest stage from unit a that fits ``memory`` (a: none)."""
    out = []
    for a in range(len(units)):
        e, held = a, 0
        while e < len(units):
            held += units[e].weight_bytes - (units[e].shared_bytes if a == 0 else 0)
            if held > memory:
                break
            e += 1
        out.append(e)
    return out


def work_bound(units: Sequence[UnitCost], nodes: Sequence[NodeCapacity]) -> float:
    """An upper bound on the weakest unit's throughput: each node splits its time between the
    head and the rest at will, memory ignored. A node pays its overhead once per step of its
    stage, so at best (serving every unit) only ``work / (overhead + work)`` of its time is
    work. Nodes with the best head-to-rest ratio take the head first, which is optimal for
    this fractional problem."""
    body = [sum(n.unit_ms(u) for u in units if u.kind != "head") for n in nodes]
    head = [sum(n.unit_ms(u) for u in units if u.kind == "head") for n in nodes]
    useful = [(b + h) / (n.overhead_ms + b + h) for n, b, h in zip(nodes, body, head, strict=True)]
    order = sorted(range(len(nodes)), key=lambda i: head[i] / body[i])

    def feasible(tau: float) -> bool:
        need_head, body_rate = tau, 0.0
        for i in order:  # time x on the head gives 1000 x / head_ms steps/s
            x = min(useful[i], need_head * head[i] / 1000)
            need_head -= 1000 * x / head[i]
            body_rate += 1000 * (useful[i] - x) / body[i]
        return need_head <= tau * 1e-12 and body_rate >= tau

    lo, hi = 0.0, sum(1000 / b for b in body)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo


# --- baselines ---------------------------------------------------------------------------


class Petals:
    """Petals' block selection, with spans over our units (embed and head included)."""

    def __init__(self, units: Sequence[UnitCost], balance_quality: float = 0.75) -> None:
        self.units = units
        self.balance_quality = balance_quality
        self.turn = 0
        self.reach: dict[str, list[int]] = {}

    def rates(self, placement: Placement, nodes: dict[str, NodeCapacity]) -> dict[str, float]:
        return {i: 1000 / stage_ms(self.units, nodes[i], *s) for i, s in placement.items()}

    def best_start(self, h: list[float], node_id: str) -> tuple[int, int] | None:
        """_choose_best_start: the span whose throughputs, sorted, are smallest.

        Petals' servers all hold blocks of one size and a fixed num_blocks; our units differ
        (embed and head are big), so each start gets the longest span that fits there, and a
        shorter span counts as if padded with infinitely strong units (else the one-unit span
        would always look weakest)."""
        r, n = self.reach[node_id], len(h)
        options = [
            (sorted(h[a : r[a]]) + [math.inf] * (n - r[a] + a), a) for a in range(n) if r[a] > a
        ]
        if not options:
            return None
        a = min(options)[1]
        return a, r[a]

    def step(self, nodes: list[NodeCapacity], previous: Placement) -> Placement:
        by_id = {n.node_id: n for n in nodes}
        for n in nodes:
            if n.node_id not in self.reach:
                self.reach[n.node_id] = reach(self.units, n.memory_bytes)
        placement = {i: s for i, s in previous.items() if i in by_id}
        for n in nodes:  # joiners, in arrival order
            if n.node_id not in previous:
                h = unit_throughput(placement, self.units, nodes)
                stage = self.best_start(h, n.node_id)
                if stage is not None:
                    placement[n.node_id] = stage
        # One server's periodic balance check.
        servers = sorted(placement)
        if servers:
            me = servers[self.turn % len(servers)]
            self.turn += 1
            if self.should_move(me, placement, by_id):
                h = unit_throughput(
                    {i: s for i, s in placement.items() if i != me}, self.units, nodes
                )
                placement[me] = self.best_start(h, me) or placement[me]
        return placement

    def should_move(self, me: str, placement: Placement, nodes: dict[str, NodeCapacity]) -> bool:
        """petals/server/block_selection.py: should_choose_other_blocks, without the shuffle."""
        eps = 1e-3
        spans = dict(placement)
        rate = self.rates(spans, nodes)
        h = unit_throughput(spans, self.units, nodes.values())
        initial = min(h)

        def shift(node_id: str, by: float) -> None:
            for u in range(*spans[node_id]):
                h[u] += by

        shift(me, -rate[me] * (1 + eps))
        if initial > eps and min(h) <= 0:
            return False  # moving would disconnect the swarm
        new = self.best_start(h, me)
        if new is None or new[0] == spans[me][0]:
            return False
        shift(me, rate[me] * eps)
        spans[me] = new
        rate[me] = self.rates({me: new}, nodes)[me]
        shift(me, rate[me])
        for _ in range(5):  # Petals loops until nobody moves; five passes bound the cost
            moved = False
            for peer in sorted(spans):
                shift(peer, -rate[peer] * (1 + eps))
                new = self.best_start(h, peer)
                shift(peer, rate[peer] * eps)
                if new is not None and new != spans[peer]:
                    spans[peer] = new
                    rate[peer] = self.rates({peer: new}, nodes)[peer]
                    moved = True
                shift(peer, rate[peer])
            if not moved:
                break
        final = min(h)
        if final < initial or final < eps:
            return False
        return initial / final < self.balance_quality - eps


def exo_place(units: Sequence[UnitCost], nodes: Sequence[NodeCapacity]) -> Placement:
    """exo's RingMemoryWeightedPartitioningStrategy + map_partitions_to_shards, over units."""
    n = len(units)
    ring = sorted(nodes, key=lambda x: (x.memory_bytes, x.node_id), reverse=True)
    total = sum(x.memory_bytes for x in ring)
    placement, start = {}, 0.0
    for k, node in enumerate(ring):
        end = round(start + node.memory_bytes / total, 5)
        first, stop = int(start * n), (n if k == len(ring) - 1 else int(end * n))
        if stop > first:
            placement[node.node_id] = (first, stop)
        start = end
    return placement


# --- the simulation ----------------------------------------------------------------------


@dataclass
class Tally:
    weakest: list[float]
    share: list[float]
    min_replicas: list[int]
    moved: list[int]
    reshuffled: list[int]
    infeasible: int = 0
    seconds: float = 0.0

    def row(self) -> dict[str, float]:
        return {
            "weakest_steps_per_s": statistics.fmean(self.weakest),
            "weakest_share_of_bound": statistics.fmean(self.share),
            "events_with_gap": sum(1 for r in self.min_replicas if r == 0),
            "events_surviving_any_one_loss": sum(1 for r in self.min_replicas if r >= 2),
            "units_moved_per_event": statistics.fmean(self.moved),
            "units_reshuffled_per_event": statistics.fmean(self.reshuffled),
            "events_over_memory": self.infeasible,
            "seconds_per_event": self.seconds / len(self.weakest),
        }


def simulate(
    model: str, swarm: str, size: int, events: int, seed: int
) -> dict[str, dict[str, float]]:
    config = MODELS[model]
    units = unit_costs(config)
    rng = random.Random(f"{seed}-{model}-{swarm}-{size}")
    ids = (f"node-{k:05d}" for k in itertools.count())
    nodes = [random_node(rng, next(ids), config, SWARMS[swarm]) for _ in range(size)]

    petals = Petals(units)
    strategies: dict[str, Callable[[list[NodeCapacity], Placement], Placement]] = {
        "ours": lambda ns, prev: place(units, ns, prev),
        "ours, from scratch": lambda ns, prev: place(units, ns),
        "petals": petals.step,
        "exo": lambda ns, prev: exo_place(units, ns),
    }
    current = {name: fn(nodes, {}) for name, fn in strategies.items()}
    tallies = {name: Tally([], [], [], [], []) for name in strategies}
    for _ in range(events):
        if len(nodes) > size // 2 and (rng.random() < 0.5 or len(nodes) >= 2 * size):
            nodes.pop(rng.randrange(len(nodes)))  # leaves, or misses its heartbeats
        else:
            nodes.append(random_node(rng, next(ids), config, SWARMS[swarm]))
        by_id = {x.node_id: x for x in nodes}
        bound = work_bound(units, nodes)
        for name, fn in strategies.items():
            before = current[name]
            started = time.process_time()
            after = fn(nodes, before)
            tally = tallies[name]
            tally.seconds += time.process_time() - started
            # A stage beyond its node's memory cannot be loaded: that node serves nothing.
            served = {
                i: s for i, s in after.items() if stage_bytes(units, *s) <= by_id[i].memory_bytes
            }
            tally.infeasible += len(served) < len(after)
            weakest = weakest_throughput(served, units, nodes)
            tally.weakest.append(weakest)
            tally.share.append(weakest / bound)
            tally.min_replicas.append(min(coverage(served, len(units))))
            tally.moved.append(units_moved(before, after))
            stayed = {i: s for i, s in after.items() if i in before}
            tally.reshuffled.append(units_moved(before, stayed))
            current[name] = after
    return {name: t.row() for name, t in tallies.items()}


def markdown(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| model | swarm | nodes | strategy | weakest unit, steps/s | % of bound | events with a gap "
        "| events surviving any 1 loss | units moved / event | of which reshuffled "
        "| events over memory | CPU ms / placement |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, rows in results.items():
        model, swarm, size = key.split("/")
        for name, r in rows.items():
            lines.append(
                f"| {model} | {swarm} | {size} | {name} | {r['weakest_steps_per_s']:.1f} "
                f"| {100 * r['weakest_share_of_bound']:.1f} | {r['events_with_gap']} "
                f"| {r['events_surviving_any_one_loss']} | {r['units_moved_per_event']:.1f} "
                f"| {r['units_reshuffled_per_event']:.1f} | {r['events_over_memory']} "
                f"| {1000 * r['seconds_per_event']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="10 and 100 nodes only")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "placement.json"
    )
    args = parser.parse_args()
    sizes = [s for s in args.sizes if s <= 100] if args.quick else args.sizes
    results = {}
    for (model, swarm), size in itertools.product(SCENARIOS, sizes):
        results[f"{model}/{swarm}/{size}"] = simulate(model, swarm, size, args.events, args.seed)
    print(markdown(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"events": args.events, "seed": args.seed, "sizes": sizes, "replicas": 2}
    args.out.write_text(json.dumps({"settings": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
