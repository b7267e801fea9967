"""Private swarms: swarm-key tokens on every call, and TLS on every channel.

A swarm key is a secret shared by the swarm's coordinator, nodes and clients. It never
travels: each call carries a fresh token in metadata ``nanoshard-token``,

    v1.<identity, base64url>.<milliseconds since the epoch>.<nonce, hex>.<HMAC-SHA256, hex>

signed with a key derived from the swarm key. A server accepts a token only if its MAC
checks out, it is at most ``TOKEN_TTL_S`` old (``CLOCK_SKEW_S`` of clock difference
allowed either way) and its nonce was not seen before (replays are refused). The identity
is the caller's own: the node id for a node, ``client:<random>`` for a client; the
coordinator only lets a node join, heartbeat or leave as itself. Everyone who holds the key
can make tokens, so a key shuts strangers out of a swarm; it does not rank its members.

The coordinator proves the key back: it answers every call whose token it accepted with
initial metadata ``nanoshard-proof``, HMAC-SHA256 (hex) of ``server.<the token's nonce>``
under the same derived key. The nonce is the caller's own and fresh, so a proof fits one
call only. Volunteers and clients check it on every control-plane call whose answer they
use (``Security.verify_proof``) and stop at a coordinator that answers without it: a
stranger's, announcing the swarm's name on mDNS or sitting at the address given. Initial
metadata, not trailing: it comes before a stream's first message (a volunteer takes no
byte of weights unproven; trailing metadata comes after the whole download), and grpc and
grpc.aio give it for unary and streaming calls alike. Nodes give no proof: their callers
got the route from a coordinator that proved itself, and no step gains work. A proof does
not cover the answer's content: a stranger relaying each call to the real coordinator can
pass its proofs along with answers of its own, which only TLS rules out.

TLS (``--tls-cert/--tls-key`` on servers, ``--tls-ca`` on whoever connects): the server
proves its name with a certificate signed by the swarm's CA (``nanoshard certs`` makes
both), so activations and tokens travel encrypted and a client talks to no impostor.
"""

from __future__ import annotations

import base64
import binascii
import collections
import datetime
import hashlib
import hmac
import logging
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from nanoshard.errors import InvalidArgument, Stranger, Unauthenticated

log = logging.getLogger(__name__)

TOKEN_KEY = "nanoshard-token"
PROOF_KEY = "nanoshard-proof"  # a server's initial metadata: its proof that it holds the key
KEY_ENV = "NANOSHARD_SWARM_KEY"
TOKEN_TTL_S = 60.0
CLOCK_SKEW_S = 30.0
MAX_REMEMBERED = 200_000  # nonces kept to refuse replays (each for TOKEN_TTL_S + skew)

Metadata = tuple[tuple[str, str], ...]


class SwarmKey:
    """Makes and checks tokens for one swarm key."""

    def __init__(self, key: str | bytes, clock: Callable[[], float] = time.time) -> None:
        raw = key.encode() if isinstance(key, str) else key
        if len(raw) < 8:
            raise InvalidArgument("a swarm key needs at least 8 characters")
        self._secret = hmac.new(raw, b"nanoshard-token-v1", hashlib.sha256).digest()
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it may be forgotten
        self._lock = threading.Lock()

    def _mac(self, payload: str) -> str:
        return hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()

    def token(self, identity: str) -> str:
        who = base64.urlsafe_b64encode(identity.encode()).decode().rstrip("=")
        payload = f"v1.{who}.{int(self._clock() * 1000)}.{secrets.token_hex(12)}"
        return f"{payload}.{self._mac(payload)}"

    def verify(self, token: str) -> str:
        """The identity a valid, fresh, first-seen token names; else ``Unauthenticated``."""
        parts = token.split(".")
        if len(parts) != 5 or parts[0] != "v1":
            raise Unauthenticated("malformed swarm token")
        payload, mac = ".".join(parts[:4]), parts[4]
        if not hmac.compare_digest(self._mac(payload), mac):
            raise Unauthenticated("bad swarm token: this swarm uses another key")
        try:
            issued = int(parts[2]) / 1000
            identity = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)).decode()
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise Unauthenticated("malformed swarm token") from None
        now = self._clock()
        if issued > now + CLOCK_SKEW_S:
            raise Unauthenticated("swarm token from the future: check this machine's clock")
        if issued < now - TOKEN_TTL_S - CLOCK_SKEW_S:
            raise Unauthenticated("expired swarm token (or the clocks differ by over 30 s)")
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now:
                self._seen.popitem(last=False)
            if parts[3] in self._seen:
                raise Unauthenticated("replayed swarm token refused")
            if len(self._seen) >= MAX_REMEMBERED:
                raise Unauthenticated("too many calls in the last minute: try again shortly")
            self._seen[parts[3]] = now + TOKEN_TTL_S + 2 * CLOCK_SKEW_S
        return identity

    def proof(self, token: str) -> str:
        """A server's answer to a call bearing ``token`` (one it accepted, or one its caller
        made): proof that it holds this key, bound to the token's nonce."""
        return self._mac(f"server.{token.split('.')[3]}")

    def proves(self, token: str, proof: object) -> bool:
        """Whether ``proof`` (a server's word: anything) is this key's proof for ``token``."""
        if isinstance(proof, str):
            proof = proof.encode(errors="replace")
        return isinstance(proof, bytes) and hmac.compare_digest(self.proof(token).encode(), proof)


