"""A session along a route of nodes: the client's side of the data plane.

The client talks only to the first hop; each node forwards to the next. ``RouteSession``
implements :class:`nanoshard.generation.Session`, so ``generate`` drives it exactly like
the local reference path.
"""

from __future__ import annotations

import contextlib
import queue
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from nanoshard import rpc
from nanoshard.codec import check_codec
from nanoshard.errors import InvalidArgument, NanoshardError
from nanoshard.generation import DEFAULT_PREFILL_CHUNK, StepResult
from nanoshard.sampling import SamplingParams
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc

_END = object()


@dataclass
class Route:
    """The chain of hops covering every unit, each with the addresses that serve it."""

    hops: list[pb.Hop]
    n_units: int
    model_id: str = ""
    names: dict[str, str] = field(default_factory=dict)  # address -> node name

    def __post_init__(self) -> None:
        expected = 0
        for hop in self.hops:
            if hop.start != expected:
                raise InvalidArgument(
                    f"the route has a gap or overlap at unit {expected}: next hop covers "
                    f"[{hop.start}, {hop.end})"
                )
            expected = hop.end
        if expected != self.n_units:
            raise InvalidArgument(f"the route stops at unit {expected} of {self.n_units}")


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=rpc.channel_options())


def route_from_addresses(addresses: list[str], timeout_s: float = 10.0) -> Route:
    """Ask each node what it serves; the given order must chain embed to head."""
    hops, n_units, model_ids, names = [], 0, set(), {}
    for address in addresses:
        with channel(address) as ch:
            try:
                info = pb_grpc.NodeStub(ch).Info(pb.InfoRequest(), timeout=timeout_s)
            except grpc.RpcError as err:
                raise rpc.error_from_rpc(err, address) from None
        hops.append(pb.Hop(start=info.start, end=info.end, addresses=[address]))
        n_units = info.n_units
        model_ids.add(info.model_id)
        names[address] = info.name
    if len(model_ids) > 1:
        raise InvalidArgument(f"the nodes serve different models ({', '.join(sorted(model_ids))})")
    return Route(hops, n_units, model_ids.pop() if model_ids else "", names)


class RouteSession:
    """One generation along a route: open on every hop, steps over one stream, close."""

    def __init__(
        self,
        route: Route,
        params: SamplingParams,
        max_length: int,
        codec: str = "fp32",
        *,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        timeout_s: float = 120.0,
    ) -> None:
        self.route = route
        self.session_id = secrets.token_bytes(16)
        self.prefill_chunk = prefill_chunk
        self.timeout_s = timeout_s
        self._step_id = 0
        self._address = route.hops[0].addresses[0]
        self._channel = channel(self._address)
        self._stub = pb_grpc.NodeStub(self._channel)
        spec = pb.SessionSpec(
            session_id=self.session_id,
            max_length=max_length,
            codec=check_codec(codec),
            sampling=pb.SamplingParams(
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                seed=params.seed,
            ),
        )
        first = route.hops[0]
        self._call(
            self._stub.Open,
            pb.OpenRequest(spec=spec, route=route.hops[1:], start=first.start, end=first.end),
        )
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._replies: Iterator[pb.StepReply] = self._stub.Steps(iter(self._requests.get, _END))

    def _call(self, method, request):  # type: ignore[no-untyped-def]
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as err:
            raise rpc.error_from_rpc(err, self._address) from None

    def step(self, tokens: list[int], pos: int) -> StepResult:
        hops: list[dict] = []
        reply = None
        for i in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[i : i + self.prefill_chunk]
            self._step_id += 1
            self._requests.put(
                pb.StepRequest(
                    session_id=self.session_id,
                    step_id=self._step_id,
                    pos=pos + i,
                    tokens=pb.Tokens(ids=chunk),
                    route=self.route.hops[1:],
                    sample=i + len(chunk) == len(tokens),
                )
            )
            try:
                reply = next(self._replies)
            except grpc.RpcError as err:
                raise rpc.error_from_rpc(err, self._address) from None
            except StopIteration:
                raise NanoshardError(f"{self._address} ended the session stream") from None
            hops.extend(trace_to_dict(h) for h in reply.hops)
        if reply is None or not reply.has_token:
            raise NanoshardError("the route answered no token: does its last hop hold the head?")
        return StepResult(reply.token, hops)

    def close(self) -> None:
        self._requests.put(_END)
        with contextlib.suppress(grpc.RpcError):  # else the nodes' TTL frees it
            self._stub.Close(pb.CloseRequest(session_id=self.session_id), timeout=10)
        self._channel.close()


def trace_to_dict(h: pb.HopTrace) -> dict:
    return {
        "node": h.node,
        "address": h.address,
        "units": [h.start, h.end],
        "queue_ms": h.queue_ms,
        "compute_ms": h.compute_ms,
        "batch": h.batch,
        "total_ms": h.total_ms,
        "downstream_ms": h.downstream_ms,
        "bytes_in": h.bytes_in,
        "bytes_out": h.bytes_out,
        "codec": h.codec,
        "kv_length": h.handle.length,
    }
