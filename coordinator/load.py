"""What the coordinator knows of each node's load, live: its own reports (``node/live.py``)
and the routes handed out that its reports cannot show yet. Pure policy, no I/O.

Routing weighs a node by its capacity measured at start, times ``speed_factor``: the speed
ratio its steps measure now (a volunteer whose owner started a game runs 5 times slower
than it measured), fading back to 1 as the figure ages — a node that routes avoid runs no
steps that could show it recovered, so after a minute or two it is tried again. And by its
load: the sessions and queued steps it reported, plus the routes handed out through it
since (``Handouts``), so that a burst of new sessions spreads over the replicas instead
of all taking the route that was best a heartbeat ago.

Placement weighs a node by its measured capacity times its ``slowdown``
(``placement_slowdown``): the same live ratio, but over what the other nodes' ratios share
(``shared_ratios``, fresh ones as they run, the others at their lowest: a busy swarm, or
nodes sharing a machine, slows everyone, and moving stages helps nobody; a group's member
over its partners' compute, ``partners_ratio``; a node is not judged while no other node
has a figure), and with hysteresis, since moving a stage costs a fetch and a load while a
route costs nothing. A node counts as slowed once fresh steps run ``SLOW`` times its
measurement, follows its ratio from then on only when it moves by half again, and counts
as recovered once fresh steps run under ``RECOVERED`` times it, or once it has run
nothing for ``RECHECK_S`` (placement may then give it work to show it). Noise on a shared
machine (1.5-2x here) moves no stage.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

FADE_S = 60.0  # a node's live speed ratio weighs e^-(idle/FADE_S): its age since its last step
MIN_RATIO, MAX_RATIO = 0.5, 100.0  # what a report may move a node's speed by
OPEN_S = 0.5  # a route handed out shows in its nodes' session counts within this after
KEEP_S = 120.0  # hand-outs kept at most this long (heartbeats stopped: the node is gone)
SLOW = 3.0  # a live speed ratio from which placement counts a node as slowed ...
RECOVERED = 1.5  # ... and below which as recovered
FOLLOW = 1.5  # a slowed node's ratio is followed when it moves by this factor
FRESH_S = 30.0  # a ratio counts for placement if the node ran a step this recently
RECHECK_S = 600.0  # a slowed node idle this long is given its measured speed back


@dataclass(frozen=True)
class LiveReport:
    """A node's ``NodeLoad.live`` (0: not measured)."""

    decode_ms: float = 0.0
    decode_ms_p90: float = 0.0
    prefill_ms_per_token: float = 0.0
    tokens_per_s: float = 0.0
    sampled_per_s: float = 0.0
    speed_ratio: float = 0.0
    idle_s: float = 0.0
    next_hops: dict[str, tuple[float, float]] = field(default_factory=dict)  # rtt_ms, B/s


def speed_factor(live: LiveReport) -> float:
    """How many times its measured capacity a node's steps take now, as routing counts it."""
    if live.speed_ratio <= 0:
        return 1.0
    ratio = min(max(live.speed_ratio, MIN_RATIO), MAX_RATIO)
    return 1.0 + (ratio - 1.0) * math.exp(-max(live.idle_s, 0.0) / FADE_S)


def fresh(live: LiveReport) -> bool:
    return live.speed_ratio > 0 and live.idle_s <= FRESH_S


def shared_ratios(
    reports: Sequence[LiveReport], rests: Sequence[float] | None = None
) -> list[float | None]:
    """For each report, the median speed ratio of the *other* nodes (at least 1; None while
    none has one: the node is not judged yet, as the first of a route's nodes to report
    after its first steps would be against nothing): the slowdown they share, which is not
    the node's own. A fresh report
    counts as it runs now; another node counts with the lowest ratio it reported
    (``rests``, 0: none), how its steps run at rest — above 1 where a step's fixed cost is
    most of it (a tiny model: 3-4 x on a busy machine), which a node that routes use alone
    would otherwise be counted slow for."""
    rests = rests if rests is not None else [0.0] * len(reports)
    values = [r.speed_ratio if fresh(r) else rest for r, rest in zip(reports, rests, strict=True)]
    order = sorted((i for i, v in enumerate(values) if v > 0), key=values.__getitem__)
    ratios = [values[i] for i in order]
    rank = {i: k for k, i in enumerate(order)}
    others = [_median_without(ratios, rank.get(i)) for i in range(len(reports))]
    return [max(ratio, 1.0) if ratio else None for ratio in others]


def partners_ratio(
    partners: Sequence[LiveReport], scales: Sequence[float] | None = None
) -> float | None:
    """What a group's member is measured against: the median fresh speed ratio of its
    partners (at least 1), who run the same shapes in step with it, so share whatever a
    step costs beyond its units' compute (on a small model, most of it); None while none of
    them has one (the member is not judged). ``scales``: each partner's measured step time
    over the member's, for the group's stage. A ratio is its node's compute over its own
    measurement, and two nodes of one host measure a block from 0.14 to 0.93 ms at start-up:
    scaled so, a partner's ratio says how its compute compares with the member's
    measurement, so partners computing alike count alike."""
    scales = scales if scales is not None else [1.0] * len(partners)
    ratios = sorted(r.speed_ratio * s for r, s in zip(partners, scales, strict=True) if fresh(r))
    return max(_median_without(ratios, None), 1.0) if ratios else None


def _median_without(ratios: list[float], skip: int | None) -> float:
    """The median of sorted ``ratios`` less the one at index ``skip`` (0 if none is left)."""
    n = len(ratios) - (skip is not None)
    if n == 0:
        return 0.0

    def at(k: int) -> float:
        return ratios[k] if skip is None or k < skip else ratios[k + 1]

    return at(n // 2) if n % 2 else (at(n // 2 - 1) + at(n // 2)) / 2


def placement_slowdown(current: float, live: LiveReport, shared: float = 1.0) -> float:
    """The factor placement multiplies a node's measured step times by, given the one it
    used so far (``current``, 1: as measured), the node's newest report and the slowdown
    the other nodes share (``shared_ratios``)."""
    ratio = min(live.speed_ratio / max(shared, 1.0), MAX_RATIO)
    fresh = ratio > 0 and live.idle_s <= FRESH_S
    if current > 1.0:  # slowed
        if not fresh:
            return 1.0 if live.idle_s >= RECHECK_S else current
        if ratio < RECOVERED:
            return 1.0
        if ratio >= current * FOLLOW or ratio <= current / FOLLOW:
            return max(ratio, 1.0)
        return current
    return ratio if fresh and ratio >= SLOW else 1.0


class Handouts:
    """When routes through each node were handed out, lately."""

    def __init__(self) -> None:
        self.times: dict[str, deque[float]] = {}

    def copy(self) -> Handouts:
        other = Handouts()
        other.times = {a: deque(t) for a, t in self.times.items()}
        return other

    def add(self, addresses: Iterable[str], now: float) -> None:
        for address in addresses:
            self.times.setdefault(address, deque()).append(now)

    def pending(self, address: str, reported_at: float) -> int:
        """Sessions handed to ``address`` that its report at ``reported_at`` cannot hold."""
        count = 0
        for t in reversed(self.times.get(address, ())):  # newest first: stop at the first held
            if t <= reported_at - OPEN_S:
                break
            count += 1
        return count

    def prune(self, now: float) -> None:
        for address in list(self.times):
            times = self.times[address]
            while times and times[0] < now - KEEP_S:
                times.popleft()
            if not times:
                del self.times[address]
