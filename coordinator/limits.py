"""Bounded memory for what strangers send the coordinator: a set that forgets its oldest
members, and a rate limit per caller. Pure, no I/O; ``now`` is passed in."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from nanoshard.errors import ResourceExhausted

MAX_CALLERS = 10_000  # callers a rate limit remembers (the least recent go first)


class Bounded:
    """A set of at most ``size`` members; adding one more forgets the oldest."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._members: OrderedDict[Hashable, None] = OrderedDict()

    def add(self, member: Hashable) -> None:
        self._members[member] = None
        self._members.move_to_end(member)
        while len(self._members) > self.size:
            self._members.popitem(last=False)

    def __contains__(self, member: object) -> bool:
        return member in self._members

    def __len__(self) -> int:
        return len(self._members)


class RateLimit:
    """At most ``count`` calls per ``per_s`` seconds per caller (a token bucket each)."""

    def __init__(self, count: int, per_s: float, callers: int = MAX_CALLERS) -> None:
        self.count, self.per_s, self.callers = count, per_s, callers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def take(self, caller: str, now: float) -> None:
        """Count a call of ``caller``; RESOURCE_EXHAUSTED once it is over its rate."""
        tokens, at = self._buckets.pop(caller, (float(self.count), now))
        tokens = min(self.count, tokens + (now - at) * self.count / self.per_s)
        if tokens < 1:
            self._buckets[caller] = (tokens, now)
            raise ResourceExhausted(
                f"at most {self.count} of these calls per {self.per_s:g} s: try again later"
            )
        self._buckets[caller] = (tokens - 1, now)
        while len(self._buckets) > self.callers:
            self._buckets.popitem(last=False)
