"""The coordinator's soft state: who is in the swarm, what each node was assigned, what
it serves now, how loaded it is. Everything here can be rebuilt from the nodes' next
join or heartbeat, so a restarted coordinator loses nothing.

No gRPC and no wall clock: the servicer passes ``now`` in, so tests can drive time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from nanoshard.config import GPTConfig

from .placement import NodeCapacity, Placement, UnitCost, place, unit_costs
from .routing import Server

log = logging.getLogger(__name__)

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
    queue_length: int = 0
    step_ms_p50: float = 0.0


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


class Registry:
    def __init__(
        self,
        config: GPTConfig,
        *,
        replicas: int = 2,
        heartbeat_timeout_s: float = 10.0,
        settle_until: float = 0.0,
    ) -> None:
        self.config = config
        self.replicas = replicas
        self.heartbeat_timeout_s = heartbeat_timeout_s
        # A (re)started coordinator first lets the swarm re-register: until then, nodes that
        # still hold a stage keep it and nothing is re-placed, so a restart moves nothing.
        self.settle_until = settle_until
        self.settled = settle_until <= 0  # 0: no window (tests of placement alone)
        self.nodes: dict[str, NodeRecord] = {}
        self.version = 0  # placement version, bumped on every change
        self.excluded: dict[str, str] = {}  # address -> why spot-checks excluded it
        self.units: list[UnitCost] = unit_costs(config)

    # ---- membership -----------------------------------------------------------------

    def join(self, record: NodeRecord) -> None:
        for other in [r for r in self.nodes.values() if r.address == record.address]:
            if other.node_id != record.node_id:  # a node restarted on the same address
                del self.nodes[other.node_id]
        previous = self.nodes.get(record.node_id)
        if previous is not None:  # a re-join: keep what it is known to serve
            record.assigned = previous.assigned
            record.ready = record.ready or previous.ready
        elif record.held is not None:  # coordinator restarted: the node still holds a stage
            record.assigned = record.ready = record.held
        if record.address in self.excluded:  # back under another id, same address: still out
            record.assigned = record.ready = None
        self.nodes[record.node_id] = record
        log.info("node %s (%s) joined from %s", record.name, record.node_id[:8], record.address)
        if self.settled:
            self.replan()

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
        self.replan()
        return True

    def exclude(self, address: str, reason: str) -> None:
        """Take the node at ``address`` out of placement and routes, for ``reason``."""
        self.excluded[address] = reason
        for record in self.nodes.values():
            if record.address == address:
                log.warning("node %s (%s) excluded: %s", record.name, address, reason)
                record.ready = None  # out of routes at once
        self.replan()

    def heartbeat(
        self, node_id: str, now: float, ready: tuple[int, int] | None, load: Load
    ) -> NodeRecord | None:
        record = self.nodes.get(node_id)
        if record is None:
            return None
        record.last_heartbeat = now
        record.ready = None if record.address in self.excluded else ready
        record.load = load
        return record

    def expire(self, now: float) -> list[NodeRecord]:
        """Drop nodes silent for longer than the heartbeat timeout; re-place their units."""
        gone = [r for r in self.nodes.values() if now - r.last_heartbeat > self.heartbeat_timeout_s]
        for record in gone:
            log.warning(
                "node %s (%s) missed its heartbeats: dropped", record.name, record.node_id[:8]
            )
            del self.nodes[record.node_id]
        if gone and self.settled:
            self.replan()
        self.settle(now)
        return gone

    # ---- placement ------------------------------------------------------------------

    def capacities(self) -> list[NodeCapacity]:
        return [
            NodeCapacity(
                node_id=r.node_id,
                memory_bytes=int(
                    r.capacity.memory_bytes * WEIGHT_SHARE * 4 / WEIGHT_BYTES[r.capacity.dtype]
                ),
                block_ms=max(r.capacity.block_ms, 1e-3),
                head_ms=max(r.capacity.head_ms, 1e-3),
            )
            for r in sorted(self.nodes.values(), key=lambda r: r.node_id)
            if r.address not in self.excluded
        ]

    def replan(self) -> None:
        previous: Placement = {
            nid: r.assigned
            for nid, r in self.nodes.items()
            if r.assigned is not None and r.address not in self.excluded
        }
        placement = place(self.units, self.capacities(), previous, replicas=self.replicas)
        changed = False
        for node_id, record in self.nodes.items():
            stage = placement.get(node_id)
            if stage != record.assigned:
                record.assigned = stage
                changed = True
        if changed:
            self.version += 1
            log.info("placement v%d: %s", self.version, self.describe())

    def describe(self) -> str:
        parts = []
        for r in sorted(self.nodes.values(), key=lambda r: r.assigned or (999, 999)):
            parts.append(f"{r.name}={list(r.assigned) if r.assigned else 'idle'}")
        return ", ".join(parts)

    # ---- routes and status ----------------------------------------------------------

    def unit_ms(self, record: NodeRecord, unit: int) -> float:
        """A node's estimated decode-step time for one unit, from its measured capacity."""
        if self.units[unit].kind == "head":
            return record.capacity.head_ms
        return record.capacity.block_ms * self.units[unit].cost

    def servers(self) -> list[Server]:
        """Ready nodes as routing sees them."""
        out = []
        for r in self.nodes.values():
            if r.ready is None:
                continue
            start, end = r.ready
            unit_ms = tuple(self.unit_ms(r, u) for u in range(start, end))
            load = r.load.sessions + r.load.queue_length
            out.append(Server(r.address, start, end, unit_ms, float(load)))
        return out

    def coverage(self) -> list[int]:
        counts = [0] * self.config.n_units
        for r in self.nodes.values():
            if r.ready is not None:
                for u in range(*r.ready):
                    counts[u] += 1
        return counts