def token_of(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == TOKEN_KEY:
            return value if isinstance(value, str) else value.decode()
    return None


def identity_of(context: Any) -> str | None:
    """The identity in a call's (already verified) token, or None without one."""
    token = token_of(context)
    if token is None:
        return None
    try:
        who = token.split(".")[1]
        return base64.urlsafe_b64decode(who + "=" * (-len(who) % 4)).decode()
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError):
        return None


def _check_pem(cert: Path | None, ca: Path | None, key: Path | None) -> None:
    """Each TLS file given holds what its flag says, in PEM: else InvalidArgument now (gRPC
    would only say it failed to bind, or to make a handshaker)."""

    def private_key(data: bytes) -> Any:
        return serialization.load_pem_private_key(data, password=None)

    certificates = x509.load_pem_x509_certificates
    files = [
        (cert, "a certificate", certificates),
        (ca, "a certificate", certificates),
        (key, "an unencrypted private key", private_key),
    ]
    loaded: list[Any] = []
    for path, what, load in files:
        if path is None:
            loaded.append(None)
            continue
        try:
            loaded.append(load(Path(path).read_bytes()))
        except (ValueError, TypeError):  # (cryptography's reason is a paragraph long)
            raise InvalidArgument(f"{path} is not {what} in PEM") from None
    certs, _, private = loaded
    if (
        certs
        and private is not None
        and _public(certs[0].public_key()) != _public(private.public_key())
    ):
        raise InvalidArgument(f"{key} is not the private key of the certificate {cert}")
    now = datetime.datetime.now(datetime.timezone.utc)
    for path, found in ((cert, loaded[0]), (ca, loaded[1])):
        if found and (until := found[0].not_valid_after_utc) < now:
            raise InvalidArgument(
                f"{path} expired on {until:%Y-%m-%d}: every peer would refuse it (make new "
                "ones with nanoshard certs)"
            )


def _public(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@dataclass
class Security:
    """How one process talks to the swarm: its swarm key and identity, and TLS files."""

    key: SwarmKey | None = None
    identity: str = ""
    tls_cert: Path | None = None  # this server's certificate (PEM)
    tls_key: Path | None = None  # its private key (PEM)
    tls_ca: Path | None = None  # the CA that signs the swarm's servers (PEM)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("--tls-cert and --tls-key go together")
        for path in (self.tls_cert, self.tls_key, self.tls_ca):
            if path is not None and not Path(path).is_file():
                what = "a folder, not a PEM file" if Path(path).is_dir() else "no such file"
                raise InvalidArgument(f"TLS file {path} is {what}")
        _check_pem(self.tls_cert, self.tls_ca, self.tls_key)
        if not self.identity:
            self.identity = f"client:{secrets.token_hex(6)}"

    @property
    def tls(self) -> bool:
        """Whether this process serves over TLS."""
        return self.tls_cert is not None

    def with_identity(self, identity: str) -> Security:
        return Security(self.key, identity, self.tls_cert, self.tls_key, self.tls_ca)

    # ---- the caller's side --------------------------------------------------------------

    def metadata(self) -> Metadata:
        """Metadata for one call: a fresh token, or nothing without a swarm key."""
        return ((TOKEN_KEY, self.key.token(self.identity)),) if self.key else ()

    def verify_proof(self, answered: Any, sent: Metadata, coordinator: str) -> None:
        """Unless this swarm has no key: raise ``Stranger`` unless ``answered``, the
        initial metadata of a call made with ``sent`` (``metadata()``), holds the proof that
        the coordinator at ``coordinator`` (HOST:PORT) holds the key."""
        if self.key is None:
            return
        token = dict(sent)[TOKEN_KEY]
        proofs = [value for name, value in answered or () if name == PROOF_KEY]
        if not proofs or not self.key.proves(token, proofs[0]):
            how = "it answered without proof" if not proofs else "its proof is wrong"
            raise Stranger(
                f"the coordinator at {coordinator} does not hold this swarm's key ({how}): "
                "is it a stranger's?"
            )

    async def proven(self, method: Any, request: Any, coordinator: str, **options: Any) -> Any:
        """``method(request, **options)``, a unary call of a grpc.aio stub, with a fresh
        token: its reply once the coordinator proved it holds the key (``verify_proof``)."""
        sent = self.metadata()
        call = method(request, metadata=sent, **options)
        reply = await call
        self.verify_proof(await call.initial_metadata(), sent, coordinator)
        return reply

    async def proven_stream(
        self, method: Any, request: Any, coordinator: str, **options: Any
    ) -> AsyncIterator[Any]:
        """The replies of ``method(request, **options)``, a server-streaming call of a
        grpc.aio stub, with a fresh token: none before the coordinator proved it holds the
        key. (Checked on the first reply, when the initial metadata has surely come: a call
        that fails before it raises its own error, not a missing proof.)"""
        sent = self.metadata()
        call = method(request, metadata=sent, **options)
        proven = False
        async for reply in call:
            if not proven:
                self.verify_proof(await call.initial_metadata(), sent, coordinator)
                proven = True
            yield reply
        if not proven:  # (no reply at all: the stream's end must be proven too)
            self.verify_proof(await call.initial_metadata(), sent, coordinator)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls_ca is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=Path(self.tls_ca).read_bytes())

    # ---- the server's side --------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        pair = (Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes())
        return grpc.ssl_server_credentials([pair])

    def check(self, context: Any) -> None:
        """Refuse a call without a valid token (when this swarm has a key)."""
        self._checked(context)

    def check_and_prove(self, context: Any) -> Metadata:
        """``check``, then the initial metadata that answers the call: this server's proof
        that it holds the key (nothing without a key)."""
        token = self._checked(context)
        return ((PROOF_KEY, self.key.proof(token)),) if self.key and token else ()

    def _checked(self, context: Any) -> str | None:
        if self.key is None:
            return None
        token = token_of(context)
        try:
            if token is None:
                raise Unauthenticated("this swarm needs a swarm key: pass --swarm-key")
            self.key.verify(token)
        except Unauthenticated as exc:
            _say_refused(context.peer(), exc)
            raise
        return token


