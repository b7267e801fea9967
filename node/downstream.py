"""A node's links to the next hop: one gRPC channel per address, shared by sessions, and
one persistent Steps stream per session."""

from __future__ import annotations

import asyncio

import grpc

from nanoshard import rpc
from nanoshard.errors import NanoshardError, Unavailable
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc


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
