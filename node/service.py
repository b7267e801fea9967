"""The data plane's servicer: validate a request, run the stage on the compute worker,
forward downstream, relay the answer up. Policy lives elsewhere (a step's input and compute
job in ``inputs``, what it signs in ``evidence``, codecs, sampling, sessions); this file is
the shell that connects them to gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from nanoshard import PROTOCOL_VERSION, agreement, identity, rpc
from nanoshard.engine import Stage
from nanoshard.errors import (
    CacheMismatch,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NanoshardError,
    ResourceExhausted,
    Unavailable,
)
from nanoshard.hop import SLOWER, Channels, NextHop, onward_timeout
from nanoshard.kv import KVCache
from nanoshard.security import Security
from nanoshard.tp import CollectiveError
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc

from . import evidence
from .faults import Delay, Fault, Forge, Slow, fault_from_env
from .group import GroupStep, Membership, acks
from .inputs import HEADROOM_BYTES, already_computed, prepare
from .links import PING_MAX_BYTES
from .live import LiveStats
from .metrics import NodeMetrics
from .quotas import Holding, QuotaLimits, Quotas
from .sessions import NodeSession, SessionSpec, SessionTable
from .wire import spec_from_wire, spec_to_wire
from .worker import ComputeWorker, Timed

Request = TypeVar("Request")  # what a stream carries: steps, or a group's commands
log = logging.getLogger(__name__)


DISSOLVED = "the node was given another stage"  # why a group placement dissolved ends
RELEASE_EVERY_S = 5.0  # freed memory goes back to the OS at least this often


@dataclass
class NodeIdentity:
    name: str
    address: str
    model_id: str
    epoch: bytes


def release_freed_memory() -> None:
    """Free what only reference cycles still hold, then hand freed heap memory back to the
    OS. A call aborted on bad input leaves a cycle (exception, traceback, frame) holding its
    request until the cycle collector runs, and KV caches are many blocks of tens of KB that
    glibc's malloc keeps after they are freed: without this, a node that once held many
    sessions, or was sent big garbage, stays that big. ``malloc_trim`` is skipped off glibc."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _on_result(then: Callable[[Any], None], job: asyncio.Future) -> None:
    """A worker job's done-callback: ``then(its value)`` if it succeeded."""
    if not job.cancelled() and job.exception() is None:
        then(job.result().value)