_REFUSED_SAID: dict[str, float] = {}  # peer host -> when a refusal of its calls was last said
REFUSED_SAY_EVERY_S = 60.0


def _say_refused(peer: str, why: Exception) -> None:
    """Log that a caller's call was refused for its token: at most once a minute a host
    (a volunteer with the wrong key retries every few seconds), so that an operator sees
    why a node never joins, not only the node's own log."""
    host = peer.rsplit(":", 1)[0]  # ("ipv4:10.0.0.5:41234": its port changes per connection)
    now = time.monotonic()
    if now - _REFUSED_SAID.get(host, -math.inf) >= REFUSED_SAY_EVERY_S:
        if len(_REFUSED_SAID) > 1024:  # (a bounded memory of whom it told about)
            _REFUSED_SAID.clear()
        _REFUSED_SAID[host] = now
        log.warning("refused a call from %s: %s", host, why)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", "method timeout metadata credentials wait_for_ready compression"
    ),
    grpc.ClientCallDetails,
):
    pass


class TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Puts a fresh swarm token on every call of a (synchronous) channel that carries none
    (a caller that checks the server's proof passes its own)."""

    def __init__(self, security: Security) -> None:
        self.security = security

    def _details(self, d: Any) -> _CallDetails:
        metadata = [*(d.metadata or ())]
        if not any(name == TOKEN_KEY for name, _ in metadata):
            metadata += self.security.metadata()
        compression = getattr(d, "compression", None)
        return _CallDetails(
            d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, compression
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def read_key(key: str | None, key_file: str | Path | None) -> SwarmKey | None:
    """The swarm key from a flag or a file (not both), else ``$NANOSHARD_SWARM_KEY``; None if
    none. An empty file is refused: it would mean an open swarm."""
    if key_file is not None:
        if key is not None:
            raise InvalidArgument("give the swarm key once: --swarm-key or --swarm-key-file")
        try:
            key = Path(key_file).read_text().strip()
        except OSError as exc:
            raise InvalidArgument(f"cannot read the swarm key file {key_file}: {exc}") from None
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"the swarm key file {key_file} is not text (UTF-8): write the key as text, "
                "e.g. the output of `openssl rand -hex 32`"
            ) from None
        if not key:
            raise InvalidArgument(f"the swarm key file {key_file} is empty")
    key = key or os.environ.get(KEY_ENV) or None
    return SwarmKey(key) if key else None


def security_from_args(args: Any, identity: str = "") -> Security:
    """A ``Security`` from the flags ``add_security_args`` adds."""
    return Security(
        key=read_key(args.swarm_key, args.swarm_key_file),
        identity=identity,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
    )


def add_security_args(parser: Any, server: bool = True) -> None:
    g = parser.add_argument_group("private swarms")
    g.add_argument("--swarm-key", help=f"the swarm's shared secret (or ${KEY_ENV})")
    g.add_argument("--swarm-key-file", type=Path, metavar="PATH", help="read the key from a file")
    g.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA that signs the swarm's servers")
    if server:
        g.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve TLS with this cert")
        g.add_argument("--tls-key", type=Path, metavar="PEM", help="... and this private key")
    else:
        parser.set_defaults(tls_cert=None, tls_key=None)
