"""``nanoshard status``: the swarm as tables for the terminal (the JSON form is
:func:`nanoshard.statusview.status_json`)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from nanoshard.v1 import coordinator_pb2 as cpb


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def status_table(s: cpb.SwarmStatus) -> Group:
    nodes = Table(
        title=f"swarm {s.swarm!r} · model {s.model_name} ({s.model_id[:12]}…) · placement v{s.placement_version}",
        title_justify="left",
    )
    for col, justify in (
        ("name", "left"),
        ("address", "left"),
        ("device", "left"),
        ("memory", "right"),
        ("block", "right"),
        ("stage", "left"),
        ("sessions", "right"),
        ("load", "right"),
        ("heartbeat", "right"),
        ("checks", "right"),
        ("health", "left"),
    ):
        nodes.add_column(col, justify=justify, no_wrap=col in ("address", "stage"))  # type: ignore[arg-type]
    for n in s.nodes:
        stage = "idle" if n.assignment.idle else f"[{n.assignment.start},{n.assignment.end})"
        if not n.assignment.idle and (n.ready_start, n.ready_end) != (
            n.assignment.start,
            n.assignment.end,
        ):
            stage += " loading"
        if n.excluded:
            health = Text("EXCLUDED", style="bold red")
        elif n.healthy:
            health = Text("ok", style="green")
        else:
            health = Text("DOWN", style="bold red")
        checks = Text(f"{n.checks_passed}/{n.checks_failed}")
        if n.checks_failed:
            checks.stylize("yellow")
        nodes.add_row(
            n.name,
            n.address,
            f"{n.capacity.device}/{n.capacity.dtype}",
            _gib(n.capacity.memory_bytes),
            f"{n.capacity.block_ms:.2f}ms",
            stage,
            str(n.load.sessions),
            f"q{n.load.queue_length} {n.load.step_ms_p50:.1f}ms",
            f"{n.last_heartbeat_s:.1f}s",
            checks,
            health,
        )
    units = Table(title="coverage (replicas per unit)", title_justify="left")
    for u in s.units:
        units.add_column(u.name.replace("block ", "b"), justify="center")
    cells = []
    for u in s.units:
        style = (
            "bold red"
            if u.replicas == 0
            else ("yellow" if u.replicas < s.replicas_target else "green")
        )
        cells.append(Text(str(u.replicas) if u.replicas else "GAP", style=style))
    units.add_row(*cells)
    gaps = [u.unit for u in s.units if u.replicas == 0]
    summary = Text(
        f"{len(s.nodes)} nodes · estimated {s.tokens_per_s:.1f} tokens/s per session · "
        + ("every unit covered" if not gaps else f"{len(gaps)} units uncovered"),
        style="bold" if not gaps else "bold red",
    )
    excluded = [
        Text(f"excluded {n.name} ({n.address}): {n.excluded}", style="red")
        for n in s.nodes
        if n.excluded
    ]
    return Group(nodes, units, summary, *excluded)
