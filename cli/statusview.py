"""``nanoshard status``: the swarm for the terminal (the JSON form is
:func:`nanoshard.statusview.status_json`).

The layout follows the terminal's width: one row per node with a column per figure when
that fits, else two lines per node with the figures paired (an 80-column terminal), so
names, addresses and devices always show whole. Coverage is a column per unit when that
fits, else runs of units with the same number of replicas. A node in a tensor-parallel
group shows its group's size and its rank beside its stage (``tp2 r0``), and each group
gets a line: its id, stage and members in rank order.
"""

from __future__ import annotations

from itertools import groupby

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from nanoshard.statusview import health
from nanoshard.v1 import coordinator_pb2 as cpb


class StatusView:
    """A SwarmStatus as rich renderables, laid out for the width it is drawn at."""

    def __init__(self, status: cpb.SwarmStatus) -> None:
        self.status = status

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        s = self.status
        yield Text(
            f"swarm {s.swarm!r} · model {s.model_name} ({s.model_id[:12]}…) · "
            f"placement v{s.placement_version}",
            style="italic",
        )
        wide = _nodes_wide(s)
        yield wide if _fits(wide, console, options) else _nodes_narrow(s)
        units = _coverage_table(s)
        yield units if _fits(units, console, options) else _coverage_runs(s)
        gaps = sum(1 for u in s.units if u.replicas == 0)
        nodes = f"{len(s.nodes)} node" + ("" if len(s.nodes) == 1 else "s")
        summary = [
            f"{nodes} ·",
            f"measured {s.measured_tokens_per_s:.1f} tokens/s (last 10 s) ·",
            f"estimated {s.tokens_per_s:.1f} tokens/s per session ·",
            f"{gaps} units uncovered" if gaps else "every unit covered",
        ]
        style = "bold red" if gaps else "bold"
        yield pack([Text(p, style=style) for p in summary], options.max_width)
        for n in s.nodes:
            if n.excluded:
                yield Text(f"excluded {n.name} ({n.address}): {n.excluded}", style="red")
        yield from _groups(s, options.max_width)


def pack(phrases: list[Text], width: int) -> Text:
    """``phrases`` joined by spaces, in lines of at most ``width`` where they fit, broken
    between phrases only: a name, an address or a figure never splits across lines (a
    phrase wider than a line is left to rich's own wrapping)."""
    out, used = Text(), 0
    for phrase in phrases:
        if used and used + 1 + phrase.cell_len > width:
            out.append("\n")
            used = 0
        elif used:
            out.append(" ")
            used += 1
        out.append_text(phrase)
        used += phrase.cell_len
    return out


def _groups(s: cpb.SwarmStatus, width: int) -> list[Text]:
    """A line per group: ``group ab12-v3-0 [0,14) up: alice r0, bob r1`` (members in rank
    order; ``forming`` until every member serves it), and its links as measured; packed
    into lines of ``width`` (``pack``)."""
    members: dict[str, list[cpb.NodeStatus]] = {}
    for n in s.nodes:
        if not n.assignment.idle and n.assignment.tp.size > 1:
            members.setdefault(n.assignment.tp.id, []).append(n)
    lines = []
    for gid, nodes in sorted(members.items(), key=lambda item: (_stage_of(item[1][0]), item[0])):
        nodes.sort(key=lambda n: n.assignment.tp.rank)
        a = nodes[0].assignment
        up = all(n.ready for n in nodes) and len(nodes) == a.tp.size
        head = Text(f"group {gid} [{a.start},{a.end}) ")
        head.append("up" if up else "forming", style="green" if up else "yellow")
        head.append(":")
        ranks = [f"{n.name} r{n.assignment.tp.rank}" for n in nodes]
        phrases = [head, *(Text(r + ",") for r in ranks[:-1]), Text(ranks[-1])]
        links = [n.load.tp_link for n in nodes]
        live = max(link.live_ms for link in links)
        probe = max(link.probe_ms for link in links)
        if live or probe:  # as measured: the slowest member's figure counts
            said = f"· all-reduce {probe:.2f} ms at formation"
            phrases.append(Text(said + ("," if live else ""), style="dim"))
            if live:
                phrases.append(Text(f"{live:.2f} ms per collective serving", style="dim"))
        lines.append(pack(phrases, width))
    return lines


def _stage_of(n: cpb.NodeStatus) -> tuple[int, int]:
    return (n.assignment.start, n.assignment.end)


def _fits(table: Table, console: Console, options: ConsoleOptions) -> bool:
    """Whether ``table`` shows every cell unwrapped at this width (measured unbounded: a
    measurement is clamped to the width it is given)."""
    natural = Measurement.get(console, options.update_width(1 << 16), table).maximum
    return natural <= options.max_width


def _add_row(table: Table, *cells: str | Text) -> None:
    """A row of plain text: names and addresses come from the swarm, and rich would read
    ``[fd00::1]:7961`` or ``[bold]`` in them as markup."""
    table.add_row(*(Text(c) if isinstance(c, str) else c for c in cells))


