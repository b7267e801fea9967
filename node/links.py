"""The links from this node to the peers it may form a tensor-parallel group with.

The coordinator lists such peers in each heartbeat reply (``HeartbeatReply.peers``); the
node measures its link to each with ``Node.Ping`` — the round trip of an empty ping, and
what a 1 MiB ping carries over its time, round trip included, for the bandwidth — and reports them in its heartbeats
(``NodeLoad.peer_links``), so that placement prices a group from measured links before it
forms one (``coordinator/groups.py``). Every run also pings this node itself: that round
trip is what the two hosts' processes cost whatever the distance (waking, gRPC, Python),
and a peer's round trip above it is the network's.

One peer at a time, in the background, again after ``REMEASURE_S``; a peer that does not
answer is left unmeasured (the coordinator keeps its constants for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from dataclasses import dataclass

from nanoshard.errors import NanoshardError
from nanoshard.hop import Channels
from nanoshard.tp import MAX_PEERS
from nanoshard.v1 import coordinator_pb2 as cpb
from nanoshard.v1 import node_pb2 as pb

log = logging.getLogger(__name__)

PING_MAX_BYTES = 1 << 20  # what a ping may carry; the bandwidth probe's payload
ROUNDS = 5  # pings per figure; the median counts
REMEASURE_S = 600.0
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Measured:
    rtt_ms: float
    self_rtt_ms: float
    bytes_per_s: float
    at: float  # time.monotonic() of the measurement


async def round_trip(channels: Channels, address: str) -> tuple[float, float]:
    """(round trip ms, bytes/s) to the node at ``address``: medians of ``ROUNDS``."""
    empty, full = pb.PingRequest(), pb.PingRequest(payload=bytes(PING_MAX_BYTES))
    await channels.call(address, "Ping", empty, TIMEOUT_S)  # connects; not counted
    rtts, fulls = [], []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        await channels.call(address, "Ping", empty, TIMEOUT_S)
        t1 = time.perf_counter()
        await channels.call(address, "Ping", full, TIMEOUT_S)
        t2 = time.perf_counter()
        rtts.append(t1 - t0)
        fulls.append(t2 - t1)
    rtt, transfer = statistics.median(rtts), statistics.median(fulls)
    return rtt * 1e3, PING_MAX_BYTES / transfer


class PeerLinks:
    """What this node measured of its links to the peers it was last asked to measure."""

    def __init__(self, channels: Channels, own_address: str) -> None:
        self.channels = channels
        self.own_address = own_address
        self.peers: list[str] = []
        self.measured: dict[str, Measured] = {}
        self._task: asyncio.Task | None = None

    def want(self, peers: list[str]) -> None:
        """The coordinator's latest list: measure those not measured lately (background)."""
        self.peers = [p for p in peers if p != self.own_address][:MAX_PEERS]
        for gone in set(self.measured) - set(self.peers):
            del self.measured[gone]
        if self._task is None or self._task.done():
            stale = [p for p in self.peers if self._stale(p)]
            if stale:
                self._task = asyncio.create_task(self._measure(stale))

    def report(self) -> list[cpb.PeerLink]:
        return [
            cpb.PeerLink(
                address=address,
                rtt_ms=m.rtt_ms,
                self_rtt_ms=m.self_rtt_ms,
                bytes_per_s=m.bytes_per_s,
            )
            for address, m in self.measured.items()
        ]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _stale(self, peer: str) -> bool:
        m = self.measured.get(peer)
        return m is None or time.monotonic() - m.at > REMEASURE_S

    async def _measure(self, peers: list[str]) -> None:
        for peer in peers:
            try:
                own_rtt, _ = await round_trip(self.channels, self.own_address)
                rtt, rate = await round_trip(self.channels, peer)
            except NanoshardError as e:
                log.info("link to %s not measured: %s", peer, e)
                continue
            if peer in self.peers:  # (still wanted)
                self.measured[peer] = Measured(rtt, own_rtt, rate, time.monotonic())
                log.info(
                    "link to %s: %.2f ms round trip (%.2f to itself), %.0f MB/s",
                    peer,
                    rtt,
                    own_rtt,
                    rate / 1e6,
                )
