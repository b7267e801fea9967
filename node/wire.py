"""Session specs between the wire's messages and the node's dataclass."""

from __future__ import annotations

from nanoshard import codec as codecs
from nanoshard.errors import InvalidArgument
from nanoshard.sampling import SamplingParams
from nanoshard.v1 import node_pb2 as pb

from .sessions import SessionSpec


def spec_from_wire(msg: pb.SessionSpec, block_size: int) -> SessionSpec:
    s = msg.sampling
    spec = SessionSpec(
        session_id=msg.session_id,
        max_length=msg.max_length,
        codec=codecs.check_codec(msg.codec),
        sampling=SamplingParams(s.temperature, s.top_k, s.top_p if s.top_p else 1.0, s.seed),
    )
    if spec.max_length > block_size:
        raise InvalidArgument(
            f"max_length {spec.max_length} exceeds the model's context length {block_size}"
        )
    return spec


def spec_to_wire(spec: SessionSpec) -> pb.SessionSpec:
    s = spec.sampling
    return pb.SessionSpec(
        session_id=spec.session_id,
        max_length=spec.max_length,
        codec=spec.codec,
        sampling=pb.SamplingParams(
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed
        ),
    )
