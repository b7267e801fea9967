"""The control plane's servicer: joins, heartbeats, routes, status, the model and its
weights. Thin: validation here, state in the registry, policy in placement and routing."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from nanoshard import PROTOCOL_VERSION, identity, rpc
from nanoshard.agreement import distance
from nanoshard.agreement import tolerance as tolerance_for
from nanoshard.codec import CODECS
from nanoshard.config import unit_name
from nanoshard.engine import DTYPES
from nanoshard.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NanoshardError,
    NotFound,
    Unauthenticated,
)
from nanoshard.security import Security, identity_of
from nanoshard.tp import MAX_PEERS
from nanoshard.v1 import coordinator_pb2 as cpb
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc

from .arbiter import Arbiter, read_evidence, signers
from .groups import LinkReport, PeerReport
from .limits import Bounded, RateLimit
from .load import LiveReport
from .metrics import CoordinatorMetrics
from .model import ModelStore, fetch_tensors
from .registry import Capacity, Load, NodeRecord, Registry
from .replanner import Replanner
from .routing import Server, plan_route, route_ms
from .trust import ARBITER, Comparison, Ledger, suggested_rate

log = logging.getLogger(__name__)

# Bounds of a believable Capacity from a volunteer.
MAX_STEP_MS = 60_000.0
MAX_MEMORY_BYTES = 1 << 50  # 1 PiB
MAX_GROUP_ID = 64  # a group id the coordinator hands out is far shorter
DEVICE_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,15}(:\d{1,3})?$")  # cpu, cuda:0, mps, xpu:1
# Re-running a disputed step costs the coordinator up to a prefill of a stage: a client
# (or many) cannot keep it busier than this.
ARBITRATE_EVERY_S = 1.0
SHADOW_SLACK = 2.0  # a shadow's (batched) output is judged at twice the step's tolerance
REPORTS_PER_MIN = 60  # spot-check reports a caller may send a minute
MAX_SETTLED = 10_000  # settled steps remembered (a replayed report is not re-run)
MAX_FALSE_REPORTERS = 10_000
PROOF_WINDOW_S = 60.0  # how far a join proof's time may be from the coordinator's clock
CERT_CHECK_TIMEOUT_S = 5.0  # a TLS coordinator's call to a joining node (its certificate)


def handles_errors(method: Callable) -> Callable:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except NanoshardError as exc:
            await rpc.abort(context, exc)
        except Exception as exc:  # a bug: INTERNAL, logged
            log.exception("%s failed", method.__name__)
            await rpc.abort(
                context, Internal(f"{method.__name__} failed on the coordinator: {exc}")
            )

    return wrapper


def check_capacity(c: cpb.Capacity) -> Capacity:
    """Capacity figures come from volunteers: refuse what no real node would send."""
    if not DEVICE_PATTERN.match(c.device):
        raise InvalidArgument(
            f"capacity: device {c.device[:40]!r} is not a device name like cpu, cuda:0, mps"
        )
    if c.dtype not in DTYPES:
        raise InvalidArgument(f"capacity: dtype {c.dtype[:40]!r} is not one of {', '.join(DTYPES)}")
    if not 0 < c.memory_bytes <= MAX_MEMORY_BYTES:
        raise InvalidArgument(
            f"capacity: memory_bytes {c.memory_bytes} is not in (0, {MAX_MEMORY_BYTES}]"
        )
    for name in ("block_ms", "head_ms"):
        value = getattr(c, name)
        if not (math.isfinite(value) and 0 < value <= MAX_STEP_MS):
            raise InvalidArgument(f"capacity: {name} {value} is not in (0, {MAX_STEP_MS:.0f}] ms")
    return Capacity(c.device, c.dtype, c.memory_bytes, c.block_ms, c.head_ms)


def assignment(registry: Registry, record: NodeRecord | None) -> cpb.Assignment:
    version = registry.version
    if record is None or record.assigned is None:
        why = registry.why_idle(record) if record is not None else ""
        return cpb.Assignment(idle=True, version=version, why_idle=why)
    start, end = record.assigned
    seat = registry.seat(record)
    tp = None
    if seat is not None:
        tp = cpb.TpGroup(
            id=seat.id,
            rank=seat.rank,
            size=seat.size,
            members=seat.members,
            rendezvous=seat.rendezvous,
            backend=seat.backend,
        )
    return cpb.Assignment(idle=False, start=start, end=end, version=version, tp=tp)


class CoordinatorService:
    def __init__(
        self,
        store: ModelStore,
        registry: Registry,
        *,
        swarm: str,
        heartbeat_interval_s: float,
        epoch: bytes,
        clock: Callable[[], float] = time.monotonic,
        security: Security | None = None,
        wall_clock: Callable[[], float] = time.time,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self.security = security or Security()
        self.store = store
        self.registry = registry
        self.swarm = swarm
        self.heartbeat_interval_s = heartbeat_interval_s
        self.epoch = epoch
        self.clock = clock
        self.wall_clock = wall_clock  # join proofs carry the time they were made
        self.ledger = Ledger()
        self._rates: dict[str, float] = {}  # address -> suggested check rate (_check_rates)
        self._rates_at = -math.inf
        self.replanner = Replanner(registry)  # placement runs off the event loop
        self.arbiter = Arbiter(store)
        self._arbitrating = asyncio.Lock()  # one dispute re-run at a time ...
        self._arbitrated_at = -math.inf  # ... and at most one per ARBITRATE_EVERY_S
        self._settled = Bounded(MAX_SETTLED)  # signatures of steps settled (replays: no re-run)
        self.reports = RateLimit(REPORTS_PER_MIN, 60.0)  # per caller
        self.false_reporters = Bounded(MAX_FALSE_REPORTERS)  # callers not heard any more
        self.metrics = metrics or CoordinatorMetrics()  # for Prometheus
        self.metrics.watch(self)

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        return rpc.strict_service(
            "nanoshard.v1.Coordinator",
            {
                "Join": ("unary", self.Join, cpb.JoinRequest),
                "Heartbeat": ("unary", self.Heartbeat, cpb.HeartbeatRequest),
                "Leave": ("unary", self.Leave, cpb.LeaveRequest),
                "GetRoute": ("unary", self.GetRoute, cpb.RouteRequest),
                "GetStatus": ("unary", self.GetStatus, cpb.StatusRequest),
                "GetModelCard": ("unary", self.GetModelCard, cpb.ModelCardRequest),
                "FetchTensors": ("server_stream", self.FetchTensors, cpb.FetchRequest),
                "ReportCheck": ("unary", self.ReportCheck, cpb.CheckReport),
            },
            guard=self.security.check_and_prove,  # every answer proves the key
        )

    def _as_itself(self, node_id: str, context: Any) -> None:
        """In a swarm with a key, a node joins, heartbeats and leaves only as itself."""
        if self.security.key is not None and identity_of(context) != node_id:
            raise Unauthenticated(f"this token is not node {node_id[:16]!r}'s own")

    async def _check_certificate(self, address: str) -> None:
        """In a TLS swarm whose coordinator holds the swarm's CA (``--tls-ca``): the joining
        node's data plane at ``address`` must prove its name with a certificate that CA
        signed, as every client will ask of it; else FailedPrecondition (it would be
        placed, and every client would fail its handshake). A node the coordinator cannot
        reach is taken in (clients may reach it where the coordinator does not)."""
        if not self.security.tls or self.security.tls_ca is None:
            return
        channel = rpc.open_channel(address, self.security, aio=True)
        try:
            await pb_grpc.NodeStub(channel).Info(
                pb.InfoRequest(), timeout=CERT_CHECK_TIMEOUT_S, metadata=self.security.metadata()
            )
        except grpc.aio.AioRpcError as err:
            if rpc.tls_refused(err.details() or ""):
                raise FailedPrecondition(
                    f"this node's TLS certificate (at {address}) does not verify against the "
                    "coordinator's CA (another swarm's CA, or a certificate for another host): "
                    "clients would refuse it; use a certificate the swarm's CA signed for this "
                    "host (nanoshard certs)"
                ) from None
            log.warning(
                "cannot check the certificate of the node at %s: %s", address, err.details()
            )
        finally:
            await channel.close()

    def _stage(self, start: int, end: int, what: str) -> tuple[int, int]:
        if not 0 <= start < end <= self.registry.config.n_units:
            raise InvalidArgument(f"{what}: [{start}, {end}) is not a stage of this model")
        return start, end

    @handles_errors
    async def Join(self, request: cpb.JoinRequest, context: Any) -> cpb.JoinReply:
        self._as_itself(request.node_id, context)
        if request.protocol_version != PROTOCOL_VERSION:
            raise FailedPrecondition(
                f"this node speaks protocol v{request.protocol_version}, the coordinator "
                f"v{PROTOCOL_VERSION}: run the same nanoshard version on both"
            )
        if request.swarm != self.swarm:
            raise FailedPrecondition(
                f"this node is for swarm {request.swarm!r}, the coordinator runs swarm {self.swarm!r}"
            )
        if request.tls != self.security.tls:  # else a client could reach one or the other
            raise FailedPrecondition(
                "this swarm's coordinator serves TLS: so must its nodes (--tls-cert, --tls-key "
                "and --tls-ca)"
                if self.security.tls
                else "this swarm's coordinator serves no TLS: so must its nodes (drop --tls-cert)"
            )
        if request.model_id and request.model_id != self.store.model_id:
            raise FailedPrecondition(
                f"this node holds model {request.model_id[:12]}…, the swarm runs "
                f"{self.store.name} ({self.store.model_id[:12]}…): drop --model or point it at the same checkpoint"
            )
        if len(request.public_key) != identity.PUBLIC_KEY_BYTES:
            raise InvalidArgument("public_key must be a 32-byte Ed25519 public key")
        if request.node_id != identity.node_id_of(request.public_key):
            raise InvalidArgument(
                "node_id must be derived from the public key (identity.node_id_of)"
            )
        if abs(request.proof_ms / 1000 - self.wall_clock()) > PROOF_WINDOW_S:
            raise InvalidArgument(
                f"the join proof was made {request.proof_ms / 1000 - self.wall_clock():+.0f} s "
                f"from the coordinator's clock (at most {PROOF_WINDOW_S:g} s): set the clock"
            )
        message = identity.join_proof_message(
            request.swarm, request.node_id, request.address, request.proof_ms
        )
        if not identity.verify(request.public_key, request.proof, message):
            raise Unauthenticated("the join proof is not the public key's signature")
        if not rpc.ADDRESS.fullmatch(request.address):
            raise InvalidArgument(f"address {request.address[:80]!r} is not HOST:PORT")
        capacity = check_capacity(request.capacity)
        if request.store_port > 65535:
            raise InvalidArgument(f"store_port {request.store_port} is not a port (0 to 65535)")
        held = None
        if request.held_end:
            held = self._stage(request.held_start, request.held_end, "held stage")
        await self._check_certificate(request.address)
        record = NodeRecord(
            node_id=request.node_id,
            name=request.name[:64] or request.node_id[:8],
            address=request.address,
            capacity=capacity,
            last_heartbeat=self.clock(),
            held=held,
            store_port=request.store_port,
            public_key=request.public_key,
        )
        self.registry.join(record)
        self.metrics.node_events.labels("join").inc()
        await self.replanner.placed()  # the reply carries the node's stage
        return cpb.JoinReply(
            model_id=self.store.model_id,
            assignment=assignment(self.registry, record),
            heartbeat_interval_s=self.heartbeat_interval_s,
            coordinator_epoch=self.epoch,
        )

    @handles_errors
    async def Heartbeat(self, request: cpb.HeartbeatRequest, context: Any) -> cpb.HeartbeatReply:
        self._as_itself(request.node_id, context)
        ready = self._stage(request.start, request.end, "ready stage") if request.ready else None
        ld = request.load
        link = ld.tp_link
        if not all(0 <= v < 1e12 for v in (link.probe_ms, link.bytes_per_s, link.live_ms)):
            raise InvalidArgument("tp_link: every figure must be >= 0 and finite")
        if len(ld.peer_links) > MAX_PEERS:
            raise InvalidArgument(f"peer_links: at most {MAX_PEERS}")
        peers = {}
        for p in ld.peer_links:
            if not rpc.ADDRESS.fullmatch(p.address) or not all(
                0 <= v < 1e12 for v in (p.rtt_ms, p.self_rtt_ms, p.bytes_per_s)
            ):
                raise InvalidArgument("peer_links: each a HOST:PORT, figures >= 0 and finite")
            peers[p.address] = PeerReport(p.rtt_ms, p.self_rtt_ms, p.bytes_per_s)
        live = live_report(ld.live)
        load = Load(
            ld.sessions,
            ld.kv_bytes_used,
            ld.kv_bytes_budget,
            ld.queue_depth,
            ld.step_ms_p50,
            LinkReport(link.probe_ms, link.bytes_per_s, link.live_ms),
            peers,
            live,
        )
        for name in ("tp_group", "gave_up_group"):
            if len(getattr(request, name)) > MAX_GROUP_ID:
                raise InvalidArgument(f"{name} is longer than {MAX_GROUP_ID} characters")
        record = self.registry.heartbeat(
            request.node_id,
            self.clock(),
            ready,
            load,
            request.tp_group if ready else "",
            request.gave_up_group,
        )
        if record is None:
            raise NotFound("this coordinator does not know the node (it restarted?): join again")
        await self.replanner.placed()  # (a group that broke is placed again at once)
        return cpb.HeartbeatReply(
            assignment=assignment(self.registry, record),
            coordinator_epoch=self.epoch,
            peers=self.registry.peers_of(record),
        )

    @handles_errors
    async def Leave(self, request: cpb.LeaveRequest, context: Any) -> cpb.LeaveReply:
        self._as_itself(request.node_id, context)
        if self.registry.leave(request.node_id):
            self.metrics.node_events.labels("leave").inc()
        return cpb.LeaveReply()

    @handles_errors
    async def GetRoute(self, request: cpb.RouteRequest, context: Any) -> cpb.RouteReply:
        try:
            hops = plan_route(
                self.registry.servers(), self.registry.config.n_units, list(request.avoid)[:64]
            )
        except NanoshardError:
            self.metrics.routes.labels("none").inc()
            raise
        if not request.peek:
            self.registry.handed_out([h.addresses[0] for h in hops], self.clock())
        self.metrics.routes.labels("peek" if request.peek else "session").inc()
        keys, rates = self.registry.public_keys(), self._check_rates()
        return cpb.RouteReply(
            hops=[
                pb.Hop(
                    start=h.start,
                    end=h.end,
                    addresses=h.addresses,
                    public_keys=[keys.get(a, b"") for a in h.addresses],
                    check_rates=[rates.get(a, 1.0) for a in h.addresses],
                )
                for h in hops
            ],
            model_id=self.store.model_id,
            n_units=self.registry.config.n_units,
        )

    def _check_rates(self) -> dict[str, float]:
        """Each address's suggested check rate (``trust.suggested_rate``), from the ledger's
        tallies; recomputed at most once a second (one pass over the ledger)."""
        now = self.clock()
        if now - self._rates_at >= 1.0:
            tallies = self.ledger.tallies(now)
            self._rates = {a: suggested_rate(*t) for a, t in tallies.items()}
            self._rates_at = now
        return self._rates

    @staticmethod
    def tokens_per_s(registry: Registry, servers: list[Server]) -> float:
        """What one session could draw a second along the best route (estimated)."""
        try:
            hops = plan_route(servers, registry.config.n_units)
        except NanoshardError:
            return 0.0
        ms = route_ms(servers, hops)
        return 1000.0 / ms if ms > 0 else 0.0

    @handles_errors
    async def GetStatus(self, request: cpb.StatusRequest, context: Any) -> cpb.SwarmStatus:
        """The swarm as the registry sees it, built on a thread from a copy of it: at
        10,000 nodes a status takes a third of a second, which the event loop does not
        wait for (heartbeats and routes go on meanwhile)."""
        now = self.clock()
        tallies = self.ledger.tallies(now)  # one pass over the ledger, not one per node
        return await asyncio.to_thread(self._status, self.registry.view(), tallies, now)

    def _status(
        self, registry: Registry, tallies: dict[str, tuple[int, int]], now: float
    ) -> cpb.SwarmStatus:
        nodes = []
        late_s = 2 * self.heartbeat_interval_s + 1  # a node quiet longer is not heartbeating
        for r in sorted(
            registry.nodes.values(), key=lambda r: (r.assigned or (1 << 30, 0), r.name)
        ):
            age = now - r.last_heartbeat
            c, ld = r.capacity, r.load
            passed, failed = tallies.get(r.address, (0, 0))
            nodes.append(
                cpb.NodeStatus(
                    node_id=r.node_id,
                    name=r.name,
                    address=r.address,
                    capacity=cpb.Capacity(
                        device=c.device,
                        dtype=c.dtype,
                        memory_bytes=c.memory_bytes,
                        block_ms=c.block_ms,
                        head_ms=c.head_ms,
                    ),
                    assignment=assignment(registry, r),
                    ready=r.ready is not None and (r.ready, r.tp_group) == (r.assigned, r.group),
                    ready_start=r.ready[0] if r.ready else 0,
                    ready_end=r.ready[1] if r.ready else 0,
                    load=cpb.NodeLoad(
                        sessions=ld.sessions,
                        kv_bytes_used=ld.kv_bytes_used,
                        kv_bytes_budget=ld.kv_bytes_budget,
                        queue_depth=ld.queue_depth,
                        step_ms_p50=ld.step_ms_p50,
                        tp_link=cpb.GroupLink(
                            probe_ms=ld.tp_link.probe_ms,
                            bytes_per_s=ld.tp_link.bytes_per_s,
                            live_ms=ld.tp_link.live_ms,
                        ),
                        peer_links=[
                            cpb.PeerLink(
                                address=a,
                                rtt_ms=p.rtt_ms,
                                self_rtt_ms=p.self_rtt_ms,
                                bytes_per_s=p.bytes_per_s,
                            )
                            for a, p in ld.peer_links.items()
                        ],
                        live=live_wire(ld.live),
                    ),
                    last_heartbeat_s=age,
                    healthy=r.ready is not None and age <= late_s,
                    heartbeating=age <= late_s,
                    checks_passed=passed,
                    checks_failed=failed,
                    excluded=registry.excluded.get(r.address, ""),
                    slowdown=r.slowdown,
                    own_ratio=r.own_ratio,
                )
            )
        config = registry.config
        servers = registry.servers()  # once: at 10,000 nodes it is most of a status's cost
        units = [
            cpb.UnitCoverage(unit=u, name=unit_name(config, u), replicas=n)
            for u, n in enumerate(registry.coverage(servers))
        ]
        return cpb.SwarmStatus(
            swarm=self.swarm,
            model_id=self.store.model_id,
            model_name=self.store.name,
            n_units=config.n_units,
            nodes=nodes,
            units=units,
            tokens_per_s=self.tokens_per_s(registry, servers),
            measured_tokens_per_s=registry.measured_tokens_per_s(),
            replicas_target=registry.replicas,
            placement_version=registry.version,
        )

    @handles_errors
    async def GetModelCard(self, request: cpb.ModelCardRequest, context: Any) -> cpb.ModelCard:
        return self.store.card()

    async def FetchTensors(
        self, request: cpb.FetchRequest, context: Any
    ) -> AsyncIterator[cpb.TensorChunk]:
        try:
            async for chunk in fetch_tensors(self.store, request):
                yield chunk
        except NanoshardError as exc:
            await rpc.abort(context, exc)

    @handles_errors
    async def ReportCheck(self, request: cpb.CheckReport, context: Any) -> cpb.CheckReply:
        """Record a client's spot-check (``_report_check``), counting what became of it."""
        try:
            reply, outcome = await self._report_check(request, context)
        except NanoshardError:
            false = rpc.caller_identity(context) in self.false_reporters
            self.metrics.check_reports.labels("false" if false else "refused").inc()
            raise
        self.metrics.check_reports.labels(outcome).inc()
        return reply

    def _compared(self, comparisons: list[Comparison]) -> None:
        """Put ``comparisons`` in the ledger (and count them)."""
        self.ledger.add(comparisons)
        for c in comparisons:
            by = "coordinator" if c.a == ARBITER else "client"
            self.metrics.comparisons.labels(by, "agree" if c.agree else "disagree").inc()

    async def _report_check(
        self, request: cpb.CheckReport, context: Any
    ) -> tuple[cpb.CheckReply, str]:
        """Record a client's spot-check. A caller's word excludes no one: a report whose
        evidence carries the checked node's own signed trace of the step is settled here
        (the coordinator re-runs the step from its own weights, and excludes the node if
        what it signed differs beyond tolerance); one without is kept for the tallies in
        status. Each caller may report ``REPORTS_PER_MIN`` times a minute; one whose
        evidence does not hold up (a signature, a digest) is not heard again."""
        caller = rpc.caller_identity(context)
        now = self.clock()
        if caller in self.false_reporters:
            return cpb.CheckReply(), "ignored"
        self.reports.take(caller, now)
        start, end = self._stage(request.start, request.end, "checked stage")
        tolerance = request.tolerance
        if not (math.isfinite(tolerance) and 0 < tolerance <= 10):
            raise InvalidArgument(f"tolerance {tolerance} must be in (0, 10]")
        if request.codec not in CODECS:
            raise InvalidArgument(f"codec {request.codec[:20]!r} is none of {', '.join(CODECS)}")
        if not 1 <= len(request.replicas) <= 8:
            raise InvalidArgument(f"a check names 1 to 8 replicas, not {len(request.replicas)}")
        checked = request.checked.address
        for opinion in [request.checked, *request.replicas]:
            if not rpc.ADDRESS.fullmatch(opinion.address):
                raise InvalidArgument(f"address {opinion.address[:80]!r} is not HOST:PORT")
            if not (math.isfinite(opinion.error) and opinion.error >= 0):
                raise InvalidArgument(f"error {opinion.error} must be finite and >= 0")
        if any(o.address == checked for o in request.replicas):
            raise InvalidArgument("a replica of a check must be another node than the one checked")
        known = {r.address: r for r in self.registry.nodes.values()}
        record = known.get(checked)
        if record is None:
            return cpb.CheckReply(), "ignored"  # about a node gone: nothing to do
        self._compared(
            [
                Comparison(checked, o.address, start, end, request.pos, o.error, tolerance, now)
                for o in request.replicas
                if o.address in known
            ]
        )
        if not request.HasField("evidence"):
            return cpb.CheckReply(), "tallied"
        try:
            inputs, checked_out, replica_outs, weights = read_evidence(
                request, self.registry.config
            )
            signed_nodes = signers(request, self.registry.public_keys())
        except InvalidArgument:
            self.false_reporters.add(caller)
            log.warning("%s sent spot-check evidence that does not hold up: ignored", caller)
            raise
        signature = request.evidence.checked_trace.signature
        idle = now - self._arbitrated_at >= ARBITRATE_EVERY_S and not self._arbitrating.locked()
        if signature in self._settled or not idle:
            return cpb.CheckReply(), "tallied"  # settled already, or busy: a later one will do
        self._settled.add(signature)
        self._arbitrated_at = now
        async with self._arbitrating:
            mine = await asyncio.to_thread(self.arbiter.rerun, start, end, weights, inputs)
        head = end == self.registry.config.n_units
        allowed_step = tolerance_for(request.codec, weights, mine, logits=head)
        addresses = [checked, *(o.address for o in request.replicas)]
        outputs = dict(zip(addresses, [checked_out, *replica_outs], strict=True))
        now = self.clock()
        excluded = []
        for address in signed_nodes:
            error = distance(mine, outputs[address])
            # A shadow ran the positions in one batched forward, the re-run step by step:
            # int8 layers quantize a batch with one scale, so it gets twice the room.
            allowed = allowed_step * (SHADOW_SLACK if address != checked else 1.0)
            self._compared(
                [Comparison(ARBITER, address, start, end, request.pos, error, allowed, now)]
            )
            log.info(
                "settled a dispute on units [%d, %d) at position %d: %s's signed output "
                "differs by %.3g from the coordinator's re-run (tolerance %.3g)",
                start, end, request.pos, address, error, allowed,
            )  # fmt: skip
            if error > allowed and address not in self.registry.excluded:
                self.registry.exclude(
                    address,
                    f"spot-check: its signed output for units [{start}, {end}) at position "
                    f"{request.pos} differs from the coordinator's re-run by {error:.3g} "
                    f"(tolerance {allowed:.3g})",
                )
                excluded.append(address)
                self.metrics.exclusions.inc()
        return cpb.CheckReply(excluded=excluded), "verified"


