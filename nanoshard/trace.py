"""Per-hop traces each step brings back, and timing summaries of them."""

from __future__ import annotations

from typing import Any

from nanoshard.v1 import node_pb2 as pb


def trace_to_dict(h: pb.HopTrace) -> dict[str, Any]:
    """One hop's trace of one step, as the SDK's results and ``--json`` carry it."""
    return {
        "node": h.node,
        "address": h.address,
        "units": [h.start, h.end],
        "queue_ms": h.queue_ms,
        "compute_ms": h.compute_ms,
        "total_ms": h.total_ms,
        "downstream_ms": h.downstream_ms,
        "bytes_in": h.bytes_in,
        "bytes_out": h.bytes_out,
        "codec": h.codec,
        "kv_length": h.handle.length,
        "repair": h.repair,
        "batch": h.batch,
        "tp": h.tp or 1,  # nodes of the tensor-parallel group serving the hop
        "collective_ms": h.collective_ms,
        "collective_bytes": h.collective_bytes,
    }


def summarize_hops(steps: list[list[dict[str, Any]]], step_ms: list[float]) -> list[dict[str, Any]]:
    """One row per hop: its node, units, and where its time went over all steps.

    ``steps[k]`` holds the traces of step k (a prefill of several chunks holds several per
    hop), ``step_ms[k]`` the client's wall time for it. Transfer time into hop i is what the
    hop before it waited on the downstream call minus what hop i itself spent (for the first
    hop, the client's wall time minus the hop's own time): network, serialization, gRPC.
    """
    rows: dict[tuple[str, int, int], dict[str, Any]] = {}
    for traces, wall in zip(steps, step_ms, strict=False):
        prev_downstream: float | None = None
        first_total = 0.0
        for h in traces:
            key = (h["address"], *h["units"])
            row = rows.setdefault(
                key,
                {
                    "node": h["node"],
                    "address": h["address"],
                    "units": list(h["units"]),
                    "codec": h["codec"],
                    "tp": h.get("tp", 1),
                    "steps": 0,
                    "compute_ms": 0.0,
                    "collective_ms": 0.0,
                    "queue_ms": 0.0,
                    "transfer_ms": 0.0,
                    "bytes_in": 0,
                    "bytes_out": 0,
                },
            )
            row["steps"] += 1
            row["compute_ms"] += h["compute_ms"]
            row["collective_ms"] += h.get("collective_ms", 0.0)
            row["queue_ms"] += h["queue_ms"]
            row["bytes_in"] += h["bytes_in"]
            row["bytes_out"] += h["bytes_out"]
            if h["units"][0] == 0:
                first_total += h["total_ms"]
                prev_downstream = h["downstream_ms"]
            elif prev_downstream is not None:
                row["transfer_ms"] += max(prev_downstream - h["total_ms"], 0.0)
                prev_downstream = h["downstream_ms"]
        if traces:
            first = traces[0]
            key = (first["address"], *first["units"])
            rows[key]["transfer_ms"] += max(wall - first_total, 0.0)
    out = list(rows.values())
    for row in out:
        for k in ("compute_ms", "collective_ms", "queue_ms", "transfer_ms"):
            row[k] = round(row[k], 3)
    return out
