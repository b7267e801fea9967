"""One generation's session on the swarm, from the client's side, with failover.

The client talks only to the first hop; each node forwards to the next and repairs its
own next hop (a replica, refilled from the activations it kept). What is left to the
client is the first hop and the route as a whole:

- the first hop is gone, lost the session, or holds less than it should: switch to a
  replica of the same stage (or the same node), open the session there, and replay the
  token ids it lacks, *in the chunks they were first sent in*, without forwarding (the
  later hops still hold their caches);
- a hop behind the first is gone with all its replicas (the error names it): avoid it,
  ask for a new route, open a new session and replay every step through it;
- the answer to a step was lost after the first hop ran it: send the step again with the
  same step id, so the hop answers again (or forwards its stored output) without recompute.
  Refill and replay steps get fresh ids.

Replaying the original chunks reproduces every cache bit for bit, and sampling is a pure
function of (seed, position), so the tokens are those of a run without the failure.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from nanoshard import rpc
from nanoshard.codec import check_codec
from nanoshard.errors import (
    CacheMismatch,
    FailedPrecondition,
    InvalidArgument,
    NanoshardError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from nanoshard.generation import DEFAULT_PREFILL_CHUNK, StepResult
from nanoshard.sampling import SamplingParams
from nanoshard.security import Security
from nanoshard.trace import trace_to_dict
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc
from nanoshard.wire import sampling_to_wire

from .checks import Checker
from .route import Route

log = logging.getLogger(__name__)
_END = object()
DEFAULT_TIMEOUT_S = 60.0  # per step and per call: a hop silent for longer counts as gone
CLOSE_TIMEOUT_S = 10.0  # closing a session at the end of a generation
ABANDON_TIMEOUT_S = 2.0  # closing a session left behind by a failover: best effort, brief


@dataclass
class RetryPolicy:
    """How hard a session tries before it gives up: finite, with backoff."""

    attempts: int = 6  # recoveries per step
    backoff_s: float = 0.1  # first wait; doubles each time
    max_backoff_s: float = 2.0
    avoid_s: float = 30.0  # how long a failed node is avoided
    route_wait_s: float = 20.0  # how long to wait for a route (a coordinator restarting)


@dataclass
class Recovery:
    """A failure the session recovered from, for the result's timings."""

    pos: int  # the step's position
    # "retry" (same step again) | "replica" (first hop replaced) | "reroute" | "refill", or
    # "repair" (a node replaced or refilled its next hop; detail names both)
    kind: str
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


