"""Per-caller quotas: what one caller may hold and spend on a node.

A caller is whoever calls this node: the client on a route's first hop, the previous node
on later ones (``nanoshard.rpc.caller_identity``: the swarm token's identity, else the
peer's host). Every limit is per caller, 0 = no limit; a refusal is ``QuotaExceeded``
naming the limit, its value and where the caller stands, so a user knows which flag or
which habit to change. Pure bookkeeping: the service asks, this answers.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nanoshard.errors import QuotaExceeded

WINDOW_S = 60.0


@dataclass(frozen=True)
class QuotaLimits:
    sessions: int = 0  # open sessions per caller
    max_length: int = 0  # positions one session may reserve
    tokens_per_minute: int = 0  # positions computed per caller over the last minute
    kv_bytes: int = 0  # KV memory (and replay material) reserved per caller


@dataclass(frozen=True)
class Holding:
    """What one of a caller's open sessions holds."""

    caller: str
    reserved_bytes: int


class Quotas:
    def __init__(self, limits: QuotaLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._spent: defaultdict[str, deque[tuple[float, int]]] = defaultdict(deque)

    def check_open(
        self, caller: str, max_length: int, nbytes: int, open_sessions: Iterable[Holding]
    ) -> None:
        """Refuse a new session of ``max_length`` positions reserving ``nbytes``."""
        limits = self.limits
        if limits.max_length and max_length > limits.max_length:
            raise QuotaExceeded(
                f"quota: max_length per session is {limits.max_length} on this node "
                f"(asked {max_length}: ask for at most that, e.g. "
                f"client.session(max_length={limits.max_length}))"
            )
        mine = [h for h in open_sessions if h.caller == caller]
        if limits.sessions and len(mine) >= limits.sessions:
            raise QuotaExceeded(
                f"quota: open sessions per client is {limits.sessions} "
                f"({caller} has {len(mine)} open): close some first"
            )
        held = sum(h.reserved_bytes for h in mine)
        if limits.kv_bytes and held + nbytes > limits.kv_bytes:
            raise QuotaExceeded(
                f"quota: KV memory per client is {limits.kv_bytes} bytes ({caller} holds "
                f"{held}, this session needs {nbytes})"
            )

    def charge_tokens(self, caller: str, n: int) -> None:
        """Count ``n`` positions computed for ``caller``; refuse if that goes over the
        per-minute limit (nothing is counted then)."""
        if not self.limits.tokens_per_minute:
            return
        now = self._clock()
        spent = self._spent[caller]
        while spent and spent[0][0] <= now - WINDOW_S:
            spent.popleft()
        used = sum(k for _, k in spent)
        if n > self.limits.tokens_per_minute:  # no wait will let it through
            raise QuotaExceeded(
                f"quota: tokens per minute per client is {self.limits.tokens_per_minute}: a "
                f"step of {n} positions can never pass it (send the prompt in smaller chunks)"
            )
        if used + n > self.limits.tokens_per_minute:
            wait = WINDOW_S - (now - spent[0][0]) if spent else WINDOW_S
            raise QuotaExceeded(
                f"quota: tokens per minute per client is {self.limits.tokens_per_minute} "
                f"({caller} used {used} in the last minute): retry in {wait:.0f} s",
                retry_after_s=wait,
            )
        spent.append((now, n))
        if len(self._spent) > 10_000:  # forget callers idle for a minute
            for who in [w for w, d in self._spent.items() if not d or d[-1][0] < now - WINDOW_S]:
                del self._spent[who]
