"""A step's input at a node: its chunks checked against the session and the stage, and the
compute job that turns them into the step's output (activations to forward, or the head's
token); and the output a retried step is answered from. Pure: no gRPC, no I/O."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nanoshard import codec as codecs
from nanoshard.agreement import inputs_of
from nanoshard.engine import Stage
from nanoshard.errors import Internal, InvalidArgument
from nanoshard.sampling import sample, sample_slice
from nanoshard.tp import gather_vocab
from nanoshard.v1 import node_pb2 as pb

from .faults import Delay, Fault
from .group import GroupStep
from .sessions import NodeSession, SessionSpec
from .worker import StageStep

HEADROOM_BYTES = 64 * 1024  # of a message, for all but its activations


def prepare(
    req: pb.StepRequest,
    session: NodeSession,
    returned: list[pb.Activations] | None,
    *,
    max_message_bytes: int,
    fault: Fault | Delay | None = None,
) -> tuple[int, int, StageStep]:
    """Validate the step's input; return its token count, bytes, and the compute job.
    With ``req.return_output`` and a ``returned`` list, the job also puts its fp32
    output there (a retried step answered from its stored output has none). ``fault``
    (a test's) perturbs or delays every output."""
    stage, spec = session.stage, session.spec
    config = stage.config
    chunks = inputs_of(req)
    if req.chunks:
        if req.WhichOneof("input") is not None:
            raise InvalidArgument("a step carries one input or chunks, not both")
        if returned is None or not req.return_output or req.sample:
            raise InvalidArgument(
                "a step of chunks (a shadow's catch-up) returns its output, samples "
                "nothing and goes no further: send it to a session ending at this node"
            )
        if stage.shard is not None:
            raise InvalidArgument("a tensor-parallel group takes no step of chunks")
        if len(req.chunks) > spec.max_length - req.pos:  # (each holds a position at least)
            raise InvalidArgument(
                f"{len(req.chunks)} chunks from position {req.pos} run past the session's "
                f"max_length {spec.max_length}"
            )
    parts = []
    at = req.pos
    for pos, item in chunks:
        part = chunk_input(item, stage, spec)  # (checked before anything reads it)
        if pos != at:
            raise InvalidArgument(f"the step's chunks must run on from {at}, not {pos}")
        at += part[0]
        parts.append(part)
    n_tokens = sum(n for n, _, _ in parts)
    bytes_in = sum(b for _, b, _ in parts)
    if len(parts) == 1:
        make_input = parts[0][2]
    else:

        def make_input() -> torch.Tensor:
            return torch.cat([make() for _, _, make in parts])

    if not stage.has_head:
        out_bytes = codecs.encoded_size((n_tokens, config.n_embd), spec.codec)
        if out_bytes + HEADROOM_BYTES > max_message_bytes:
            most = (max_message_bytes - HEADROOM_BYTES) // codecs.encoded_size(
                (1, config.n_embd), spec.codec
            )
            raise InvalidArgument(
                f"a step of {n_tokens} tokens would forward {out_bytes} bytes, over this node's "
                f"message limit: send at most {most} tokens per step"
            )
    want_token = req.sample and stage.has_head
    pos = req.pos
    return_output = req.return_output and returned is not None

    def finish(y: torch.Tensor) -> Any:
        try:
            return finish_checked(y)
        except InvalidArgument as exc:  # (this node's own output: not the sender's fault)
            raise Internal(f"this node's output cannot be sent: {exc}") from None

    def finish_checked(y: torch.Tensor) -> Any:
        if fault is not None:
            y = fault(y)
        if return_output:
            out = y[-1:] if stage.has_head else y
            if stage.has_head and stage.shard is not None:  # the whole row, for a check
                out = gather_vocab(stage.shard, out, config.vocab_size)
            fp32 = codecs.encode(out.float(), "fp32")
            output = pb.Activations(codec="fp32", shape=list(out.shape), payload=fp32)
            returned.append(output)  # type: ignore[union-attr]
        if stage.has_head:
            if not want_token:
                return None
            if stage.shard is None:
                return sample(y[-1], spec.sampling, pos + n_tokens)
            at = pos + n_tokens  # the vocabulary is split: sampled together, not gathered
            return sample_slice(y[-1], stage.vocab[0], spec.sampling, at, stage.shard.gather)
        payload = codecs.encode(y, spec.codec)
        return pb.Activations(codec=spec.codec, shape=list(y.shape), payload=payload)

    step = GroupStep if stage.shard is not None else StageStep
    run = step(stage, session.cache, pos, n_tokens, make_input, finish, bool(req.chunks))
    return n_tokens, bytes_in, run


def chunk_input(
    item: list[int] | pb.Activations, stage: Stage, spec: SessionSpec
) -> tuple[int, int, Callable[[], torch.Tensor]]:
    """One input chunk, validated: its token count, bytes, and how to make its tensor."""
    config = stage.config
    device, dtype = stage.device, stage.act_dtype
    if stage.has_embed:
        if not isinstance(item, list):
            raise InvalidArgument("this node holds embed (unit 0): send token ids, not activations")
        ids = item
        if not ids:
            raise InvalidArgument("a step needs at least one token")
        if max(ids) >= config.vocab_size:
            raise InvalidArgument(
                f"token id {max(ids)} is outside the vocabulary [0, {config.vocab_size})"
            )

        def make_ids() -> torch.Tensor:
            return torch.tensor(ids, dtype=torch.long, device=device)

        return len(ids), 4 * len(ids), make_ids
    if not isinstance(item, pb.Activations):
        raise InvalidArgument(
            f"this node starts at unit {stage.start}: send activations, not token ids"
        )
    act = item
    if act.codec != spec.codec:
        raise InvalidArgument(
            f"activations use codec {act.codec!r} but the session was opened with {spec.codec!r}"
        )
    shape = tuple(act.shape)
    if len(shape) != 2 or shape[1] != config.n_embd or shape[0] < 1:
        raise InvalidArgument(
            f"activations must have shape [tokens >= 1, {config.n_embd}], got {list(shape)}"
        )
    if len(act.payload) != codecs.encoded_size(shape, act.codec):
        raise InvalidArgument(
            f"activations of shape {list(shape)} in {act.codec} take "
            f"{codecs.encoded_size(shape, act.codec)} bytes, not {len(act.payload)}"
        )

    def make_activations() -> torch.Tensor:
        return codecs.decode(act.payload, shape, act.codec, dtype=dtype, device=device)

    return shape[0], len(act.payload), make_activations


def already_computed(session: NodeSession, req: pb.StepRequest, n_tokens: int) -> Any:
    """A retried step this node already ran (its answer was lost, or forwarding failed):
    its output, to answer or forward again without recomputing. A 1-tuple or None."""
    if session.last_output is None:
        return None
    step_id, pos, count, out = session.last_output
    if (step_id, pos, count) == (req.step_id, req.pos, n_tokens) and pos + count == session.length:
        return (out,)
    return None