def handles_errors(method: Callable) -> Callable:
    """Answer nanoshard errors with their gRPC status; anything else is a bug, logged. (For
    a call or a stream alike: a stream's handler gets its requests' reader.)"""

    @functools.wraps(method)
    async def wrapper(self: NodeService, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except NanoshardError as exc:
            await rpc.abort(context, exc)
        except Exception as exc:  # a bug or a device failure (out of memory): INTERNAL
            log.exception("%s failed", method.__name__)
            await rpc.abort(context, Internal(f"{method.__name__} failed on this node: {exc}"))

    return wrapper


class NodeService(pb_grpc.NodeServicer):
    def __init__(
        self,
        stage: Stage | None,
        identity: NodeIdentity,
        worker: ComputeWorker,
        sessions: SessionTable,
        *,
        max_message_bytes: int = rpc.MAX_MESSAGE_BYTES,
        step_timeout_s: float = 120.0,
        leave_slower: float = SLOWER,
        security: Security | None = None,
        quotas: Quotas | None = None,
        key: identity.NodeKey | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.security = security or Security()
        self.key = key  # what it signs its steps with (None: it signs nothing)
        self.quotas = quotas or Quotas(QuotaLimits())
        self._opening: list[Holding] = []  # sessions being opened: their callers' quotas
        self.stage = stage  # new sessions open on this stage; open ones keep theirs
        self.group: Membership | None = None  # the tensor-parallel group serving it, if any
        self.on_broken: Callable[[], None] | None = None  # told when a group breaks (join's)
        self._views: dict[tuple[int, int], Stage] = {}  # parts of it routes asked for
        self.identity = identity
        self.worker = worker
        self.sessions = sessions
        self.stopping = False  # its server stops: its streams end (``_next``)
        self._waiting: set[asyncio.Task] = set()  # streams waiting for a request
        self.channels = Channels(self.security, max_message_bytes)
        self.max_message_bytes = max_message_bytes
        self.step_timeout_s = step_timeout_s
        self.leave_slower = leave_slower  # its links leave a node this many times slower
        self._latencies: list[float] = []
        self.live = LiveStats()  # what its steps measure, for its heartbeats
        self.metrics = metrics or NodeMetrics()  # the same, and more, for Prometheus
        self.metrics.watch(self)
        fault = fault_from_env()
        if fault is not None:
            log.warning("TEST FAULT ON: this node perturbs or slows its steps (%s)", fault)
        if isinstance(fault, Slow):
            worker.slow, fault = fault, None  # the worker holds each job longer
        self.forge = fault if isinstance(fault, Forge) else None  # rewrites what it relays
        self.fault = fault if isinstance(fault, (Fault, Delay)) else None  # on every output

    def set_stage(self, stage: Stage | None, group: Membership | None = None) -> None:
        """Serve another stage from now on (``group``: as a member of that tensor-parallel
        group). Sessions already open finish on the stage they opened on, which is freed
        when the last of them closes; a group's sessions end with the group."""
        first = self.stage is None and not self.sessions
        old = self.group
        self.stage, self._views, self.group = stage, {}, group
        if stage is not None:
            self.metrics.serving(stage)
        if old is not group:
            self.live.forget_ratio()
        if old is not None and old is not group:
            self.break_group(old, DISSOLVED)
            old.close()
        if first and stage is not None:
            # What is alive now (torch, the weights' modules: ~300k objects) stays for
            # good: leave it out of every later collection, each of which would otherwise
            # walk it all on the event loop (100-300 ms, mid-generation). Once, before any
            # session exists; garbage goes first.
            gc.collect()
            gc.freeze()

    def break_group(self, group: Membership, why: str) -> None:
        """The group cannot run steps any more: its sessions fail over, and the node serves
        nothing until the coordinator places it again (the volunteer gives the group up)."""
        if group.broken:
            return
        group.broken = why.removeprefix(f"tensor-parallel group {group.id}: ")  # (said once)
        # (a group placement dissolved is no fault: the node was given another stage)
        level = logging.INFO if why == DISSOLVED else logging.WARNING
        log.log(level, "tensor-parallel group %s is broken: %s", group.id, group.broken)
        group.collective.abort(group.broken)  # one waiting fails now, not at its timeout
        if self.group is group:
            self.stage, self._views = None, {}
        if self.on_broken is not None:
            self.on_broken()
        for session in self.sessions.all():
            if (
                session.stage.shard is not None
                and session.stage.shard.collective is group.collective
            ):
                self._drop(session, f"its tensor-parallel group broke ({group.broken})")

    def current_stage(self, start: int = 0, end: int = 0) -> Stage:
        """The stage a new session opens on: the node's, or the part of it the caller's hop
        covers (a route may enter a stage part-way, or leave it early). Refuses units the
        node does not hold, and a group's stage on any member but rank 0."""
        stage = self.stage
        if stage is None:
            raise FailedPrecondition(
                "this node is not serving a stage now (loading, or its group broke): try a replica"
            )
        group = self.group
        if group is not None and group.rank != 0:
            raise FailedPrecondition(
                f"this node is rank {group.rank} of a tensor-parallel group: its steps go to "
                f"rank 0 at {group.tp.members[0]}"
            )
        return self._stage_view(stage, start, end)

    def _stage_view(self, stage: Stage, start: int, end: int) -> Stage:
        if not end or (start, end) == (stage.start, stage.end):
            return stage
        if not stage.start <= start < end <= stage.end:
            raise FailedPrecondition(
                f"this node now serves units [{stage.start}, {stage.end}), not [{start}, {end}): "
                "ask the coordinator for a fresh route"
            )
        view = self._views.get((start, end))
        if view is None:
            view = self._views[start, end] = stage.view(start, end)
        return view

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        """This service for a gRPC server, parsing requests itself (garbage -> INVALID_ARGUMENT)."""
        return rpc.strict_service(
            "nanoshard.v1.Node",
            {
                "Open": ("unary", self.Open, pb.OpenRequest),
                "Steps": ("stream", self.Steps, pb.StepRequest),
                "Step": ("unary", self.Step, pb.StepRequest),
                "Close": ("unary", self.Close, pb.CloseRequest),
                "Info": ("unary", self.Info, pb.InfoRequest),
                "Outputs": ("unary", self.Outputs, pb.OutputsRequest),
                "Group": ("stream", self.Group, pb.GroupCommand),
                "Ping": ("unary", self.Ping, pb.PingRequest),
            },
            guard=self.security.check,
        )

    # ---- sessions -------------------------------------------------------------------

    @staticmethod
    def reservation_bytes(stage: Stage, spec: SessionSpec) -> int:
        """KV cache plus replay material (at most fp32 activations for every position)."""
        kv = KVCache.nbytes_for(
            stage.config, stage.n_blocks, spec.max_length, stage.act_dtype, stage.heads
        )
        replay = 0 if stage.has_head else spec.max_length * stage.config.n_embd * 4
        return kv + replay

    def handle(self, session: NodeSession) -> pb.KVHandle:
        return pb.KVHandle(
            session_id=session.spec.session_id,
            start=session.stage.start,
            end=session.stage.end,
            length=session.length,
            epoch=self.identity.epoch,
        )

    @staticmethod
    def check_route(stage: Stage, route: Any) -> list[pb.Hop]:
        """The hops after this node must continue from our last unit, contiguously, to the head."""
        hops = list(route)
        expected = stage.end
        for hop in hops:
            if hop.start != expected or hop.end <= hop.start or hop.end > stage.config.n_units:
                raise InvalidArgument(
                    f"route does not continue this node's stage [{stage.start}, "
                    f"{stage.end}): a hop covers [{hop.start}, {hop.end}), expected to "
                    f"start at unit {expected}"
                )
            if not 1 <= len(hop.addresses) <= rpc.MAX_REPLICAS_PER_HOP:
                raise InvalidArgument(
                    f"route hop [{hop.start}, {hop.end}) names {len(hop.addresses)} addresses: "
                    f"give 1 to {rpc.MAX_REPLICAS_PER_HOP}"
                )
            for address in hop.addresses:
                if not rpc.ADDRESS.fullmatch(address):
                    raise InvalidArgument(f"route address {address[:80]!r} is not HOST:PORT")
            expected = hop.end
        if hops and expected != stage.config.n_units:
            raise InvalidArgument(f"route ends at unit {expected}, before the head")
        return hops

    def _bind(self, session: NodeSession, route: list[pb.Hop]) -> None:
        """Bind the session to ``route``, the hops after this node: its steps go on along
        it. A link already open keeps its node if the new route still names it."""
        if not route:
            if session.next is not None:
                session.next.drop_stream()
            session.next = None
        elif session.next is None:
            session.next = NextHop(
                self.channels,
                spec_to_wire(session.spec),
                route,
                session.sent,
                timeout_s=self.step_timeout_s,
                owner=self.identity.name,
                on_repair=self.metrics.failover,
                slower=self.leave_slower,
            )
        else:
            session.next.rebind(route)

    async def _open_onwards(self, session: NodeSession, timeout_s: float) -> pb.OpenReply:
        """This node's answer to an Open, once the later hops opened the session along the
        route (within ``timeout_s``): the positions it holds, and the head's share of the
        session's key."""
        reply = pb.OpenReply(length=session.length)
        if session.next is not None:
            onwards = await session.next.open(timeout_s)
            if onwards.HasField("session_key"):
                reply.session_key.CopyFrom(onwards.session_key)
        elif session.session_key is not None:
            reply.session_key.CopyFrom(session.session_key)
        return reply

    @handles_errors
    async def Open(self, request: pb.OpenRequest, context: Any) -> pb.OpenReply:
        deadline = time.perf_counter() + onward_timeout(request.timeout_ms, self.step_timeout_s)
        session = self.sessions.find(request.spec.session_id)
        if session is not None:  # opened again (a repair upstream): check, and reach onwards
            async with session.lock:
                self.sessions.require(session)
                spec = spec_from_wire(request.spec, session.stage.config.block_size)
                if session.spec != spec:
                    raise FailedPrecondition("this session id is already open with another spec")
                self._bind(session, self.check_route(session.stage, request.route))
                reply = await self._open_onwards(session, deadline - time.perf_counter())
                session.touch()
                return reply
        stage = self.current_stage(request.start, request.end)
        route = self.check_route(stage, request.route)
        group = self.group
        session = await self._open_here(stage, request, rpc.caller_identity(context))
        try:
            async with session.lock:
                if group is not None and stage.shard is not None:  # rank 0: every member too
                    opened = pb.OpenRequest(spec=request.spec, start=stage.start, end=stage.end)
                    await self._group_acks(group, group.send(pb.GroupCommand(open=opened)))
                self._bind(session, route)
                if not route:
                    self._share_key(session)
                return await self._open_onwards(session, deadline - time.perf_counter())
        except BaseException:  # refused downstream, or the caller went away: nothing stays
            link = session.next
            self._drop(session)
            if link is not None:  # here or onwards (a later hop may have opened it already)
                link.abandon()
            raise

    def _share_key(self, session: NodeSession) -> None:
        """At the head of a session whose client sent a share: the session's MAC key, and
        this node's share signed with its key (``identity``'s module doc)."""
        spec = session.spec
        if not spec.client_share or self.key is None or not session.stage.has_head:
            return
        mine = identity.SessionShare()
        session.mac_key = mine.head_key(spec.session_id, spec.client_share)
        statement = identity.session_key_statement(spec.session_id, spec.client_share, mine.share)
        session.session_key = pb.SessionKey(
            address=self.identity.address, share=mine.share, signature=self.key.sign(statement)
        )

    async def _open_here(self, stage: Stage, request: pb.OpenRequest, caller: str) -> NodeSession:
        """A new session on ``stage`` here: its KV cache reserved and allocated."""
        spec = spec_from_wire(request.spec, stage.config.block_size)
        nbytes = self.reservation_bytes(stage, spec)
        held = [Holding(s.caller, s.reserved_bytes) for s in self.sessions.all()]
        self.quotas.check_open(caller, spec.max_length, nbytes, held + self._opening)
        opening = Holding(caller, nbytes)  # counted until it is open (or refused)
        self._opening.append(opening)
        try:
            with self.sessions.reservation(nbytes):  # held while allocating; refused if full
                cache = (await self.worker.run(lambda: stage.new_cache(spec.max_length))).value
                session = NodeSession(spec, stage, cache, nbytes, caller=caller)
                self.sessions.add(session)
        finally:
            self._opening.remove(opening)
        self.metrics.sessions_opened.inc()
        return session

    async def _group_acks(
        self, group: Membership, futures: list[asyncio.Future[pb.GroupAck]]
    ) -> list[pb.GroupAck]:
        """The other members' acks to a command; a member that fails breaks the group."""
        try:
            return await acks(futures)
        except Unavailable as exc:
            self.break_group(group, str(exc))
            raise
        except asyncio.TimeoutError:  # (not TimeoutError before Python 3.11)
            why = f"a member of tensor-parallel group {group.id} did not answer in time"
            self.break_group(group, why)
            raise Unavailable(why, [self.identity.address]) from None

    @handles_errors
    async def Close(self, request: pb.CloseRequest, context: Any) -> pb.CloseReply:
        session = self.sessions.find(request.session_id)
        if session is None:
            return pb.CloseReply(closed=False)
        async with session.lock:
            link = None if request.this_hop_only else session.next
            self._drop(session)
        if link is not None:  # best effort: the next hop's TTL frees it anyway
            await link.close()
        return pb.CloseReply(closed=True)

    def _drop(self, session: NodeSession, why: str = "it was closed") -> None:
        """Forget ``session`` here, and on the other members of a group this node leads. A
        step of it still under way fails, saying ``why``."""
        session.closed = session.closed or why
        self.sessions.remove(session.spec.session_id)
        if session.next is not None:
            session.next.drop_stream()
        session.sent.clear()
        group = self.group
        if group is not None and group.links and session.stage.shard is not None:
            closed = pb.CloseRequest(session_id=session.spec.session_id, this_hop_only=True)
            group.send(pb.GroupCommand(close=closed))  # (answered in order; not awaited)

    async def expire_forever(self, every_s: float) -> None:
        """Close sessions idle for longer than the TTL; their memory returns."""
        released, owed = time.monotonic(), False
        while True:
            await asyncio.sleep(every_s)
            expired = self.sessions.expired()
            for session in expired:
                log.info("session %s expired", session.spec.session_id.hex()[:12])
                try:
                    self._drop(session, "it expired (idle past the session TTL)")
                except Exception:  # never let one session stop expiry for all
                    log.exception("could not drop session %s", session.spec.session_id.hex()[:12])
            owed = owed or bool(expired)
            expired.clear()  # the last references: their caches can be freed now
            # Freed KV caches and the buffers of big or malformed requests stay with the
            # process otherwise: give them back after expiries (at most once a second),
            # and at least every RELEASE_EVERY_S.
            since = time.monotonic() - released
            if (owed and since > 1.0) or since > RELEASE_EVERY_S:
                release_freed_memory()
                released, owed = time.monotonic(), False

    # ---- steps ----------------------------------------------------------------------

    @handles_errors
    async def Step(self, request: pb.StepRequest, context: Any) -> pb.StepReply:
        return await self._step(request)

    @handles_errors
    async def Steps(
        self, next_request: Callable[[], Awaitable[pb.StepRequest | None]], context: Any
    ) -> None:
        while (request := await self._next(next_request)) is not None:
            await context.write(await self._step(request))

    async def _next(self, next_request: Callable[[], Awaitable[Request | None]]) -> Request | None:
        """A stream's next request (None at its end). Once the node stops, Unavailable, at
        once if the stream waits: it ends before the server's grace is over (else gRPC
        cancels it then and logs that as an error), and the hop before it repairs."""
        if self.stopping:
            raise self._stopping()
        task = asyncio.current_task()
        assert task is not None  # (a gRPC handler runs in a task)
        self._waiting.add(task)
        try:
            return await next_request()
        except asyncio.CancelledError:
            if not self.stopping:
                raise
            raise self._stopping() from None
        finally:
            self._waiting.discard(task)

    def _stopping(self) -> Unavailable:
        return Unavailable(f"{self.identity.address} is stopping", [self.identity.address])

    def stop_streams(self) -> None:
        """The node stops: its streams end as they finish their step (``_next``)."""
        self.stopping = True
        for task in list(self._waiting):
            task.cancel()

    def _group_of(self, stage: Stage) -> Membership | None:
        """The group a sharded stage runs in; Unavailable if it is broken or gone."""
        if stage.shard is None:
            return None
        group = self.group
        if group is None or group.broken or group.collective is not stage.shard.collective:
            why = group.broken if group is not None and group.broken else "it was dissolved"
            raise Unavailable(
                f"the tensor-parallel group serving this session cannot run steps: {why}",
                [self.identity.address],
            )
        return group

    async def Group(
        self, next_request: Callable[[], Awaitable[pb.GroupCommand | None]], context: Any
    ) -> None:
        """A member's side of its group: rank 0's commands, run in the order they come. Rank
        0 opens the stream as soon as the group's process group forms, maybe before this
        member has its shard: each command is checked against the group it serves then."""
        group = None
        try:
            while (command := await self._next(next_request)) is not None:
                group = self.group
                self._check_member(group, command, rpc.peer_host(context))
                assert group is not None
                await context.write(await self._run_command(group, command, context))
        except NanoshardError as exc:
            if group is not None and not isinstance(exc, FailedPrecondition | InvalidArgument):
                self.break_group(group, str(exc))
            await rpc.abort(context, exc)
        except Exception as exc:
            log.exception("a group command failed")
            if group is not None:
                self.break_group(group, f"a group command failed: {exc}")
            await rpc.abort(context, Internal(f"a group command failed on this node: {exc}"))

    def _check_member(
        self, group: Membership | None, command: pb.GroupCommand, peer_host: str
    ) -> None:
        """Only rank 0 of this node's own group, now, may command it."""
        if group is None or group.rank == 0:
            raise FailedPrecondition(
                f"this node is not a member of tensor-parallel group {command.group[:40]!r} "
                "under another rank 0"
            )
        if command.group != group.id:
            raise FailedPrecondition(
                f"this node is in tensor-parallel group {group.id}, not {command.group[:40]!r}"
            )
        if group.broken:
            raise FailedPrecondition(f"tensor-parallel group {group.id} is broken: {group.broken}")
        if peer_host != rpc.host_of(group.tp.members[0]):
            raise FailedPrecondition(
                f"group commands come from rank 0 ({group.tp.members[0]}), not from {peer_host}"
            )

    async def _run_command(
        self, group: Membership, command: pb.GroupCommand, context: Any
    ) -> pb.GroupAck:
        kind = command.WhichOneof("command")
        if kind == "open":
            if self.sessions.find(command.open.spec.session_id) is None:
                assert self.stage is not None  # a group's stage goes when the group breaks
                stage = self._stage_view(self.stage, command.open.start, command.open.end)
                await self._open_here(stage, command.open, rpc.caller_identity(context))
            return pb.GroupAck()
        if kind == "step":
            reply = await self._step(command.step)
            return pb.GroupAck(
                has_token=reply.has_token,
                token=reply.token,
                compute_ms=reply.hops[0].compute_ms,
                collective_ms=reply.hops[0].collective_ms,
            )
        if kind == "close":
            session = self.sessions.find(command.close.session_id)
            if session is not None:
                self._drop(session)
            return pb.GroupAck()
        raise InvalidArgument("a group command needs open, step or close")

    async def _step(self, req: pb.StepRequest) -> pb.StepReply:
        received = time.perf_counter()
        onward = onward_timeout(req.timeout_ms, self.step_timeout_s)  # for the hops after it
        loop = asyncio.get_running_loop()
        if req.step_id == 0:
            raise InvalidArgument("step_id must be >= 1")
        session = self.sessions.get(req.session_id)
        async with session.lock:
            self.sessions.require(session)
            last = session.last_reply
            if last is not None and session.last_step_id == req.step_id and last[0] == req.pos:
                return last[1]  # a duplicate: same answer, nothing recomputed
            stage = session.stage
            forward = session.next is not None and not req.this_hop_only
            if req.sample and not forward and not stage.has_head:
                raise InvalidArgument(
                    f"this node serves units [{stage.start}, {stage.end}) without the head: a "
                    "step that samples must go on along a route to it (open the session with one)"
                )
            # The route's last hop answers its own output when the step asks for it.
            returned: list[pb.Activations] = []
            n_tokens, bytes_in, run = prepare(
                req,
                session,
                None if forward else returned,
                max_message_bytes=self.max_message_bytes,
                fault=self.fault,
            )
            if req.pos + n_tokens > session.spec.max_length:
                raise InvalidArgument(
                    f"positions up to {req.pos + n_tokens} exceed the session's max_length "
                    f"{session.spec.max_length}"
                )
            resend = already_computed(session, req, n_tokens)
            if resend is None and req.pos != session.length:
                raise CacheMismatch(
                    f"the step starts at position {req.pos} but this node's KV cache holds "
                    f"{session.length} positions: replay from {session.length}",
                    session.length,
                )
            trace = pb.HopTrace(
                node=self.identity.name,
                address=self.identity.address,
                start=stage.start,
                end=stage.end,
                bytes_in=bytes_in,
                codec=session.spec.codec,
            )
            if resend is None:
                self.quotas.charge_tokens(session.caller, n_tokens)
                group = self._group_of(stage)
                # A lone session's decode step runs right here (no hand-off to the worker).
                # Else the cache moves on in the worker whatever happens to this call, so
                # what the step produced is recorded even if the caller goes away: a retry
                # of the same step is then answered from it instead of refused.
                timed = self.worker.run_inline(run) if group is None else None
                job = self.worker.submit(run) if timed is None else None
                # Rank 0 hands the step to the other members in the same turn as it queued
                # its own compute (so a step its worker refused reaches no member): every
                # member runs the group's steps in one order.
                if group is not None and group.links:
                    member_req = pb.StepRequest()
                    member_req.CopyFrom(req)
                    member_req.this_hop_only = True  # its output goes nowhere ...
                    member_req.sample = req.sample and stage.has_head  # ... but it samples
                    member_req.return_output = req.return_output and stage.has_head
                    member_acks = group.send(pb.GroupCommand(step=member_req))
                else:
                    member_acks = []
                digest = session.inputs.copy()  # the input digest once this step is in
                chunk_digests = []  # and after each of its chunks (a step of chunks signs each)
                for chunk_pos, item in agreement.inputs_of(req):
                    agreement.add_chunk(digest, chunk_pos, item)
                    chunk_digests.append(digest.digest())
                record = functools.partial(
                    self._record, session, req.step_id, req.pos, n_tokens, digest
                )
                if job is None:
                    assert timed is not None  # (ran inline)
                    record(timed.value)
                else:
                    job.add_done_callback(functools.partial(_on_result, record))
                    try:
                        timed = await asyncio.shield(job)
                    except CollectiveError as exc:
                        assert group is not None
                        self.break_group(group, str(exc))
                        raise Unavailable(str(exc), [self.identity.address]) from None
                assert timed is not None
                trace.queue_ms, trace.compute_ms = timed.queue_ms, timed.compute_ms
                trace.batch = timed.batch
                out = timed.value
                if group is not None:
                    assert isinstance(run, GroupStep)
                    trace.tp = group.size
                    trace.collective_ms, trace.collective_bytes = run.stats.ms, run.stats.bytes
                    group.observe(run.stats)
                    for ack in await self._group_acks(group, member_acks):
                        if ack.has_token and (not stage.has_head or ack.token != out):
                            why = f"a member drew token {ack.token}, rank 0 drew {out}"
                            self.break_group(group, why)
                            raise Unavailable(why, [self.identity.address])
            else:
                timed, out = None, resend[0]
            # What the step leaves here (counts, the KV handle, the signed trace): while the
            # hops after this one compute, when it goes on; else now.
            book = functools.partial(
                self._book, session, req, n_tokens, trace, timed, out, returned
            )
            if stage.has_head or not forward:
                book(later=True)  # (its counts once the reply is on its way)
                reply = pb.StepReply()
                if returned:
                    reply.output.CopyFrom(returned[0])
                if stage.has_head and out is not None:
                    reply.has_token, reply.token = True, out
            else:
                assert session.next is not None
                trace.bytes_out = len(out.payload)
                down_req = pb.StepRequest(
                    session_id=req.session_id,
                    step_id=req.step_id,
                    pos=req.pos,
                    activations=out,
                    sample=req.sample,
                    return_output=req.return_output,
                    mac_only=req.mac_only,
                )
                sent_at = time.perf_counter()
                try:
                    own_ms = timed.compute_ms if timed is not None else None
                    onward_s = onward - (time.perf_counter() - received)
                    reply, trace.repair = await session.next.step(down_req, own_ms, book, onward_s)
                except InvalidArgument as exc:  # what this node sent was refused: its fault
                    raise Internal(f"the next hop refused this node's output: {exc}") from None
                except NanoshardError:
                    if session.closed:  # here, meanwhile (its link's stream went with it)
                        raise Unavailable(
                            f"the session was closed here mid-step: {session.closed}",
                            [self.identity.address],
                        ) from None
                    raise
                trace.downstream_ms = (time.perf_counter() - sent_at) * 1e3
                if reply.hops and session.next.address is not None:
                    # the link: the step's time there, less the next node's own (its word:
                    # taken only if it fits inside what this node timed)
                    there = reply.hops[0].total_ms
                    rtt_ms = trace.downstream_ms - (
                        there if 0.0 <= there <= trace.downstream_ms else 0.0
                    )
                    to = session.next.address
                    loop.call_soon(self.live.hop, to, rtt_ms, trace.bytes_out)
                if self.forge is not None:
                    self.forge.relay(reply)
            if req.chunks and resend is None and returned and self.key is not None:
                reply.chunk_traces.extend(
                    evidence.chunk_traces(self.key, trace, session, req, chunk_digests, returned[0])
                )
            trace.total_ms = (time.perf_counter() - received) * 1e3
            reply.hops.insert(0, trace)
            session.last_step_id, session.last_reply = req.step_id, (req.pos, reply)
            session.touch()
            loop.call_soon(self._record_latency, trace.total_ms)
            return reply

    def _book(
        self,
        session: NodeSession,
        req: pb.StepRequest,
        n_tokens: int,
        trace: pb.HopTrace,
        timed: Timed | None,
        out: Any,
        returned: list[pb.Activations],
        later: bool = False,
    ) -> None:
        """A step's bookkeeping once its output is known: live figures and metrics (if it
        was computed here, ``timed``; with ``later``, once this turn of the event loop is
        over), the KV handle, the signed trace."""
        stage = session.stage
        if timed is not None:
            count = functools.partial(
                self._count, stage, req, n_tokens, timed, trace.collective_ms, out, returned
            )
            if later:
                asyncio.get_running_loop().call_soon(count)
            else:
                count()
        trace.handle.CopyFrom(self.handle(session))
        if self.key is not None:
            evidence.sign_step(self.key, session, req, n_tokens, trace, out, returned)
        if session.session_key is not None and not session.key_told and not req.this_hop_only:
            trace.session_key.CopyFrom(session.session_key)  # (once: see HopTrace)
            session.key_told = True
        if trace.signature and not stage.has_head and not req.chunks:
            session.signed[req.pos] = pb.HopTrace(
                start=trace.start,
                end=trace.end,
                input_digest=trace.input_digest,
                output_digest=trace.output_digest,
                signature=trace.signature,
            )

    @staticmethod
    def _record(
        session: NodeSession,
        step_id: int,
        pos: int,
        n_tokens: int,
        digest: Any,
        out: Any,
    ) -> None:
        """What a computed step leaves in its session."""
        session.inputs = digest
        session.input_digests[pos + n_tokens] = digest.digest()
        session.last_output = (step_id, pos, n_tokens, out)
        if not session.stage.has_head:
            session.sent.add(pos, out)

    def _count(
        self,
        stage: Stage,
        req: pb.StepRequest,
        n_tokens: int,
        timed: Timed,
        collective_ms: float,
        out: Any,
        returned: list[pb.Activations],
    ) -> None:
        sampled = stage.has_head and out is not None
        self.live.step(stage, n_tokens, timed.compute_ms, sampled, collective_ms)
        # (a group member samples too, on rank 0's word: its token is not counted)
        self.metrics.step(stage, n_tokens, timed.compute_ms, sampled and not req.this_hop_only)
        if returned:
            self.metrics.check_answered("output")

    # ---- replay material ------------------------------------------------------------

    @handles_errors
    async def Outputs(self, request: pb.OutputsRequest, context: Any) -> pb.OutputsReply:
        if not request.start < request.end:
            raise InvalidArgument(
                f"positions [{request.start}, {request.end}) are empty: start must be < end"
            )
        session = self.sessions.get(request.session_id)
        reply = pb.OutputsReply()
        size = 0
        for pos, message in session.sent.chunks:
            if pos < request.end and pos + message.shape[0] > request.start:
                size += len(message.payload)
                if size + HEADROOM_BYTES > self.max_message_bytes:
                    raise ResourceExhausted(
                        f"positions [{request.start}, {request.end}) hold over {size} bytes, "
                        "more than one message may carry: ask for fewer"
                    )
                chunk = reply.chunks.add(pos=pos, activations=message)
                if pos in session.signed:
                    chunk.trace.CopyFrom(session.signed[pos])
        self.metrics.check_answered("material")
        return reply

    # ---- info -----------------------------------------------------------------------

    def _record_latency(self, ms: float) -> None:
        self._latencies.append(ms)
        del self._latencies[:-200]

    @property
    def step_ms_p50(self) -> float:
        """Median time of the last 200 steps here (this hop and those after it)."""
        lat = sorted(self._latencies)
        return lat[len(lat) // 2] if lat else 0.0

    @handles_errors
    async def Ping(self, request: pb.PingRequest, context: Any) -> pb.PingReply:
        if len(request.payload) > PING_MAX_BYTES:
            raise InvalidArgument(f"a ping carries at most {PING_MAX_BYTES} bytes")
        return pb.PingReply()

    @handles_errors
    async def Info(self, request: pb.InfoRequest, context: Any) -> pb.NodeInfo:
        stage = self.stage
        return pb.NodeInfo(
            name=self.identity.name,
            address=self.identity.address,
            model_id=self.identity.model_id,
            start=stage.start if stage else 0,
            end=stage.end if stage else 0,
            n_units=stage.config.n_units if stage else 0,
            device=str(stage.device) if stage else "",
            dtype=stage.weights if stage else "",
            sessions=len(self.sessions),
            kv_bytes_used=self.sessions.used_bytes,
            kv_bytes_budget=self.sessions.budget_bytes,
            queue_depth=self.worker.queue_depth,
            step_ms_p50=self.step_ms_p50,
            epoch=self.identity.epoch,
            protocol_version=PROTOCOL_VERSION,
            public_key=self.key.public_key if self.key is not None else b"",
        )
