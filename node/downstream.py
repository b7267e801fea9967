"""A node's links to the next hop: one gRPC channel per address, shared by sessions, and
one persistent Steps stream per session."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import OrderedDict
from typing import Any

import grpc

from nanoshard import codec as codecs
from nanoshard import rpc
from nanoshard.errors import (
    CacheMismatch,
    FailedPrecondition,
    InvalidArgument,
    NanoshardError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from nanoshard.security import Security
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc

from .sessions import NodeSession
from .wire import spec_to_wire

log = logging.getLogger(__name__)


MAX_CHANNELS = 256  # channels kept open to other nodes; the least recently used go first


class Channels:
    """gRPC channels to other nodes, by address: at most ``MAX_CHANNELS``, so routes naming
    endless addresses (garbage, or a huge swarm) cannot grow a node without bound."""

    def __init__(
        self, max_message_bytes: int = rpc.MAX_MESSAGE_BYTES, security: Security | None = None
    ) -> None:
        self._max_message_bytes = max_message_bytes
        self.security = security or Security()
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self._closing: set[asyncio.Future] = set()  # evicted channels still closing

    def stub(self, address: str) -> pb_grpc.NodeStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = rpc.open_channel(
                address, self.security, aio=True, max_message_bytes=self._max_message_bytes
            )
            self._channels[address] = channel
            while len(self._channels) > MAX_CHANNELS:
                _, old = self._channels.popitem(last=False)
                closing = asyncio.ensure_future(old.close(grace=30))  # calls on it may finish
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
        self._channels.move_to_end(address)
        return pb_grpc.NodeStub(channel)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """For one call to another node: this node's swarm token, if the swarm has a key."""
        return self.security.metadata()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


class Link:
    """A session's stream to its next hop. Steps are sent one at a time (the session lock
    orders them), so each write is followed by exactly one read."""

    def __init__(
        self,
        stub: pb_grpc.NodeStub,
        address: str,
        timeout_s: float,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.address = address
        self._timeout_s = timeout_s
        self._call = stub.Steps(metadata=metadata)

    async def step(self, request: pb.StepRequest) -> pb.StepReply:
        try:
            reply = await _exchange(self._call, request, self._timeout_s)
        except grpc.aio.AioRpcError as err:
            raise rpc.error_from_rpc(err, self.address) from None
        except asyncio.InvalidStateError:  # the stream already ended
            raise Unavailable(
                f"{self.address}: the session stream had ended", [self.address]
            ) from None
        except asyncio.TimeoutError:
            self.close()
            raise Unavailable(f"{self.address}: no answer within {self._timeout_s:.0f} s") from None
        if reply is grpc.aio.EOF:
            raise await self._ended()
        return reply

    async def _ended(self) -> NanoshardError:
        code = await self._call.code()
        details = await self._call.details()
        trailers = await self._call.trailing_metadata()
        err = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details)
        return rpc.error_from_rpc(err, self.address)

    def close(self) -> None:
        self._call.cancel()


if sys.version_info >= (3, 11):

    async def _exchange(call: Any, request: pb.StepRequest, timeout_s: float) -> Any:
        """Write a step on the stream and read its reply, within ``timeout_s`` (no task of
        its own, unlike ``wait_for`` before Python 3.12: this is on every step's path)."""
        async with asyncio.timeout(timeout_s):
            await call.write(request)
            return await call.read()

else:

    async def _exchange(call: Any, request: pb.StepRequest, timeout_s: float) -> Any:
        await asyncio.wait_for(call.write(request), timeout_s)
        return await asyncio.wait_for(call.read(), timeout_s)


