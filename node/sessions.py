"""A node's sessions: their KV caches, the memory budget they share, and what each one
sent downstream (replay material). No gRPC here: the servicer calls in."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from nanoshard.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from nanoshard.hop import NextHop, Replay, activation_replay
from nanoshard.identity import SHARE_BYTES
from nanoshard.kv import KVCache
from nanoshard.sampling import SamplingParams

log = logging.getLogger(__name__)

SESSION_ID_BYTES = 16


@dataclass(frozen=True)
class SessionSpec:
    """What a session is, fixed when it opens (mirrors the wire's SessionSpec)."""

    session_id: bytes
    max_length: int
    codec: str
    sampling: SamplingParams
    client_share: bytes = b""  # the client's X25519 share for the session's MAC key, if any

    def __post_init__(self) -> None:
        if len(self.session_id) != SESSION_ID_BYTES:
            raise InvalidArgument(
                f"session_id must be {SESSION_ID_BYTES} bytes, got {len(self.session_id)}"
            )
        if self.max_length < 1:
            raise InvalidArgument(f"max_length must be >= 1, got {self.max_length}")
        if len(self.client_share) not in (0, SHARE_BYTES):
            raise InvalidArgument(
                f"client_share must be {SHARE_BYTES} bytes (or none), got {len(self.client_share)}"
            )


@dataclass
class NodeSession:
    spec: SessionSpec
    stage: Any  # the engine Stage the session runs on (kept even if the node moves on)
    cache: KVCache
    reserved_bytes: int
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_step_id: int = 0
    last_reply: Any = None  # (pos, reply) of last_step_id, answered again to a duplicate
    last_output: Any = None  # (step_id, pos, tokens, output) of the last step computed
    # What this node sent on, as sent: its replay material (refills, spot-checks).
    sent: Replay[Any] = field(default_factory=activation_replay)
    # What it signed for each chunk it sent (pos -> the trace's stage, digests, signature):
    # the replay material comes with the node's word for it.
    signed: dict[int, Any] = field(default_factory=dict)
    next: NextHop | None = None  # the link to the next hop of the bound route, if any
    caller: str = ""  # who opened it (rpc.caller_identity): whose quotas it counts against
    # agreement.input_digest of every input chunk it computed, running; and its value after
    # each chunk, by the position the chunk ends at: what the node signs a step over.
    inputs: Any = field(default_factory=hashlib.sha256)
    input_digests: dict[int, bytes] = field(default_factory=dict)
    # At the head, with the spec's client share: the session's MAC key and the signed share
    # that made it (answered to every Open of the session, and told once in a step's trace).
    mac_key: bytes | None = None
    session_key: Any = None
    key_told: bool = False
    closed: str = ""  # why it was closed here, once it is: a step still under way fails so

    @property
    def length(self) -> int:
        return self.cache.length

    def touch(self) -> None:
        self.last_used = time.monotonic()


class SessionTable:
    """Open sessions and the KV memory they reserve; at most ``budget_bytes`` in all."""

    def __init__(self, budget_bytes: int, ttl_s: float) -> None:
        self.budget_bytes = budget_bytes
        self.ttl_s = ttl_s
        self._sessions: dict[bytes, NodeSession] = {}
        self._held = 0  # reserved by sessions still being opened

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def used_bytes(self) -> int:
        return self._held + sum(s.reserved_bytes for s in self._sessions.values())

    def find(self, session_id: bytes) -> NodeSession | None:
        return self._sessions.get(session_id)

    def get(self, session_id: bytes) -> NodeSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise _not_open(session_id)
        session.last_used = time.monotonic()
        return session

    def require(self, session: NodeSession) -> None:
        """``session`` is still the open one of its id: a close or an expiry may have come
        first while a caller waited for its lock."""
        if self._sessions.get(session.spec.session_id) is not session:
            raise _not_open(session.spec.session_id)

    def reserve(self, nbytes: int) -> None:
        """Refuse at once when ``nbytes`` more would not fit the budget."""
        free = self.budget_bytes - self.used_bytes
        if nbytes > free:
            raise ResourceExhausted(
                f"KV memory budget full: the session needs {nbytes / 2**20:.1f} MiB, "
                f"{max(free, 0) / 2**20:.1f} MiB of {self.budget_bytes / 2**20:.1f} MiB free; "
                "try another replica, a shorter max_length, or later"
            )

    @contextlib.contextmanager
    def reservation(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the budget while a session is being opened (refused at once
        when they do not fit), so concurrent opens cannot overcommit it."""
        self.reserve(nbytes)
        self._held += nbytes
        try:
            yield
        finally:
            self._held -= nbytes

    def add(self, session: NodeSession) -> None:
        """Register a session whose memory is held by :meth:`reservation`."""
        if session.spec.session_id in self._sessions:
            raise FailedPrecondition("this session id is already open")
        self._sessions[session.spec.session_id] = session

    def remove(self, session_id: bytes) -> NodeSession | None:
        return self._sessions.pop(session_id, None)

    def expired(self, now: float | None = None) -> list[NodeSession]:
        """Remove and return the sessions idle for longer than the TTL."""
        now = time.monotonic() if now is None else now
        stale = [
            s
            for s in self._sessions.values()
            if now - s.last_used > self.ttl_s and not s.lock.locked()
        ]
        for s in stale:
            del self._sessions[s.spec.session_id]
        return stale

    def all(self) -> list[NodeSession]:
        return list(self._sessions.values())


def _not_open(session_id: bytes) -> NotFound:
    return NotFound(
        f"session {session_id.hex()[:12]}… is not open on this node "
        "(closed, expired, or the node restarted): open it again"
    )
