"""Session specs between the wire's messages and the node's dataclass."""

from __future__ import annotations

from nanoshard import codec as codecs
from nanoshard.errors import InvalidArgument
from nanoshard.v1 import node_pb2 as pb
from nanoshard.wire import sampling_from_wire, sampling_to_wire

from .sessions import SessionSpec


def spec_from_wire(msg: pb.SessionSpec, block_size: int) -> SessionSpec:
    spec = SessionSpec(
        session_id=msg.session_id,
        max_length=msg.max_length,
        codec=codecs.check_codec(msg.codec),
        sampling=sampling_from_wire(msg.sampling),
        client_share=msg.client_share,
    )
    if spec.max_length > block_size:
        raise InvalidArgument(
            f"max_length {spec.max_length} exceeds the model's context length {block_size}"
        )
    return spec


def spec_to_wire(spec: SessionSpec) -> pb.SessionSpec:
    return pb.SessionSpec(
        session_id=spec.session_id,
        max_length=spec.max_length,
        codec=spec.codec,
        sampling=sampling_to_wire(spec.sampling),
        client_share=spec.client_share,
    )
