"""One generation's session on the swarm, from the client's side, with failover.

The client talks only to the first hop; each node forwards to the next and repairs its
own next hop (a replica, refilled from the activations it kept). What is left to the
client is the first hop and the route as a whole:

- the first hop is gone, lost the session, or holds less than it should: switch to a
  replica of the same stage (or the same node), open the session there, and replay the
  token ids it lacks, *in the chunks they were first sent in*, without forwarding (the
  later hops still hold their caches);
- a hop behind the first is gone with all its replicas (the error names it): avoid it,
  ask for a new route, open a new session and replay every step through it.

Replaying the original chunks reproduces every cache bit for bit, and sampling is a pure
function of (seed, position), so the tokens are those of a run without the failure.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from nanoshard import rpc
from nanoshard.codec import check_codec
from nanoshard.errors import (
    CacheMismatch,
    FailedPrecondition,
    NanoshardError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from nanoshard.generation import StepResult
from nanoshard.sampling import SamplingParams
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc

from .route import DEFAULT_PREFILL_CHUNK, Route, channel, trace_to_dict

log = logging.getLogger(__name__)
_END = object()


@dataclass
class RetryPolicy:
    """How hard a session tries before it gives up: finite, with backoff."""

    attempts: int = 6  # recoveries per step
    backoff_s: float = 0.1  # first wait; doubles each time
    max_backoff_s: float = 2.0
    avoid_s: float = 30.0  # how long a failed node is avoided


@dataclass
class Recovery:
    """A failure the session recovered from, for the result's timings."""

    pos: int  # the step's position
    kind: str  # "replica" (first hop replaced) | "reroute" (new route) | "refill"
    detail: str
    ms: float


class Avoid:
    """Addresses that failed recently, avoided until their time is up."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._until: dict[str, float] = {}

    def add(self, addresses: list[str]) -> None:
        now = time.monotonic()
        for a in addresses:
            self._until[a] = now + self.seconds

    def now(self) -> list[str]:
        t = time.monotonic()
        return [a for a, until in self._until.items() if until > t]


Planner = Callable[[list[str]], Route]  # avoid list -> a fresh route


class FirstHop:
    """The client's stream to the first hop of a route."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = channel(address)
        self.stub = pb_grpc.NodeStub(self._channel)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._replies: Iterator[pb.StepReply] | None = None

    def call(self, method: str, request: object) -> object:
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError as err:
            raise rpc.error_from_rpc(err, self.address) from None

    def step(self, request: pb.StepRequest) -> pb.StepReply:
        if self._replies is None:
            self._requests = queue.SimpleQueue()
            self._replies = self.stub.Steps(iter(self._requests.get, _END))
        self._requests.put(request)
        try:
            return next(self._replies)
        except grpc.RpcError as err:
            self._replies = None  # the stream ended with this error; the next step opens anew
            raise rpc.error_from_rpc(err, self.address) from None
        except StopIteration:
            self._replies = None
            raise Unavailable(f"{self.address} ended the session stream", [self.address]) from None

    def close(self) -> None:
        if self._replies is not None:
            self._requests.put(_END)
        self._channel.close()


@dataclass
class History:
    """Every chunk this session sent, as sent: what a replacement is refilled with."""

    chunks: list[tuple[int, list[int]]] = field(default_factory=list)  # (pos, token ids)

    @property
    def length(self) -> int:
        return self.chunks[-1][0] + len(self.chunks[-1][1]) if self.chunks else 0

    def since(self, pos: int) -> list[tuple[int, list[int]]]:
        """Chunks covering [pos, length); a chunk the hop holds part of is cut."""
        out = []
        for start, ids in self.chunks:
            if start + len(ids) <= pos:
                continue
            if start < pos:
                ids, start = ids[pos - start :], pos
            out.append((start, ids))
        return out