def _gib(n: int) -> str:
    """A size as a volunteer gave it (``--max-memory 2.6M`` read "3 MiB", 500K "0 MiB")."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    if n >= 10 * 2**20:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _stage(n: cpb.NodeStatus, sep: str = " ") -> str:
    """``[0,14)``, its group (``tp2 r0``: size 2, rank 0) and ``loading`` until it serves
    them, joined by ``sep``."""
    a = n.assignment
    if a.idle:
        return "idle"
    parts = [f"[{a.start},{a.end})"]
    if a.tp.size > 1:
        parts.append(f"tp{a.tp.size} r{a.tp.rank}")
    if not n.ready:
        parts.append("loading")
    return sep.join(parts)


HEALTH_STYLES = {"ok": "green", "loading": "yellow", "standby": "yellow"}  # else bold red


def _health(n: cpb.NodeStatus) -> Text:
    word = health(n)
    return Text(word, style=HEALTH_STYLES.get(word, "bold red"))


def _load(n: cpb.NodeStatus) -> Text:
    """Queued steps and the node's live compute per decode step."""
    return Text(f"q{n.load.queue_depth} {n.load.live.decode_ms:.1f}ms")


def _slowdown(n: cpb.NodeStatus) -> Text:
    """How many times its capacity measurement placement counts the node's steps, in red,
    when it counts it slowed (`` x4.9``: its owner took the machine back); else, in
    yellow, its live ratio beyond what the other nodes share, when that is 1.5 or more (a
    slowdown placement has not acted on, or will not: its hysteresis)."""
    if n.slowdown > 1.0:
        return Text(f" x{n.slowdown:.1f}", style="bold red")
    own = n.own_ratio
    return Text(f" x{own:.1f}", style="bold yellow") if own >= 1.5 else Text("")


def _checks(n: cpb.NodeStatus) -> Text:
    return Text(f"{n.checks_passed}/{n.checks_failed}", style="yellow" if n.checks_failed else "")


def _nodes_wide(s: cpb.SwarmStatus) -> Table:
    table = Table()
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
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for n in s.nodes:
        _add_row(
            table,
            n.name,
            n.address,
            f"{n.capacity.device}/{n.capacity.dtype}",
            _gib(n.capacity.memory_bytes),
            f"{n.capacity.block_ms:.2f}ms",
            _stage(n),
            str(n.load.sessions),
            _load(n) + _slowdown(n),
            f"{n.last_heartbeat_s:.1f}s",
            _checks(n),
            _health(n),
        )
    return table


def _nodes_narrow(s: cpb.SwarmStatus) -> Table:
    """Two lines per node: name over address, device over memory and block time, and so on."""
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    table.add_column("node\naddress", overflow="fold")
    table.add_column("device\nmemory, block", overflow="fold")
    table.add_column("stage")
    table.add_column("sessions\nload", justify="right")
    table.add_column("health\nbeat, checks")
    for n in s.nodes:
        checks = _checks(n)
        _add_row(
            table,
            Text(n.name, style="bold") + "\n" + n.address,
            f"{n.capacity.device}/{n.capacity.dtype}\n"
            f"{_gib(n.capacity.memory_bytes)}, {n.capacity.block_ms:.2f}ms",
            _stage(n, "\n"),
            Text(str(n.load.sessions)) + _slowdown(n) + "\n" + _load(n),
            _health(n) + "\n" + f"{n.last_heartbeat_s:.1f}s, " + checks,
        )
    return table


def _replicas_style(replicas: int, target: int) -> str:
    return "bold red" if replicas == 0 else ("yellow" if replicas < target else "green")


def _coverage_table(s: cpb.SwarmStatus) -> Table:
    table = Table(title="coverage (replicas per unit)", title_justify="left")
    for u in s.units:
        table.add_column(Text(u.name.replace("block ", "b")), justify="center", no_wrap=True)
    table.add_row(
        *(
            Text(
                str(u.replicas) if u.replicas else "GAP",
                _replicas_style(u.replicas, s.replicas_target),
            )
            for u in s.units
        )
    )
    return table


def _coverage_runs(s: cpb.SwarmStatus) -> Text:
    """Coverage as runs of units with the same number of replicas: ``embed–b3 2, b4–head 1``."""
    text = Text("coverage (replicas): ")
    runs = [list(run) for _, run in groupby(s.units, key=lambda u: u.replicas)]
    for i, run in enumerate(runs):
        first, last = run[0].name.replace("block ", "b"), run[-1].name.replace("block ", "b")
        count = run[0].replicas
        text.append(first if first == last else f"{first}–{last}")
        text.append(f" {count}" if count else " GAP", _replicas_style(count, s.replicas_target))
        if i < len(runs) - 1:
            text.append(", ")
    return text
