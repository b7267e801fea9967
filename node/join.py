"""``nanoshard-node join``: a volunteer joins a swarm and serves whatever stage the
coordinator gives it, for as long as it runs.

The life of a node: find the coordinator (mDNS, or --coordinator), read the model card,
measure its capacity (cached), start its data plane with no stage, advertise itself,
register, fetch and load its stage, then heartbeat. A new assignment in a heartbeat reply
is loaded beside the old stage and swapped in; sessions already open finish on the old
one. A tensor-parallel group that breaks (or does not form) is given up: the node says so
in its heartbeats, and the coordinator places it again. If the coordinator restarts, the
node joins again and keeps serving meanwhile. On SIGINT/SIGTERM it deregisters, stops
advertising and ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psutil
import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry

from nanoshard import PROTOCOL_VERSION, discovery, rpc
from nanoshard.backoff import backoff_delays
from nanoshard.checkpoint import open_checkpoint
from nanoshard.cliutil import NODE, format_size, stop_on_signals
from nanoshard.config import GPTConfig, describe_units
from nanoshard.engine import Stage, parse_dtype, pick_device
from nanoshard.errors import (
    CheckpointError,
    FailedPrecondition,
    InvalidArgument,
    Stranger,
    Unavailable,
)
from nanoshard.hop import SLOWER
from nanoshard.identity import NodeKey, join_proof_message
from nanoshard.security import Security
from nanoshard.tp import Collective, CollectiveError, failure_reason, shard
from nanoshard.v1 import coordinator_pb2 as cpb
from nanoshard.v1 import coordinator_pb2_grpc as cpb_grpc

from .capacity import load_or_measure, to_wire
from .group import MemberLink, Membership, give_up_when_stuck
from .links import PeerLinks
from .quotas import QuotaLimits
from .server import DataPlane
from .weights import DEFAULT_CACHE_DIR, fetch_stage, verify_local_stage
from .worker import MAX_BATCH, MAX_QUEUE

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_SHARE = 64 * 2**20  # weights and KV caches get at least this, or the node does not start
# A step's own buffers, kept out of the KV budget of a node whose share is the whole
# process (a 128-position prefill chunk's logits over GPT-2's vocabulary: 25 MB).
STEP_BUFFERS = 64 * 2**20
FORM_TIMEOUT_S = 300.0  # a group forms once every member has its weights: wait this long
SAY_EVERY_S = 60.0  # a coordinator that does not answer is said so once a minute
LOOK_AGAIN_S = 3.0  # one mDNS look-up for a coordinator found by mDNS that stopped answering
COLLECTIVE_TIMEOUT_S = 20.0  # a member that hangs fails the group's step after this
GAVE_UP_KEPT = 16  # groups a node remembers it gave up (ids never repeat)


# What a coordinator that cannot be reached answers (anything else: it answered)
TLS_FLAGS = ", and --tls-cert/--tls-key for this node"  # (what a volunteer lacks for TLS)
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def rendezvous_store(host: str, timeout_s: float) -> dist.TCPStore:
    """A torch.distributed store (the rendezvous of a group) listening on ``host`` only.
    Given a port, torch's store listens on every interface, and it answers anyone: it
    takes no swarm key. So it gets a socket bound here, as the data plane is."""
    family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.bind(address)
        listener.listen(socket.SOMAXCONN)
        port = listener.getsockname()[1]
    except OSError:
        listener.close()
        raise
    return dist.TCPStore(
        host,
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        master_listen_fd=listener.detach(),  # (the store owns the socket from here on)
    )


async def on_own_thread(call: Callable[[], T], name: str) -> T:
    """``call()`` on a daemon thread of its own. ``asyncio.to_thread``'s threads are waited
    for when the event loop closes and when the process ends; a group's rendezvous blocks in
    torch's C++ until every member has come (minutes, when one never does), and a node that
    stops must not wait for it. Cancelled, the caller stops waiting; the call runs on."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():  # (the caller was cancelled)
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        result, error = None, None
        try:
            result = call()
        except BaseException as exc:  # handed to the caller, whatever it is
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done


def kv_budget(share: int, held: int, whole_process: bool) -> int:
    """Bytes the KV caches of a node's sessions may reserve, of the ``share`` it may use,
    ``held`` of which is taken now. A share for weights and KV caches alone
    (``--max-memory``, or a CUDA device; ``held``: the weights): what the weights leave,
    and no more, however little (placement leaves a fifth of it). A share that is the whole
    process (``held``: its resident memory: runtime, weights, cache pages): what is left
    after a step's own buffers, and at least ``MIN_SHARE`` (a node whose machine's free
    memory shrank under it keeps serving)."""
    if not whole_process:
        return max(share - held, 0)
    return max(share - held - STEP_BUFFERS, MIN_SHARE)


