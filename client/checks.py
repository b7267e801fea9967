"""Spot-checks by shadow: a replica follows one hop of a session on its own KV cache, fed
that hop's inputs in chunks as they happen, and every position it computes is compared
with what the hop computed, within what the codec and the weights' dtype allow.

Cost. A session's hop is followed with probability ``rate`` (decided at its first step),
or always where the route says the coordinator wants its node followed (a node new to
checks, or one whose checks disagreed: ``coordinator/trust.py``).
Its shadow runs the hop's work once, in a few batched forwards (one every ``CHECK_EVERY``
steps), never replaying from position 0: the checks cost a fixed share of the work they
check, whatever the length of the generation. Which hops are followed is not said to
them: a followed hop only sees its replay material read back (``Node.Outputs``) after it
signed what it sent, and every session, followed or not, asks the head for its logits at
random check points.

A check point of hop k at the step (pos, n): a session's first step, then one step in
``CHECK_EVERY`` at random; only while the same node ran hop k, fed by the same node:

- the input since the last check point: the token ids (k = 0) or what hop k-1 sent it
  (``Outputs`` of hop k-1), in the chunks first sent, so the shadow's running input
  digest is the hop's own (signatures name the same input);
- the output: what hop k sent on over the same positions (``Outputs`` of hop k), or at the
  head the logits of the check point's step, which that step asked for in advance
  (``return_output``); the head's other positions are computed but not compared;
- the shadow runs the chunks in one step (``StepRequest.chunks``) and returns its output
  for all of them, fp32, with its signature for each chunk.

The material is fetched right after the step, while the session's nodes still hold it;
the shadows run on a background thread. A disagreement goes to the coordinator with the
step's input from position 0 (kept by the shadow as it went), the hop's signed output
and the shadow's, and the coordinator re-runs the step itself (``coordinator/arbiter.py``)
and excludes whichever signed a wrong output. What counts as agreement is
``nanoshard/agreement.py``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import secrets
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from nanoshard import identity, rpc
from nanoshard.agreement import (
    chunk_rows,
    distance,
    from_wire,
    input_digest,
    output_digest,
    to_wire,
    tolerance,
)
from nanoshard.errors import InvalidArgument, NanoshardError
from nanoshard.security import Security
from nanoshard.v1 import coordinator_pb2 as cpb
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc

from .route import Route

log = logging.getLogger(__name__)

DEFAULT_CHECK_RATE = 0.4  # share of sessions' hops a shadow follows (benchmarks/checks.py)
CHECK_EVERY = 32  # one step in this many is a check point, at random (and a session's first)
MAX_PENDING = 64  # check points waiting for the background thread; more are skipped
MATERIAL_TIMEOUT_S = 5.0  # the calls a check point waits for: brief, a check is optional
MAX_EVIDENCE_BYTES = 12 * 2**20  # a dispute's input and outputs, sent to the coordinator
REPORT_AGREEMENT_S = 5.0  # a pair's agreements feed the coordinator's tallies at most this often
MAX_SESSIONS = 1024  # sessions whose shadows a checker remembers (the oldest go first)

Chunk = tuple[int, Any]  # (pos, token ids or pb.Activations)


@dataclass
class CheckResult:
    """One check point: the stage, the step compared (the first that disagreed, or the
    check point's own), who ran it, and the shadow's distance from it."""

    start: int
    end: int
    pos: int
    tokens: int
    checked: str  # the node whose steps were checked
    distances: dict[str, float]  # shadow address -> its largest distance over the positions
    tolerance: float
    positions: int = 0  # positions compared at this check point
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
            "positions": self.positions,
            "agree": self.agree,
            "excluded": self.excluded,
        }


@dataclass
class Shadow:
    """A replica following hop ``hop`` of one session, in a session of its own there."""

    hop: int
    replica: str = ""  # chosen at the first check point
    weights: str = ""  # the dtype the hop's weights run in (the replica's must match)
    session_id: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    checked: str = ""  # the node it follows, and the one sending it its input ...
    upstream: str = ""  # ... (set at the first check point; a move stops the shadow)
    planned: int = 0  # positions the check points queued so far reach (generation side)
    step_id: int = 0
    opened: bool = False
    broken: str = ""  # why it stopped following ("" while it follows)
    inputs: list[Chunk] = field(default_factory=list)  # every chunk fed, from 0 (evidence)
    traces: dict[int, pb.HopTrace] = field(default_factory=dict)  # pos -> the hop's trace
    upstreams: dict[int, str] = field(default_factory=dict)  # pos -> who sent it the input

    @property
    def fed(self) -> int:
        """Positions the shadow holds (background side)."""
        return _end(self.inputs)


@dataclass
class Material:
    """What a check point needs, fetched right after its step."""

    shadow: Shadow  # its node follows shadow.checked
    hop: pb.Hop
    spec: pb.SessionSpec  # the session's (codec, sampling, max_length)
    inputs: list[Chunk]  # [shadow.planned before, the check point's end), as first sent
    outputs: list[pb.Activations]  # per input chunk what the hop sent; at the head one: logits
    logits: bool
    token: int | None  # the token the head drew at the check point

    @property
    def end(self) -> int:
        """One past the check point's step (its last chunk)."""
        return _end(self.inputs)


Reporter = Callable[[cpb.CheckReport], list[str]]  # a report -> addresses excluded now


class Checker:
    """Decides which hops of a session a shadow follows, gathers each check point's
    material, and runs the shadows in the background. ``rate`` 0 turns checks off;
    ``seed`` makes the choices repeatable."""

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
        self.skipped: Counter[str] = Counter()  # why check points did not happen
        self._weights: dict[str, str] = {}  # address -> weights dtype (Node.Info)
        self._excluded: set[str] = set()  # nodes the coordinator excluded: no shadows
        self._sessions: OrderedDict[bytes, dict[int, Shadow]] = OrderedDict()
        self._jobs: queue.Queue[Material | Shadow | None] = queue.Queue(MAX_PENDING)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._agreement_reported: dict[tuple[str, str], float] = {}  # (hop, shadow) -> when

    # ---- deciding and gathering (on the generation's side) -----------------------------

    def plan(self, route: Route, session_id: bytes) -> tuple[list[int], bool]:
        """Whether the next step is a check point: the hops whose shadows compare it, and
        whether it asks the head for its logits. A session's first step decides which hops
        are followed. Every session, followed or not, has check points at its first step and
        at random steps (one in ``CHECK_EVERY``) and asks the head for its logits at each, so
        no hop can tell which sessions or steps are compared."""
        if self.rate <= 0:  # off, the coordinator's asks too (``Client``'s check_rate)
            return [], False
        shadows = self._sessions.get(session_id)
        first = shadows is None
        if shadows is None:
            candidates = [k for k, hop in enumerate(route.hops) if len(hop.addresses) > 1]
            if not candidates:
                self.skipped["no replica"] += 1
            shadows = {
                k: Shadow(k)
                for k in candidates
                if self.rng.random() < max([self.rate, *route.hops[k].check_rates])
            }
            self._sessions[session_id] = shadows
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        if not first and self.rng.random() >= 1 / CHECK_EVERY:
            return [], False
        return [k for k, s in shadows.items() if not s.broken], True

    def followed(self, session_id: bytes) -> list[int]:
        """The hops of a session that a shadow follows: their traces are compared."""
        return [k for k, s in self._sessions.get(session_id, {}).items() if not s.broken]

    def observe(self, session_id: bytes, pos: int, reply: pb.StepReply) -> None:
        """Keep the followed hops' signed traces of a step (who computed it, and a dispute's
        evidence), and who sent each its input."""
        for k, s in self._sessions.get(session_id, {}).items():
            if not s.broken and k < len(reply.hops):
                s.traces[pos] = reply.hops[k]
                s.upstreams[pos] = reply.hops[k - 1].address if k else ""

    def gather(
        self,
        route: Route,
        k: int,
        spec: pb.SessionSpec,
        history: list[tuple[int, list[int]]],
        reply: pb.StepReply,
    ) -> None:
        """Fetch what hop ``k``'s check point at the step just answered needs, and queue
        it. ``history`` is every chunk the session sent, the step's own last."""
        shadow = self._sessions.get(spec.session_id, {}).get(k)
        if shadow is None or shadow.broken:
            return
        try:
            material = self._material(shadow, route, spec, history, reply)
        except UnsignedMaterial as exc:  # a node's replay is not its word: never trusted
            log.warning("spot-check stopped: %s", exc)
            self._stop(shadow, "unsigned replay material")
            return
        except NanoshardError as exc:  # a node went away, or freed the session already
            self._stop(shadow, f"material unavailable: {exc}")
            return
        except Exception:  # what a node sent does not decode: never the generation's problem
            log.warning("spot-check stopped: its material is malformed", exc_info=True)
            self._stop(shadow, "material malformed")
            return
        if material is None:
            return
        try:
            self._jobs.put_nowait(material)
        except queue.Full:
            self._stop(shadow, "busy")
            return
        shadow.planned = material.end
        self._start()

    def end(self, session_id: bytes) -> None:
        """The session ended: its shadows close their sessions (after their check points)."""
        for shadow in self._sessions.pop(session_id, {}).values():
            if shadow.replica:
                with contextlib.suppress(queue.Full):
                    self._jobs.put_nowait(shadow)
                    self._start()

    def _stop(self, shadow: Shadow, why: str) -> None:
        log.debug("spot-check shadow of hop %d stopped: %s", shadow.hop, why)
        self.skipped[why.split(":")[0]] += 1
        shadow.broken = why

    def _material(
        self,
        shadow: Shadow,
        route: Route,
        spec: pb.SessionSpec,
        history: list[tuple[int, list[int]]],
        reply: pb.StepReply,
    ) -> Material | None:
        k = shadow.hop
        hop, last = route.hops[k], k == len(route.hops) - 1
        traces = list(reply.hops)
        if len(traces) != len(route.hops) or (traces[k].start, traces[k].end) != (
            hop.start,
            hop.end,
        ):
            self._stop(shadow, "route changed")
            return None
        checked = traces[k].address
        upstream = traces[k - 1].address if k else ""
        if traces[k].tp > 1:  # a group takes no step of chunks: no shadow can replay it
            self._stop(shadow, "a tensor-parallel hop")
            return None
        if not shadow.replica:
            shadow.weights = self._weights_of(checked)
            shadow.checked, shadow.upstream = checked, upstream
            # a node the coordinator asks to have followed is the shadow where it can be;
            # dtypes are asked only until one replica matches
            rates = dict(zip(hop.addresses, hop.check_rates, strict=False))
            others = [a for a in hop.addresses if a != checked and not self.excluded([a])]
            self.rng.shuffle(others)
            others.sort(key=lambda a: -rates.get(a, 0.0))
            match = (a for a in others if self._weights_or_none(a) == shadow.weights)
            shadow.replica = next(match, "")
            if not shadow.replica:
                self._stop(shadow, "no replica with the same weights")
                return None
        pos, ids = history[-1]
        end, start = pos + len(ids), shadow.planned
        # The same node ran every step since the last check point, fed by the same one:
        # else its outputs are another node's, and the shadow's input not the hop's.
        since = [(p, chunk) for p, chunk in history if p >= start]
        if (checked, upstream) != (shadow.checked, shadow.upstream) or any(
            shadow.traces.get(p, pb.HopTrace()).address != checked
            or shadow.upstreams.get(p) != upstream
            for p, _ in since
        ):
            self._stop(shadow, "the hop moved to another node")
            return None
        keys = route.keys()
        inputs: list[Chunk]
        if k == 0:
            inputs = since
        else:
            inputs = self._sent(upstream, spec.session_id, start, end, keys.get(upstream))
        if not _covers(inputs, start, end) or inputs[-1][0] != pos:
            self._stop(shadow, "incomplete replay material")
            return None
        if last:
            if not reply.HasField("output"):  # answered from a retried step's stored output
                self._stop(shadow, "no output")
                return None
            outputs = [reply.output]
            token = reply.token if reply.has_token else None
        else:
            sent = self._sent(checked, spec.session_id, start, end, keys.get(checked))
            if [(p, a.shape[0]) for p, a in sent] != [(p, chunk_rows(x)) for p, x in inputs]:
                self._stop(shadow, "incomplete replay material")
                return None
            if any(
                identity.output_digest(a) != shadow.traces[p].output_digest for p, a in sent
            ):  # its replay is not what it signed for the steps as they ran: never trusted
                self._stop(shadow, "replay material differs from the steps")
                return None
            outputs, token = [a for _, a in sent], None
        return Material(shadow, hop, spec, inputs, outputs, last, token)

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

    def _sent(
        self, address: str, session_id: bytes, start: int, end: int, key: bytes | None
    ) -> list[Chunk]:
        """What ``address`` sent on over [start, end), each chunk checked against what it
        signed for it when ``key`` (its public key) is known."""
        reply = self._call(
            address, "Outputs", pb.OutputsRequest(session_id=session_id, start=start, end=end)
        )
        for c in reply.chunks:
            rows = c.activations.shape[0] if c.activations.shape else 0
            if key and not (
                identity.step_signed(key, session_id, c.pos, rows, c.trace)
                and identity.output_digest(c.activations) == c.trace.output_digest
            ):
                raise UnsignedMaterial(
                    f"{address}'s replay material at {c.pos} is not what it signed"
                )
        return [(c.pos, c.activations) for c in reply.chunks]

    def _call(self, address: str, method: str, request: Any) -> Any:
        with rpc.open_channel(address, self.security) as channel:
            stub = pb_grpc.NodeStub(channel)
            try:
                return getattr(stub, method)(request, timeout=MATERIAL_TIMEOUT_S)
            except grpc.RpcError as err:
                raise rpc.error_from_rpc(err, address) from None

    # ---- following (on the background thread) -----------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="spot-checks", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if isinstance(job, Shadow):
                    self._close(job)
                else:
                    self._check(job)
            except Exception:  # a check must never take the client down
                log.exception("spot-check failed")
            finally:
                self._jobs.task_done()

    def _check(self, m: Material) -> None:
        s = m.shadow
        if s.broken:
            return
        if self.excluded([s.replica]):
            self._stop(s, "the shadow was excluded")
            return
        start = m.inputs[0][0]
        if s.fed != start:
            self._stop(s, "a check point was skipped")
            return
        try:
            reply = self._feed(s, m)
        except NanoshardError as exc:
            log.debug("spot-check shadow on %s failed: %s", s.replica, exc)
            self._stop(s, f"shadow unavailable: {exc}")
            return
        earlier = list(s.inputs)
        s.inputs.extend(m.inputs)
        out = from_wire(reply.output)
        # (chunk index, the hop's output, the shadow's) per compared chunk
        compared = []
        if m.logits:  # the head: its logits of the check point's step
            mine, theirs = from_wire(m.outputs[0]), out[-1:]
            compared.append((len(m.inputs) - 1, mine, theirs))
        else:
            row = 0
            for i, (_, item) in enumerate(m.inputs):
                n = chunk_rows(item)
                compared.append((i, from_wire(m.outputs[i]), out[row : row + n]))
                row += n
        worst = None
        for i, mine, theirs in compared:
            tol = tolerance(m.spec.codec, s.weights, theirs, logits=m.logits)
            d = distance(theirs, mine)
            if worst is None or d - tol > worst[1] - worst[2]:
                worst = (i, d, tol)
            if d > tol:
                break
        assert worst is not None
        i, d, tol = worst
        pos, item = m.inputs[i]
        if m.logits:
            positions = 1
        elif d > tol:  # up to the first that disagrees
            positions = sum(chunk_rows(x) for _, x in m.inputs[: i + 1])
        else:
            positions = m.end - start
        result = CheckResult(
            m.hop.start, m.hop.end, pos, chunk_rows(item), s.checked, {s.replica: d}, tol, positions
        )
        if not result.agree:
            log.warning(
                "spot-check: units [%d, %d) at position %d disagree: %s ran it; %s at %.3g "
                "(tolerance %.2g)",
                m.hop.start, m.hop.end, pos, s.checked, s.replica, d, tol,
            )  # fmt: skip
        if self.report is not None:
            report = self._report(m, result, earlier + m.inputs[: i + 1], i, out, reply)
            if report is not None:
                try:
                    result.excluded = self.report(report)
                    with self._lock:
                        self._excluded.update(result.excluded)
                except NanoshardError as exc:
                    log.info("could not report a spot-check: %s", exc)
        self.results.append(result)

    def _feed(self, s: Shadow, m: Material) -> pb.StepReply:
        """Open the shadow's session on its first check point, then run the chunks."""
        request = pb.StepRequest(
            session_id=s.session_id, step_id=s.step_id + 1, pos=m.inputs[0][0], return_output=True
        )
        for pos, item in m.inputs:
            if isinstance(item, pb.Activations):
                request.chunks.add(pos=pos, activations=item)
            else:
                request.chunks.add(pos=pos, tokens=pb.Tokens(ids=item))
        with rpc.open_channel(s.replica, self.security) as channel:
            stub = pb_grpc.NodeStub(channel)
            try:
                if not s.opened:
                    spec = pb.SessionSpec()
                    spec.CopyFrom(m.spec)
                    spec.session_id = s.session_id
                    stub.Open(
                        pb.OpenRequest(spec=spec, start=m.hop.start, end=m.hop.end),
                        timeout=self.timeout_s,
                    )
                    s.opened = True
                reply = stub.Step(request, timeout=self.timeout_s)
            except grpc.RpcError as err:
                raise rpc.error_from_rpc(err, s.replica) from None
        s.step_id += 1
        traces = 1 if m.logits else len(m.inputs)  # at the head, the last chunk's only
        if not reply.HasField("output") or len(reply.chunk_traces) not in (0, traces):
            raise NanoshardError(f"{s.replica} answered the shadow's step without its output")
        return reply

    def _close(self, s: Shadow) -> None:
        if not s.opened:
            return
        with contextlib.suppress(NanoshardError):
            self._call(s.replica, "Close", pb.CloseRequest(session_id=s.session_id))
        s.opened, s.broken = False, s.broken or "the session ended"

    def _report(
        self,
        m: Material,
        result: CheckResult,
        inputs: list[Chunk],
        i: int,
        out: torch.Tensor,
        reply: pb.StepReply,
    ) -> cpb.CheckReport | None:
        """What the coordinator hears of a check point: a disagreement with its evidence
        (it settles it itself, on the signed words of the hop and the shadow, and a re-run
        of its own); an agreement only for its tallies, and for a pair of nodes at most
        every few seconds."""
        s = m.shadow
        dispute = not result.agree
        if not dispute:
            now, pair = time.monotonic(), (s.checked, s.replica)
            if now - self._agreement_reported.get(pair, -REPORT_AGREEMENT_S) < REPORT_AGREEMENT_S:
                return None
            self._agreement_reported[pair] = now
            while len(self._agreement_reported) > MAX_SESSIONS:  # the oldest pairs go
                del self._agreement_reported[next(iter(self._agreement_reported))]
        pos, item = inputs[-1]
        n = chunk_rows(item)
        rows = out[-1:] if m.logits else out[sum(chunk_rows(x) for _, x in m.inputs[:i]) :][:n]
        mine = from_wire(m.outputs[0 if m.logits else i])
        report = cpb.CheckReport(
            start=m.hop.start,
            end=m.hop.end,
            pos=pos,
            tokens=n,
            codec=m.spec.codec,
            input_digest=input_digest(inputs),
            tolerance=result.tolerance,
            checked=cpb.CheckOpinion(address=s.checked, digest=output_digest(mine)),
            replicas=[
                cpb.CheckOpinion(
                    address=s.replica, digest=output_digest(rows), error=result.distances[s.replica]
                )
            ],
        )
        trace = s.traces.get(pos)
        if dispute and trace is not None:
            token = m.token if m.logits else None
            evidence = cpb.CheckEvidence(
                checked_output=m.outputs[0 if m.logits else i],
                replica_outputs=[to_wire(rows)],
                weights=s.weights,
                checked_trace=trace,
                session_id=m.spec.session_id,
                has_token=token is not None,
                token=token or 0,
            )
            if reply.chunk_traces:
                evidence.replica_traces.append(reply.chunk_traces[-1 if m.logits else i])
                evidence.replica_session_ids.append(s.session_id)
            for p, x in inputs:
                if isinstance(x, pb.Activations):
                    evidence.inputs.add(pos=p, activations=x)
                else:
                    evidence.inputs.add(pos=p, tokens=pb.Tokens(ids=x))
            if evidence.ByteSize() <= MAX_EVIDENCE_BYTES:
                report.evidence.CopyFrom(evidence)
        return report

    # ---- the client's side ------------------------------------------------------------

    def excluded(self, addresses: list[str]) -> list[str]:
        """Those of ``addresses`` the coordinator excluded after this client's checks."""
        with self._lock:
            return [a for a in addresses if a in self._excluded]

    def wait(self) -> None:
        """Until every queued check point has run (tests; ``close`` waits briefly itself)."""
        self._jobs.join()

    def close(self, timeout_s: float = 5.0) -> None:
        for session_id in list(self._sessions):
            self.end(session_id)
        thread = self._thread
        if thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._jobs.put(None, timeout=timeout_s)
        thread.join(timeout_s)


class UnsignedMaterial(NanoshardError):
    """A node's replay material that its signature does not cover."""


def _end(chunks: list[Chunk]) -> int:
    """One past the last position of ``chunks`` (0 for none)."""
    if not chunks:
        return 0
    pos, item = chunks[-1]
    return pos + chunk_rows(item)


def _covers(chunks: list[Chunk], start: int, end: int) -> bool:
    """Whether ``chunks`` cover [start, end) in order, without a gap, from ``start``."""
    at = start
    for pos, item in chunks:
        if pos != at:
            return False
        at += chunk_rows(item)
    return at == end and bool(chunks)
