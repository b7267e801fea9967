"""What a node's steps measure as they run, for its heartbeats (``NodeLoad.live``).

The coordinator routes by these (``coordinator/registry.py``): a node's speed measured as
it started says what it can do on an idle machine, and these say what it does now — its
owner may have started a game since. Per decode step: its own compute (the median of the
last 9, and the 90th percentile of the last 64), and that compute over what its measured
capacity predicts for the units the step ran (the *speed ratio*: 1 as measured, 5 five
times slower; a group's member counts its share of the units, and its compute without the
time its collectives took, which a slow member makes the others wait); per
token of prompt chunks; positions computed and tokens drawn per second over the last
``WINDOW_S``; and, per next hop its sessions used, the round trip (a step's time there
less the next node's own time on it) and the bytes sent per second.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from nanoshard.engine import Stage
from nanoshard.v1 import coordinator_pb2 as cpb

WINDOW_S = 10.0  # rates are counted over this long
EWMA = 0.2  # weight of the newest figure (prompt chunks, next hops' round trips)
LATEST = 9  # a decode step's time and speed ratio: the median of the last this many
RECENT = 64  # decode steps the p90 is taken over
MAX_NEXT_HOPS = 8  # next-hop links reported (the most recently used)


class _Ewma:
    def __init__(self) -> None:
        self.value = 0.0

    def add(self, x: float) -> None:
        self.value = x if self.value == 0.0 else (1 - EWMA) * self.value + EWMA * x


class _Median:
    """The median of the last ``LATEST`` figures: it follows a lasting change within half
    of them, and one slow step (a first step after an idle minute, a pause) moves it not at
    all, where an EWMA jumps and then reads above the steps' own 90th percentile."""

    def __init__(self) -> None:
        self.latest: deque[float] = deque(maxlen=LATEST)

    def add(self, x: float) -> None:
        self.latest.append(x)

    @property
    def value(self) -> float:
        if not self.latest:
            return 0.0
        ordered = sorted(self.latest)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class _Rate:
    """A count per second over the last ``WINDOW_S``."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.events: deque[tuple[float, float]] = deque()

    def add(self, amount: float) -> None:
        self.events.append((self.clock(), amount))

    def per_s(self) -> float:
        cutoff = self.clock() - WINDOW_S
        while self.events and self.events[0][0] < cutoff:
            self.events.popleft()
        return sum(a for _, a in self.events) / WINDOW_S


class LiveStats:
    """A node's live figures (see the module doc); ``capacity`` is (block_ms, head_ms) as
    it measured them at start, when it has them (a ``serve`` node has none: no ratio)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.capacity: tuple[float, float] | None = None
        self.decode = _Median()
        self.recent: deque[float] = deque(maxlen=RECENT)
        self.prefill = _Ewma()
        self.ratio = _Median()
        self._share = 0  # the group size its ratio is of (1: alone; 0: no step yet)
        self.positions = _Rate(clock)
        self.sampled = _Rate(clock)
        self.last_step = clock()
        self.hops: OrderedDict[str, tuple[_Ewma, _Rate]] = OrderedDict()

    def step(
        self,
        stage: Stage,
        n_tokens: int,
        compute_ms: float,
        sampled: bool,
        collective_ms: float = 0.0,
    ) -> None:
        """A step of ``n_tokens`` positions on ``stage`` (a view, maybe) took ``compute_ms``,
        ``collective_ms`` of it in its group's collectives (a member of a group)."""
        self.last_step = self.clock()
        self.positions.add(n_tokens)
        if sampled:
            self.sampled.add(1)
        if n_tokens > 1:
            self.prefill.add(compute_ms / n_tokens)
            return
        self.decode.add(compute_ms)
        self.recent.append(compute_ms)
        expected = self.expected_ms(stage)
        share = stage.shard.size if stage.shard is not None else 1
        if share != self._share:  # alone after a group, or the other way: a new basis
            self.ratio, self._share = _Median(), share
        if expected > 0:
            # A member's own compute is what its collectives did not take: waiting there for
            # a slow member is that member's slowness, not this one's.
            self.ratio.add(max(compute_ms - collective_ms, 0.0) / expected)

    def forget_ratio(self) -> None:
        """The node joined a group or left one: its ratio was of another basis (all of each
        unit, or a share of it), and is not known again until its next decode step."""
        self.ratio, self._share = _Median(), 0

    def expected_ms(self, stage: Stage) -> float:
        """A decode step of ``stage``'s units, as the node's capacity measurement prices it
        (a member of a group computes its share: 1/size of each unit)."""
        if self.capacity is None:
            return 0.0
        block_ms, head_ms = self.capacity
        ms = block_ms * stage.n_blocks + (head_ms if stage.has_head else 0.0)
        return ms / stage.shard.size if stage.shard is not None else ms

    def hop(self, address: str, rtt_ms: float, nbytes: int) -> None:
        """A step went on to ``address``: its round trip, and the bytes sent."""
        if address not in self.hops:
            self.hops[address] = (_Ewma(), _Rate(self.clock))
            while len(self.hops) > MAX_NEXT_HOPS:
                self.hops.popitem(last=False)
        self.hops.move_to_end(address)
        rtt, sent = self.hops[address]
        rtt.add(max(rtt_ms, 0.0))
        sent.add(nbytes)

    def report(self) -> cpb.LiveLoad:
        recent = sorted(self.recent)
        return cpb.LiveLoad(
            decode_ms=self.decode.value,
            decode_ms_p90=recent[int(0.9 * (len(recent) - 1))] if recent else 0.0,
            prefill_ms_per_token=self.prefill.value,
            tokens_per_s=self.positions.per_s(),
            sampled_per_s=self.sampled.per_s(),
            speed_ratio=self.ratio.value,
            idle_s=self.clock() - self.last_step,
            next_hops=[
                cpb.HopLink(address=a, rtt_ms=rtt.value, bytes_per_s=sent.per_s())
                for a, (rtt, sent) in self.hops.items()
            ],
        )
