"""Whom spot-checks speak against: a pure policy over the checks clients report.

A check compares the output of the node that ran a step with the outputs of the replicas
that re-ran it: each pair agrees (within the reported tolerance) or disagrees. One
disagreement cannot say which side is wrong, so a node is excluded only once two other
nodes stand against it:

- **confirmed**: two distinct nodes disagreed with it; or
- **corroborated**: a node disagreed with it, and a third node agreed with that node.

Nodes already excluded are no witnesses, so the honest partners of an excluded node are
cleared of what it said about them. With only two nodes serving a stage, the coordinator
is the third: it re-runs a disputed step itself (``arbiter.py``) and its comparisons count
like a node's, under the name ``coordinator``.

Comparisons are kept for ``window_s`` (and at most ``max_entries``); the ledger is soft
state like the rest of the coordinator's: a restart forgets it, and the exclusions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Comparison:
    """Two nodes' outputs for the same step of the same stage, compared."""

    a: str  # the node that ran the step in the generation
    b: str  # a replica that re-ran it
    start: int
    end: int
    pos: int
    error: float  # b's distance from a's output
    tolerance: float
    at: float  # when it was reported (the coordinator's clock)

    @property
    def agree(self) -> bool:
        return self.error <= self.tolerance

    def other(self, address: str) -> str:
        return self.b if address == self.a else self.a


class Ledger:
    def __init__(self, window_s: float = 3600.0, max_entries: int = 10_000) -> None:
        self.window_s = window_s
        self._entries: deque[Comparison] = deque(maxlen=max_entries)

    def add(self, comparisons: list[Comparison]) -> None:
        self._entries.extend(comparisons)

    def _recent(self, now: float) -> list[Comparison]:
        while self._entries and now - self._entries[0].at > self.window_s:
            self._entries.popleft()
        return list(self._entries)

    def tally(self, address: str, now: float) -> tuple[int, int]:
        """Checks involving ``address`` that agreed, and that disagreed."""
        return self.tallies(now).get(address, (0, 0))

    def tallies(self, now: float) -> dict[str, tuple[int, int]]:
        """``tally`` of every address at once, in one pass (a status lists every node)."""
        counts: dict[str, list[int]] = {}
        for c in self._recent(now):
            for address in {c.a, c.b}:
                counts.setdefault(address, [0, 0])[0 if c.agree else 1] += 1
        return {address: (passed, failed) for address, (passed, failed) in counts.items()}

    def verdict(self, address: str, excluded: set[str], now: float) -> str | None:
        """Why ``address`` should be excluded, or None. ``excluded`` are no witnesses."""
        recent = self._recent(now)
        against = [
            c
            for c in recent
            if address in (c.a, c.b) and not c.agree and c.other(address) not in excluded
        ]
        if not against:
            return None
        witnesses = sorted({c.other(address) for c in against})
        worst = max(against, key=lambda c: c.error / max(c.tolerance, 1e-12))
        evidence = (
            f"units [{worst.start}, {worst.end}) at position {worst.pos}: error "
            f"{worst.error:.3g} > tolerance {worst.tolerance:.3g}; "
            f"{len(against)} disagreement(s)"
        )
        if len(witnesses) >= 2:
            return f"spot-checks: {' and '.join(witnesses)} disagreed with it ({evidence})"
        (witness,) = witnesses
        for c in recent:
            if witness in (c.a, c.b) and c.agree:
                third = c.other(witness)
                if third != address and third not in excluded:
                    return (
                        f"spot-checks: {witness} disagreed with it and {third} agreed with "
                        f"{witness} ({evidence})"
                    )
        return None
