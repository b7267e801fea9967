"""Shared conversions between the core's dataclasses and the wire's messages, so the client
and the node read and write them the same way."""

from __future__ import annotations

from nanoshard.sampling import SamplingParams
from nanoshard.v1 import node_pb2 as pb


def sampling_to_wire(params: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed
    )


def sampling_from_wire(msg: pb.SamplingParams) -> SamplingParams:
    """Validated (InvalidArgument on bad values); an unset top_p (0) means off (1)."""
    return SamplingParams(msg.temperature, msg.top_k, msg.top_p if msg.top_p else 1.0, msg.seed)
