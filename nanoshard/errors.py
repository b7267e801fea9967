"""nanoshard's exceptions. Each maps to one gRPC status code, in exactly one place
(:func:`nanoshard.rpc.status_of`); messages say what was wrong and what to do."""

from __future__ import annotations


class NanoshardError(Exception):
    """Base of every error nanoshard raises on purpose."""


class InvalidArgument(NanoshardError):
    """The input is malformed: wrong shape, dtype, size, range or value."""


class NotFound(NanoshardError):
    """A named thing (session, model file, node) does not exist."""


class FailedPrecondition(NanoshardError):
    """The request is well-formed but does not fit the current state."""


class CacheMismatch(FailedPrecondition):
    """A step's start position does not match the KV cache; ``length`` is the real one."""

    def __init__(self, message: str, length: int) -> None:
        super().__init__(message)
        self.length = length


class ResourceExhausted(NanoshardError):
    """A budget is full (KV memory, sessions, message size)."""


class QuotaExceeded(ResourceExhausted):
    """A node's per-caller quota refused the caller: nobody is gone, and the same call later
    (``retry_after_s``, when the quota can tell) or fewer of them will be taken."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(NanoshardError):
    """A peer cannot be reached or stopped answering. ``failed`` names the nodes that
    failed: the peer called itself, or, relayed by it, nodes behind it on the route."""

    def __init__(self, message: str, failed: list[str] | None = None) -> None:
        super().__init__(message)
        self.failed = failed or []


class Unauthenticated(NanoshardError):
    """The call carries no valid swarm token (a private swarm, and a wrong or missing key)."""


class Stranger(Unauthenticated):
    """A coordinator answered without proof that it holds the swarm key: a stranger's (or
    an older nanoshard's). Raised by its caller, never sent."""


class Internal(NanoshardError):
    """Something failed inside a peer (a bug, or its device ran out of memory)."""


class CheckpointError(NanoshardError):
    """A checkpoint is missing, truncated or of another architecture."""
