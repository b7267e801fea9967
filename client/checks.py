"""Spot-checks: the client re-runs a random hop's step on replicas of the same stage and
compares their outputs with the one the generation used, within what the codec and the
weights' dtype allow. Every result goes to the coordinator, which excludes a node once
two others stand against it (``coordinator/trust.py``). When the one replica asked
disagrees, the report carries the step's input and both outputs, and the coordinator
re-runs the step itself (``coordinator/arbiter.py``).

A check of hop k at the step (pos, n):

- its input: the token ids (k = 0) or what hop k-1 sent it over positions [0, pos + n),
  from hop k-1's replay material (``Node.Outputs``), in the chunks first sent, so an honest
  replica rebuilds the same KV cache bit for bit;
- its output: what hop k sent on (``Outputs`` of hop k), or at the head its logits, which
  the step asked for in advance (``return_output``: the check is decided before the step);
- each replica (up to two, with the same weights dtype) opens a session of its own, takes
  the input chunks, and returns its output for the last one, in fp32.

The material is fetched right after the step, while the session's nodes still hold it;
the re-runs happen on a background thread, so a checked step costs the generation one or
two small calls. What counts as agreement is ``nanoshard/agreement.py``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import secrets
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from nanoshard import rpc
from nanoshard.agreement import (
    distance,
    from_wire,
    input_digest,
    output_digest,
    tolerance,
)
from nanoshard.errors import InvalidArgument, NanoshardError
from nanoshard.security import Security
from nanoshard.v1 import coordinator_pb2 as cpb
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc

from .route import Route

log = logging.getLogger(__name__)

DEFAULT_CHECK_RATE = 0.02  # share of steps checked
MAX_REPLICAS = 2  # re-runs per check: with three opinions the odd one out is known at once
MAX_PENDING = 4  # checks waiting for the background thread; more are skipped
MATERIAL_TIMEOUT_S = 5.0  # the calls a checked step waits for: brief, a check is optional
MAX_EVIDENCE_BYTES = 12 * 2**20  # a dispute's input and outputs, sent to the coordinator


@dataclass
class CheckResult:
    """One check: the stage, the step, who ran it, and each replica's distance from it."""

    start: int
    end: int
    pos: int
    tokens: int
    checked: str  # the node whose step was checked
    distances: dict[str, float]  # replica address -> distance from the checked output
    tolerance: float
    excluded: list[str] = field(default_factory=list)  # what the coordinator excluded

    @property
    def agree(self) -> bool:
        return all(d <= self.tolerance for d in self.distances.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "units": [self.start, self.end],
            "pos": self.pos,
            "tokens": self.tokens,
            "checked": self.checked,
            "distances": self.distances,
            "tolerance": self.tolerance,
            "agree": self.agree,
            "excluded": self.excluded,
        }


@dataclass(frozen=True)
class Rerun:
    """A replica's re-run of a checked step: its session, its output and signed trace."""

    session_id: bytes
    output: pb.Activations  # fp32, as it returned it
    trace: pb.HopTrace


@dataclass
class Material:
    """What a check needs, fetched right after the step."""

    hop: pb.Hop
    checked: str
    replicas: list[str]
    weights: str
    spec: pb.SessionSpec  # the session's (codec, sampling); re-runs get their own ids
    inputs: list[tuple[int, Any]]  # (pos, token ids or Activations), [0, pos + tokens)
    output: torch.Tensor  # fp32: activations (tokens, n_embd), or logits (1, vocab)
    logits: bool
    pos: int
    tokens: int
    sent: pb.Activations  # the output exactly as the checked node sent it on (or returned it)
    trace: pb.HopTrace  # what the checked node signed for the step
    token: int | None  # the token it drew (at the head)

    def evidence(self, reruns: list[Rerun]) -> cpb.CheckEvidence | None:
        """The step's input, the checked node's output and signed trace, and the replicas'
        (theirs signed too), for the coordinator to re-run the step itself (None when too
        big to send)."""
        evidence = cpb.CheckEvidence(
            checked_output=self.sent,
            replica_outputs=[r.output for r in reruns],
            replica_traces=[r.trace for r in reruns],
            replica_session_ids=[r.session_id for r in reruns],
            weights=self.weights,
            checked_trace=self.trace,
            session_id=self.spec.session_id,
            has_token=self.token is not None,
            token=self.token or 0,
        )
        for pos, item in self.inputs:
            if isinstance(item, pb.Activations):
                evidence.inputs.add(pos=pos, activations=item)
            else:
                evidence.inputs.add(pos=pos, tokens=pb.Tokens(ids=item))
        return evidence if evidence.ByteSize() <= MAX_EVIDENCE_BYTES else None


Reporter = Callable[[cpb.CheckReport], list[str]]  # a report -> addresses excluded now