@dataclass
class JoinConfig:
    """``nanoshard-node join``'s options, one field per flag."""

    coordinator: str | None = None  # HOST:PORT; None = find it by mDNS
    host: str = "0.0.0.0"  # where the data plane listens
    port: int = 0  # 0 picks a free port
    mdns: bool = True
    mdns_interfaces: list[str] | None = None  # None = every interface
    model: str | None = None  # a local checkpoint of the swarm's model: no download
    max_memory: int | None = None  # bytes for weights + KV caches; None = measured share
    device: str = "auto"
    dtype: str = "fp32"
    name: str = ""
    cache_dir: Path = field(default_factory=lambda: DEFAULT_CACHE_DIR.expanduser())
    swarm: str = "default"
    threads: int = 0  # torch threads; 0 = one per core (see nanoshard.threads)
    batch: int = MAX_BATCH  # decode steps of concurrent sessions per forward; 1 = each alone
    session_ttl: float = 300.0
    discovery_timeout: float = 5.0
    security: Security = field(default_factory=Security)  # swarm key and TLS
    quotas: QuotaLimits = field(default_factory=QuotaLimits)  # per caller; 0 = no limit
    max_queue: int = MAX_QUEUE  # compute jobs queued or running before new ones are refused
    leave_slower: float = SLOWER  # a next-hop node this many times slower is left; inf: never
    metrics: CollectorRegistry | None = None  # where its metrics go (--metrics-port's)


class Events:
    """What the node tells its user about (the CLI draws them; tests read the log)."""

    def info(self, message: str) -> None:
        log.info(message)

    def progress(self, what: str) -> Callable[[int, int], None] | None:
        return None

    def ready(self, line: str) -> None:
        """Once, when the node first serves a stage: what it serves, the memory it takes,
        how to leave (the CLI prints it for the owner of the machine)."""
        log.info(line)


def reachable_host(listen_host: str, coordinator: str) -> str:
    """The address other machines reach us at: the listen address, or when that is a
    wildcard, the local address of the route towards the coordinator."""
    if listen_host not in ("", "0.0.0.0", "::"):
        return listen_host
    host = rpc.host_of(coordinator)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))  # UDP: no packet is sent, only a route chosen
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


NOT_YET = (-1, -1, "")  # ``Volunteer.wanted`` before the coordinator has assigned anything


