"""One generation's session on the swarm, from the client's side: route-level policy.

The hop protocol itself (open, step, refill, replica, who failed) is
:class:`nanoshard.hop.NextHop`, the same link every node keeps to its next hop. The client
keeps one for the route's first hop, with the token ids it sent as replay material. What is
left here is the route as a whole:

- **plan**: the first route comes from the planner (the coordinator), or is fixed;
- **reroute**: when the link gives up (the first stage is gone with all its replicas, or
  the error names a hop behind it), avoid the failed nodes, ask for a new route, open a
  new session on it and replay every chunk sent so far through it, with backoff, a
  bounded number of times;
- **exclusions**: a node the coordinator excluded after spot-checks is left at the next
  step (a new route, replayed);
- the **spot-check hook**: the checker picks steps to check and gathers their material.

Replaying the original chunks reproduces every cache bit for bit, and sampling is a pure
function of (seed, position), so the tokens are those of a run without the failure.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from nanoshard import identity
from nanoshard.backoff import backoff_delays
from nanoshard.codec import check_codec
from nanoshard.errors import InvalidArgument, NanoshardError, Unavailable
from nanoshard.generation import DEFAULT_PREFILL_CHUNK, StepResult
from nanoshard.hop import SLOWER, Channels, NextHop, token_replay
from nanoshard.sampling import SamplingParams
from nanoshard.trace import trace_to_dict
from nanoshard.v1 import node_pb2 as pb
from nanoshard.wire import sampling_to_wire

from .checks import Checker
from .route import Route

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 60.0  # per step and per call: a hop silent for longer counts as gone
ABANDON_TIMEOUT_S = 2.0  # closing a session left behind by a reroute: best effort, brief


@dataclass
class RetryPolicy:
    """How hard a session tries before it gives up: finite, with backoff."""

    attempts: int = 6  # new routes (or, along a fixed route, new tries) per step, at least
    backoff_s: float = 0.1  # first wait; doubles each time
    max_backoff_s: float = 2.0
    avoid_s: float = 30.0  # how long a failed node is avoided
    # How long to wait for a route: a first one (a coordinator restarting), or, once a step
    # failed, one around the loss (the swarm re-placing a stage whose every node is gone)
    route_wait_s: float = 20.0


@dataclass
class Recovery:
    """A failure the session recovered from, for the result's timings."""

    pos: int  # the step's position
    # "repair" (a hop was refilled or replaced by its caller, the client or a node: detail
    # names both) | "reroute" (a new route, replayed from token ids) | "retry" (the same
    # nodes of a fixed route, tried again)
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


Planner = Callable[[list[str]], Awaitable[Route]]  # avoid list -> a fresh route


class HeadKey(NamedTuple):
    """The key a session shares with its head (``identity``'s module doc)."""

    address: str  # the head
    share: bytes  # its X25519 share
    key: bytes  # the MAC key


