"""The hop protocol, written once: a caller's link to the next hop of a session's route.

Both ends of the data plane use it. Every node keeps one per session for the hop after
its own (its replay material: the activations it sent on); the client keeps one for the
route's first hop (its replay material: the token ids it sent). A link:

- **opens** the session on the first node of its hop that takes it, binding the rest of
  the route there (that node opens it onwards in turn);
- **steps** over one persistent bidirectional stream, each step within a deadline, which
  the step carries on (``timeout_ms``): a node gives the hops after it ``HOP_SHARE`` of
  what is left of its own, so along a route the caller nearest a silent node gives up
  first and names it (not a caller before it, which did answer); the
  owner's own bookkeeping for a step (``meanwhile``) runs once the step is on its way, while
  the hops after it compute, not on the path back;
- **repairs** its hop when a step fails: a node that lost the session is opened again, a
  node that holds fewer positions than the step starts at is **refilled** from the replay
  material, in the chunks first sent (so its KV cache is rebuilt bit for bit), with
  ``this_hop_only`` (the hops after it hold those positions already); a node that is gone,
  full, serving other units or failing inside is replaced by the next **replica** of the
  hop;
- **moves** off a node whose decode steps slowed down: when a node's compute per decode
  step (its trace's) runs at ``SLOWER`` times (the default) its pace over the session's
  first steps, the next step goes to a replica, refilled like a repair (so the output is
  unchanged), and the node is tried last from then on — its owner may have taken the
  machine back. Slower *than the rest*: the paces of the hops after it (their traces ride
  on the reply) and of the link's owner (a node's own compute) are followed too, and a
  slowdown they share (the swarm got busy, or nodes share a machine) is divided out;
- applies the **who-failed rule**: an UNAVAILABLE that names failed addresses other than
  the node it called (``Unavailable.failed``) means a hop *behind* it is gone with all its
  replicas. The link cannot repair that; it raises it unchanged, so the error travels up
  to the caller that can (the client re-plans the route);
- tells a **refusal** from a failure, at the client: when every node of the first hop
  refused the client for a quota (``QuotaExceeded``), nobody is gone, and the link answers
  that refusal rather than UNAVAILABLE, so it reaches the user at once instead of a
  re-planned route. At a later hop the quota's caller is the relaying node, not the user:
  there a refusal is the next hop being full for that node, a failure like any other.

Nothing is recomputed here or upstream: a repair costs the replacement's refill only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import sys
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc

from nanoshard import codec as codecs
from nanoshard import rpc
from nanoshard.backoff import backoff_delays
from nanoshard.errors import (
    CacheMismatch,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    ResourceExhausted,
    Unavailable,
)
from nanoshard.security import Security
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_CHANNELS = 256  # channels kept open to nodes; the least recently used go first
REPAIRS_PER_NODE = 3  # a refill can race with expiry or a restart: a few tries per node
CLOSE_TIMEOUT_S = 10.0
# Freeing the session on a node a link moved away from: delivered whenever the node answers
# within this, sent again if the connection it went out on is cut (one that hung and came
# back frees it then, not at its TTL).
LEAVE_WITHIN_S = 120.0
SLOWER = 3.0  # a node whose decode steps take this many times their first pace is left
HOP_SHARE = 0.9  # of the time its caller waits, what a node gives the hops after it
FAIR_TRY_S = 1.0  # a node silent for less than this, as a step's time ran out, is not blamed
MAX_TIMEOUT_MS = 2**32 - 1  # (the wire's uint32)
PACE_STEPS = 8  # decode steps a node's first pace is the median of
RECENT_STEPS = 5  # its pace now: the median of its last decode steps (one spike moves nothing)

# What makes a link give up on a node and try the hop's next one: gone or silent, full or
# busy, serving other units, or failing inside (a bug, out of memory).
NODE_FAILURES = (Unavailable, ResourceExhausted, FailedPrecondition, Internal)


def wire_ms(seconds: float) -> int:
    """A timeout as a request carries it."""
    return min(math.ceil(seconds * 1000), MAX_TIMEOUT_MS)


def onward_timeout(timeout_ms: int, limit_s: float) -> float:
    """Seconds a node waits for the hops after it, given how long its caller waits for it
    (``timeout_ms`` from the request; 0: unsaid) and its own limit."""
    if not timeout_ms:
        return limit_s
    return min(limit_s, HOP_SHARE * timeout_ms / 1000)


class OutOfTime(Exception):
    """A step's time ran out before a node of the hop could be tried (or after it had too
    little of it to be blamed for its silence): no node of the hop failed. The link's
    answer then names none, so the caller counts it against the link's owner, which was
    late."""


P = TypeVar("P")  # a chunk's payload: token ids (list[int]) or pb.Activations


class Channels:
    """``grpc.aio`` channels to nodes, by address, shared by every session of a process: at
    most ``MAX_CHANNELS``, so routes naming endless addresses (garbage, or a huge swarm)
    cannot grow a process without bound."""

    def __init__(
        self, security: Security | None = None, max_message_bytes: int = rpc.MAX_MESSAGE_BYTES
    ) -> None:
        self.security = security or Security()
        self._max_message_bytes = max_message_bytes
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self._closing: set[asyncio.Future] = set()  # evicted channels still closing
        self._streams: Counter[str] = Counter()  # open session streams, by address
        self._background: set[asyncio.Future] = set()  # closes sent in the background

    def stub(self, address: str) -> pb_grpc.NodeStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = rpc.open_channel(
                address, self.security, aio=True, max_message_bytes=self._max_message_bytes
            )
            self._channels[address] = channel
            self._evict(keep=address)
        self._channels.move_to_end(address)
        return pb_grpc.NodeStub(channel)

    def _evict(self, keep: str) -> None:
        """Past ``MAX_CHANNELS``, close the least recently used channels that carry no
        session stream (a live session's stream is never cut for a newcomer)."""
        idle = [a for a in self._channels if a != keep and not self._streams[a]]
        for address in idle[: max(len(self._channels) - MAX_CHANNELS, 0)]:
            old = self._channels.pop(address)
            closing = asyncio.ensure_future(old.close(grace=30))  # calls on it may finish
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    def stream(self, address: str) -> Any:
        """A session's ``Steps`` stream to ``address``; its channel stays while it is open."""
        call = self.stub(address).Steps(metadata=self.metadata())
        self._streams[address] += 1

        def ended(_: Any) -> None:
            self._streams[address] -= 1
            if not self._streams[address]:
                del self._streams[address]

        call.add_done_callback(ended)
        return call

    def in_background(self, work: Awaitable[Any]) -> asyncio.Future:
        """``work`` (a close) as a task of its own, kept here until it ends, also once the
        link that sent it is gone (a failure nobody awaits is dropped: a node that is
        gone)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(_forget(self._background))
        return task

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """For one call: this process's swarm token, if the swarm has a key."""
        return self.security.metadata()

    async def call(
        self,
        address: str,
        method: str,
        request: Any,
        timeout_s: float,
        wait_for_ready: bool = False,
    ) -> Any:
        """A unary call to the node at ``address``; failures as nanoshard errors. With
        ``wait_for_ready``, a node that cannot be reached is waited for (within
        ``timeout_s``) rather than failed at once."""
        try:
            return await getattr(self.stub(address), method)(
                request, timeout=timeout_s, metadata=self.metadata(), wait_for_ready=wait_for_ready
            )
        except grpc.aio.AioRpcError as err:
            raise rpc.error_from_rpc(err, address) from None

    async def call_until_answered(
        self, address: str, method: str, request: Any, within_s: float
    ) -> Any:
        """A unary call that waits for the node at ``address`` to answer, within
        ``within_s``: for a connection to it (``wait_for_ready``), and again whenever the
        connection the call went out on is cut unanswered. A hung node's connection stays
        open, so the call goes out on it, and the keepalive cuts it while the node still
        hangs (UNAVAILABLE, "ping timeout"): gRPC does not send a call again once it went
        out, and the node, back, never answers it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        delays = backoff_delays(0.2, 2.0)
        while True:  # (each try waits for a connection first: no busy loop)
            try:
                return await self.call(
                    address, method, request, deadline - loop.time(), wait_for_ready=True
                )
            except Unavailable:
                delay = next(delays)
                if loop.time() + delay >= deadline:
                    raise
            await asyncio.sleep(delay)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), OrderedDict()
        for channel in channels:
            await channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


@dataclass
class Tries:
    """What one open or step of a link met on the nodes of its hop that did not take it."""

    why: list[str] = field(default_factory=list)  # every failure's message, in order
    failed: list[str] = field(default_factory=list)  # the nodes it gave up on
    refused: list[QuotaExceeded] = field(default_factory=list)  # those a quota refused
    short: bool = False  # the time ran out before every node was asked


@dataclass
class Replay(Generic[P]):
    """What a caller sent down a hop, chunk by chunk and exactly as sent: what a
    replacement is refilled with. ``rows`` counts a payload's positions; ``cut(payload, k)``
    is the payload without its first ``k`` positions, as the same bytes."""

    rows: Callable[[P], int]
    cut: Callable[[P, int], P]
    chunks: list[tuple[int, P]] = field(default_factory=list)  # (pos, payload), in order

    def add(self, pos: int, payload: P) -> None:
        self.chunks.append((pos, payload))

    def since(self, pos: int) -> list[tuple[int, P]]:
        """Chunks covering [pos, length), in order; a chunk that straddles ``pos`` is cut."""
        out = []
        for start, payload in self.chunks:
            rows = self.rows(payload)
            if start + rows <= pos:
                continue
            if start < pos:
                payload, start = self.cut(payload, pos - start), pos
            out.append((start, payload))
        return out

    def clear(self) -> None:
        self.chunks.clear()


def token_replay() -> Replay[list[int]]:
    """The client's replay material: the token ids it sent."""
    return Replay(rows=len, cut=lambda ids, k: ids[k:])


def activation_replay() -> Replay[pb.Activations]:
    """A node's replay material: the encoded activations it sent on."""
    return Replay(rows=lambda message: message.shape[0], cut=tail_rows)


def tail_rows(message: pb.Activations, skip: int) -> pb.Activations:
    """The activations without their first ``skip`` rows, as the bytes first sent."""
    rows, width = message.shape
    payload = codecs.cut_rows(message.payload, (rows, width), message.codec, skip)
    return pb.Activations(codec=message.codec, shape=[rows - skip, width], payload=payload)


def with_input(request: pb.StepRequest, payload: list[int] | pb.Activations) -> pb.StepRequest:
    """``request`` carrying ``payload`` as its input: token ids or activations."""
    if isinstance(payload, pb.Activations):
        request.activations.CopyFrom(payload)
    else:
        request.tokens.ids.extend(payload)
    return request


if sys.version_info >= (3, 11):

    async def _write_read(
        call: Any, request: pb.StepRequest, timeout_s: float, meanwhile: Callable[[], None]
    ) -> Any:
        """Write a step on the stream, run ``meanwhile()``, and read the step's reply, all
        within ``timeout_s`` (no task of its own, unlike ``wait_for`` before Python 3.12:
        this is on every step's path)."""
        async with asyncio.timeout(timeout_s):
            await call.write(request)
            meanwhile()
            return await call.read()

else:

    async def _write_read(
        call: Any, request: pb.StepRequest, timeout_s: float, meanwhile: Callable[[], None]
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        await asyncio.wait_for(call.write(request), timeout_s)
        meanwhile()
        return await asyncio.wait_for(call.read(), max(deadline - loop.time(), 0.0))


def _nothing() -> None:
    pass


def _cancelling() -> bool:
    """Whether the running task is being cancelled (Python 3.10 cannot tell: taken as yes)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


def once(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` that runs the first time it is called and never again."""
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            fn()

    return run


class Pace:
    """A node's compute per decode step as a link sees it: its first pace, and now."""

    def __init__(self) -> None:
        self.first: list[float] = []
        self.recent: deque[float] = deque(maxlen=RECENT_STEPS)
        self._first_ms = 0.0  # the median of ``first``, once complete

    def add(self, ms: float) -> None:
        if not 0.0 <= ms < math.inf:
            return  # (a peer's word: NaN, negative or infinite tells nothing)
        if len(self.first) < PACE_STEPS:
            self.first.append(ms)
            if len(self.first) == PACE_STEPS:
                self._first_ms = max(statistics.median(self.first), 0.05)
        self.recent.append(ms)

    @property
    def known(self) -> bool:
        return len(self.first) >= PACE_STEPS and len(self.recent) >= RECENT_STEPS

    def slower(self) -> float:
        """How many times its first pace the node takes now (1 until both are known)."""
        if not self.known:
            return 1.0
        return statistics.median(self.recent) / self._first_ms


def shared_slowdown(paces: Iterable[Pace]) -> float:
    """What the other paces say of everyone's slowdown (the median of those known; at
    least 1: the others running faster than they first did excuses nothing)."""
    known = [p.slower() for p in paces if p.known]
    return max(statistics.median(known), 1.0) if known else 1.0


class NextHop:
    """One session's link to the next hop of its route (see the module doc).

    ``route`` is the hop this link reaches, then the hops after it; ``spec`` the session;
    ``replay`` what the owner sent down this link so far (the client adds a step's token
    ids once it is answered, a node its output once computed, before forwarding it: so a
    refill stops at the step's own position). ``avoided()`` names nodes to try last (the
    client's recent failures; the link also tries last the nodes it gave up on).
    ``timeout_s`` is how long each call may take when the owner gives no deadline (the
    client, which answers to nobody; a node passes what its caller gave it).
    ``owner`` names the caller in error messages; ``slower`` is
    the slowdown at which the link leaves a node (``SLOWER``; infinite: never, which keeps a
    route steady for whoever must know who ran each step); ``on_repair(kind)`` hears of
    each repair as it succeeds (its owner's metrics): "replica" (another node of the hop
    took over), "refill" (a node was refilled), "slow" (the link left a node whose steps
    slowed down). ``final_refusals``: the owner is the caller quotas count (the client):
    a hop whose every node refused it for a quota answers ``QuotaExceeded``."""

    def __init__(
        self,
        channels: Channels,
        spec: pb.SessionSpec,
        route: Sequence[pb.Hop],
        replay: Replay,
        *,
        timeout_s: float,
        owner: str = "the client",
        avoided: Callable[[], Collection[str]] = frozenset,
        on_repair: Callable[[str], None] | None = None,
        slower: float = SLOWER,
        final_refusals: bool = False,
    ) -> None:
        if not route:
            raise InvalidArgument("a next hop needs a route")
        self.channels = channels
        self.spec = spec
        self.rebind(route)
        self.replay = replay
        self.timeout_s = timeout_s
        self.owner = owner
        self.avoided = avoided
        self.on_repair = on_repair
        self.slower = slower
        self.final_refusals = final_refusals
        self.address: str | None = None  # the node this link steps on, once open
        self._call: Any = None  # the open Steps stream to it
        self._leaving: dict[str, asyncio.Future] = {}  # the close of each node it left
        self.pace = Pace()  # of the node it last stepped on (``_paced_on``) ...
        self.others: dict[str, Pace] = {}  # ... and of the owner ("") and the hops after it
        self._paced_on: str | None = None
        self.slowed: dict[str, float] = {}  # nodes it left for slowness: how much slower
        self.given_up: set[str] = set()  # nodes it gave up on (tried last from then on)

    def rebind(self, route: Sequence[pb.Hop]) -> None:
        """Go on along ``route`` (the session was opened again with it). The current node
        stays first if the route still names it."""
        self.route = list(route)
        self._behind = {a for hop in self.route[1:] for a in hop.addresses}  # later hops' nodes

    @property
    def hop(self) -> pb.Hop:
        return self.route[0]

    def candidates(self) -> list[str]:
        """The current node first, then the hop's replicas in route order; after them the
        avoided ones and those this link left for slowness, and last those it gave up on
        (a node it left for slowness, then one that failed, the current one: the slow one
        is tried first, not the failed one again)."""
        later = set(self.avoided()) | set(self.slowed)
        addresses = list(self.hop.addresses)
        if self.address in addresses:
            addresses.remove(self.address)
            addresses.insert(0, self.address)
        return sorted(addresses, key=lambda a: (a in self.given_up, a in later))  # (stable)

    # ---- opening ----------------------------------------------------------------------

    async def open(self, timeout_s: float | None = None) -> pb.OpenReply:
        """Open the session on the first node of the hop that takes it, within
        ``timeout_s`` (None: each node tried gets the link's own); its answer (the positions
        it holds, and the head's share of the session's key)."""
        deadline = self._deadline(timeout_s)
        tries = Tries()
        for address in self.candidates():
            try:
                reply = await self._open_at(address, deadline)
            except asyncio.CancelledError:  # the owner left: the node may have opened it
                self._use(address)  # (so that ``close`` reaches it)
                raise
            except InvalidArgument:
                raise  # the request itself is wrong: no replica will take it
            except OutOfTime as exc:
                tries.why.append(str(exc))
                tries.short = True
                break
            except NODE_FAILURES as exc:
                self._raise_if_behind(exc, address)
                self._failed_at(address, tries, exc)
                continue
            self._use(address)
            if tries.why:
                self._repaired("replica")
            return reply
        raise self._gone(tries)

    async def _open_at(self, address: str, deadline: float | None) -> pb.OpenReply:
        self._stay(address)
        left = self._left(deadline, address)
        request = pb.OpenRequest(
            spec=self.spec,
            route=self.route[1:],
            start=self.hop.start,
            end=self.hop.end,
            timeout_ms=wire_ms(left),
        )
        try:
            return await self.channels.call(address, "Open", request, left)
        except Unavailable:
            self._raise_if_short(deadline, left, address)
            raise

    # ---- time ---------------------------------------------------------------------------

    @staticmethod
    def _deadline(timeout_s: float | None) -> float | None:
        """When an open or step must be answered by (None: each call gets ``timeout_s``)."""
        return None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s

    def _raise_if_short(self, deadline: float | None, left: float, address: str) -> None:
        """The owner's deadline passed while ``address``, given ``left`` seconds of it, did
        not answer: too little to blame it for (a refill that took the time, a late owner)."""
        if deadline is None or left >= FAIR_TRY_S:
            return
        if asyncio.get_running_loop().time() >= deadline:
            raise OutOfTime(f"{self.owner}'s time ran out asking {address} ({left:.3g} s)")

    def _left(self, deadline: float | None, address: str) -> float:
        """Seconds left before ``deadline`` to ask ``address``; OutOfTime if none."""
        if deadline is None:
            return self.timeout_s
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise OutOfTime(f"{self.owner} had no time left to ask {address}")
        return left

    # ---- stepping ---------------------------------------------------------------------

    async def step(
        self,
        request: pb.StepRequest,
        own_ms: float | None = None,
        meanwhile: Callable[[], None] = _nothing,
        timeout_s: float | None = None,
    ) -> tuple[pb.StepReply, str]:
        """Send a step to the hop, repairing it on the way (module doc). Returns the reply
        and what was repaired ("" if nothing). Bounded: a few repairs per node, each node
        of the hop once, all within ``timeout_s`` (how long the owner's caller waits; None:
        it has none, and each call gets the link's own ``timeout_s``); then UNAVAILABLE
        naming every node of the hop that failed (none if the time ran out before any did:
        the owner was late).
        ``own_ms``: the owner's own compute for this step (a node's), if it has one.
        ``meanwhile()`` runs once, as soon as the step is first written (while the hop
        computes), or before the step fails; it must not raise."""
        run_once = once(meanwhile)
        try:
            return await self._step(request, own_ms, run_once, self._deadline(timeout_s))
        finally:
            run_once()

    async def _step(
        self,
        request: pb.StepRequest,
        own_ms: float | None,
        meanwhile: Callable[[], None],
        deadline: float | None,
    ) -> tuple[pb.StepReply, str]:
        tries = Tries()
        for address in self.candidates():
            have: int | None = None  # positions the node holds, once a repair is needed
            for _ in range(REPAIRS_PER_NODE):
                try:
                    repair = ""
                    if have is not None:
                        await self._refill(address, have, request, deadline)
                        repair = f"refilled {address} from {max(have, 0)} to {request.pos}"
                    reply = await self._exchange(address, request, deadline, meanwhile)
                    if len(reply.hops) > len(self.route):  # a trace per hop, no more
                        raise Internal(
                            f"{address} answered {len(reply.hops)} traces for the "
                            f"{len(self.route)} hops from it on"
                        )
                    if have is not None:
                        self._repaired("refill")
                    if tries.why:
                        repair = "; ".join([*tries.why, repair or f"switched to {address}"])
                        self._repaired("replica")
                    if moved := self._paced(address, request, reply, own_ms):
                        repair = "; ".join(r for r in (moved, repair) if r)
                        self._repaired("slow")
                    return reply, repair
                except CacheMismatch as exc:
                    self.drop_stream()
                    have = exc.length
                except NotFound:
                    self.drop_stream()
                    have = -1  # not open there (expired, restarted): open it first
                except InvalidArgument:
                    self.drop_stream()
                    raise
                except OutOfTime as exc:
                    self.drop_stream()
                    tries.why.append(str(exc))
                    tries.short = True
                    raise self._gone(tries) from None
                except NODE_FAILURES as exc:
                    self.drop_stream()
                    self._raise_if_behind(exc, address)
                    self._failed_at(address, tries, exc)
                    break
            else:
                self._failed_at(
                    address, tries, f"could not be brought up to position {request.pos}"
                )
        raise self._gone(tries)

    def _failed_at(self, address: str, tries: Tries, why: Exception | str) -> None:
        """Give up on ``address`` for this open or step (and try it last from now on)."""
        tries.why.append(str(why) if isinstance(why, Exception) else f"{address}: {why}")
        tries.failed.append(address)
        if isinstance(why, QuotaExceeded):
            tries.refused.append(why)
        self.given_up.add(address)

    def _paced(
        self, address: str, request: pb.StepRequest, reply: pb.StepReply, own_ms: float | None
    ) -> str:
        """Count a decode step's compute on ``address``; once it runs at ``slower`` times
        its first pace, beyond what the other paces share, and another node holds the hop,
        leave it: the next step goes to that one. Returns, on the first step on a node this
        link moved to, why it moved."""
        why = ""
        if address != self._paced_on:  # a new node (moved, or a repair): its own pace
            if self._paced_on in self.slowed:
                ratio = self.slowed[self._paced_on]
                why = f"left {self._paced_on}: its decode steps took {ratio:.1f} x their first pace"
            self.pace, self._paced_on = Pace(), address
        rows = (
            len(request.tokens.ids) if request.HasField("tokens") else request.activations.shape[0]
        )
        if rows == 1 and reply.hops:
            self.pace.add(reply.hops[0].compute_ms)
            # (a trace's address is a peer's word: only the route's own nodes are followed)
            others = [
                (h.address, h.compute_ms) for h in reply.hops[1:] if h.address in self._behind
            ]
            if own_ms is not None:
                others.append(("", own_ms))
            for key, ms in others:
                pace = self.others.get(key)
                if pace is None:  # (not setdefault: that would build a Pace every step)
                    pace = self.others[key] = Pace()
                pace.add(ms)
            own = self.pace.slower()
            if own < self.slower:  # (the others' share only divides it further)
                return why
            shared = shared_slowdown(self.others.values())
            replicas = set(self.hop.addresses) - set(self.slowed) - {address}
            if own / shared >= self.slower and replicas:
                self.slowed[address] = own / shared
                log.info(
                    "%s leaves %s: %.1f x slower than its first pace (the others %.1f x)",
                    self.owner,
                    address,
                    own,
                    shared,
                )
        return why

    def _repaired(self, kind: str) -> None:
        if self.on_repair is not None:
            self.on_repair(kind)

    async def _refill(
        self, address: str, have: int, step: pb.StepRequest, deadline: float | None
    ) -> None:
        """Bring the node at ``address`` from ``have`` positions (-1: the session is not
        open there) up to ``step`` with the replay material: nothing recomputed."""
        upto, step_id = step.pos, step.step_id
        if have < 0:
            have = (await self._open_at(address, deadline)).length
        if have > upto:
            raise FailedPrecondition(
                f"{address} holds {have} positions, more than the {upto} sent to it: it "
                "belongs to another history of this session"
            )
        for pos, payload in self.replay.since(have):
            if pos >= upto:
                break
            # Chunks end where steps ended, and a refill goes up to where one begins.
            assert pos + self.replay.rows(payload) <= upto, "a replay chunk straddles a step"
            # The step's own id with a lower position: not taken for a duplicate of it.
            fill = pb.StepRequest(
                session_id=self.spec.session_id, step_id=step_id, pos=pos, this_hop_only=True
            )
            await self._exchange(address, with_input(fill, payload), deadline)
        log.info("%s refilled %s from %d to %d positions", self.owner, address, have, upto)

    async def _exchange(
        self,
        address: str,
        request: pb.StepRequest,
        deadline: float | None,
        meanwhile: Callable[[], None] = _nothing,
    ) -> pb.StepReply:
        """One step on the stream to ``address`` (opened on first use), by ``deadline``."""
        left = self._left(deadline, address)
        request.timeout_ms = wire_ms(left)
        self._use(address)
        if self._call is None:
            self._call = self.channels.stream(address)
        call = self._call
        try:
            reply = await _write_read(call, request, left, meanwhile)
        except asyncio.CancelledError:
            if call is not self._call and not _cancelling():
                # the stream was dropped under the step (``drop_stream``: the owner closed
                # the session meanwhile), not this task cancelled: a failure, said as one
                raise Unavailable(
                    f"{self.owner} closed the session while its step was at {address}", []
                ) from None
            self.drop_stream()  # our own caller left mid-step: never reuse this stream
            raise
        except grpc.aio.AioRpcError as err:
            raise rpc.error_from_rpc(err, address) from None
        except asyncio.InvalidStateError:  # the stream had already ended
            raise Unavailable(f"{address}: the session stream had ended", [address]) from None
        except asyncio.TimeoutError:  # (``_step`` drops the stream, whichever it raises)
            self._raise_if_short(deadline, left, address)
            raise Unavailable(
                f"{address}: no answer to the step at position {request.pos} within {left:.3g} s",
                [address],
            ) from None
        if reply is grpc.aio.EOF:
            raise await self._ended(address)
        return reply

    async def _ended(self, address: str) -> Exception:
        call = self._call
        err = grpc.aio.AioRpcError(
            await call.code(),
            grpc.aio.Metadata(),
            await call.trailing_metadata(),
            await call.details(),
        )
        return rpc.error_from_rpc(err, address)

    # ---- the node it talks to -----------------------------------------------------------

    def _use(self, address: str) -> None:
        if self.address != address:
            self._stay(address)
            self.drop_stream()
            if self.address is not None:
                self._leave(self.address)
            self.address = address

    def _leave(self, address: str) -> None:
        """Free the session on a node this link moved away from, now rather than at its
        TTL; the hops after it keep theirs. In the background: the node may well be gone,
        or hung (SIGSTOP, a swapping machine), and the close waits for it to answer again
        (sent again if the hung node's connection it went out on is cut meanwhile)."""
        request = pb.CloseRequest(session_id=self.spec.session_id, this_hop_only=True)
        leave = self.channels.call_until_answered(address, "Close", request, LEAVE_WITHIN_S)
        self._leaving[address] = self.channels.in_background(leave)

    def _stay(self, address: str) -> None:
        """The link goes back to ``address``: its close, if it still waits, is not sent."""
        leaving = self._leaving.pop(address, None)
        if leaving is not None:
            leaving.cancel()

    def drop_stream(self) -> None:
        """End the stream (the next step opens a new one); the session stays open."""
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def _raise_if_behind(self, exc: Exception, address: str) -> None:
        """The who-failed rule: an UNAVAILABLE from ``address`` naming nodes of the later
        hops of this route (and not ``address`` itself) comes from behind it, which this
        link cannot repair: pass it on. What it names is a peer's word, so only nodes of
        the bound route count; one naming nobody behind counts against ``address``."""
        if not isinstance(exc, Unavailable) or address in exc.failed:
            return
        named = [a for a in exc.failed if a in self._behind]
        if named:
            raise Unavailable(str(exc), named)

    def _gone(self, tries: Tries) -> Unavailable | QuotaExceeded:
        """Why the hop did not take an open or step: UNAVAILABLE naming the nodes that
        failed; or (``final_refusals``), when every node of the hop was asked and refused
        for a quota, nobody is gone: the refusal, with the soonest any of them said it would
        take the call again."""
        hop, why = self.hop, "; ".join(tries.why)
        refused = tries.failed and len(tries.refused) == len(tries.failed) and not tries.short
        if refused and self.final_refusals:
            after = [r.retry_after_s for r in tries.refused if r.retry_after_s is not None]
            return QuotaExceeded(
                f"units [{hop.start}, {hop.end}) refused {self.owner}: {why}",
                min(after) if after else None,
            )
        return Unavailable(
            f"units [{hop.start}, {hop.end}) unreachable from {self.owner}: {why}", tries.failed
        )

    def abandon(self) -> None:
        """``close``, in the background: for an owner giving the session up where it cannot
        wait (its own open was refused or cancelled after this link's node took it)."""
        self.channels.in_background(self.close())

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close the session on the current node and the hops after it. Best effort: a
        node that is gone frees it at its TTL. An owner cancelled meanwhile (Ctrl-C right
        after a generation's last token) is cancelled once the node answered, within
        ``timeout_s``: a close cut short would leave the session to the nodes' TTL."""
        self.drop_stream()
        if self.address is None:
            return
        closing = self.channels.in_background(self._close(self.address, timeout_s))
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            await asyncio.wait([closing])  # (cancelled again: it still ends on its own)
            raise

    async def _close(self, address: str, timeout_s: float) -> None:
        """Close the session at ``address``, which passes the close on. If it cannot (it is
        gone, or restarted and holds no such session), every node of the later hops is
        told directly, for this hop only: the nodes after a dead one (the session's owner
        gave it up on a reroute) would hold it, and its KV memory, until their TTL."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        request = pb.CloseRequest(session_id=self.spec.session_id)
        try:
            reply = await self.channels.call(address, "Close", request, timeout_s)
            if reply.closed:
                return
        except Exception:
            log.debug("could not close session at %s", address)
        alone = pb.CloseRequest(session_id=self.spec.session_id, this_hop_only=True)
        left = max(deadline - loop.time(), 0.1)
        await asyncio.gather(
            *(self.channels.call(a, "Close", alone, left) for a in sorted(self._behind)),
            return_exceptions=True,
        )


def _forget(tasks: set[asyncio.Future]) -> Callable[[asyncio.Future], None]:
    def done(task: asyncio.Future) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # a node that is gone: nothing to report

    return done
