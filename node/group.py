"""A node's place in a tensor-parallel group (``nanoshard/tp.py``), and rank 0's links to the
other members.

The data plane sees a group as one hop: routes send steps to its rank 0 only. Rank 0 runs
each open, step and close of the group on its own shard and hands the same command to every
other member, over one ordered ``Node.Group`` stream per member; a member runs the commands
in the order they come. So every member runs the group's collectives in one order: rank 0
hands a step to the members and queues its own compute in the same event-loop turn, and
its compute worker (and each member's) runs jobs first in, first out, one step at a time
(a group's steps are never batched).

A member that fails (its stream ends, or its collective partner is gone) breaks the group:
the step fails on every member (the hop fails over like any other), and the node stops
serving the group's stage until the coordinator forms a new group.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from nanoshard.errors import Unavailable
from nanoshard.hop import Channels
from nanoshard.tp import Collective, CollectiveStats
from nanoshard.v1 import coordinator_pb2 as cpb
from nanoshard.v1 import node_pb2 as pb

from .worker import StageStep

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 120.0  # a member's answer to one command (its compute and collectives)
LIVE_WEIGHT = 0.05  # of a step's collectives in the live figure (about the last 20 steps)
STUCK_S = 2.0  # a node placed elsewhere gives its old group up once a collective waits this
STUCK_POLL_S = 0.25


async def give_up_when_stuck(group: Membership, give_up: Callable[[Membership, str], None]) -> None:
    """Watch ``group``, which this node leaves, while its new stage waits for the compute
    worker: a collective of the old group may hold the worker, waiting for a partner gone
    or hung, which would queue the new stage behind it until gloo's timeout (20 s in a node).
    Once one has waited ``STUCK_S``, ``give_up`` the group (which ends the wait). A
    healthy group's collectives take milliseconds, and it serves until the new stage is
    ready; run until cancelled or the group breaks."""
    while not group.broken:
        if (waited := group.collective.waiting_s()) >= STUCK_S:
            give_up(
                group, f"a collective waited {waited:.0f} s for a partner as this node moved on"
            )
            return
        await asyncio.sleep(STUCK_POLL_S)


@dataclass
class Membership:
    """This node's group: who is in it, its collectives, and (rank 0) links to the others."""

    tp: cpb.TpGroup
    collective: Collective
    links: list[MemberLink] = field(default_factory=list)
    broken: str = ""  # why the group no longer works ("" while it does)
    # Its links as this member measures them, for the coordinator's cost model.
    link: cpb.GroupLink = field(default_factory=cpb.GroupLink)

    @property
    def rank(self) -> int:
        return self.tp.rank

    @property
    def size(self) -> int:
        return self.tp.size

    @property
    def id(self) -> str:
        return self.tp.id

    def observe(self, stats: CollectiveStats) -> None:
        """Fold one step's collectives into ``link.live_ms`` (an EWMA of one collective)."""
        if stats.calls:
            ms = stats.ms / stats.calls
            live = self.link.live_ms
            self.link.live_ms = ms if live == 0 else live + LIVE_WEIGHT * (ms - live)

    def send(self, command: pb.GroupCommand) -> list[asyncio.Future[pb.GroupAck]]:
        """Rank 0: hand ``command`` to every other member, in order; their acks to await.
        Synchronous: the command is queued before the caller's next await."""
        command.group = self.tp.id
        return [link.send(command) for link in self.links]

    def close(self) -> None:
        for link in self.links:
            link.close()
        self.links.clear()


@dataclass
class GroupStep(StageStep):
    """A step of a sharded stage, with what its collectives cost (read once it ran)."""

    stats: CollectiveStats = field(default_factory=CollectiveStats)

    def __call__(self) -> Any:
        collective = self.stage.shard.collective
        collective.take()  # one step at a time on this thread: nothing else is counted
        try:
            return super().__call__()
        finally:
            self.stats = collective.take()


class MemberLink:
    """Rank 0's ordered stream to one other member: commands go out in the order ``send``
    is called, each answered by one ack, in order."""

    def __init__(self, channels: Channels, address: str, on_broken: Callable[[str], None]) -> None:
        self.channels = channels
        self.address = address
        self.on_broken = on_broken
        self._call: Any = None
        self._outbox: asyncio.Queue[pb.GroupCommand] = asyncio.Queue()
        self._waiting: deque[asyncio.Future[pb.GroupAck]] = deque()
        self._tasks: list[asyncio.Task] = []
        self.error: Exception | None = None

    def start(self) -> None:
        self._call = self.channels.stub(self.address).Group(metadata=self.channels.metadata())
        self._tasks = [
            asyncio.create_task(self._write(), name=f"group-write-{self.address}"),
            asyncio.create_task(self._read(), name=f"group-read-{self.address}"),
        ]

    def send(self, command: pb.GroupCommand) -> asyncio.Future[pb.GroupAck]:
        future: asyncio.Future[pb.GroupAck] = asyncio.get_running_loop().create_future()
        # A step that fails before awaiting its acks (its own collective failed) leaves
        # them: their failure is the link's, said once (``_fail``), not asyncio's "never
        # retrieved" error with a traceback.
        future.add_done_callback(_retrieved)
        if self.error is not None:
            future.set_exception(self.error)
            return future
        self._waiting.append(future)
        self._outbox.put_nowait(command)
        return future

    async def _write(self) -> None:
        try:
            while True:
                await self._call.write(await self._outbox.get())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            self._fail(f"cannot send to group member {self.address}: {exc}")

    async def _read(self) -> None:
        try:
            while True:
                ack = await self._call.read()
                if ack is grpc.aio.EOF:
                    break
                if self._waiting:
                    future = self._waiting.popleft()
                    if not future.done():
                        future.set_result(ack)
            status = await self._call.code()
            details = await self._call.details()
            if status != grpc.StatusCode.OK or self._waiting:
                self._fail(f"group member {self.address} ended its stream: {status.name} {details}")
        except grpc.aio.AioRpcError as err:
            self._fail(f"group member {self.address} failed: {err.code().name} {err.details()}")

    def _fail(self, why: str, broken: bool = True) -> None:
        if self.error is None:
            self.error = Unavailable(why, [self.address])
            if broken:
                log.warning("%s", why)
                self.on_broken(why)
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(self.error)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._call is not None:
            self._call.cancel()
        self._fail(f"the group link to {self.address} was closed", broken=False)


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def acks(futures: list[asyncio.Future[pb.GroupAck]]) -> list[pb.GroupAck]:
    """The members' acks, or Unavailable naming the first member that failed."""
    if not futures:
        return []
    return list(await asyncio.wait_for(asyncio.gather(*futures), ACK_TIMEOUT_S))
