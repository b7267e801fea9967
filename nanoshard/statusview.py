"""The swarm's status as one JSON object: ``Client.status()`` and ``nanoshard status --json``.

The terminal view of the same status is the CLI's (``cli/statusview.py``).
"""

from __future__ import annotations

from typing import Any

from nanoshard.v1 import coordinator_pb2 as cpb


def status_json(s: cpb.SwarmStatus) -> dict[str, Any]:
    return {
        "swarm": s.swarm,
        "model": {"name": s.model_name, "id": s.model_id, "n_units": s.n_units},
        "placement_version": s.placement_version,
        "replicas_target": s.replicas_target,
        "tokens_per_s": round(s.tokens_per_s, 2),  # estimated, one session, the best route
        "measured_tokens_per_s": round(s.measured_tokens_per_s, 2),  # drawn, last 10 s
        "nodes": [
            {
                "id": n.node_id,
                "name": n.name,
                "address": n.address,
                "device": n.capacity.device,
                "dtype": n.capacity.dtype,
                "memory_bytes": n.capacity.memory_bytes,
                "block_ms": round(n.capacity.block_ms, 3),
                "head_ms": round(n.capacity.head_ms, 3),
                "stage": None if n.assignment.idle else [n.assignment.start, n.assignment.end],
                "tp": _tp(n),
                "peer_links": [
                    {
                        "address": p.address,
                        "rtt_ms": round(p.rtt_ms, 3),
                        "self_rtt_ms": round(p.self_rtt_ms, 3),
                        "bytes_per_s": round(p.bytes_per_s),
                    }
                    for p in n.load.peer_links
                ],
                "serving": [n.ready_start, n.ready_end] if n.ready_end else None,
                "sessions": n.load.sessions,
                "queue": n.load.queue_depth,
                "kv_bytes_used": n.load.kv_bytes_used,
                "step_ms_p50": round(n.load.step_ms_p50, 3),
                "live": _live(n.load.live),
                "slowdown": round(n.slowdown, 2),
                "own_ratio": _figure(n.own_ratio, 2),
                "last_heartbeat_s": round(n.last_heartbeat_s, 2),
                "health": health(n),
                "healthy": n.healthy,
                "heartbeating": n.heartbeating,
                "checks": {"passed": n.checks_passed, "failed": n.checks_failed},
                "excluded": n.excluded or None,
            }
            for n in s.nodes
        ],
        "units": [{"unit": u.unit, "name": u.name, "replicas": u.replicas} for u in s.units],
    }


def health(n: cpb.NodeStatus) -> str:
    """A node's health in one word, as ``nanoshard status`` shows it: ``EXCLUDED`` (a check
    caught it), ``ok`` (serving), ``loading`` (on time, its stage not loaded yet),
    ``standby`` (on time, no stage for it) or ``DOWN`` (its heartbeats stopped)."""
    if n.excluded:
        return "EXCLUDED"
    if n.healthy:
        return "ok"
    if n.heartbeating:  # on time, not serving yet: waiting for a stage or a group, or loading
        return "standby" if n.assignment.idle else "loading"
    return "DOWN"


def _tp(n: cpb.NodeStatus) -> dict[str, Any]:
    """The node's tensor-parallel group: its id, this node's rank, its size (1: alone)."""
    tp = n.assignment.tp
    if n.assignment.idle or tp.size <= 1:
        return {"group": "", "rank": 0, "size": 1}
    link = n.load.tp_link
    return {
        "group": tp.id,
        "rank": tp.rank,
        "size": tp.size,
        "link": {
            "probe_ms": link.probe_ms,
            "bytes_per_s": link.bytes_per_s,
            "live_ms": link.live_ms,
        },
    }


def _figure(value: float, digits: int) -> float | None:
    """A ratio the wire carries as 0 until it is measured: None (JSON null) until then."""
    return round(value, digits) if value > 0 else None


def _live(live: cpb.LiveLoad) -> dict[str, Any]:
    """What the node's steps measured as they ran (``node/live.py``)."""
    return {
        "decode_ms": round(live.decode_ms, 3),
        "decode_ms_p90": round(live.decode_ms_p90, 3),
        "prefill_ms_per_token": round(live.prefill_ms_per_token, 3),
        "tokens_per_s": round(live.tokens_per_s, 2),
        "sampled_per_s": round(live.sampled_per_s, 2),
        "speed_ratio": _figure(live.speed_ratio, 3),
        "idle_s": round(live.idle_s, 1),
        "next_hops": [
            {
                "address": h.address,
                "rtt_ms": round(h.rtt_ms, 3),
                "bytes_per_s": round(h.bytes_per_s),
            }
            for h in live.next_hops
        ],
    }
