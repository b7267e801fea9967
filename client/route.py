"""Routes from the client's side: the chain of hops covering every unit, and how to build
one from node addresses when no coordinator plans it. Sessions along a route live in
``session.py``."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from nanoshard import rpc
from nanoshard.errors import InvalidArgument
from nanoshard.security import Security
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc


@dataclass
class Route:
    """The chain of hops covering every unit, each with the addresses that serve it."""

    hops: list[pb.Hop]
    n_units: int
    model_id: str = ""
    # a node's own address (what its traces name) -> the one this route dials, where the
    # two differ (a route made by hand: "localhost:7005" for a node at 127.0.0.1:7005)
    aliases: dict[str, str] = field(default_factory=dict)

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

    def keys(self) -> dict[str, bytes]:
        """Each node of the route and its public key (b"": a node whose key the route does
        not give, as in a route made by hand)."""
        keys: dict[str, bytes] = {}
        for hop in self.hops:
            given = list(hop.public_keys) + [b""] * (len(hop.addresses) - len(hop.public_keys))
            for address, key in zip(hop.addresses, given, strict=False):
                keys[address] = keys.get(address) or key
        for own, dialed in self.aliases.items():
            keys.setdefault(own, keys.get(dialed, b""))
        return keys


def route_from_addresses(
    addresses: list[str], timeout_s: float = 10.0, security: Security | None = None
) -> Route:
    """Ask each node what it serves; the given order must chain embed to head."""
    hops, n_units, model_ids, aliases = [], 0, set(), {}
    for address in addresses:
        with rpc.open_channel(address, security) as ch:
            try:
                info = pb_grpc.NodeStub(ch).Info(pb.InfoRequest(), timeout=timeout_s)
            except grpc.RpcError as err:
                raise rpc.error_from_rpc(err, address) from None
        keys = [info.public_key] if info.public_key else []
        hops.append(pb.Hop(start=info.start, end=info.end, addresses=[address], public_keys=keys))
        n_units = info.n_units
        model_ids.add(info.model_id)
        if info.address and info.address != address:
            aliases[info.address] = address
    if len(model_ids) > 1:
        raise InvalidArgument(f"the nodes serve different models ({', '.join(sorted(model_ids))})")
    return Route(hops, n_units, model_ids.pop() if model_ids else "", aliases)