class SwarmSession:
    """A generation along a route, surviving the loss of nodes (see the module doc).

    Implements :class:`nanoshard.generation.Session`. ``planner`` gives a fresh route
    avoiding some addresses (None: the route is fixed, only its replicas can stand in).
    """

    def __init__(
        self,
        route: Route,
        params: SamplingParams,
        max_length: int,
        codec: str = "fp32",
        *,
        planner: Planner | None = None,
        retry: RetryPolicy | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        timeout_s: float = 120.0,
    ) -> None:
        self.params, self.max_length = params, max_length
        self.codec = check_codec(codec)
        self.planner = planner
        self.retry = retry or RetryPolicy()
        self.avoid = Avoid(self.retry.avoid_s)
        self.prefill_chunk = prefill_chunk
        self.timeout_s = timeout_s
        self.history = History()
        self.recoveries: list[Recovery] = []
        self._step_id = 0
        self.route = route
        self.session_id = secrets.token_bytes(16)
        self.first: FirstHop | None = None
        self._open_first(self._first_candidates())

    # ---- the route's ends -------------------------------------------------------------

    def _spec(self) -> pb.SessionSpec:
        p = self.params
        return pb.SessionSpec(
            session_id=self.session_id,
            max_length=self.max_length,
            codec=self.codec,
            sampling=pb.SamplingParams(
                temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed
            ),
        )

    def _first_candidates(self) -> list[str]:
        avoided = set(self.avoid.now())
        addresses = list(self.route.hops[0].addresses)
        return [a for a in addresses if a not in avoided] + [a for a in addresses if a in avoided]

    def _open_first(self, candidates: list[str]) -> int:
        """Open the session on the first candidate that takes it; return its length there."""
        hop = self.route.hops[0]
        errors: list[str] = []
        for address in candidates:
            first = FirstHop(address, self.timeout_s)
            try:
                reply = first.call(
                    "Open",
                    pb.OpenRequest(
                        spec=self._spec(), route=self.route.hops[1:], start=hop.start, end=hop.end
                    ),
                )
            except (Unavailable, ResourceExhausted, FailedPrecondition) as exc:
                first.close()
                if isinstance(exc, Unavailable) and exc.failed and address not in exc.failed:
                    raise  # a later hop is gone: the caller re-plans
                self.avoid.add([address])
                errors.append(str(exc))
                continue
            if self.first is not None:
                self.first.close()
            self.first = first
            return reply.length  # type: ignore[attr-defined]
        raise Unavailable(
            f"no node could open units [{hop.start}, {hop.end}): " + "; ".join(errors),
            list(candidates),
        )

    # ---- steps ------------------------------------------------------------------------

    def _request(self, pos: int, ids: list[int], *, forward: bool, sample: bool) -> pb.StepRequest:
        self._step_id += 1
        return pb.StepRequest(
            session_id=self.session_id,
            step_id=self._step_id,
            pos=pos,
            tokens=pb.Tokens(ids=ids),
            route=self.route.hops[1:] if forward else [],
            sample=sample,
        )

    def step(self, tokens: list[int], pos: int) -> StepResult:
        hops: list[dict] = []
        reply = None
        for i in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[i : i + self.prefill_chunk]
            last = i + len(chunk) == len(tokens)
            reply = self._send(pos + i, chunk, sample=last)
            self.history.chunks.append((pos + i, chunk))
            hops.extend(trace_to_dict(h) for h in reply.hops)
        if reply is None or not reply.has_token:
            raise NanoshardError("the route answered no token: does its last hop hold the head?")
        return StepResult(reply.token, hops)

    def _send(self, pos: int, ids: list[int], *, sample: bool) -> pb.StepReply:
        delay = self.retry.backoff_s
        last_error: NanoshardError | None = None
        for attempt in range(self.retry.attempts + 1):
            if attempt:
                time.sleep(delay)
                delay = min(delay * 2, self.retry.max_backoff_s)
            started = time.perf_counter()
            try:
                if last_error is not None:
                    self._recover(last_error, pos, started)
                assert self.first is not None
                return self.first.step(self._request(pos, ids, forward=True, sample=sample))
            except (Unavailable, NotFound, CacheMismatch) as exc:
                log.info("step at %d failed (%s); recovering", pos, exc)
                last_error = exc
        raise Unavailable(f"gave up after {self.retry.attempts} recoveries: {last_error}")

    def _recover(self, error: NanoshardError, pos: int, started: float) -> None:
        assert self.first is not None
        address = self.first.address
        if isinstance(error, Unavailable) and error.failed and address not in error.failed:
            # A hop behind the first one is gone with its replicas: a new route.
            self.avoid.add(error.failed)
            self._reroute(pos)
            kind, detail = "reroute", f"{', '.join(error.failed)} unreachable"
        elif isinstance(error, CacheMismatch):
            self._refill(error.length, pos)
            kind, detail = "refill", f"{address} held {error.length} of {pos} positions"
        else:  # the first hop is gone, or lost the session
            if isinstance(error, Unavailable):
                self.avoid.add([address])
            try:
                have = self._open_first(self._first_candidates())
                self._refill(have, pos)
                kind, detail = "replica", f"{address} -> {self.first.address}"
            except Unavailable as exc:  # no node of that stage left: a new route
                self.avoid.add(exc.failed)
                self._reroute(pos)
                kind, detail = "reroute", str(exc)
        self.recoveries.append(Recovery(pos, kind, detail, (time.perf_counter() - started) * 1e3))

    def _refill(self, have: int, pos: int) -> None:
        """Bring the first hop from ``have`` to ``pos`` positions, without forwarding."""
        assert self.first is not None
        if have > pos:
            raise FailedPrecondition(
                f"{self.first.address} holds {have} positions, more than the {pos} sent"
            )
        for start, ids in self.history.since(have):
            self.first.step(self._request(start, ids, forward=False, sample=False))

    def _reroute(self, pos: int) -> None:
        """A new route and a new session on it, refilled with everything sent so far."""
        if self.planner is None:
            raise Unavailable("a hop of this fixed route is gone and no coordinator can re-plan it")
        self.route = self.planner(self.avoid.now())
        self.session_id = secrets.token_bytes(16)
        self._open_first(self._first_candidates())
        assert self.first is not None
        for start, ids in self.history.since(0):
            self.first.step(self._request(start, ids, forward=True, sample=False))

    def close(self) -> None:
        if self.first is None:
            return
        with contextlib.suppress(NanoshardError):
            self.first.call("Close", pb.CloseRequest(session_id=self.session_id))
        self.first.close()
        self.first = None