class Checker:
    """Decides which steps to check, gathers their material, and re-runs them in the
    background. ``rate`` 0 turns checks off; ``seed`` makes the choices repeatable."""

    def __init__(
        self,
        rate: float = DEFAULT_CHECK_RATE,
        *,
        seed: int | None = None,
        security: Security | None = None,
        timeout_s: float = 30.0,
        report: Reporter | None = None,
    ) -> None:
        if not 0 <= rate <= 1:
            raise InvalidArgument(f"the spot-check rate must be in [0, 1], got {rate}")
        self.rate = rate
        self.rng = random.Random(seed)
        self.security = security
        self.timeout_s = timeout_s
        self.report = report
        self.results: deque[CheckResult] = deque(maxlen=1000)
        self.skipped: Counter[str] = Counter()  # why checks did not happen
        self._weights: dict[str, str] = {}  # address -> weights dtype (Node.Info)
        self._excluded: set[str] = set()  # nodes the coordinator excluded: no replicas
        self._jobs: queue.Queue[Material | None] = queue.Queue(MAX_PENDING)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- deciding and gathering (on the generation's thread) ---------------------------

    def plan(self, route: Route) -> int | None:
        """Whether to check the next step, and which hop (its index in the route)."""
        if self.rate <= 0 or self.rng.random() >= self.rate:
            return None
        candidates = [k for k, hop in enumerate(route.hops) if len(hop.addresses) > 1]
        if not candidates:
            self.skipped["no replica"] += 1
            return None
        return self.rng.choice(candidates)

    def gather(
        self,
        route: Route,
        k: int,
        spec: pb.SessionSpec,
        history: list[tuple[int, list[int]]],
        reply: pb.StepReply,
    ) -> None:
        """Fetch what checking hop ``k`` of the step just answered needs, and queue it.
        ``history`` is every chunk the session sent, the step's own last."""
        try:
            material = self._material(route, k, spec, history, reply)
        except NanoshardError as exc:  # a node went away, or freed the session already
            log.info("spot-check skipped: %s", exc)
            self.skipped["material unavailable"] += 1
            return
        except Exception:  # what a node sent does not decode: never the generation's problem
            log.warning("spot-check skipped: its material is malformed", exc_info=True)
            self.skipped["material malformed"] += 1
            return
        if material is None:
            return
        try:
            self._jobs.put_nowait(material)
        except queue.Full:
            self.skipped["busy"] += 1
            return
        self._start()

    def _material(
        self,
        route: Route,
        k: int,
        spec: pb.SessionSpec,
        history: list[tuple[int, list[int]]],
        reply: pb.StepReply,
    ) -> Material | None:
        hop, last = route.hops[k], k == len(route.hops) - 1
        traces = list(reply.hops)
        if len(traces) != len(route.hops) or (traces[k].start, traces[k].end) != (
            hop.start,
            hop.end,
        ):
            self.skipped["route changed"] += 1
            return None
        pos, ids = history[-1]
        n = len(ids)
        end = pos + n
        checked = traces[k].address
        weights = self._weights_of(checked)
        replicas = [a for a in hop.addresses if a != checked and not self.excluded([a])]
        self.rng.shuffle(replicas)
        replicas = [a for a in replicas if self._weights_or_none(a) == weights][:MAX_REPLICAS]
        if not replicas:
            self.skipped["no replica with the same weights"] += 1
            return None
        inputs: list[tuple[int, Any]]
        if k == 0:
            inputs = [(p, chunk) for p, chunk in history]
        else:
            inputs = self._sent(traces[k - 1].address, spec.session_id, 0, end)
            if not _covers(inputs, 0, end) or inputs[-1][0] != pos:
                self.skipped["incomplete replay material"] += 1
                return None
        if last:
            if not reply.HasField("output"):  # answered from a retried step's stored output
                self.skipped["no output"] += 1
                return None
            sent, token = reply.output, reply.token if reply.has_token else None
        else:
            chunks = self._sent(checked, spec.session_id, pos, end)
            if len(chunks) != 1 or chunks[0][0] != pos or chunks[0][1].shape[0] != n:
                self.skipped["incomplete replay material"] += 1
                return None
            sent, token = chunks[0][1], None
        output = from_wire(sent)
        return Material(
            hop, checked, replicas, weights, spec, inputs, output, last, pos, n, sent,
            traces[k], token,
        )  # fmt: skip

    def _weights_of(self, address: str) -> str:
        """The dtype a node's weights run in (asked once): replicas must match it."""
        if address not in self._weights:
            info = self._call(address, "Info", pb.InfoRequest())
            self._weights[address] = info.dtype
        return self._weights[address]

    def _weights_or_none(self, address: str) -> str | None:
        try:
            return self._weights_of(address)
        except NanoshardError:  # unreachable: not a replica for this check
            return None

    def _sent(self, address: str, session_id: bytes, start: int, end: int) -> list[tuple[int, Any]]:
        reply = self._call(
            address, "Outputs", pb.OutputsRequest(session_id=session_id, start=start, end=end)
        )
        return [(c.pos, c.activations) for c in reply.chunks]

    def _call(self, address: str, method: str, request: Any) -> Any:
        with rpc.open_channel(address, self.security) as channel:
            stub = pb_grpc.NodeStub(channel)
            try:
                return getattr(stub, method)(request, timeout=MATERIAL_TIMEOUT_S)
            except grpc.RpcError as err:
                raise rpc.error_from_rpc(err, address) from None

    # ---- re-running (on the background thread) -----------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="spot-checks", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            material = self._jobs.get()
            try:
                if material is None:
                    return
                self._check(material)
            except Exception:  # a check must never take the client down
                log.exception("spot-check failed")
            finally:
                self._jobs.task_done()

    def _check(self, m: Material) -> None:
        outputs, reruns = {}, {}
        for address in m.replicas:
            try:
                reruns[address] = self._rerun(address, m)
                outputs[address] = from_wire(reruns[address].output)
            except NanoshardError as exc:
                log.info("spot-check re-run on %s failed: %s", address, exc)
        distances = {a: distance(out, m.output) for a, out in outputs.items()}
        if not distances:
            self.skipped["replicas unavailable"] += 1
            return
        tol = max(
            tolerance(m.spec.codec, m.weights, out, logits=m.logits) for out in outputs.values()
        )
        result = CheckResult(m.hop.start, m.hop.end, m.pos, m.tokens, m.checked, distances, tol)
        if not result.agree:
            log.warning(
                "spot-check: units [%d, %d) at position %d disagree: %s ran it; %s (tolerance %.2g)",
                m.hop.start, m.hop.end, m.pos, m.checked,
                ", ".join(f"{a} at {d:.3g}" for a, d in distances.items()), tol,
            )  # fmt: skip
        if self.report is not None:
            try:
                result.excluded = self.report(self._report(m, result, outputs, reruns))
                with self._lock:
                    self._excluded.update(result.excluded)
            except NanoshardError as exc:
                log.info("could not report a spot-check: %s", exc)
        self.results.append(result)

    def _rerun(self, address: str, m: Material) -> Rerun:
        """The replica's output for the step, from a session of its own, and its trace."""
        session_id = secrets.token_bytes(16)
        spec = pb.SessionSpec()
        spec.CopyFrom(m.spec)
        spec.session_id, spec.max_length = session_id, m.pos + m.tokens
        open_request = pb.OpenRequest(spec=spec, start=m.hop.start, end=m.hop.end)
        with rpc.open_channel(address, self.security) as channel:
            stub = pb_grpc.NodeStub(channel)
            try:
                stub.Open(open_request, timeout=self.timeout_s)
                try:
                    for i, (pos, item) in enumerate(m.inputs):
                        request = pb.StepRequest(
                            session_id=session_id,
                            step_id=i + 1,
                            pos=pos,
                            return_output=i == len(m.inputs) - 1,
                        )
                        if isinstance(item, pb.Activations):
                            request.activations.CopyFrom(item)
                        else:
                            request.tokens.ids.extend(item)
                        reply = stub.Step(request, timeout=self.timeout_s)
                finally:
                    with contextlib.suppress(grpc.RpcError):
                        stub.Close(pb.CloseRequest(session_id=session_id), timeout=5)
            except grpc.RpcError as err:
                raise rpc.error_from_rpc(err, address) from None
        if not reply.HasField("output") or not reply.hops:
            raise NanoshardError(f"{address} answered the re-run without its output")
        return Rerun(session_id, reply.output, reply.hops[0])

    @staticmethod
    def _report(
        m: Material,
        result: CheckResult,
        outputs: dict[str, torch.Tensor],
        reruns: dict[str, Rerun],
    ) -> cpb.CheckReport:
        # A disagreement: the coordinator settles it itself, on the checked node's own word
        # (its signed trace) and a re-run of its own; nothing less excludes anyone.
        dispute = not result.agree
        return cpb.CheckReport(
            start=m.hop.start,
            end=m.hop.end,
            pos=m.pos,
            tokens=m.tokens,
            codec=m.spec.codec,
            input_digest=input_digest(m.inputs),
            tolerance=result.tolerance,
            checked=cpb.CheckOpinion(address=m.checked, digest=output_digest(m.output)),
            replicas=[
                cpb.CheckOpinion(address=a, digest=output_digest(outputs[a]), error=d)
                for a, d in result.distances.items()
            ],
            evidence=m.evidence([reruns[a] for a in result.distances]) if dispute else None,
        )

    # ---- the client's side ------------------------------------------------------------

    def excluded(self, addresses: list[str]) -> list[str]:
        """Those of ``addresses`` the coordinator excluded after this client's checks."""
        with self._lock:
            return [a for a in addresses if a in self._excluded]

    def wait(self) -> None:
        """Until every queued check has run (tests; ``close`` waits briefly by itself)."""
        self._jobs.join()

    def close(self, timeout_s: float = 5.0) -> None:
        thread = self._thread
        if thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._jobs.put(None, timeout=timeout_s)
        thread.join(timeout_s)


def _covers(chunks: list[tuple[int, Any]], start: int, end: int) -> bool:
    """Whether ``chunks`` (pos, Activations) cover [start, end) in order, without a gap."""
    at = start
    for pos, act in chunks:
        if pos != at:
            return False
        at += act.shape[0]
    return at == end