class SwarmSession:
    """A generation along a route, surviving the loss of nodes (see the module doc).

    Implements :class:`nanoshard.generation.AsyncSession`; :meth:`open` it first.
    ``planner`` gives a fresh route avoiding some addresses (None: the route is fixed, only
    its replicas can stand in); with ``route=None`` it gives the first route too. Along a
    fixed route (``planner=None``) a hop gone with all its replicas is tried again
    ``retry.attempts`` times (``RetryPolicy(attempts=0)``: raised at once). Its first hop's
    node is left for a replica once ``leave_slower`` times slower (``nanoshard.hop``).
    """

    def __init__(
        self,
        channels: Channels,
        route: Route | None,
        params: SamplingParams,
        max_length: int,
        codec: str = "fp32",
        *,
        planner: Planner | None = None,
        retry: RetryPolicy | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        checker: Checker | None = None,
        leave_slower: float = SLOWER,
    ) -> None:
        if route is None and planner is None:
            raise InvalidArgument("a session needs a route, or a planner to ask for one")
        self.channels = channels
        self.checker = checker
        self.params, self.max_length = params, max_length
        self.codec = check_codec(codec)
        self.planner = planner
        self.retry = retry or RetryPolicy()
        self.avoid = Avoid(self.retry.avoid_s)
        self.prefill_chunk = prefill_chunk
        self.timeout_s = timeout_s
        self.leave_slower = leave_slower  # its first hop's node is left this many times slower
        self.replay = token_replay()  # every chunk of token ids sent, as sent
        self.recoveries: list[Recovery] = []
        self.route: Route | None = route
        self.first: NextHop | None = None
        self.session_id = b""
        self._keys: dict[str, bytes] = {}  # the route's nodes' keys (Route.keys), once open
        self._share = identity.SessionShare()  # this session's half of its key with the head
        self._mac: HeadKey | None = None  # the session's MAC key with its head, once known
        self._served: list[str] = []  # the nodes that ran the last step, in route order
        self._step_id = 0
        # Traces behind the head still to be checked (the step's session, its route's keys,
        # the reply, its position and tokens, which traces), while the next step is on its
        # way; and what that found.
        self._unchecked: list[tuple[bytes, dict[str, bytes], pb.StepReply, int, int, list[int]]]
        self._unchecked = []
        self._forged: Unavailable | None = None
        self._waited_s = 0.0  # this step's time that went to no hop (StepResult.waited_ms)

    def _spec(self) -> pb.SessionSpec:
        return pb.SessionSpec(
            session_id=self.session_id,
            max_length=self.max_length,
            codec=self.codec,
            sampling=sampling_to_wire(self.params),
            client_share=self._share.share,
        )

    # ---- the route --------------------------------------------------------------------

    async def open(self) -> None:
        """Open the session along the route (or one the planner gives). While the planner
        has none (a coordinator restarting) or no node of the first hop takes the session
        (one died since the coordinator last heard from it), ask again, avoiding the failed
        nodes, with backoff, for up to ``retry.route_wait_s``."""
        give_up = time.monotonic() + self.retry.route_wait_s
        delays = backoff_delays(self.retry.backoff_s, self.retry.max_backoff_s)
        route, told = self.route, False
        while True:
            try:
                await self._open_on(route)
                return
            except Unavailable as exc:
                left = give_up - time.monotonic()
                if self.planner is None or left <= 0:
                    raise
                if not told:  # (once: the wait may be long, and silent it looks hung)
                    told = True
                    log.warning("no route yet (%s): waiting up to %.0f s for one", exc, left)
                self.avoid.add(exc.failed)
                route = None
                await asyncio.sleep(min(next(delays), left))  # (the last try at the deadline)

    async def _open_on(self, route: Route | None) -> None:
        """A new session (a new id) along ``route``, or a fresh one from the planner."""
        if route is None:
            assert self.planner is not None
            route = await self.planner(self.avoid.now())
        if self.first is not None:  # the old route's nodes free the old session now
            await self.first.close(timeout_s=ABANDON_TIMEOUT_S)
        if self.checker is not None and self.session_id:
            self.checker.end(self.session_id)
        self.route, self.session_id = route, secrets.token_bytes(16)
        self._keys = route.keys()  # what its traces are checked against
        self._share, self._mac = identity.SessionShare(), None
        self.first = NextHop(
            self.channels,
            self._spec(),
            route.hops,
            self.replay,
            timeout_s=self.timeout_s,
            avoided=self.avoid.now,
            slower=self.leave_slower,
            final_refusals=True,  # the quotas of the first hop's nodes count this client
        )
        opened = await self.first.open()
        if opened.HasField("session_key"):
            self._mac = self._mac_key(opened.session_key)

    def _mac_key(self, head: pb.SessionKey) -> HeadKey | None:
        """The session's MAC key with the head that made ``head``, if that is a share signed
        by the key the route gives it (else its traces are checked by signature alone)."""
        key = self._keys.get(head.address)
        if not key:
            return None  # a node the route gives no key for (or not on the route at all)
        assert self.route is not None
        statement = identity.session_key_statement(self.session_id, self._share.share, head.share)
        if head.address not in self.route.hops[-1].addresses or not identity.verify(
            key, head.signature, statement
        ):
            log.warning("a session key that is not the head's word, from %s: ignored", head.address)
            return None
        try:
            return HeadKey(
                head.address, head.share, self._share.client_key(self.session_id, head.share)
            )
        except InvalidArgument:
            return None

    async def _reroute(self) -> None:
        """A new route and a new session on it, replayed with everything sent so far."""
        await self._open_on(None)
        assert self.first is not None
        for pos, ids in self.replay.since(0):
            reply, _ = await self.first.step(
                self._request(self._next_step_id(), pos, ids, sample=False)
            )
            if self.checker is not None:  # the new session's steps, as its hops signed them
                self.checker.observe(self.session_id, pos, reply)

    # ---- steps ------------------------------------------------------------------------

    def _next_step_id(self) -> int:
        self._step_id += 1
        return self._step_id

    def _request(
        self, step_id: int, pos: int, ids: list[int], *, sample: bool, return_output: bool = False
    ) -> pb.StepRequest:
        return pb.StepRequest(
            session_id=self.session_id,
            step_id=step_id,
            pos=pos,
            tokens=pb.Tokens(ids=ids),
            sample=sample,
            return_output=return_output,
            mac_only=self._mac is not None,  # (the head need not sign what no check compares)
        )

    async def step(self, tokens: list[int], pos: int) -> StepResult:
        if self.first is None:
            raise InvalidArgument("open the session before its first step")
        self._waited_s = 0.0
        await self._leave_excluded(pos)
        hops: list[dict] = []
        reply = None
        checks: list[int] = []  # the hops whose shadows compare this step (spot-checks)
        for i in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[i : i + self.prefill_chunk]
            last = i + len(chunk) == len(tokens)
            assert self.route is not None
            head = False  # a check point asks the head for its logits (followed or not)
            if last and self.checker is not None:
                checks, head = self.checker.plan(self.route, self.session_id)
            reply = await self._send(pos + i, chunk, sample=last, return_output=head)
            self.replay.add(pos + i, chunk)
            if self.checker is not None:
                self.checker.observe(self.session_id, pos + i, reply)
            hops.extend(trace_to_dict(h) for h in reply.hops)
            for h in reply.hops:  # repairs made behind the first hop show in the traces
                if h.repair:
                    self.recoveries.append(
                        Recovery(pos + i, "repair", f"{h.node}: {h.repair}", h.downstream_ms)
                    )
        if reply is None or not reply.has_token:
            raise NanoshardError("the route answered no token: does its last hop hold the head?")
        self._served = [h.address for h in reply.hops]
        if checks and self.checker is not None and self.route is not None:
            self._check_pending()  # the traces a check point compares are their nodes' own
            self._raise_forged()
            # The material comes over blocking calls: off the event loop (a check point
            # is a small share of all steps).
            spec, route = self._spec(), self.route
            gathering = time.perf_counter()
            for k in checks:
                await asyncio.to_thread(
                    self.checker.gather, route, k, spec, self.replay.chunks, reply
                )
            self._waited_s += time.perf_counter() - gathering
        return StepResult(reply.token, hops, self._waited_s * 1e3)

    async def _leave_excluded(self, pos: int) -> None:
        """If spot-checks got a node of this session excluded, go on along a new route
        (replayed from token ids): what that node computes is not to be trusted."""
        if self.checker is None or self.planner is None:
            return
        bad = sorted(set(self.checker.excluded(self._served)))
        if not bad:
            return
        started = time.perf_counter()
        self.avoid.add(bad)
        await self._reroute()
        self._served = []
        ms = (time.perf_counter() - started) * 1e3
        self._waited_s += ms / 1e3
        self.recoveries.append(Recovery(pos, "reroute", f"{', '.join(bad)} excluded", ms))

    async def _send(
        self, pos: int, ids: list[int], *, sample: bool, return_output: bool = False
    ) -> pb.StepReply:
        """Send one chunk along the route. When the first hop's link gives up (UNAVAILABLE:
        its stage, or a hop behind it, is gone with every replica), go on along a new route
        from the planner, replayed; along a fixed route, try the same nodes again (a stream
        that broke, an answer that was lost). With backoff, ``retry.attempts`` times; with a
        planner, also until ``retry.route_wait_s`` after the first failure, so a stage lost
        with all its nodes is waited for while the coordinator places it again (a node's
        heartbeats time out, another loads the units: about 10 s with the defaults)."""
        # One step id for every attempt: a node that ran the step already (and whose answer
        # was lost) then answers it again, or forwards its stored output, instead of
        # refusing a second copy of positions it holds.
        step_id = self._next_step_id()
        delays = backoff_delays(self.retry.backoff_s, self.retry.max_backoff_s)
        failure: Unavailable | None = None  # the last try's
        first: Unavailable | None = None  # the first try's: what was lost
        attempt, failed_at = 0, 0.0
        started = time.perf_counter()  # (a recovery's cost: from the step's first try on)
        while True:
            try:
                if failure is not None and self.planner is not None:
                    await self._reroute()
                assert self.first is not None
                tried = time.perf_counter()  # (this try's start: the time before it is lost)
                request = self._request(
                    step_id, pos, ids, sample=sample, return_output=return_output
                )
                reply, repair = await self.first.step(request, meanwhile=self._check_pending)
                self._raise_forged()  # a trace of an earlier step that its node did not sign
                self._check_signatures(
                    reply, pos, len(ids), self._followed(), check_point=return_output
                )
            except Unavailable as exc:
                log.info("step at %d failed (%s)", pos, exc)
                self.avoid.add(exc.failed)
                if first is None:
                    first, failed_at = exc, time.monotonic()
                    if self.planner is not None:  # (said once: the wait may be long)
                        log.warning(
                            "the step at position %d failed (%s): looking for a new route "
                            "for up to %.0f s",
                            pos,
                            exc,
                            self.retry.route_wait_s,
                        )
                failure = exc
                attempt += 1
                left = 0.0  # (along a fixed route no new route comes: tries alone count)
                if self.planner is not None:
                    left = failed_at + self.retry.route_wait_s - time.monotonic()
                tried_all = attempt > self.retry.attempts
                if self.retry.attempts == 0 or (tried_all and left <= 0):
                    break
                await asyncio.sleep(min(next(delays), left) if tried_all else next(delays))
                continue
            ms = (time.perf_counter() - started) * 1e3
            self._waited_s += tried - started
            if first is not None and failure is not None:
                kind = "reroute" if self.planner is not None else "retry"
                self.recoveries.append(Recovery(pos, kind, _lost(first, failure, attempt), ms))
            if repair:
                self.recoveries.append(Recovery(pos, "repair", f"client: {repair}", ms))
            return reply
        assert failure is not None
        if self.retry.attempts == 0:
            raise failure
        took = time.monotonic() - failed_at
        assert first is not None
        since = "" if str(first) == str(failure) else f" (the first: {first})"
        raise Unavailable(
            f"gave up after {attempt} tries in {took:.0f} s: {failure}{since}", failure.failed
        )

    def _followed(self) -> list[int]:
        """The hops of this session whose traces spot-checks compare (a shadow follows)."""
        return self.checker.followed(self.session_id) if self.checker is not None else []

    def _check_signatures(
        self,
        reply: pb.StepReply,
        pos: int,
        n_tokens: int,
        followed: Sequence[int] = (),
        *,
        check_point: bool = False,
    ) -> None:
        """A trace that vouches for something must carry its node's signature over the
        step: a hop that rewrote a later hop's trace or token is caught. The node of a
        forged trace and every hop that relayed it may have forged it: all are avoided. A
        reply with a token must carry a trace for every hop of the route.

        What a trace vouches for: the head's, the token answered (and the logits returned),
        checked now, before the token is answered (on the session's MAC if the head made
        one, else by signature); a ``followed`` hop's, what a check point
        compares, checked while the next step is on its way (``_check_pending``; a forged
        one fails that step) and always before the check point. A head that made a MAC
        signs only its ``check_point`` steps (the steps that asked for its output: all a
        check compares of it; ``node/evidence.maced_only``), so only those of its
        signatures are checked, when it is followed. The other hops' traces
        vouch for nothing the client uses, and a signature check costs more CPU (about
        60 µs) than a hop's own Python: they are not checked. A step without a token (a
        prefill chunk) has every trace checked."""
        keys = self._keys
        if not any(keys.values()):
            return  # a route given by hand: nobody to check against
        assert self.route is not None
        if reply.has_token and len(reply.hops) != len(self.route.hops):
            relays = [h.address for h in reply.hops]
            raise Unavailable(
                f"{', '.join(relays)} answered a token without every hop's trace", relays
            )
        told = reply.hops[-1].session_key if reply.hops else None
        if told is not None and told.share and (self._mac is None or told.share != self._mac.share):
            # a head this session was not opened on (the hop before it moved here): its key
            self._mac = self._mac_key(told) or self._mac
        if reply.has_token:
            head = len(reply.hops) - 1
            mac = self._mac
            forged = _forged_trace(self.session_id, keys, reply, head, pos, n_tokens, mac)
            if forged is not None:
                raise forged
            # (a head accepted on its MAC has its check point's signature checked later if
            # it is followed; it signs no other step)
            behind = [
                k for k in followed if k < head or (k == head and mac is not None and check_point)
            ]
            if behind:
                self._unchecked.append((self.session_id, keys, reply, pos, n_tokens, behind))
        else:
            for i in range(len(reply.hops)):
                forged = _forged_trace(self.session_id, keys, reply, i, pos, n_tokens)
                if forged is not None:
                    raise forged

    def _check_pending(self) -> None:
        """Check the followed hops' traces of the steps answered so far (never raises: what
        it finds waits in ``_forged``)."""
        pending, self._unchecked = self._unchecked, []
        for session_id, keys, reply, pos, n_tokens, behind in pending:
            for i in behind:
                forged = _forged_trace(session_id, keys, reply, i, pos, n_tokens)
                if forged is not None and self._forged is None:
                    self._forged = forged

    def _raise_forged(self) -> None:
        forged, self._forged = self._forged, None
        if forged is not None:
            raise forged

    async def close(self) -> None:
        """Close the session on its route (else the nodes' TTL frees it)."""
        if self.first is not None:
            await self.first.close()
            self.first = None
        if self.checker is not None and self.session_id:
            self.checker.end(self.session_id)