class Forwarder:
    """A node's side of its next hop: open sessions there, send steps, and repair the hop
    when it fails: reopen and refill it from this node's replay material, or switch to a
    replica of it. No recomputation, here or upstream."""

    def __init__(self, channels: Channels, node_name: str, timeout_s: float) -> None:
        self.channels = channels
        self.node_name = node_name
        self.timeout_s = timeout_s

    async def open(self, session: NodeSession, route: list[pb.Hop]) -> pb.OpenReply:
        """Open the session on the next hop (the first of its nodes that takes it)."""
        hop = route[0]
        failures, failed = [], []
        for address in self._candidates(session, hop):
            try:
                reply = await self._open_at(session, route, address)
            except InvalidArgument:
                raise  # the request itself is wrong: no replica will take it
            except Unavailable as exc:
                if exc.failed and address not in exc.failed:
                    raise  # a later hop is gone, not this one
                failures.append(str(exc))
                failed.append(address)
                continue
            except (FailedPrecondition, ResourceExhausted) as exc:  # serves other units, or full
                failures.append(str(exc))
                failed.append(address)
                continue
            self._use_link(session, address)
            return reply
        raise Unavailable(
            f"no node could open units [{hop.start}, {hop.end}): " + "; ".join(failures), failed
        )

    async def _open_at(
        self, session: NodeSession, route: list[pb.Hop], address: str
    ) -> pb.OpenReply:
        hop = route[0]
        request = pb.OpenRequest(
            spec=spec_to_wire(session.spec), route=route[1:], start=hop.start, end=hop.end
        )
        try:
            return await self.channels.stub(address).Open(
                request, timeout=self.timeout_s, metadata=self.channels.metadata()
            )
        except grpc.aio.AioRpcError as err:
            raise rpc.error_from_rpc(err, address) from None

    def _candidates(self, session: NodeSession, hop: pb.Hop) -> list[str]:
        """The current next hop first if it still serves the stage, then the route's order."""
        current = session.downstream.address if session.downstream else None
        addresses = list(hop.addresses)
        if current in addresses:
            addresses.remove(current)
            addresses.insert(0, current)
        return addresses

    def _use_link(self, session: NodeSession, address: str) -> Link:
        if session.downstream is None or session.downstream.address != address:
            if session.downstream is not None:
                session.downstream.close()
            session.downstream = Link(
                self.channels.stub(address), address, self.timeout_s, self.channels.metadata()
            )
        return session.downstream

    @staticmethod
    def _drop_link(session: NodeSession) -> None:
        if session.downstream is not None:
            session.downstream.close()
            session.downstream = None

    async def step(
        self, session: NodeSession, route: list[pb.Hop], request: pb.StepRequest
    ) -> tuple[pb.StepReply, str]:
        """Send a step to the next hop. If that hop lost the session or part of its cache,
        reopen and refill it from the replay material; if it is gone, try its replicas.
        Bounded: a few repairs per replica, each replica once. Returns the reply and what
        was repaired ("" if nothing)."""
        failures: list[str] = []
        failed: list[str] = []
        for address in self._candidates(session, route[0]):
            have: int | None = None  # positions the hop holds, once a repair is needed
            for _ in range(3):  # a refill can race with expiry or a restart
                try:
                    repair = ""
                    if have is not None:
                        await self._refill(session, route, address, have, request)
                        repair = f"refilled {address} from {max(have, 0)} to {request.pos}"
                    reply = await self._use_link(session, address).step(request)
                    if failures:
                        repair = "; ".join([*failures, repair or f"switched to {address}"])
                    return reply, repair
                except CacheMismatch as exc:
                    self._drop_link(session)
                    have = exc.length
                except NotFound:
                    self._drop_link(session)
                    have = -1  # not open there: open it first
                except InvalidArgument:
                    self._drop_link(session)
                    raise
                except (Unavailable, ResourceExhausted, FailedPrecondition) as exc:
                    self._drop_link(session)
                    if isinstance(exc, Unavailable) and exc.failed and address not in exc.failed:
                        raise  # the next hop is fine; a hop behind it is gone: say so upstream
                    failures.append(str(exc))
                    failed.append(address)
                    break
            else:
                failures.append(f"{address}: could not be brought up to position {request.pos}")
        hop = route[0]
        raise Unavailable(
            f"units [{hop.start}, {hop.end}) unreachable from {self.node_name}: "
            + "; ".join(failures),
            failed,
        )

    async def _refill(
        self,
        session: NodeSession,
        route: list[pb.Hop],
        address: str,
        have: int,
        request: pb.StepRequest,
    ) -> None:
        """Bring the hop at ``address`` from ``have`` positions (-1: session not open there)
        to ``request.pos`` with what this node sent before: no recomputation here or upstream."""
        if have < 0:
            have = (await self._open_at(session, route, address)).length
        upto = request.pos
        if have > upto:
            raise FailedPrecondition(
                f"{address} holds {have} positions, more than this node's {upto}: it belongs to "
                "another history of this session"
            )
        link = self._use_link(session, address)
        for sent in session.sent_since(have):
            if sent.pos >= upto:
                break
            message, pos = sent.message, sent.pos
            if pos < have:  # the hop holds part of this chunk: send only the rest
                message, pos = tail_rows(message, have - pos), have
            fill = pb.StepRequest(
                session_id=session.spec.session_id,
                step_id=request.step_id,  # with a lower pos than the step itself: not a duplicate
                pos=pos,
                activations=message,
            )
            await link.step(fill)
        log.info("refilled %s from %d to %d positions", address, have, upto)


def tail_rows(message: pb.Activations, skip: int) -> pb.Activations:
    """The rows after the first ``skip`` of an encoded (tokens, n_embd) matrix, as the same
    bytes the whole matrix carried (no re-encoding: a refill must be bit for bit)."""
    rows, width = message.shape
    spec = codecs.parse_codec(message.codec)
    n, keep = rows * width, (rows - skip) * width
    if spec.kind != "int8":
        size = spec.nbytes(n) // n
        payload = message.payload[skip * width * size :]
    elif width % spec.block == 0:  # int8 blocks never straddle rows: cut scales and values
        n_blocks = n // spec.block
        scale_bytes = (spec.nbytes(n) - n) // n_blocks
        first = skip * width // spec.block
        payload = message.payload[first * scale_bytes : n_blocks * scale_bytes]
        payload += message.payload[n_blocks * scale_bytes + skip * width :]
    else:  # blocks straddle rows: re-encode (exact to within the codec's bound only)
        decoded = codecs.decode(message.payload, (rows, width), message.codec)[skip:]
        payload = codecs.encode(decoded, message.codec)
    assert len(payload) == spec.nbytes(keep)  # our own bytes, not remote input
    return pb.Activations(codec=message.codec, shape=[rows - skip, width], payload=payload)
