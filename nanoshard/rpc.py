"""What every gRPC peer shares: channel options, and the one place where nanoshard's
exceptions become gRPC statuses (and back)."""

from __future__ import annotations

import errno
import math
import re
import socket
import ssl
from collections.abc import Callable
from typing import Any, NoReturn

import grpc

from nanoshard import errors
from nanoshard.security import Metadata, Security, TokenInterceptor, identity_of

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # per gRPC message, both ways; prefills are chunked below it
KV_LENGTH_KEY = "nanoshard-kv-length"  # trailing metadata of FAILED_PRECONDITION: the real length
ADDRESS = re.compile(r"[A-Za-z0-9.\-]{1,253}:\d{1,5}|\[[0-9A-Fa-f:.]{2,45}\]:\d{1,5}")  # HOST:PORT
FAILED_KEY = "nanoshard-failed"  # trailing metadata of a relayed UNAVAILABLE: the hops that failed
# trailing metadata of RESOURCE_EXHAUSTED from a quota: seconds until it takes the call ("": unknown)
QUOTA_KEY = "nanoshard-quota"
MAX_RETRY_AFTER_S = 3600.0
# What gRPC's C core says when the peer answered, but not in HTTP/2 (a web server: HTTP/1.x)
NOT_HTTP2 = "Failed parsing HTTP/2"
REFUSED = "Connection refused"  # (gRPC's text: nothing listens at that address)
CLOSED = ("Socket closed", "Connection reset")  # (gRPC's: the peer's process went away)
CUT = "Internal error from Core"  # (gRPC's INTERNAL, not a peer's: a stream cut mid-call)
RESOLVING = ("errors resolving", "DNS resolution failed")  # (gRPC's: the host name is unknown)
CONNECTING = "failed to connect to all addresses"  # (gRPC's: no connection was made)
# gRPC's words for a server certificate the caller's CA refused, or one for another host
TLS_REFUSED = ("Tls handshake failed", "Hostname Verification Check failed")
NOT_TLS = "WRONG_VERSION_NUMBER"  # (OpenSSL's word for a peer answering TLS in plain text)
MAX_FAILED = 64  # addresses read from FAILED_KEY
MAX_REPLICAS_PER_HOP = 8  # addresses a route names for one hop (the best ones)
# A peer that hangs (a laptop asleep, a stopped process) keeps its connections open and
# answers nothing: every connection pings its peer at least every KEEPALIVE_S, and one whose
# ping goes unanswered for PING_TIMEOUT_S is cut, failing its calls at once (UNAVAILABLE),
# within KEEPALIVE_S + PING_TIMEOUT_S of the hang however long the calls' own deadlines are.
# A peer busy computing answers (gRPC's transport threads do, not Python's). A ping waits
# behind the data queued on the link, and on a slow link with a deep buffer a bulk transfer
# delays it by tens of seconds (1 Mbit/s, a router holding 1000 packets, TCP cubic: 10 s and
# more; 24-43 s under gRPC's own 60 s timeout; 2026-12-06, emulated): a timeout of 10 s cut
# every such healthy stream. The data plane (steps: a few MB at most, and a hung hop costs
# a user's generation its time) takes 20 s; channels to the coordinator (whose calls carry
# their own deadlines, and which sends a new node its weights) keep gRPC's 60 s.
KEEPALIVE_S = 10
PING_TIMEOUT_S = 20
BULK_PING_TIMEOUT_S = 60
MIN_CONNECT_TIMEOUT_S = 5  # a connection attempt (``channel_options``)
PING_TIMEOUT = "ping timeout"

STATUS_OF: dict[type[errors.NanoshardError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Internal: grpc.StatusCode.INTERNAL,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.CheckpointError: grpc.StatusCode.FAILED_PRECONDITION,
}


def channel_options(
    max_message_bytes: int = MAX_MESSAGE_BYTES, ping_timeout_s: int = PING_TIMEOUT_S
) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
        ("grpc.keepalive_timeout_ms", ping_timeout_s * 1000),
        # (every ping's timeout, the keepalive's included: gRPC's own is 60 s, which a
        # ping in flight when the peer hangs waits out whatever keepalive_timeout says)
        ("grpc.http2.ping_timeout_ms", ping_timeout_s * 1000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # Volunteers come back (a restarted coordinator, a node on the same address): retry
        # connecting within seconds, not gRPC's default of up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # Despite its name, how long one connection attempt may take (TCP, TLS, HTTP/2's
        # first SETTINGS): at 200 ms, as it once was, no channel over TLS to a node 120 ms
        # away connected on its first call (tests/test_links.py), nor one on a host too
        # busy to answer that fast.
        ("grpc.min_reconnect_backoff_ms", MIN_CONNECT_TIMEOUT_S * 1000),
    ]


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        *channel_options(max_message_bytes),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.so_reuseport", 0),  # two servers must never share a port by accident
    ]