class Volunteer:
    """One joined node: its data plane, its assignment, its heartbeats."""

    def __init__(self, config: JoinConfig, events: Events | None = None) -> None:
        self.config = config
        self.events = events or Events()
        # Its identity: a key kept in its cache folder (nanoshard/identity.py).
        self.key = NodeKey.load(config.cache_dir / "keys")
        self.node_id = self.key.node_id
        self.security = config.security.with_identity(self.node_id)  # tokens name this node
        self.stop = asyncio.Event()
        # Set when the coordinator must hear of a change now, not at the next heartbeat:
        # a stage loaded or given up (routes name what it serves), a group broken.
        self.beat = asyncio.Event()
        self.target = ""
        self.joined = False  # the coordinator took its Join (it says it left only then)
        self.card: cpb.ModelCard | None = None
        self.model_config: GPTConfig | None = None
        self.plane: DataPlane | None = None
        self._channel: grpc.aio.Channel  # to the coordinator (``_connect``)
        self._stub: cpb_grpc.CoordinatorStub
        self.links: PeerLinks | None = None  # to the peers it may form a group with
        # mDNS probing takes about 1.5 s: the node loads its stage meanwhile (``_advertise``)
        self.advertising: asyncio.Task[discovery.Advertiser] | None = None
        self.ready: tuple[int, int] | None = None
        self.loading: asyncio.Task | None = None
        self.wanted: tuple[int, int, str] | None = NOT_YET  # the stage, and its group's id
        self.why_idle = ""  # why it serves none, as last told
        self.store: dist.TCPStore | None = None  # the rendezvous of groups it is rank 0 of
        # The groups it gave up (they broke, or did not form), newest last: it serves them
        # no more, and tells the coordinator of the last one (``_give_up``).
        self.gave_up: list[str] = []
        # The mDNS look-up for a coordinator that stopped answering (``_look_again``).
        self.looking: asyncio.Task[discovery.Found | None] | None = None
        self.stop_looking = threading.Event()  # set: look-ups stop (the node stops)
        self.strangers = discovery.PassedOver()  # coordinators found without the key
        self.said_ready = False
        self.runtime_bytes = 0  # the process before any stage, taken out of the default share

    # ---- set-up ---------------------------------------------------------------------

    async def find_coordinator(self) -> str:
        if self.config.coordinator:
            return self.config.coordinator
        self.events.info("looking for a coordinator by mDNS…")
        told = False
        while not self.stop.is_set():  # volunteers may start before their coordinator
            found = await self._browse(self.config.discovery_timeout)
            if found is not None:
                self.events.info(f"found coordinator {found.name} at {found.target}")
                found.require_tls(self.security.tls_ca is not None, TLS_FLAGS)
                return found.target
            if not told:
                told = True
                others = await asyncio.to_thread(
                    discovery.other_swarms,
                    self.config.swarm,
                    self.config.mdns_interfaces,
                    stop=self.stop_looking,
                )
                if others:
                    them = ", ".join(map(repr, others))
                    who = f"those of swarms {them}" if len(others) > 1 else f"one of swarm {them}"
                    self.events.info(
                        f"no coordinator of swarm {self.config.swarm!r} answered on mDNS yet, "
                        f"but {who} did: pass --swarm NAME to join it (still looking)"
                    )
                else:
                    self.events.info(
                        f"no coordinator of swarm {self.config.swarm!r} answered on mDNS yet: "
                        "still looking (none started? multicast blocked, or Wi-Fi client "
                        "isolation? then pass --coordinator HOST:PORT)"
                    )
        raise asyncio.CancelledError  # stopped while looking

    async def _browse(self, timeout_s: float) -> discovery.Found | None:
        """One mDNS look-up for the swarm's coordinator, past the strangers it met."""
        return await asyncio.to_thread(
            discovery.find_coordinator,
            self.config.mdns_interfaces,
            timeout_s,
            self.config.swarm,
            self.stop_looking,
            self.strangers.current(),
        )

    async def call(self, method: Callable, request: object, what: str) -> object:
        """A control-plane call, retried with backoff while the coordinator is unreachable."""
        delays = backoff_delays(0.5, 10.0)
        while True:
            try:
                return await self.security.proven(method, request, self.target, timeout=10)
            except grpc.aio.AioRpcError as err:
                exc = rpc.error_from_rpc(err, self.target)
                if err.code() not in UNREACHABLE or not isinstance(exc, Unavailable):
                    raise exc from None  # (it answered: not a coordinator, or refused)
                plain = self.security.tls_ca is None and rpc.closed_connecting(err)
                if plain and await asyncio.to_thread(rpc.serves_tls, self.target):
                    raise discovery.needs_tls(self.target, TLS_FLAGS) from None  # (as by mDNS)
                if self.security.tls_ca is not None and rpc.serves_plaintext(err.details() or ""):
                    raise FailedPrecondition(
                        f"the coordinator at {self.target} does not serve TLS: drop --tls-ca, "
                        "--tls-cert and --tls-key (a swarm's servers all serve TLS or none does)"
                    ) from None
                delay = next(delays)
                why = str(exc).removeprefix(f"{self.target}: ")
                self.events.info(
                    f"cannot reach the coordinator at {self.target} ({what}): {why}; retrying "
                    f"in {delay:g} s"
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)
                raise asyncio.CancelledError

    async def run(self) -> None:
        config = self.config
        if config.threads:  # before measuring: capacity is what this node will really do
            torch.set_num_threads(config.threads)
        if config.mdns:  # a wrong --mdns-interface is refused before anything starts
            discovery.zeroconf_interfaces(config.mdns_interfaces)
        device = pick_device(config.device)  # (and a device this machine lacks)
        total = psutil.virtual_memory().total
        if config.max_memory is not None and device.type == "cpu" and config.max_memory > total:
            log.warning(
                "--max-memory %s is more than this machine's memory (%s): the system may kill "
                "this node before it holds that much",
                format_size(config.max_memory),
                format_size(total),
            )
        try:
            self.card = card = await self._first_card()
            self.model_config = GPTConfig.from_dict(json.loads(card.config_json))  # type: ignore[attr-defined]
            local = self._local_checkpoint()
            capacity = await asyncio.to_thread(
                load_or_measure,
                self.model_config,
                device,
                config.dtype,
                max_memory=config.max_memory,
                cache_dir=config.cache_dir,
            )
            self.events.info(
                f"capacity on {device} {config.dtype}: block {capacity.block_ms:.2f} ms, head "
                f"{capacity.head_ms:.2f} ms, memory {format_size(capacity.memory_bytes)}"
            )
            self.capacity = self.promised = capacity
            self.plane = DataPlane(
                host=config.host,
                port=config.port,
                name=config.name,
                model_id=card.model_id,  # type: ignore[attr-defined]
                kv_memory=0,
                session_ttl=config.session_ttl,
                threads=config.threads,
                batch=config.batch,
                advertise_host=reachable_host(config.host, self.target),
                security=self.security,
                quotas=config.quotas,
                max_queue=config.max_queue,
                leave_slower=config.leave_slower,
                key=self.key,
                metrics=config.metrics,
            )
            await self.plane.start()
            self.events.info(f"{self.plane.name}: data plane on {self.plane.address}")
            if config.max_memory is None and device.type != "cuda":
                self._runtime_out_of_the_share()
            self.links = PeerLinks(self.plane.service.channels, self.plane.address)
            self.plane.service.live.capacity = (capacity.block_ms, capacity.head_ms)
            self.store = await asyncio.to_thread(self._open_store)
            await self._join()
            if config.mdns:  # once the swarm took it (a node of another swarm advertises nothing)
                self.advertising = asyncio.create_task(asyncio.to_thread(self._advertise))
            await self._heartbeats(local)
        finally:
            await self._shutdown()
            if self.target:  # (connected: ``_connect``)
                await self._channel.close()

    async def _first_card(self) -> cpb.ModelCard:
        """Find the coordinator and read its model card. One found by mDNS that cannot
        prove it holds the swarm key is a stranger's: passed over, and the search goes on
        (a stranger announcing the swarm's name on the LAN must not end its volunteers)."""
        while True:
            self._connect(await self.find_coordinator())
            try:
                request = cpb.ModelCardRequest()
                return await self.call(self._stub.GetModelCard, request, "model card")  # type: ignore[return-value]
            except Stranger as exc:
                self._pass_over(exc)
                await self._channel.close()

    def _pass_over(self, stranger: Stranger) -> None:
        """The coordinator at ``self.target`` is a stranger's: end a node given its address;
        a node that found it by mDNS looks on for the swarm's own."""
        if self.config.coordinator:
            raise stranger
        if self.strangers.add(self.target):  # (said once a pass: its heartbeats may go on)
            self.events.info(f"{stranger} (passed over: looking on by mDNS for the swarm's own)")

    def _runtime_out_of_the_share(self) -> None:
        """The default share of RAM (half of what is free) is what the whole process may
        take, measured as its RSS: the runtime it already holds (interpreter, torch, gRPC,
        the data plane) comes out of it before weights, and each stage's KV budget is what
        is left of it once the stage is loaded (``_kv_budget``). ``--max-memory`` and a
        CUDA device's share are for weights and KV caches only."""
        self.runtime_bytes = psutil.Process().memory_info().rss
        left = self.promised.memory_bytes - self.runtime_bytes
        if left < MIN_SHARE:
            raise InvalidArgument(
                f"this node's runtime takes {format_size(self.runtime_bytes)} of the "
                f"{format_size(self.promised.memory_bytes)} it may use here (half of the free "
                "memory): nothing is left for weights; free some memory or pass --max-memory"
            )
        self.capacity = replace(self.promised, memory_bytes=left)

    def _connect(self, target: str) -> None:
        """Talk to the coordinator at ``target`` from now on."""
        self.target = target
        self._channel = rpc.open_channel(
            target, self.security, aio=True, ping_timeout_s=rpc.BULK_PING_TIMEOUT_S
        )
        self._stub = cpb_grpc.CoordinatorStub(self._channel)

    def _look_again(self) -> discovery.Found | None:
        """The coordinator does not answer. One found by mDNS may have restarted on another
        port or host: look for it there again, beside the heartbeats (a look-up browses and
        resolves for up to ``LOOK_AGAIN_S``, longer than a heartbeat interval may be), one
        look-up at a time. What the last one found, once it is done; None meanwhile."""
        if self.config.coordinator:
            return None
        looking = self.looking
        if looking is None:
            self.looking = asyncio.create_task(self._browse(LOOK_AGAIN_S))
            self.looking.add_done_callback(self._looked)
            return None
        if not looking.done():
            return None
        self.looking = None
        try:
            return looking.result()
        except OSError as exc:  # (the network changed under it: look again at the next beat)
            self.events.info(f"looking for the coordinator by mDNS failed: {exc}")
            return None

    def _looked(self, task: asyncio.Task) -> None:
        if task is self.looking:  # (not one dropped since: the coordinator answered)
            self.beat.set()  # what it found is taken at once, not at the next heartbeat

    async def _join_moved(self, found: discovery.Found) -> bool:
        """Join the coordinator found again at another address, unless it is a stranger's
        (False: passed over, its address gets no heartbeat, and the look-ups go on)."""
        self.events.info(f"found coordinator {found.name} again, at {found.target}: joining it")
        old = self._channel
        self._connect(found.target)
        await old.close()
        try:
            await self._join()
        except Stranger as exc:
            self._pass_over(exc)
            return False
        return True

    def _local_checkpoint(self):  # type: ignore[no-untyped-def]
        if not self.config.model:
            return None
        checkpoint = open_checkpoint(self.config.model)
        if checkpoint.config != self.model_config:
            raise CheckpointError(
                f"{checkpoint.path}: its config differs from the swarm's model "
                f"({self.card.name}): drop --model to fetch the swarm's weights"  # type: ignore[union-attr]
            )
        return checkpoint

    def _advertise(self) -> discovery.Advertiser:
        assert self.plane is not None and self.card is not None
        props = discovery.node_properties(
            self.node_id,
            self.config.swarm,
            self.capacity.device,
            self.capacity.memory_bytes,
            self.capacity.block_ms,
            self.ready,
            tls=self.security.tls,
        )
        host = self.plane.address.rsplit(":", 1)[0]
        name = discovery.instance_name(self.plane.name, self.node_id[:12])
        advert = discovery.Advert("node", name, host, self.plane.port, props)
        return discovery.Advertiser(advert, self.config.mdns_interfaces)

    # ---- membership -----------------------------------------------------------------

    async def _join(self) -> None:
        assert self.plane is not None
        request = cpb.JoinRequest(
            node_id=self.node_id,
            name=self.plane.name,
            address=self.plane.address,
            protocol_version=PROTOCOL_VERSION,
            swarm=self.config.swarm,
            model_id=self.card.model_id if self.card else "",
            capacity=to_wire(self.capacity),
            held_start=self.ready[0] if self.ready else 0,
            held_end=self.ready[1] if self.ready else 0,
            store_port=self.store.port if self.store is not None else 0,
            public_key=self.key.public_key,
            proof_ms=int(time.time() * 1000),
            tls=self.security.tls,
        )
        request.proof = self.key.sign(
            join_proof_message(request.swarm, request.node_id, request.address, request.proof_ms)
        )
        reply: cpb.JoinReply = await self.call(self._stub.Join, request, "join")  # type: ignore[assignment]
        self.heartbeat_interval = reply.heartbeat_interval_s or 2.0
        self.joined = True
        self.events.info(f"joined the swarm at {self.target}")
        self._follow(reply.assignment)

    @property
    def host(self) -> str:
        """The host its data plane is reached at (its groups' collectives use it too)."""
        assert self.plane is not None
        return rpc.host_of(self.plane.address)

    def _open_store(self) -> dist.TCPStore:
        """The torch.distributed store of the groups this node will be rank 0 of: one for
        the process (each formation uses its own key prefix), on its data plane's host."""
        return rendezvous_store(self.host, FORM_TIMEOUT_S)

    def _follow(self, assignment: cpb.Assignment) -> None:
        tp = assignment.tp if assignment.tp.size > 1 else None
        if tp is not None and tp.id in self.gave_up:
            return  # (a reply sent before the coordinator heard: it places this node again)
        wanted = (
            None if assignment.idle else (assignment.start, assignment.end, tp.id if tp else "")
        )
        if wanted is None and wanted == self.wanted and assignment.why_idle != self.why_idle:
            self._stand_by(assignment.why_idle)  # (still idle, for another reason)
        if wanted == self.wanted:
            return
        self.wanted = wanted
        if self.loading is not None:
            self.loading.cancel()
        if wanted is None:
            self._stand_by(assignment.why_idle)
            self.loading = None
            if self.plane is not None:  # open sessions finish on the stage they hold
                self.plane.service.set_stage(None)
            self.ready = None
            self.beat.set()
            return
        self.loading = asyncio.create_task(self._load(wanted[0], wanted[1], tp))

    def _stand_by(self, why_idle: str) -> None:
        """Say why this node serves no stage (each time the reason changes)."""
        self.why_idle = why_idle
        why = why_idle or (  # (a coordinator that does not say)
            "the swarm may be covered already, or "
            f"{self.capacity.memory_bytes / 2**30:.2f} GiB may hold no unit of this model: see "
            "nanoshard status"
        )
        if why.startswith("spot-checks excluded it"):  # its owner has something to check
            log.warning(
                "assigned no stage: standing by (%s). Its outputs disagreed with what honest "
                "nodes compute: check this machine's memory, the weights in its cache folder "
                "and its build; it stays excluded for the coordinator's --exclude-hours",
                why,
            )
            return
        self.events.info(f"assigned no stage for now: standing by ({why})")

    async def _load(self, start: int, end: int, tp: cpb.TpGroup | None = None) -> None:
        assert self.plane is not None and self.card is not None and self.model_config
        config = self.model_config
        self.events.info(f"assigned units [{start}, {end}) ({describe_units(config, start, end)})")
        local = self._local_checkpoint()
        if local is not None:
            tensors = await asyncio.to_thread(verify_local_stage, local, self.card, start, end)
        else:
            delays = backoff_delays(0.5, 10.0)
            while True:  # the coordinator may be restarting: weights are worth waiting for
                try:
                    tensors, _ = await fetch_stage(
                        self._stub,
                        self.card,
                        start,
                        end,
                        self.config.cache_dir,
                        progress=self.events.progress(f"units [{start}, {end})"),
                        security=self.security,
                        coordinator=self.target,
                    )
                    break
                except Unavailable as exc:
                    delay = next(delays)
                    self.events.info(
                        f"fetching units [{start}, {end}) failed ({exc}); retrying in {delay:.1f} s"
                    )
                    await asyncio.sleep(delay)
        device = pick_device(self.config.device)
        dtype = parse_dtype(self.config.dtype)
        try:
            group = None if tp is None else await self._form(tp)
        except CollectiveError as exc:
            assert tp is not None
            self._give_up(tp.id, str(exc))  # (still serving what it served before)
            return
        transform = None if group is None else functools.partial(shard, collective=group.collective)
        threads = self._threads_for(tp)

        def build() -> Stage:  # on the compute worker, whose thread count this sets
            torch.set_num_threads(threads)
            return Stage.from_tensors(config, start, end, tensors, dtype, device, transform)

        # (a collective of the group it leaves may hold the worker: a partner gone or hung)
        old = self.plane.service.group
        unstick = (
            None if old is None else asyncio.create_task(give_up_when_stuck(old, self._group_broke))
        )
        try:
            stage: Stage = await self.plane.load(build)
        finally:
            if unstick is not None:
                unstick.cancel()
        weights = stage.weight_nbytes
        self.plane.sessions.budget_bytes = self._kv_budget(weights)
        self.plane.service.set_stage(stage, group)  # new sessions go here; open ones finish
        self.ready = (start, end)
        self.beat.set()
        where = "" if tp is None else f" as rank {tp.rank} of tensor-parallel group {tp.id}"
        self.events.info(f"serving units [{start}, {end}) on {self.plane.address}{where}")
        if not self.said_ready:
            self.said_ready = True
            self.events.ready(self._ready_line(start, end, weights))
        if self.advertising is not None:
            advertiser = await self.advertising
            props = dict(advertiser.advert.properties, stage=discovery.stage_txt(self.ready))
            await asyncio.to_thread(advertiser.update, props)

    def _kv_budget(self, weights: int) -> int:
        """Memory the sessions' KV caches may reserve on the stage just loaded."""
        if not self.runtime_bytes:  # --max-memory, or CUDA: weights and KV caches only
            return kv_budget(self.capacity.memory_bytes, weights, whole_process=False)
        held = psutil.Process().memory_info().rss
        kv = kv_budget(self.promised.memory_bytes, held, whole_process=True)
        if self.promised.memory_bytes - held - STEP_BUFFERS < MIN_SHARE:
            log.warning(
                "the process holds %s of the %s it may take: KV caches get %s anyway",
                format_size(held),
                format_size(self.promised.memory_bytes),
                format_size(MIN_SHARE),
            )
        return kv

    def _ready_line(self, start: int, end: int, weights: int) -> str:
        assert self.plane is not None and self.card is not None and self.model_config
        units = describe_units(self.model_config, start, end)
        promised = format_size(self.promised.memory_bytes)
        kv = format_size(self.plane.sessions.budget_bytes)
        rss = format_size(psutil.Process().memory_info().rss)
        if self.runtime_bytes:  # the default share: the whole process
            memory = (
                f"takes at most {promised} ({rss} now, {format_size(weights)} of it weights; "
                f"up to {kv} more for KV caches)"
            )
        else:
            memory = (
                f"takes at most {promised} for weights and KV caches ({format_size(weights)} of "
                f"weights + up to {kv} of KV caches; the process holds {rss} now)"
            )
        return (
            f"{NODE}: ready: serving units [{start}, {end}) ({units}) of {self.card.name} "
            f"on {self.plane.address} ({self.capacity.device}); memory: {memory}; "
            "Ctrl-C leaves the swarm"
        )

    def _threads_for(self, tp: cpb.TpGroup | None) -> int:
        """torch threads for the compute worker: --threads if given; else a thread per core,
        shared with the members of its group on this host, which compute at the same time
        (a pipeline's nodes take turns, a group's do not)."""
        if self.config.threads:
            return self.config.threads
        here = sum(1 for m in tp.members if rpc.host_of(m) == self.host) if tp else 1
        return max(1, (os.cpu_count() or 1) // max(here, 1))

    async def _form(self, tp: cpb.TpGroup) -> Membership:
        """Join the group's process group (rank 0 hosts its rendezvous) and, on rank 0,
        open the ordered links to the other members."""
        assert self.plane is not None and self.model_config is not None
        config = self.model_config
        if not 0 <= tp.rank < tp.size == len(tp.members) or not tp.id:
            raise Unavailable(f"the coordinator sent a malformed group: {tp}")
        self.events.info(
            f"forming tensor-parallel group {tp.id} as rank {tp.rank} of {tp.size} "
            f"(rendezvous {tp.rendezvous})"
        )

        def form() -> tuple[Collective, float, float]:
            if tp.rank == 0:
                assert self.store is not None
                store: dist.Store = self.store
            else:
                store = dist.TCPStore(
                    rpc.host_of(tp.rendezvous),
                    int(tp.rendezvous.rsplit(":", 1)[1]),
                    is_master=False,
                    timeout=datetime.timedelta(seconds=FORM_TIMEOUT_S),
                )
            collective = Collective.form(
                tp.id,
                tp.rank,
                tp.size,
                store,
                self.host,
                COLLECTIVE_TIMEOUT_S,
                backend=tp.backend or "gloo",
                device=self.capacity.device,
            )
            # every member measures the links at once, before the group's first step
            return collective, *collective.probe(config.n_embd)

        try:
            collective, probe_ms, bytes_per_s = await on_own_thread(form, f"group {tp.id}")
        # A member that never came, a bad address, or a backend this node cannot run.
        except (RuntimeError, ValueError, InvalidArgument) as exc:
            log.info("group %s did not form: %s", tp.id, exc)  # (torch's own words)
            raise CollectiveError(f"group {tp.id} did not form: {failure_reason(exc)}") from None
        group = Membership(tp, collective)
        group.link.probe_ms, group.link.bytes_per_s = probe_ms, bytes_per_s
        self.events.info(
            f"group {tp.id}: an all-reduce of {config.n_embd} values takes {probe_ms:.2f} ms, "
            f"{bytes_per_s / 1e6:.0f} MB/s"
        )
        if tp.rank == 0:
            service = self.plane.service
            for address in tp.members[1:]:
                link = MemberLink(
                    service.channels,
                    address,
                    functools.partial(self._group_broke, group),
                )
                link.start()
                group.links.append(link)
        return group

    def _group_broke(self, group: Membership, why: str) -> None:
        if self.plane is not None:
            self.plane.service.break_group(group, why)

    def _give_up_if_broken(self) -> None:
        """The group this node serves in broke: it cannot mend (``_give_up``)."""
        assert self.plane is not None
        group = self.plane.service.group
        if group is None or not group.broken or group.id in self.gave_up:
            return
        self.plane.service.set_stage(None)  # (its sessions failed over already)
        self.ready = None
        moving = self.loading is not None and not self.loading.done()  # (placed elsewhere)
        self._give_up(group.id, f"tensor-parallel group {group.id} broke ({group.broken})", moving)

    def _give_up(self, group: str, why: str, moving: bool = False) -> None:
        """Serve ``group`` no more, whatever a reply sent meanwhile assigns (``_follow``), and
        tell the coordinator now (``gave_up_group``): it places the group's members again,
        in a new group or none. The node neither leaves nor re-joins: it stays placeable,
        so whatever placement does next, it takes part (``moving``: it was placed already,
        and loads that stage)."""
        then = (
            "loading the stage placed next"
            if moving
            else "waiting for the coordinator to place this node again"
        )
        self.events.info(f"{why}: {then}")
        self.gave_up = [*self.gave_up[-(GAVE_UP_KEPT - 1) :], group]
        if self.wanted and self.wanted[2] == group:
            self.wanted = NOT_YET  # whatever comes next is followed
        self.beat.set()

    async def _heartbeats(self, local: object) -> None:
        assert self.plane is not None
        unreachable: float | None = None  # since when the coordinator has not answered
        said = 0.0  # when that was last said
        self.plane.service.on_broken = self.beat.set
        while not self.stop.is_set():
            stop, beat = (
                asyncio.ensure_future(self.stop.wait()),
                asyncio.ensure_future(self.beat.wait()),
            )
            await asyncio.wait(
                (stop, beat), timeout=self.heartbeat_interval, return_when=asyncio.FIRST_COMPLETED
            )
            stop.cancel()
            beat.cancel()
            self.beat.clear()
            if self.stop.is_set():
                break
            task = self.loading
            if task is not None and task.done() and not task.cancelled() and task.exception():
                raise task.exception()  # type: ignore[misc]  # a stage that cannot load ends the node
            task = self.advertising
            if task is not None and task.done() and not task.cancelled() and task.exception():
                raise task.exception()  # type: ignore[misc]  # so does an advert that failed
            self._give_up_if_broken()
            info = self.plane.service
            group = info.group
            request = cpb.HeartbeatRequest(
                node_id=self.node_id,
                ready=self.ready is not None,
                start=self.ready[0] if self.ready else 0,
                end=self.ready[1] if self.ready else 0,
                tp_group=group.id if group is not None and self.ready else "",
                gave_up_group=self.gave_up[-1] if self.gave_up else "",
                load=cpb.NodeLoad(
                    sessions=len(self.plane.sessions),
                    kv_bytes_used=self.plane.sessions.used_bytes,
                    kv_bytes_budget=self.plane.sessions.budget_bytes,
                    queue_depth=self.plane.worker.queue_depth,
                    step_ms_p50=info.step_ms_p50,
                    tp_link=group.link if group is not None and self.ready else None,
                    peer_links=self.links.report() if self.links else (),
                    live=info.live.report(),
                ),
            )
            if self.target not in self.strangers:  # (else a stranger's took its address)
                try:
                    reply = await self._heartbeat(request)
                except Stranger as exc:
                    self._pass_over(exc)
                    unreachable = time.monotonic() if unreachable is None else unreachable
                except grpc.aio.AioRpcError as err:
                    now = time.monotonic()
                    if unreachable is None or now - said >= SAY_EVERY_S:
                        since = "" if unreachable is None else f" for {now - unreachable:.0f} s"
                        why = (  # (it answered, and refused: a key it no longer takes?)
                            f"the coordinator at {self.target} refused this node's heartbeat"
                            f"{since}: {err.details()}"
                            if err.code() not in UNREACHABLE
                            else f"cannot reach the coordinator at {self.target}{since}"
                        )
                        doing = "still serving" if self.ready else "standing by"
                        self.events.info(f"{why}: {doing}, retrying")
                        said = now
                    unreachable = now if unreachable is None else unreachable
                    if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        continue
                else:
                    self.looking = None  # (what a look-up still running finds is not wanted)
                    if unreachable is not None:
                        self.events.info("the coordinator answers again")
                        unreachable = None
                    if reply is not None:  # (None: it did not know this node: joined again)
                        if self.links is not None:
                            self.links.want(list(reply.peers))
                        self._follow(reply.assignment)
                    continue
            # Gone, or a stranger's in its place: look for it by mDNS, beside the heartbeats.
            found = self._look_again()
            if found is not None and found.target != self.target and await self._join_moved(found):
                unreachable = None

    async def _heartbeat(self, request: cpb.HeartbeatRequest) -> cpb.HeartbeatReply | None:
        """One heartbeat: the coordinator's reply, or None once the node joined again
        because the coordinator did not know it."""
        try:
            return await self.security.proven(  # type: ignore[no-any-return]
                self._stub.Heartbeat,
                request,
                self.target,
                timeout=max(self.heartbeat_interval, 2.0),
            )
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
        self.events.info(
            "the coordinator does not know this node (it restarted, or dropped this node "
            "after missed heartbeats): joining again"
        )
        await self._join()
        return None

    async def _shutdown(self) -> None:
        self.stop_looking.set()
        if self.loading is not None:
            self.loading.cancel()
        # First tell the coordinator: routes stop naming this node at once, and sessions
        # through it move to replicas when its data plane stops below.
        if self.joined:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
                await self._stub.Leave(
                    cpb.LeaveRequest(node_id=self.node_id),
                    timeout=3,
                    metadata=self.security.metadata(),
                )
        if self.links is not None:
            await self.links.close()
        if self.advertising is not None:
            with contextlib.suppress(Exception):  # (a failed advert ended the node already)
                advertiser = await self.advertising  # registering cannot be cut short
                await asyncio.to_thread(advertiser.close)
        if self.plane is not None:
            await self.plane.stop()
        self.events.info("left the swarm" if self.joined else "stopped before joining the swarm")


async def join(config: JoinConfig, events: Events | None = None) -> int | None:
    """Volunteer until SIGINT/SIGTERM. Returns the signal that stopped it."""
    volunteer = Volunteer(config, events)
    received = stop_on_signals(volunteer.stop)
    with contextlib.suppress(asyncio.CancelledError):
        await volunteer.run()
    return received[0] if received else None