def live_report(live: cpb.LiveLoad) -> LiveReport:
    """A heartbeat's live figures, checked: remote input."""
    figures = (
        live.decode_ms,
        live.decode_ms_p90,
        live.prefill_ms_per_token,
        live.tokens_per_s,
        live.sampled_per_s,
        live.speed_ratio,
        live.idle_s,
    )
    if not all(0 <= v < 1e12 for v in figures) or len(live.next_hops) > MAX_PEERS:
        raise InvalidArgument("live: figures >= 0 and finite, at most 8 next hops")
    hops = {}
    for h in live.next_hops:
        if not rpc.ADDRESS.fullmatch(h.address) or not (
            0 <= h.rtt_ms < 1e12 and 0 <= h.bytes_per_s < 1e15
        ):
            raise InvalidArgument("live.next_hops: each a HOST:PORT, figures >= 0 and finite")
        hops[h.address] = (h.rtt_ms, h.bytes_per_s)
    return LiveReport(*figures, next_hops=hops)


def live_wire(live: LiveReport) -> cpb.LiveLoad:
    return cpb.LiveLoad(
        decode_ms=live.decode_ms,
        decode_ms_p90=live.decode_ms_p90,
        prefill_ms_per_token=live.prefill_ms_per_token,
        tokens_per_s=live.tokens_per_s,
        sampled_per_s=live.sampled_per_s,
        speed_ratio=live.speed_ratio,
        idle_s=live.idle_s,
        next_hops=[
            cpb.HopLink(address=a, rtt_ms=rtt, bytes_per_s=rate)
            for a, (rtt, rate) in live.next_hops.items()
        ],
    )