class Watchdog:
    """Cancels a call whose deadline has passed. One thread for a stream's whole life, so a
    step costs two lock round trips, not a thread of its own."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._call: Any = None
        self._deadline: float | None = None
        self._fired = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="step-deadline", daemon=True)
        self._thread.start()

    def arm(self, call: Any, timeout_s: float) -> None:
        with self._cond:
            self._call, self._deadline, self._fired = call, time.monotonic() + timeout_s, False
            self._cond.notify()

    def disarm(self) -> bool:
        """Stop watching; True if the deadline fired (and the call was cancelled)."""
        with self._cond:
            self._deadline, self._call = None, None
            return self._fired

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._fired, self._deadline = True, None
                self._call.cancel()  # wakes the step blocked reading the call


class FirstHop:
    """The client's stream to the first hop of a route. Every step has a deadline: a hop
    that does not answer within ``timeout_s`` counts as gone."""

    def __init__(self, address: str, timeout_s: float, security: Security | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = rpc.open_channel(address, security)
        self.stub = pb_grpc.NodeStub(self._channel)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call: Any = None  # the open Steps stream: an iterator of replies, with cancel()
        self._watchdog = Watchdog()

    def call(self, method: str, request: object, timeout_s: float | None = None) -> object:
        try:
            return getattr(self.stub, method)(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as err:
            raise rpc.error_from_rpc(err, self.address) from None

    def step(self, request: pb.StepRequest) -> pb.StepReply:
        if self._call is None:
            self._requests = queue.SimpleQueue()
            self._call = self.stub.Steps(iter(self._requests.get, _END))
        call = self._call
        self._requests.put(request)
        # The stream as a whole has no deadline (it lives as long as the session), so each
        # step gets its own: cancelling the call wakes the read below.
        self._watchdog.arm(call, self.timeout_s)
        failure: BaseException | None = None
        try:
            reply = next(call)
        except (grpc.RpcError, StopIteration) as exc:
            failure = exc
        finally:
            expired = self._watchdog.disarm()  # waits out a deadline firing right now
        if failure is None and not expired:
            return reply
        self._end_stream()  # the stream is over; the next step opens a new one
        if failure is None:
            return reply  # answered just as the deadline cancelled the stream
        if expired:
            raise Unavailable(
                f"{self.address}: no answer to the step at position {request.pos} within "
                f"{self.timeout_s:g} s",
                [self.address],
            )
        if isinstance(failure, StopIteration):
            raise Unavailable(f"{self.address} ended the session stream", [self.address])
        raise rpc.error_from_rpc(failure, self.address) from None  # type: ignore[arg-type]

    def _end_stream(self) -> None:
        # gRPC reads the requests on a thread of its own, blocked on this queue until told
        # the stream is over: without the end marker that thread would live forever.
        self._requests.put(_END)
        self._call = None

    def close(self) -> None:
        if self._call is not None:
            self._end_stream()
        self._watchdog.close()
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
    avoiding some addresses (None: the route is fixed, only its replicas can stand in);
    with ``route=None`` it gives the first route too. With ``planner=None`` and ``RetryPolicy(attempts=0)`` it is a plain session along a
    fixed route: any failure is raised at once.
    """

    def __init__(
        self,
        route: Route | None,
        params: SamplingParams,
        max_length: int,
        codec: str = "fp32",
        *,
        planner: Planner | None = None,
        retry: RetryPolicy | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        security: Security | None = None,
        checker: Checker | None = None,
    ) -> None:
        self.security = security
        self.checker = checker
        self.params, self.max_length = params, max_length
        self.codec = check_codec(codec)
        self.planner = planner
        self.retry = retry or RetryPolicy()
        self.avoid = Avoid(self.retry.avoid_s)
        self.prefill_chunk = prefill_chunk
        self.timeout_s = timeout_s
        self.history = History()
        self.recoveries: list[Recovery] = []
        self._served: list[str] = []  # the nodes that ran the last step, in route order
        self._step_id = 0
        self.session_id = secrets.token_bytes(16)
        self.first: FirstHop | None = None
        self._open(route)

    # ---- the route's ends -------------------------------------------------------------

    def _spec(self) -> pb.SessionSpec:
        return pb.SessionSpec(
            session_id=self.session_id,
            max_length=self.max_length,
            codec=self.codec,
            sampling=sampling_to_wire(self.params),
        )

    def _first_candidates(self) -> list[str]:
        avoided = set(self.avoid.now())
        addresses = list(self.route.hops[0].addresses)
        return [a for a in addresses if a not in avoided] + [a for a in addresses if a in avoided]

    def _open(self, route: Route | None) -> None:
        """Open the session on the first hop of ``route``, or of one the planner gives.
        While the planner has none (a coordinator restarting) or no node of the first hop
        takes the session (one died since the coordinator last heard from it), ask again,
        avoiding the failed nodes, with backoff, for up to ``retry.route_wait_s``."""
        if route is None and self.planner is None:
            raise InvalidArgument("a session needs a route, or a planner to ask for one")
        delay, give_up = self.retry.backoff_s, time.monotonic() + self.retry.route_wait_s
        while True:
            try:
                if route is None:
                    assert self.planner is not None
                    route = self.planner(self.avoid.now())
                self.route = route
                self._open_first(self._first_candidates())
                return
            except Unavailable as exc:
                if self.planner is None or time.monotonic() + delay > give_up:
                    raise
                self.avoid.add(exc.failed)
                route = None
                time.sleep(delay)
                delay = min(2 * delay, self.retry.max_backoff_s)

    def _open_first(self, candidates: list[str]) -> int:
        """Open the session on the first candidate that takes it; return its length there."""
        hop = self.route.hops[0]
        errors: list[str] = []
        for address in candidates:
            first = FirstHop(address, self.timeout_s, self.security)
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
            old, self.first = self.first, first
            if old is not None:
                if old.address != address:  # free the old hop now; the later ones go on
                    self._abandon(old, self.session_id, this_hop_only=True)
                old.close()
            return reply.length  # type: ignore[attr-defined]
        raise Unavailable(
            f"no node could open units [{hop.start}, {hop.end}): " + "; ".join(errors),
            list(candidates),
        )

    @staticmethod
    def _abandon(first: FirstHop, session_id: bytes, *, this_hop_only: bool = False) -> None:
        """Close a session left behind, so its nodes free their KV memory now rather than
        at their TTL. Best effort and brief: the node may well be gone."""
        request = pb.CloseRequest(session_id=session_id, this_hop_only=this_hop_only)
        with contextlib.suppress(NanoshardError):
            first.call("Close", request, ABANDON_TIMEOUT_S)

    # ---- steps ------------------------------------------------------------------------

    def _next_step_id(self) -> int:
        self._step_id += 1
        return self._step_id

    def _request(
        self,
        step_id: int,
        pos: int,
        ids: list[int],
        *,
        forward: bool,
        sample: bool,
        return_output: bool = False,
    ) -> pb.StepRequest:
        return pb.StepRequest(
            session_id=self.session_id,
            step_id=step_id,
            pos=pos,
            tokens=pb.Tokens(ids=ids),
            route=self.route.hops[1:] if forward else [],
            sample=sample,
            return_output=return_output,
        )

    def step(self, tokens: list[int], pos: int) -> StepResult:
        self._leave_excluded(pos)
        hops: list[dict] = []
        reply = None
        check = None  # the hop a spot-check re-runs this step on, if any
        for i in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[i : i + self.prefill_chunk]
            last = i + len(chunk) == len(tokens)
            if last and self.checker is not None:
                check = self.checker.plan(self.route)
            # a check of the head compares logits: the route's last hop answers them
            head = check is not None and check == len(self.route.hops) - 1
            reply = self._send(pos + i, chunk, sample=last, return_output=head)
            self.history.chunks.append((pos + i, chunk))
            hops.extend(trace_to_dict(h) for h in reply.hops)
            for h in reply.hops:  # repairs made behind the first hop show in the traces
                if h.repair:
                    self.recoveries.append(
                        Recovery(pos + i, "repair", f"{h.node}: {h.repair}", h.downstream_ms)
                    )
        if reply is None or not reply.has_token:
            raise NanoshardError("the route answered no token: does its last hop hold the head?")
        self._served = [h.address for h in reply.hops]
        if check is not None and self.checker is not None:
            self.checker.gather(self.route, check, self._spec(), self.history.chunks, reply)
        return StepResult(reply.token, hops)

    def _leave_excluded(self, pos: int) -> None:
        """If spot-checks got a node of this session excluded, go on along a new route
        (replayed from token ids): what that node computes is not to be trusted."""
        if self.checker is None or self.planner is None:
            return
        bad = sorted(set(self.checker.excluded(self._served)))
        if not bad:
            return
        started = time.perf_counter()
        self.avoid.add(bad)
        self._reroute(pos)
        self._served = []
        ms = (time.perf_counter() - started) * 1e3
        self.recoveries.append(Recovery(pos, "reroute", f"{', '.join(bad)} excluded", ms))

    def _send(
        self, pos: int, ids: list[int], *, sample: bool, return_output: bool = False
    ) -> pb.StepReply:
        # One step id for every attempt: a node that ran the step already (and whose answer
        # was lost) then answers it again, or forwards its stored output, instead of
        # refusing a second copy of positions it holds.
        step_id = self._next_step_id()
        delay = self.retry.backoff_s
        last_error: NanoshardError | None = None
        ahead = 0  # answers "I hold more than pos" to this step
        for attempt in range(self.retry.attempts + 1):
            if attempt:
                time.sleep(delay)
                delay = min(delay * 2, self.retry.max_backoff_s)
            started = time.perf_counter()
            try:
                if last_error is not None:
                    self._recover(last_error, pos, len(ids), ahead, started)
                assert self.first is not None
                request = self._request(
                    step_id, pos, ids, forward=True, sample=sample, return_output=return_output
                )
                return self.first.step(request)
            except (Unavailable, NotFound, CacheMismatch) as exc:
                log.info("step at %d failed (%s); recovering", pos, exc)
                last_error = exc
                if isinstance(exc, CacheMismatch) and exc.length > pos:
                    ahead += 1
        raise Unavailable(f"gave up after {self.retry.attempts} recoveries: {last_error}")

    def _recover(self, error: NanoshardError, pos: int, n: int, ahead: int, started: float) -> None:
        """Make the next attempt of the step at ``pos`` (``n`` tokens) possible."""
        assert self.first is not None
        address = self.first.address
        if isinstance(error, Unavailable) and error.failed and address not in error.failed:
            # A hop behind the first one is gone with its replicas: a new route.
            self.avoid.add(error.failed)
            self._reroute(pos)
            kind, detail = "reroute", f"{', '.join(error.failed)} unreachable"
        elif isinstance(error, CacheMismatch) and error.length > pos and ahead < 2:
            # It ran this step before (the answer was lost): the same step id gets its
            # stored output answered or forwarded again, nothing recomputed.
            kind, detail = "retry", f"{address} already held {error.length} positions"
        elif isinstance(error, CacheMismatch) and error.length <= pos:
            self._refill(error.length, pos)
            kind, detail = "refill", f"{address} held {error.length} of {pos} positions"
        else:  # the first hop is gone, lost the session, or cannot answer this step again
            if not isinstance(error, NotFound):
                self.avoid.add([address])
            try:
                have = self._open_first(self._first_candidates())
                if have > pos and (have != pos + n or ahead >= 2):
                    raise Unavailable(
                        f"{self.first.address} holds {have} positions, more than the {pos} "
                        "sent, and cannot answer this step again",
                        [self.first.address],
                    )
                self._refill(have, pos)
                kind, detail = "replica", f"{address} -> {self.first.address}"
            except Unavailable as exc:  # no node of that stage left: a new route
                self.avoid.add(exc.failed)
                self._reroute(pos)
                kind, detail = "reroute", str(exc)
        self.recoveries.append(Recovery(pos, kind, detail, (time.perf_counter() - started) * 1e3))

    def _refill(self, have: int, pos: int) -> None:
        """Bring the first hop from ``have`` to ``pos`` positions, without forwarding (the
        later hops hold them). A hop already past ``pos`` gets nothing."""
        assert self.first is not None
        for start, ids in self.history.since(have):
            request = self._request(self._next_step_id(), start, ids, forward=False, sample=False)
            self.first.step(request)

    def _reroute(self, pos: int) -> None:
        """A new route and a new session on it, refilled with everything sent so far."""
        if self.planner is None:
            raise Unavailable("a hop of this fixed route is gone and no coordinator can re-plan it")
        route = self.planner(self.avoid.now())
        if self.first is not None:  # the old route's nodes free the old session now
            self._abandon(self.first, self.session_id)
        self.route = route
        self.session_id = secrets.token_bytes(16)
        self._open_first(self._first_candidates())
        assert self.first is not None
        for start, ids in self.history.since(0):
            request = self._request(self._next_step_id(), start, ids, forward=True, sample=False)
            self.first.step(request)

    def close(self) -> None:
        if self.first is None:
            return
        with contextlib.suppress(NanoshardError):  # else the nodes' TTL frees it
            self.first.call("Close", pb.CloseRequest(session_id=self.session_id), CLOSE_TIMEOUT_S)
        self.first.close()
        self.first = None