def _lost(first: Unavailable, last: Unavailable, tries: int) -> str:
    """A recovery's reason: the first failure (what was lost; the later tries meet its
    consequences, such as no node serving those units yet), and the last if it differs."""
    if tries == 1 or str(last) == str(first):
        return str(first)
    return f"{first}; then {tries - 1} more failed tries, the last: {last}"


def _forged_trace(
    session_id: bytes,
    keys: dict[str, bytes],
    reply: pb.StepReply,
    i: int,
    pos: int,
    n_tokens: int,
    mac: HeadKey | None = None,
) -> Unavailable | None:
    """Why trace ``i`` of ``reply`` (the step at ``pos`` of ``session_id``) is not the word
    of its node (``keys``: the route's), or None if it is. The head's trace is its word if
    it carries the session's ``mac`` (the head, the key) over the step, or else its node's
    signature: a MAC that fails (a head restarted with a new key, or a relay's forgery) is
    judged by the signature."""
    trace = reply.hops[i]
    key = keys.get(trace.address)
    if key == b"":
        return None  # a node of the route whose key nobody gave
    head = i == len(reply.hops) - 1 and reply.has_token
    maced = (
        head
        and mac is not None
        and trace.address == mac.address
        and identity.step_maced(mac.key, session_id, pos, n_tokens, trace)
    )
    # (a trace naming a node the route does not is forged too: its relay renamed it)
    forged = not maced and (
        key is None or not identity.step_signed(key, session_id, pos, n_tokens, trace)
    )
    if not forged and head:
        output = reply.output if reply.HasField("output") else None
        forged = identity.output_digest(output, reply.token) != trace.output_digest
    if not forged:
        return None
    relays = [h.address for h in reply.hops[: i + 1]]
    return Unavailable(
        f"a trace of {trace.address} that its signature does not hold, relayed "
        f"by {', '.join(relays[:-1]) or 'nobody'} (step at position {pos})",
        relays,
    )
