"""A node's links to the next hop: one gRPC channel per address, shared by sessions, and
one persistent Steps stream per session."""

from __future__ import annotations

import asyncio
import logging

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
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc

from .sessions import NodeSession
from .wire import spec_to_wire

log = logging.getLogger(__name__)


class Channels:
    """gRPC channels to other nodes, by address."""

    def __init__(self, max_message_bytes: int = rpc.MAX_MESSAGE_BYTES) -> None:
        self._options = rpc.channel_options(max_message_bytes)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> pb_grpc.NodeStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
        return pb_grpc.NodeStub(channel)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


class Link:
    """A session's stream to its next hop. Steps are sent one at a time (the session lock
    orders them), so each write is followed by exactly one read."""

    def __init__(self, stub: pb_grpc.NodeStub, address: str, timeout_s: float) -> None:
        self.address = address
        self._timeout_s = timeout_s
        self._call = stub.Steps()

    async def step(self, request: pb.StepRequest) -> pb.StepReply:
        try:
            await asyncio.wait_for(self._call.write(request), self._timeout_s)
            reply = await asyncio.wait_for(self._call.read(), self._timeout_s)
        except grpc.aio.AioRpcError as err:
            raise rpc.error_from_rpc(err, self.address) from None
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
        request = pb.OpenRequest(
            spec=spec_to_wire(session.spec), route=route[1:], start=hop.start, end=hop.end
        )
        failures, failed = [], []
        for address in self._candidates(session, hop):
            try:
                reply = await self.channels.stub(address).Open(request, timeout=self.timeout_s)
            except Exception as err:  # grpc.aio.AioRpcError
                exc = rpc.error_from_rpc(err, address)
                if isinstance(exc, InvalidArgument | FailedPrecondition):
                    raise exc from None
                if isinstance(exc, Unavailable) and exc.failed and address not in exc.failed:
                    raise exc from None  # a later hop is gone, not this one
                failures.append(str(exc))
                failed.append(address)
                continue
            self._use_link(session, address)
            return reply
        raise Unavailable(
            f"no node could open units [{hop.start}, {hop.end}): " + "; ".join(failures), failed
        )

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
            session.downstream = Link(self.channels.stub(address), address, self.timeout_s)
        return session.downstream

    async def step(
        self, session: NodeSession, route: list[pb.Hop], request: pb.StepRequest
    ) -> pb.StepReply:
        """Send a step to the next hop. If that hop lost the session or part of its cache,
        reopen and refill it from the replay material; if it is gone, try its replicas."""
        failures: list[str] = []
        failed: list[str] = []
        for address in self._candidates(session, route[0]):
            link = self._use_link(session, address)
            for _ in range(3):  # a refill can race with expiry or a restart; bounded
                try:
                    return await link.step(request)
                except CacheMismatch as exc:
                    link = await self._refill(
                        session, address, exc.length, request.pos, request.step_id
                    )
                except NotFound:
                    await self.open(session, route)
                    link = await self._refill(session, address, 0, request.pos, request.step_id)
                except (Unavailable, ResourceExhausted) as exc:
                    if isinstance(exc, Unavailable) and exc.failed and address not in exc.failed:
                        raise  # the next hop is fine; a hop behind it is gone: say so upstream
                    failures.append(str(exc))
                    failed.append(address)
                    session.downstream = None
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
        self, session: NodeSession, address: str, have: int, upto: int, step_id: int
    ) -> Link:
        """Bring the next hop's cache from ``have`` to ``upto`` positions with what this node
        sent before: no recomputation here or upstream."""
        if session.downstream is not None:
            session.downstream.close()
            session.downstream = None
        link = self._use_link(session, address)
        if have > upto:
            raise FailedPrecondition(
                f"{address} holds {have} positions, more than this node's {upto}: it belongs to "
                "another history of this session"
            )
        for sent in session.sent_since(have):
            if sent.pos >= upto:
                break
            message, pos = sent.message, sent.pos
            if pos < have:  # the hop holds part of this chunk: send only the rest
                message, pos = self._tail(message, have - pos), have
            fill = pb.StepRequest(
                session_id=session.spec.session_id,
                step_id=step_id,  # with a lower pos than the step itself: not a duplicate
                pos=pos,
                activations=message,
            )
            await link.step(fill)
        log.info("refilled %s from %d to %d positions", address, have, upto)
        return link

    def _tail(self, message: pb.Activations, skip: int) -> pb.Activations:
        rows = codecs.decode(message.payload, tuple(message.shape), message.codec)[skip:]
        return pb.Activations(
            codec=message.codec,
            shape=list(rows.shape),
            payload=codecs.encode(rows, message.codec),
        )
