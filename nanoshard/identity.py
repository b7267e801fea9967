"""A node's identity: a long-lived Ed25519 key, and what it signs.

Every node keeps a private key in its cache folder (``keys/node.key``, made on first start;
a second node started on the same folder while the first runs takes ``node-1.key``, and so
on: each key file is locked by the process using it). Its public key *is* its identity: the
node id is derived from it (``node_id_of``), so no one can claim another node's id, and a
restarted node keeps its own. A node proves it holds the key when it joins (``join_proof``)
and signs what each of its steps computed (``step_statement``): the session, the step's
positions, its stage, and digests of its input (every chunk from position 0, as
``agreement.input_digest`` hashes them) and of its output (the activations it sent on, or
at the head the token it drew and the logits it returned). A client checks the signatures
of the traces it gets (a middle hop cannot rewrite a later hop's trace or token), and the
coordinator excludes a node only on evidence its own signature makes (``coordinator/
service.py``).

Checking a signature costs the client 60-130 us a token, on its path from one token to the
next. So a session also gets a key of its own between the client and the head: the client
sends an X25519 share when it opens the session, the head answers its own signed with its
node key (``session_key_statement``), and both derive the key (``session_mac_key``). The
head then MACs every step's statement (``step_mac``, 2 us to check) beside signing it; the
client accepts the head's token on the MAC, and only a step whose MAC fails has its
signature checked. The signature stays what evidence rests on. The signature, key exchange
and key derivation work is the ``cryptography`` package's (OpenSSL).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import hmac
import os
import struct
from pathlib import Path
from typing import IO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nanoshard.errors import FailedPrecondition, InvalidArgument
from nanoshard.v1 import node_pb2 as pb

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
JOIN_DOMAIN = b"nanoshard-join-v1"
STEP_DOMAIN = b"nanoshard-step-v1"
SESSION_KEY_DOMAIN = b"nanoshard-session-key-v1"  # what a head signs for its share
SESSION_MAC_DOMAIN = b"nanoshard-session-mac-v1"  # the MAC key's derivation
SHARE_BYTES = 32  # an X25519 public key
MAX_KEY_FILES = 64  # node.key, node-1.key, ... in one folder


def node_id_of(public_key: bytes) -> str:
    """A node's id: the first 32 hex digits of its public key's sha256."""
    return hashlib.sha256(public_key).hexdigest()[:32]


class NodeKey:
    """A node's private key, loaded from (or made in) a key file this process holds locked."""

    def __init__(self, private: Ed25519PrivateKey, lock: IO[bytes] | None = None) -> None:
        self._private = private
        self._lock = lock  # open (and flock-ed) while this process uses the key
        self.public_key = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.node_id = node_id_of(self.public_key)

    @classmethod
    def generate(cls) -> NodeKey:
        """A key of this process alone (tests, and nodes that keep no cache)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, folder: Path) -> NodeKey:
        """The first key file in ``folder`` no other running process holds; a new one if
        every existing file is held."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FailedPrecondition(f"cannot keep this node's key in {folder}: {exc}") from None
        for index in range(MAX_KEY_FILES):
            path = folder / ("node.key" if index == 0 else f"node-{index}.key")
            try:
                handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:  # a folder in its place, no permission, ...
                raise FailedPrecondition(f"cannot keep this node's key in {path}: {exc}") from None
            lock = os.fdopen(handle, "r+b")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another node on this folder uses it
                lock.close()
                continue
            pem = lock.read()
            if pem:
                try:
                    private = serialization.load_pem_private_key(pem, password=None)
                except (ValueError, TypeError):  # not PEM, or a key with a password
                    lock.close()
                    raise InvalidArgument(
                        f"{path} does not hold an Ed25519 key in PEM: move it away and a new "
                        "one is made (the node then has a new identity)"
                    ) from None
                if not isinstance(private, Ed25519PrivateKey):
                    lock.close()
                    raise InvalidArgument(f"{path} does not hold an Ed25519 key")
            else:
                private = Ed25519PrivateKey.generate()
                lock.write(
                    private.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
                lock.flush()
                os.fsync(lock.fileno())
            return cls(private, lock)
        raise InvalidArgument(f"{folder}: {MAX_KEY_FILES} nodes already run on this folder")

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def close(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.close()
            self._lock = None


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s over ``message`` (False for malformed ones)."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        _public_key(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=1024)  # a client checks the same few nodes' traces every step
def _public_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def join_proof_message(swarm: str, node_id: str, address: str, at_ms: int) -> bytes:
    """What a joining node signs: the swarm, its id and address, and the time (ms)."""
    return b"\0".join(
        [JOIN_DOMAIN, swarm.encode(), node_id.encode(), address.encode(), str(at_ms).encode()]
    )


def step_statement(
    session_id: bytes,
    pos: int,
    tokens: int,
    start: int,
    end: int,
    input_digest: bytes,
    output_digest: bytes,
) -> bytes:
    """What a node signs for a step: it computed units [start, end) for positions
    [pos, pos + tokens) of the session, from the input and to the output with those
    digests (sha256 each)."""
    if len(input_digest) != 32 or len(output_digest) != 32:
        raise InvalidArgument("a step's digests are sha256 (32 bytes each)")
    return b"".join(
        [
            STEP_DOMAIN,
            struct.pack("<B", len(session_id)),
            session_id,
            struct.pack("<IIII", pos, tokens, start, end),
            input_digest,
            output_digest,
        ]
    )


def output_digest(sent: pb.Activations | None, token: int | None = None) -> bytes:
    """sha256 of a step's output as signed: the activations a node sent on (exactly, in the
    session's codec) or returned (the head's logits, fp32), and the token it drew."""
    h = hashlib.sha256(STEP_DOMAIN)
    if token is not None:
        h.update(b"T" + token.to_bytes(4, "little"))
    if sent is not None:
        h.update(b"A" + sent.SerializeToString(deterministic=True))
    return h.digest()


def trace_statement(session_id: bytes, pos: int, tokens: int, trace: pb.HopTrace) -> bytes:
    """``step_statement`` of ``trace`` (its stage and digests) for the step at ``pos``."""
    return step_statement(
        session_id, pos, tokens, trace.start, trace.end, trace.input_digest, trace.output_digest
    )


def sign_step(
    key: NodeKey,
    session_id: bytes,
    pos: int,
    tokens: int,
    trace: pb.HopTrace,
    mac_key: bytes | None = None,
    *,
    sign: bool = True,
) -> None:
    """Sign ``trace`` (its stage and digests filled in) for the step at ``pos``; with the
    session's ``mac_key`` (the head's), MAC it too (without ``sign``, only MAC it)."""
    statement = trace_statement(session_id, pos, tokens, trace)
    if sign or mac_key is None:
        trace.signature = key.sign(statement)
    if mac_key is not None:
        trace.mac = step_mac(mac_key, statement)


def step_signed(
    public_key: bytes, session_id: bytes, pos: int, tokens: int, trace: pb.HopTrace
) -> bool:
    """Whether ``trace`` carries its node's signature over the step at ``pos``."""
    if len(trace.input_digest) != 32 or len(trace.output_digest) != 32:
        return False
    return verify(public_key, trace.signature, trace_statement(session_id, pos, tokens, trace))


# ---- a session's key between the client and the head ----------------------------------


class SessionShare:
    """One side's X25519 key for one session: its public ``share``, and the session's MAC
    key it derives with the other side's share."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.share = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def client_key(self, session_id: bytes, head_share: bytes) -> bytes:
        """The key, this share being the client's."""
        return self._derive(session_id, self.share, head_share, head_share)

    def head_key(self, session_id: bytes, client_share: bytes) -> bytes:
        """The key, this share being the head's."""
        return self._derive(session_id, client_share, self.share, client_share)

    def _derive(self, session_id: bytes, client: bytes, head: bytes, other: bytes) -> bytes:
        """InvalidArgument if ``other`` is no usable X25519 public key."""
        try:
            secret = self._private.exchange(X25519PublicKey.from_public_bytes(other))
        except ValueError as exc:  # not 32 bytes, or a low-order point
            raise InvalidArgument(f"not a usable X25519 share: {exc}") from None
        return session_mac_key(secret, session_id, client, head)


def session_mac_key(
    secret: bytes, session_id: bytes, client_share: bytes, head_share: bytes
) -> bytes:
    """HKDF-SHA256 of the X25519 secret, bound to the session and both shares."""
    info = b"".join([SESSION_MAC_DOMAIN, session_id, client_share, head_share])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def session_key_statement(session_id: bytes, client_share: bytes, head_share: bytes) -> bytes:
    """What the head signs with its node key for its share: the session and both shares."""
    return b"".join([SESSION_KEY_DOMAIN, session_id, client_share, head_share])


def step_mac(mac_key: bytes, statement: bytes) -> bytes:
    """HMAC-SHA256 of a step's statement with the session's key."""
    return hmac.digest(mac_key, statement, "sha256")


def step_maced(
    mac_key: bytes, session_id: bytes, pos: int, tokens: int, trace: pb.HopTrace
) -> bool:
    """Whether ``trace`` carries the session key's MAC over the step at ``pos``."""
    if len(trace.input_digest) != 32 or len(trace.output_digest) != 32 or not trace.mac:
        return False
    statement = trace_statement(session_id, pos, tokens, trace)
    return hmac.compare_digest(step_mac(mac_key, statement), trace.mac)