def tls_refused(detail: str) -> bool:
    """Whether a call failed in its TLS handshake: the server's certificate did not verify,
    or the server does not serve TLS (``serves_plaintext``)."""
    return any(text in detail for text in TLS_REFUSED)


def serves_plaintext(detail: str) -> bool:
    """Whether a call over TLS failed because its server answered in plain text."""
    return tls_refused(detail) and NOT_TLS in detail


def open_channel(
    address: str, security: Security | None = None, *, aio: bool = False, **options: int
) -> Any:
    """A channel to ``address`` (a ``grpc.aio`` one with ``aio``): over TLS when
    ``security`` names a CA. Every channel of nanoshard is made here."""
    opts = channel_options(**options)
    creds = security.channel_credentials() if security else None
    mod: Any = grpc.aio if aio else grpc
    if creds is None:
        channel = mod.insecure_channel(address, options=opts)
    else:
        channel = mod.secure_channel(address, creds, options=opts)
    if security is not None and security.key is not None and not aio:
        # asyncio callers pass ``security.metadata()`` per call; sync ones get it here
        channel = grpc.intercept_channel(channel, TokenInterceptor(security))
    return channel


def check_address(address: object, what: str = "") -> str:
    """``address`` if it is HOST:PORT with a port in 0-65535; else InvalidArgument (``what``
    names it in the message)."""
    if not (
        isinstance(address, str)
        and ADDRESS.fullmatch(address)
        and int(address.rsplit(":", 1)[1]) <= 65535
    ):
        shown = repr(address)[:80]
        named = f"{what} {shown}" if what else shown
        raise errors.InvalidArgument(
            f"{named} is not HOST:PORT (a port of 0 to 65535; IPv6 as [::1]:PORT)"
        )
    return address


def add_port(server: Any, address: str, security: Security | None = None) -> int:
    """Listen on ``address``: over TLS when ``security`` has a certificate."""
    creds = security.server_credentials() if security else None
    check_listenable(address)
    try:
        if creds is None:
            return int(server.add_insecure_port(address))
        return int(server.add_secure_port(address, creds))
    except RuntimeError:  # gRPC's "Failed to bind to address ...": in use, or not ours
        why = "the port is in use (another, or 0 for any free one) or the address is not ours"
        if address.endswith(":0"):
            why = "the address is not this machine's"
        raise errors.Unavailable(f"cannot listen on {address}: {why}") from None


def check_listenable(address: str) -> None:
    """Unavailable, saying why, if no server can listen on ``address`` now (a server asks
    before its slow start-up too: a port in use is said at once)."""
    if why := unbindable(address):
        raise errors.Unavailable(f"cannot listen on {address}: {why}")


def unbindable(address: str) -> str | None:
    """Why no socket can listen on ``address`` now (the OS's word, asked before gRPC, whose
    C core would print a log line of its own), or None. As gRPC does, one of the addresses
    a host name resolves to is enough."""
    host, port = address.rsplit(":", 1)
    try:
        resolved = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        return f"the host name does not resolve ({exc.strerror or exc})"
    why = None
    for family, kind, proto, _, sockaddr in resolved:
        try:
            with socket.socket(family, kind, proto) as probe:  # (no IPv6 here: OSError)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as gRPC binds)
                probe.bind(sockaddr)
                return None
        except OSError as exc:
            why = why or ("the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror)
    return why


def caller_identity(context: Any) -> str:
    """Who is calling: the identity in its swarm token, else the host it calls from."""
    return identity_of(context) or peer_host(context)


def host_of(address: str) -> str:
    """The host of ``"host:port"``, IPv6 brackets off: ``"[fd00::1]:7961"`` -> ``"fd00::1"``."""
    return address.rsplit(":", 1)[0].strip("[]")


def peer_host(context: Any) -> str:
    """The host a call comes from."""
    peer = context.peer() or ""  # "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555"
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    return rest.rsplit(":", 1)[0] if kind == "ipv4" else peer


def status_of(exc: errors.NanoshardError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def trailing_metadata_of(exc: errors.NanoshardError) -> tuple[tuple[str, str], ...]:
    if isinstance(exc, errors.CacheMismatch):
        return ((KV_LENGTH_KEY, str(exc.length)),)
    if isinstance(exc, errors.Unavailable) and exc.failed:
        return ((FAILED_KEY, ",".join(exc.failed)),)
    if isinstance(exc, errors.QuotaExceeded):
        after = exc.retry_after_s
        return ((QUOTA_KEY, "" if after is None else f"{after:.3f}"),)
    return ()


async def abort(context: grpc.aio.ServicerContext, exc: errors.NanoshardError) -> NoReturn:
    """End an RPC with the status of a nanoshard error."""
    context.set_trailing_metadata(trailing_metadata_of(exc))
    await context.abort(status_of(exc), str(exc))
    raise AssertionError("unreachable")  # context.abort raises


def closed_connecting(err: grpc.RpcError) -> bool:
    """Whether a call failed because the connection closed before gRPC had made one: the
    peer went away, or it serves TLS (a TLS server closes on a caller without it)."""
    code = err.code() if hasattr(err, "code") else None
    detail = (err.details() if hasattr(err, "details") else None) or ""
    closed = any(text in detail for text in CLOSED) and CONNECTING in detail
    return code == grpc.StatusCode.UNAVAILABLE and closed


def serves_tls(target: str, timeout_s: float = 3.0) -> bool:
    """Whether the server at ``target`` (HOST:PORT) answers a TLS handshake (its certificate
    unchecked): what a caller without TLS asks once its connection closed before gRPC
    made one (``closed_connecting``), to tell a TLS server from one that went away."""
    host, _, port = target.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout_s) as sock,
            context.wrap_socket(sock),
        ):
            return True
    except (OSError, ValueError):  # (ssl.SSLError is an OSError)
        return False


