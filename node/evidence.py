"""What a node signs for its steps (``identity.step_statement``): that it computed its
units for those positions, from the input and to the output with these digests. The
signed traces are the evidence spot-checks and the arbiter read. Pure: no gRPC, no I/O."""

from __future__ import annotations

from typing import Any

import torch

from nanoshard import agreement, identity
from nanoshard.agreement import chunk_rows, inputs_of
from nanoshard.v1 import node_pb2 as pb

from .sessions import NodeSession


def sign_step(
    key: identity.NodeKey,
    session: NodeSession,
    req: pb.StepRequest,
    n_tokens: int,
    trace: pb.HopTrace,
    out: Any,
    returned: list[pb.Activations],
) -> None:
    """Sign ``trace`` for what this node computed for the step: its output ``out``
    (activations sent on, or the head's token and any ``returned`` logits). Nothing if the
    session has no input digest for the step (a retry answered from a stored output)."""
    digest = session.input_digests.get(req.pos + n_tokens)
    if digest is None:
        return
    if session.stage.has_head:
        token = out if isinstance(out, int) else None
        output = identity.output_digest(returned[0] if returned else None, token)
    else:
        output = identity.output_digest(out)
    trace.input_digest, trace.output_digest = digest, output
    identity.sign_step(
        key,
        session.spec.session_id,
        req.pos,
        n_tokens,
        trace,
        session.mac_key,
        sign=not maced_only(session, req),
    )


def maced_only(session: NodeSession, req: pb.StepRequest) -> bool:
    """Whether the step's trace carries the session's MAC and no signature: a head's decode
    step that is not a check point, of a client that takes the head's token on the MAC
    (``mac_only``: it may not have, e.g. a route naming the head by another address than
    the head's own). The MAC is then the client's proof of the token (no relay can forge
    it), and a spot-check compares the head only at check points, the steps that ask for
    its output (every session asks at its check points, followed or not, so the head
    cannot tell which are checked): only those, and prefill chunks, which the client
    checks by signature, are evidence (a signature: 50-60 µs of the step's way back)."""
    return (
        session.stage.has_head
        and session.mac_key is not None
        and req.mac_only
        and req.sample
        and not req.return_output
        and not req.chunks
    )


def chunk_traces(
    key: identity.NodeKey,
    node: pb.HopTrace,
    session: NodeSession,
    req: pb.StepRequest,
    digests: list[bytes],
    output: pb.Activations,
) -> list[pb.HopTrace]:
    """A step of chunks: per chunk, a trace signing its input digest (running, after the
    chunk) and its rows of ``output`` (fp32), as if the chunk had been a step alone. At
    the head only the last chunk has an output (its last position's logits): only it.
    ``node`` names the node (its trace's node and address)."""
    values = agreement.from_wire(output)
    chunks = list(zip(inputs_of(req), digests, strict=True))
    if session.stage.has_head:  # only the last chunk has an output: its last position's logits
        (pos, item), digest = chunks[-1]
        return [_chunk_trace(key, node, session, pos, chunk_rows(item), digest, values)]
    traces, row = [], 0
    for (pos, item), digest in chunks:
        n = chunk_rows(item)
        rows = values[row : row + n]
        traces.append(_chunk_trace(key, node, session, pos, n, digest, rows))
        row += n
    return traces


def _chunk_trace(
    key: identity.NodeKey,
    node: pb.HopTrace,
    session: NodeSession,
    pos: int,
    n: int,
    digest: bytes,
    rows: torch.Tensor,
) -> pb.HopTrace:
    trace = pb.HopTrace(
        node=node.node,
        address=node.address,
        start=session.stage.start,
        end=session.stage.end,
        input_digest=digest,
        output_digest=identity.output_digest(agreement.to_wire(rows)),
    )
    identity.sign_step(key, session.spec.session_id, pos, n, trace)
    return trace
