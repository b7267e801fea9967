"""A step's input at a node (``node/inputs.py``): what is the sender's fault, refused as
INVALID_ARGUMENT before any work, and what is the node's own, refused as INTERNAL."""

from __future__ import annotations

import pytest
import torch

from nanoshard.config import GPTConfig
from nanoshard.engine import Stage, init_weights
from nanoshard.errors import Internal, InvalidArgument
from nanoshard.node.faults import Fault
from nanoshard.node.inputs import prepare
from nanoshard.node.sessions import NodeSession, SessionSpec
from nanoshard.sampling import SamplingParams
from nanoshard.v1 import node_pb2 as pb

CONFIG = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16)


def session_on(start: int, end: int) -> NodeSession:
    stage = Stage.from_tensors(CONFIG, start, end, init_weights(CONFIG, seed=4))
    spec = SessionSpec(b"s" * 16, 16, "fp16", SamplingParams(temperature=0.0))
    return NodeSession(spec, stage, stage.new_cache(16), reserved_bytes=0)


def activations(rows: int, value: float = 0.5) -> pb.Activations:
    x = torch.full((rows, CONFIG.n_embd), value, dtype=torch.float16)
    return pb.Activations(codec="fp16", shape=[rows, CONFIG.n_embd], payload=x.numpy().tobytes())


def test_an_output_the_codec_cannot_hold_is_the_nodes_own_failure() -> None:
    """A node whose own output is NaN (here: a fault) answers INTERNAL, so the hop before
    it leaves it; INVALID_ARGUMENT would blame the hop before it for sending bad input."""
    session = session_on(1, 2)
    req = pb.StepRequest(session_id=b"s" * 16, step_id=1, pos=0, activations=activations(1))
    _, _, run = prepare(req, session, None, max_message_bytes=2**20, fault=Fault(float("nan")))
    with torch.inference_mode(), pytest.raises(Internal, match="output cannot be sent"):
        run()
    assert session.cache.length == 0  # nothing of the failed step counts


@pytest.mark.parametrize(
    "chunks, match",
    [
        ([pb.InputChunk(pos=0, activations=pb.Activations(codec="fp16"))], "shape"),
        ([pb.InputChunk(pos=i, activations=activations(1)) for i in range(17)], "17 chunks"),
        ([pb.InputChunk(pos=1, activations=activations(1))], "run on from 0"),
    ],
)
def test_a_step_of_chunks_is_checked_chunk_by_chunk(chunks: list, match: str) -> None:
    session = session_on(1, 2)
    req = pb.StepRequest(session_id=b"s" * 16, step_id=1, chunks=chunks, return_output=True)
    with pytest.raises(InvalidArgument, match=match):
        prepare(req, session, [], max_message_bytes=2**20)
