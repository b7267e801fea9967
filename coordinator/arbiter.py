"""The coordinator as a third witness. When a spot-check finds two nodes disagreeing and no
third node re-ran the step (a stage served twice, the default), one disagreement cannot say
which of the two is wrong. The client then sends the step's input and both outputs, and the
coordinator re-runs the stage from its own copy of the weights, at the nodes' weights dtype
and in the chunks first sent: an honest node's output is then the same to the bit (fp32)
or within the tolerance.

Checking the evidence is pure (``read_evidence``); re-running holds one stage in memory
(the last one built) and runs off the event loop, one dispute at a time.
"""

from __future__ import annotations

import torch

from nanoshard import codec as codecs
from nanoshard import identity
from nanoshard.agreement import StepInput, chunk_rows, from_wire, input_digest
from nanoshard.config import GPTConfig
from nanoshard.engine import DTYPES, Stage
from nanoshard.errors import InvalidArgument
from nanoshard.v1 import coordinator_pb2 as cpb
from nanoshard.v1 import node_pb2 as pb

from .model import ModelStore


def _activations(act: pb.Activations, rows: int, width: int, what: str) -> None:
    if act.codec not in codecs.CODECS:
        raise InvalidArgument(f"{what}: unknown codec {act.codec[:20]!r}")
    if list(act.shape) != [rows, width]:
        raise InvalidArgument(f"{what}: shape {list(act.shape)[:4]} is not [{rows}, {width}]")
    if len(act.payload) != codecs.encoded_size((rows, width), act.codec):
        raise InvalidArgument(f"{what}: {len(act.payload)} payload bytes do not fit its shape")


def read_evidence(
    report: cpb.CheckReport, config: GPTConfig
) -> tuple[list[StepInput], torch.Tensor, list[torch.Tensor], str]:
    """A dispute's input chunks, the checked and replica outputs, and the weights dtype, all
    checked against the report (shapes, positions, the input's digest)."""
    ev = report.evidence
    if ev.weights not in DTYPES:
        raise InvalidArgument(f"evidence: weights must be one of {', '.join(DTYPES)}")
    if len(ev.replica_outputs) != len(report.replicas):
        raise InvalidArgument("evidence: one replica output per replica of the report")
    end = report.pos + report.tokens
    if not 0 < report.tokens <= end <= config.block_size:
        raise InvalidArgument(f"evidence: positions [{report.pos}, {end}) exceed the context")
    embed, head = report.start == 0, report.end == config.n_units
    inputs: list[StepInput] = []
    at = 0
    for chunk in ev.inputs:
        if chunk.pos != at:
            raise InvalidArgument(f"evidence: input chunks must run on from 0 (gap at {at})")
        if embed:
            ids = list(chunk.tokens.ids)
            if chunk.WhichOneof("input") != "tokens" or not ids or max(ids) >= config.vocab_size:
                raise InvalidArgument("evidence: a stage holding embed takes token ids")
            inputs.append((chunk.pos, ids))
            at += len(ids)
        else:
            if chunk.WhichOneof("input") != "activations" or not chunk.activations.shape:
                raise InvalidArgument("evidence: a stage after embed takes activations")
            rows = chunk.activations.shape[0]
            _activations(chunk.activations, rows, config.n_embd, "evidence input")
            inputs.append((chunk.pos, chunk.activations))
            at += rows
        if at > end:
            break
    if at != end or inputs[-1][0] != report.pos:
        raise InvalidArgument(f"evidence: inputs must end with the step at {report.pos}")
    if input_digest(inputs) != report.input_digest:
        raise InvalidArgument("evidence: the inputs do not match the report's input digest")
    rows, width = (1, config.vocab_size) if head else (report.tokens, config.n_embd)
    outputs = [ev.checked_output, *ev.replica_outputs]
    for act in outputs:
        _activations(act, rows, width, "evidence output")
    decoded = [from_wire(act) for act in outputs]
    return inputs, decoded[0], decoded[1:], ev.weights


def signed(
    public_key: bytes,
    report: cpb.CheckReport,
    session_id: bytes,
    trace: pb.HopTrace,
    output: pb.Activations,
    token: int | None,
    who: str,
) -> None:
    """Check that a node's part of the evidence is its own word: its signature over the
    step (session, positions, stage, digests), the input digest of the evidence's chunks,
    and the output digest of the output given (and token). INVALID_ARGUMENT if not."""
    if not public_key:
        raise InvalidArgument(f"evidence: {who} has no key to check it with")
    if (trace.start, trace.end) != (report.start, report.end):
        raise InvalidArgument(f"evidence: {who}'s trace is of another stage")
    if not identity.step_signed(public_key, session_id, report.pos, report.tokens, trace):
        raise InvalidArgument(f"evidence: {who}'s trace does not carry its signature")
    if trace.input_digest != report.input_digest:
        raise InvalidArgument(f"evidence: the inputs are not those {who} signed for")
    if identity.output_digest(output, token) != trace.output_digest:
        raise InvalidArgument(f"evidence: the output is not the one {who} signed for")


def signers(report: cpb.CheckReport, keys: dict[str, bytes]) -> list[str]:
    """The nodes whose outputs in the report's evidence are their own signed word: the
    checked node always (raises INVALID_ARGUMENT if not), each replica that sent a trace."""
    ev = report.evidence
    checked = report.checked.address
    token = ev.token if ev.has_token else None
    signed(keys.get(checked, b""), report, ev.session_id, ev.checked_trace, ev.checked_output,
           token, "the checked node")  # fmt: skip
    out = [checked]
    if ev.replica_traces and len(ev.replica_traces) != len(report.replicas):
        raise InvalidArgument("evidence: one trace per replica, or none")
    if len(ev.replica_session_ids) != len(ev.replica_traces):
        raise InvalidArgument("evidence: one session id per replica trace")
    for opinion, trace, sid, output in zip(
        report.replicas, ev.replica_traces, ev.replica_session_ids, ev.replica_outputs,
        strict=False,
    ):  # fmt: skip
        who = f"replica {opinion.address}"
        signed(keys.get(opinion.address, b""), report, sid, trace, output, None, who)
        out.append(opinion.address)
    return out


class Arbiter:
    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self._last: tuple[tuple[int, int, str], Stage] | None = None

    def _stage(self, start: int, end: int, weights: str) -> Stage:
        key = (start, end, weights)
        if self._last is None or self._last[0] != key:
            self._last = None  # free the previous one first
            stage = self.store.checkpoint.load_stage(start, end, DTYPES[weights])
            self._last = (key, stage)
        return self._last[1]

    @torch.no_grad()
    def rerun(self, start: int, end: int, weights: str, inputs: list[StepInput]) -> torch.Tensor:
        """The stage's output for the last chunk: activations, or the head's last logits."""
        stage = self._stage(start, end, weights)
        length = inputs[-1][0] + chunk_rows(inputs[-1][1])
        cache = stage.new_cache(length)
        y = torch.empty(0)
        for pos, item in inputs:
            if isinstance(item, pb.Activations):
                shape = tuple(item.shape)
                x = codecs.decode(item.payload, shape, item.codec, dtype=stage.act_dtype)
            else:
                x = torch.tensor(item, dtype=torch.long)
            y = stage(x, cache, pos)
        return (y[-1:] if stage.has_head else y).float()
