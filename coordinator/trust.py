"""What spot-checks said: a pure record of the comparisons clients report, for the tallies
``nanoshard status`` shows (checks passed and failed, per node).

A comparison is a caller's word, and a caller's word excludes no one: the coordinator
excludes a node only on evidence it verified itself, the node's own signed output for a
step that the coordinator's re-run contradicts (``service.ReportCheck``, ``arbiter.py``).
Those re-runs are recorded here too, under the name ``coordinator``.

Comparisons are kept for ``window_s`` (and at most ``max_entries``): soft state, like the
rest of the coordinator's.

A caller's word does one thing more: it raises a node's check rate. Routes suggest that
clients follow every session through a node new to checks (fewer than
``PROBATION_PASSES`` agreeing checks in the window) or under suspicion (more than
``SUSPECT_SHARE`` of its checks disagreed): a liar never leaves probation, and a forged
report costs its target only more checks (``suggested_rate``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

ARBITER = "coordinator"  # the coordinator's name as a witness in the ledger (its re-runs)
PROBATION_PASSES = 4  # agreeing checks before clients follow a node at their own rate
SUSPECT_SHARE = 0.2  # a node more of whose checks than this disagreed is followed always


def suggested_rate(passed: int, failed: int) -> float:
    """The share of sessions through a node that routes suggest a shadow follow: 1 for a
    node new to checks or under suspicion, else 0 (the client's own rate)."""
    if passed < PROBATION_PASSES or failed > SUSPECT_SHARE * (passed + failed):
        return 1.0
    return 0.0


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
        """``tally`` of every address at once (a status lists every node). A disagreement
        with a node the coordinator's own re-run has contradicted counts against that node
        only: the honest witness of a liar's check is not held to have failed it."""
        recent = self._recent(now)
        caught = {c.b for c in recent if c.a == ARBITER and not c.agree}
        counts: dict[str, list[int]] = {}
        for c in recent:
            sides = {c.a, c.b}
            if not c.agree and len(sides & caught) == 1:
                sides &= caught
            for address in sides:
                counts.setdefault(address, [0, 0])[0 if c.agree else 1] += 1
        return {address: (passed, failed) for address, (passed, failed) in counts.items()}
