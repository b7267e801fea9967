"""When two nodes' outputs for the same step agree: the measure, its tolerance, and the
digests that name a step's input and output. Pure; the client's spot-checks and the
coordinator's arbiter share them.

Outputs are compared in fp32 by relative RMS distance. What two honest runs of the same
step may differ by depends on the weights' dtype (fp32 differs only by summation order;
int8 nodes quantize each forward's activations with a scale the batch shares) and, for
activations, on the codec they travelled in: the checked output was encoded, a re-run's
was not.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import Any

import torch

from nanoshard import codec as codecs
from nanoshard.v1 import node_pb2 as pb

WEIGHT_SLACK = {"fp32": 1e-3, "bf16": 3e-2, "fp16": 3e-2, "int8": 5e-2}  # relative RMS
CODEC_MARGIN = 3.0  # times the codec's own round-trip error on the output

StepInput = tuple[int, "list[int] | pb.Activations"]  # (pos, token ids or activations)


def chunk_rows(item: list[int] | pb.Activations) -> int:
    """Positions an input chunk holds: its token ids, or its activations' rows."""
    return item.shape[0] if isinstance(item, pb.Activations) else len(item)


def inputs_of(request: pb.StepRequest) -> list[StepInput]:
    """A step's input chunks as ``input_digest`` hashes them: its chunks (a shadow's
    catch-up), or its one input at its position."""
    if request.chunks:
        return [
            (c.pos, c.activations if c.WhichOneof("input") == "activations" else list(c.tokens.ids))
            for c in request.chunks
        ]
    kind = request.WhichOneof("input")
    return [
        (request.pos, request.activations if kind == "activations" else list(request.tokens.ids))
    ]


def distance(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Relative RMS distance: rms(other - reference) / rms(reference)."""
    reference, other = reference.float(), other.float()
    scale = reference.pow(2).mean().sqrt().clamp_min(1e-12)
    return float((other - reference).pow(2).mean().sqrt() / scale)


def tolerance(codec: str, weights: str, output: torch.Tensor, *, logits: bool) -> float:
    """The largest distance counted as agreement: the weights' slack, plus (for activations,
    which travelled encoded) a margin over the codec's own error on ``output``, a re-run's
    fp32 output (the checked one was encoded already: encoding it again loses nothing)."""
    slack = WEIGHT_SLACK.get(weights, max(WEIGHT_SLACK.values()))
    if logits or codec == "fp32":
        return slack
    shape = tuple(output.shape)
    decoded = codecs.decode(codecs.encode(output.float(), codec), shape, codec)
    return slack + CODEC_MARGIN * distance(output, decoded)


def input_digest(inputs: Sequence[StepInput]) -> bytes:
    """sha256 of a step's input chunks, from position 0 (token ids as uint32, activations
    as their wire message)."""
    h = hashlib.sha256()
    for pos, item in inputs:
        add_chunk(h, pos, item)
    return h.digest()


def add_chunk(h: Any, pos: int, item: list[int] | pb.Activations) -> None:
    """Feed one input chunk to a running ``input_digest`` (a node keeps one per session)."""
    h.update(pos.to_bytes(4, "little"))
    if isinstance(item, pb.Activations):
        h.update(item.SerializeToString(deterministic=True))
    else:
        h.update(array("I", item).tobytes())


def output_digest(output: torch.Tensor) -> bytes:
    """sha256 of an output as compared: its fp32 values, row-major."""
    return hashlib.sha256(output.float().contiguous().numpy().tobytes()).digest()


def to_wire(output: torch.Tensor) -> pb.Activations:
    """An output as fp32 activations on the wire (logits too: shape [1, vocab])."""
    return pb.Activations(
        codec="fp32", shape=list(output.shape), payload=codecs.encode(output.float(), "fp32")
    )


def from_wire(act: pb.Activations) -> torch.Tensor:
    return codecs.decode(act.payload, tuple(act.shape), act.codec, dtype=torch.float32)