def error_from_rpc(err: grpc.RpcError, peer: str = "", label: str = "") -> errors.NanoshardError:
    """Turn a failed call back into a nanoshard error (the caller's view): its message
    starts with ``label`` (default ``peer``, the address called)."""
    code = err.code() if hasattr(err, "code") else None
    detail = (err.details() if hasattr(err, "details") else None) or str(err)
    where = f"{label or peer}: " if label or peer else ""
    trailers = dict(err.trailing_metadata() or ()) if hasattr(err, "trailing_metadata") else {}
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        length = trailers.get(KV_LENGTH_KEY)  # a peer's word: a plain, short number or nothing
        if isinstance(length, str) and length.isdigit() and len(length) <= 10:
            return errors.CacheMismatch(where + detail, int(length))
        return errors.FailedPrecondition(where + detail)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and QUOTA_KEY in trailers:
        return errors.QuotaExceeded(where + detail, _retry_after(trailers[QUOTA_KEY]))
    if code == grpc.StatusCode.UNAVAILABLE and NOT_HTTP2 in detail:  # no use trying again
        return errors.FailedPrecondition(
            f"{where}it answers, but not in gRPC (HTTP/2): is that the right port? (a web "
            "server's, such as nanoshard api's, is not a coordinator's or a node's)"
        )
    if (
        code == grpc.StatusCode.UNAVAILABLE
        and PING_TIMEOUT in detail
        and FAILED_KEY not in trailers
    ):
        detail = (
            f"no answer to a ping in {PING_TIMEOUT_S} s: hung, asleep or cut off (gRPC: {detail})"
        )
    if code == grpc.StatusCode.UNAVAILABLE and any(text in detail for text in RESOLVING):
        host = peer.rpartition(":")[0] or "its host"
        detail = (
            f"{host} does not resolve: no such host (a typo, or a name this network's DNS "
            "does not know)"
        )
    if code == grpc.StatusCode.UNAVAILABLE and REFUSED in detail and FAILED_KEY not in trailers:
        detail = "nothing listens there (connection refused): stopped, or not that port"
    if (
        code == grpc.StatusCode.UNAVAILABLE
        and any(text in detail for text in CLOSED)
        and FAILED_KEY not in trailers
    ):
        tls = ", or it serves TLS: pass --tls-ca" if closed_connecting(err) else ""
        detail = f"the connection closed: it stopped, crashed or left{tls} (gRPC: {detail})"
    if code == grpc.StatusCode.INTERNAL and detail == CUT and FAILED_KEY not in trailers:
        # (a node stopping, or gone, as a step was on its way: not a bug of the peer's)
        code = grpc.StatusCode.UNAVAILABLE
        detail = f"the stream was cut: it stopped, crashed or left mid-call (gRPC: {detail})"
    if code == grpc.StatusCode.UNAVAILABLE and serves_plaintext(detail):
        detail = (
            "it does not serve TLS: drop --tls-ca (a swarm's servers all serve TLS or none "
            f"does) (gRPC: {detail})"
        )
    elif code == grpc.StatusCode.UNAVAILABLE and tls_refused(detail):
        detail = (
            "the TLS handshake failed: its certificate does not verify against --tls-ca "
            f"(another swarm's CA, or a certificate for another host) (gRPC: {detail})"
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:  # another kind of server (a node, not a coordinator)
        detail = f"it does not serve this call ({detail}): is it the right address?"
    cls = _BY_CODE.get(code, errors.Unavailable)  # type: ignore[arg-type]
    if cls is errors.Unavailable:
        # Relayed by a node: the hops behind it that failed. Otherwise the peer itself
        # could not be reached, or did not answer in time.
        # (Remote input: only well-formed addresses count, and only a route's worth.)
        relayed = trailers.get(FAILED_KEY)
        failed = []
        if isinstance(relayed, str):
            failed = [a for a in relayed.split(",")[:MAX_FAILED] if ADDRESS.fullmatch(a)]
        return errors.Unavailable(where + detail, failed or ([peer] if peer else []))
    return cls(where + detail)


def _retry_after(value: object) -> float | None:
    """A peer's word for when its quota takes the call again: a sane number, or None."""
    try:
        seconds = float(value) if isinstance(value, str) and len(value) <= 16 else math.nan
    except ValueError:
        return None
    return seconds if 0.0 <= seconds <= MAX_RETRY_AFTER_S else None


_BY_CODE = {status: cls for cls, status in STATUS_OF.items() if cls is not errors.CheckpointError}


def _parse(cls: Any, raw: bytes) -> Any:
    try:
        return cls.FromString(raw)
    except Exception as exc:  # protobuf's DecodeError, or garbage it chokes on otherwise
        raise errors.InvalidArgument(
            f"the request is not a valid {cls.DESCRIPTOR.name}: {exc}"
        ) from None


# Raises a NanoshardError to refuse a call (before parsing); else gives the initial metadata
# to answer it with, sent at once (None or (): none of its own, sent when gRPC sends it)
Guard = Callable[[Any], Metadata | None]


def _no_guard(context: Any) -> None:
    return None


async def _answer(context: Any, metadata: Metadata | None) -> None:
    if metadata:  # (sent now, so a stream's caller reads it before the first message)
        await context.send_initial_metadata(metadata)


def strict_service(
    service_name: str, methods: dict[str, tuple[str, Any, Any]], guard: Guard = _no_guard
) -> grpc.GenericRpcHandler:
    """A service whose requests are parsed by us, so garbage bytes get INVALID_ARGUMENT
    (gRPC's own deserializer would answer UNKNOWN). ``methods``: name -> (kind, handler,
    request class) with kind "unary", "server_stream" or "stream" (bidirectional). Unary and
    server-streaming handlers take parsed messages, as generated servicers do; a "stream"
    handler takes ``next_request()`` (the next parsed message, or None at the end) and
    writes with ``context.write``: gRPC's read/write API, cheaper per message than its
    async iterators. ``guard`` sees every call first (the swarm key's check) and gives the
    initial metadata it is answered with (the coordinator's proof of the key)."""
    handlers = {}
    for name, (kind, handler, request_cls) in methods.items():
        if kind == "unary":

            async def unary(
                raw: bytes, context: Any, _h: Any = handler, _c: Any = request_cls
            ) -> Any:
                try:
                    answer = guard(context)
                    request = _parse(_c, raw)
                except errors.NanoshardError as exc:
                    await abort(context, exc)
                await _answer(context, answer)
                return await _h(request, context)

            handlers[name] = grpc.unary_unary_rpc_method_handler(
                unary, response_serializer=_serialize
            )
        elif kind == "server_stream":

            async def server_stream(
                raw: bytes, context: Any, _h: Any = handler, _c: Any = request_cls
            ) -> Any:
                try:
                    answer = guard(context)
                    request = _parse(_c, raw)
                except errors.NanoshardError as exc:
                    await abort(context, exc)
                await _answer(context, answer)
                async for reply in _h(request, context):
                    yield reply

            handlers[name] = grpc.unary_stream_rpc_method_handler(
                server_stream, response_serializer=_serialize
            )
        else:

            async def stream(
                raw_iterator: Any, context: Any, _h: Any = handler, _c: Any = request_cls
            ) -> None:
                try:
                    answer = guard(context)
                except errors.NanoshardError as exc:
                    await abort(context, exc)
                await _answer(context, answer)

                async def next_request() -> Any:
                    raw = await context.read()
                    return None if raw is grpc.aio.EOF else _parse(_c, raw)

                await _h(next_request, context)

            handlers[name] = grpc.stream_stream_rpc_method_handler(
                stream, response_serializer=_serialize
            )
    return grpc.method_handlers_generic_handler(service_name, handlers)


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()
