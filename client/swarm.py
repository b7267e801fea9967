"""Talking to a coordinator as a client: find it, read the model card, ask for routes."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import grpc
import tiktoken

from nanoshard import discovery, machine, rpc
from nanoshard.config import GPTConfig
from nanoshard.errors import NotFound, Stranger, Unauthenticated
from nanoshard.files import write_atomic
from nanoshard.security import Security
from nanoshard.tokenizer import encoding_from_hf_files, gpt2_encoding
from nanoshard.v1 import coordinator_pb2 as cpb
from nanoshard.v1 import coordinator_pb2_grpc as cpb_grpc

from .route import Route

DEFAULT_CACHE = machine.cache_dir() / "tokenizers"


def open_coordinator(
    address: str | None,
    security: Security,
    *,
    mdns_interfaces: list[str] | None = None,
    swarm: str | None = None,
    timeout_s: float = 5.0,
    stop: threading.Event | None = None,
    passed_over: discovery.PassedOver | None = None,
) -> CoordinatorClient:
    """A client of the coordinator at ``address``, else of one advertised on mDNS (of this
    protocol version, and of ``swarm`` when given; the first found, or the first by name if
    several were seen at once), once it proved it holds the swarm key (its model card is
    read). One found by mDNS that cannot prove it is a stranger's: its address joins
    ``passed_over`` and the search goes on, for ``timeout_s`` in all (a stranger announcing
    the swarm's name on the LAN does not stop its clients). Whether one found needs TLS
    (its TXT record says) is checked too: without a CA that is an error naming the flag."""
    passed = passed_over if passed_over is not None else discovery.PassedOver()
    deadline = time.monotonic() + timeout_s
    stranger: Stranger | None = None
    while True:
        target = address
        if not target:
            left = max(deadline - time.monotonic(), 0.0)
            found = discovery.find_coordinator(mdns_interfaces, left, swarm, stop, passed.current())
            if found is None and stranger is not None:
                raise stranger  # (what was found, and why it was passed over)
            if found is None:
                which = f"of swarm {swarm!r} " if swarm else ""
                raise NotFound(
                    f"no coordinator {which}answered on mDNS within {timeout_s:.0f} s: "
                    'give its address (--coordinator HOST:PORT; Client("HOST:PORT") in Python)'
                )
            found.require_tls(security.tls_ca is not None)
            target = found.target
        coordinator = CoordinatorClient(target, security=security)
        try:
            coordinator.card()
            return coordinator
        except Stranger as exc:
            coordinator.close()
            if address:
                raise
            passed.add(target)
            stranger = exc
        except Unauthenticated as exc:  # (a keyed swarm's, and this client has no key)
            coordinator.close()
            if address or swarm or found is None:
                raise
            name = found.properties.get("swarm", "")
            raise Unauthenticated(
                f"{exc} (found on mDNS, of swarm {name!r}: --swarm NAME picks the swarm)"
            ) from None
        except BaseException:
            coordinator.close()
            raise


class CoordinatorClient:
    """A synchronous stub for the control-plane calls a client makes."""

    def __init__(
        self, address: str, timeout_s: float = 10.0, security: Security | None = None
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.security = security or Security()
        self._channel = rpc.open_channel(address, security, ping_timeout_s=rpc.BULK_PING_TIMEOUT_S)
        self._stub = cpb_grpc.CoordinatorStub(self._channel)
        self._card: cpb.ModelCard | None = None

    def _call(self, method, request):  # type: ignore[no-untyped-def]
        """A unary call; its reply once the coordinator proved it holds the swarm key."""
        sent = self.security.metadata()
        try:
            reply, call = method.with_call(request, timeout=self.timeout_s, metadata=sent)
        except grpc.RpcError as err:
            plain = self.security.tls_ca is None and rpc.closed_connecting(err)
            if plain and rpc.serves_tls(self.address):  # (as mDNS would have said)
                raise discovery.needs_tls(self.address) from None
            # (its words name nodes and units: not mistaken for a node's own failure)
            raise rpc.error_from_rpc(
                err, self.address, f"the coordinator at {self.address}"
            ) from None
        self.security.verify_proof(call.initial_metadata(), sent, self.address)
        return reply

    def card(self) -> cpb.ModelCard:
        if self._card is None:
            self._card = self._call(self._stub.GetModelCard, cpb.ModelCardRequest())
        return self._card

    def config(self) -> GPTConfig:
        return GPTConfig.from_dict(json.loads(self.card().config_json))

    def encoding(self, cache_dir: Path = DEFAULT_CACHE) -> tiktoken.Encoding:
        """The swarm model's tokenizer, from the card (cached on disk by content)."""
        card = self.card()
        if not card.vocab_json:
            return gpt2_encoding()
        digest = hashlib.sha256(card.vocab_json + b"\0" + card.merges_txt).hexdigest()[:16]
        folder = cache_dir / digest
        for name, data in (("vocab.json", card.vocab_json), ("merges.txt", card.merges_txt)):
            if not (folder / name).is_file():  # (written whole: other clients share the folder)
                write_atomic(folder / name, data)
        return encoding_from_hf_files(folder / "vocab.json", folder / "merges.txt", card.name)

    def route(self, avoid: list[str] | None = None, peek: bool = False) -> Route:
        """The route a new session gets (``peek``: only looking, no session will open)."""
        request = cpb.RouteRequest(avoid=avoid or [], peek=peek)
        reply = self._call(self._stub.GetRoute, request)
        return Route(list(reply.hops), reply.n_units, reply.model_id)

    def status(self) -> cpb.SwarmStatus:
        return self._call(self._stub.GetStatus, cpb.StatusRequest())

    def report_check(self, report: cpb.CheckReport) -> list[str]:
        """Tell the coordinator a spot-check's result; the addresses it excluded now."""
        return list(self._call(self._stub.ReportCheck, report).excluded)

    def close(self) -> None:
        self._channel.close()
