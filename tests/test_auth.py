"""Private swarms: swarm-key tokens (what they accept and refuse), every service refusing
calls without one, and TLS end to end."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import grpc
import pytest
from swarm import Swarm, local_tokens, nanoshard, wait_until
from test_swarm import STEADY, covered

from nanoshard import Client
from nanoshard.client.swarm import CoordinatorClient
from nanoshard.errors import NanoshardError, Unauthenticated
from nanoshard.security import CLOCK_SKEW_S, TOKEN_KEY, TOKEN_TTL_S, Security, SwarmKey
from nanoshard.v1 import coordinator_pb2 as cpb

KEY = "correct horse battery staple"
NODE_METHODS = ["Open", "Steps", "Step", "Close", "Info"]
COORDINATOR_METHODS = [
    "Join",
    "Heartbeat",
    "Leave",
    "GetRoute",
    "GetStatus",
    "GetModelCard",
    "FetchTensors",
]
STREAMING = {"Steps": "stream_stream", "FetchTensors": "unary_stream"}


# ---- tokens ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_token_names_its_caller_once() -> None:
    clock = Clock()
    key = SwarmKey(KEY, clock)
    token = key.token("node-42")
    assert KEY not in token and "node-42" not in token  # neither travels in clear
    assert key.verify(token) == "node-42"
    with pytest.raises(Unauthenticated, match="replayed"):
        key.verify(token)
    assert key.verify(key.token("node-42")) == "node-42"  # a fresh one is fine


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t[:-2] + ("00" if t[-2:] != "00" else "11"), "another key"),
        (lambda t: t.replace("v1.", "v1.x", 1), "another key|malformed"),
        (lambda t: "garbage", "malformed"),
        (lambda t: t + ".extra", "malformed"),
    ],
)
def test_tampered_tokens_are_refused(change, message) -> None:
    key = SwarmKey(KEY, Clock())
    with pytest.raises(Unauthenticated, match=message):
        key.verify(change(key.token("me")))


def test_other_keys_and_stale_tokens_are_refused() -> None:
    clock = Clock()
    ours, theirs = SwarmKey(KEY, clock), SwarmKey("another swarm's key", clock)
    with pytest.raises(Unauthenticated, match="another key"):
        ours.verify(theirs.token("me"))
    old = ours.token("me")
    clock.now += TOKEN_TTL_S + CLOCK_SKEW_S + 1
    with pytest.raises(Unauthenticated, match="expired"):
        ours.verify(old)
    future = SwarmKey(KEY, lambda: clock.now + CLOCK_SKEW_S + 5).token("me")
    with pytest.raises(Unauthenticated, match="future"):
        ours.verify(future)


def test_replay_memory_forgets_only_expired_tokens() -> None:
    clock = Clock()
    key = SwarmKey(KEY, clock)
    token = key.token("me")
    key.verify(token)
    clock.now += 10  # still valid: still remembered
    with pytest.raises(Unauthenticated, match="replayed"):
        key.verify(token)
    for _ in range(50):
        key.verify(key.token("me"))
    clock.now += TOKEN_TTL_S + 3 * CLOCK_SKEW_S  # all expired: memory empties
    key.verify(key.token("me"))
    assert len(key._seen) == 1


def test_short_keys_are_refused() -> None:
    with pytest.raises(NanoshardError, match="8 characters"):
        SwarmKey("short")


# ---- a keyed swarm --------------------------------------------------------------------


def raw_call(address: str, service: str, method: str, metadata=()) -> grpc.StatusCode:
    """Call ``method`` with an empty request (valid for every message) and the given
    metadata; the status code it ends with."""
    with grpc.insecure_channel(address) as channel:
        path = f"/nanoshard.v1.{service}/{method}"
        kind = STREAMING.get(method, "unary_unary")
        call = getattr(channel, kind)(path)
        try:
            if kind == "stream_stream":
                list(call(iter([b""]), timeout=10, metadata=metadata))
            elif kind == "unary_stream":
                list(call(b"", timeout=10, metadata=metadata))
            else:
                call(b"", timeout=10, metadata=metadata)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def keyed_swarm(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("keyed")
    with Swarm() as swarm:
        _, coordinator = swarm.coordinator("--swarm-key", KEY, "--no-mdns", *STEADY)
        for i in range(2):
            swarm.join(
                "--coordinator", coordinator, "--no-mdns", "--swarm-key", KEY,
                "--cache-dir", str(cache / f"n{i}"), "--name", f"k{i}",
            )  # fmt: skip
        client = CoordinatorClient(coordinator, security=Security(key=SwarmKey(KEY)))
        status = wait_until("full coverage", lambda: covered(client, 2), timeout=120)
        assert isinstance(status, dict)
        nodes = [n["address"] for n in status["nodes"]]
        yield coordinator, nodes


def test_every_service_refuses_calls_without_a_valid_token(keyed_swarm) -> None:
    coordinator, nodes = keyed_swarm
    stranger = Security(key=SwarmKey("not this swarm's key"))
    for address, service, methods in [
        (coordinator, "Coordinator", COORDINATOR_METHODS),
        (nodes[0], "Node", NODE_METHODS),
    ]:
        for method in methods:
            for metadata in [(), stranger.metadata(), ((TOKEN_KEY, "v1.garbage"),)]:
                code = raw_call(address, service, method, metadata)
                assert code == grpc.StatusCode.UNAUTHENTICATED, (service, method, metadata)
    # with the key, the same empty requests get past the door (to their own answers)
    member = Security(key=SwarmKey(KEY))
    assert raw_call(nodes[0], "Node", "Info", member.metadata()) == grpc.StatusCode.OK
    code = raw_call(coordinator, "Coordinator", "GetStatus", member.metadata())
    assert code == grpc.StatusCode.OK


def test_replayed_tokens_and_borrowed_identities_are_refused(keyed_swarm) -> None:
    coordinator, nodes = keyed_swarm
    member = Security(key=SwarmKey(KEY))
    captured = member.metadata()
    assert raw_call(nodes[0], "Node", "Info", captured) == grpc.StatusCode.OK
    assert raw_call(nodes[0], "Node", "Info", captured) == grpc.StatusCode.UNAUTHENTICATED
    # a valid token cannot make another node leave
    with grpc.insecure_channel(coordinator) as channel:
        leave = channel.unary_unary("/nanoshard.v1.Coordinator/Leave")
        status = CoordinatorClient(coordinator, security=member).status()
        victim = status.nodes[0].node_id
        request = cpb.LeaveRequest(node_id=victim).SerializeToString()
        with pytest.raises(grpc.RpcError) as err:
            leave(request, metadata=member.metadata(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "not node" in err.value.details()
    assert len(CoordinatorClient(coordinator, security=member).status().nodes) == 2


def test_the_swarm_generates_with_the_key_and_refuses_without(keyed_swarm) -> None:
    coordinator, _ = keyed_swarm
    with Client(coordinator, swarm_key=KEY) as client:
        text = client.generate("ROMEO:", 20, temperature=0).token_ids
    assert text == local_tokens("--temperature", "0", "--max-new-tokens", "20", "ROMEO:")
    with pytest.raises(Unauthenticated):
        Client(coordinator, swarm_key="a guess at the key")
    done = nanoshard("status", "--coordinator", coordinator)
    assert done.returncode != 0 and "swarm key" in done.stderr
    assert "Traceback" not in done.stderr


# ---- TLS ------------------------------------------------------------------------------


def test_tls_swarm_generates_and_a_wrong_ca_is_refused(tmp_path: Path) -> None:
    certs, other = tmp_path / "certs", tmp_path / "other"
    assert nanoshard("certs", str(certs), "--hosts", "127.0.0.1").returncode == 0
    assert nanoshard("certs", str(other), "--hosts", "127.0.0.1").returncode == 0
    tls = ["--tls-cert", str(certs / "127.0.0.1.pem"), "--tls-key", str(certs / "127.0.0.1.key")]
    tls += ["--tls-ca", str(certs / "ca.pem"), "--swarm-key", KEY]
    with Swarm() as swarm:
        _, coordinator = swarm.coordinator("--no-mdns", *tls, *STEADY)
        for i in range(2):
            swarm.join(
                "--coordinator", coordinator, "--no-mdns", *tls,
                "--cache-dir", str(tmp_path / f"n{i}"), "--name", f"t{i}",
            )  # fmt: skip
        member = Security(key=SwarmKey(KEY), tls_ca=certs / "ca.pem")
        client = CoordinatorClient(coordinator, security=member)
        wait_until("full coverage over TLS", lambda: covered(client, 2), timeout=120)
        with Client(coordinator, swarm_key=KEY, tls_ca=certs / "ca.pem") as sdk:
            tokens = sdk.generate("ROMEO:", 20, temperature=0).token_ids
        local = local_tokens("--temperature", "0", "--max-new-tokens", "20", "ROMEO:")
        assert tokens == local
        # a client trusting another CA does not talk to these servers
        with pytest.raises(NanoshardError, match="the TLS handshake failed: its certificate"):
            Client(coordinator, swarm_key=KEY, tls_ca=other / "ca.pem", timeout_s=5)
        # nor does one speaking plaintext, which is told what may be missing
        assert raw_call(coordinator, "Coordinator", "GetStatus") == grpc.StatusCode.UNAVAILABLE
        plain = nanoshard("status", "--coordinator", coordinator, "--swarm-key", KEY)
        assert plain.returncode == 1, plain.stderr
        assert "or it serves TLS: pass --tls-ca" in plain.stderr.strip().splitlines()[-1]
        # and a volunteer that would serve plaintext is not taken in
        plaintext = swarm.join(
            "--coordinator", coordinator, "--no-mdns", "--tls-ca", str(certs / "ca.pem"),
            "--swarm-key", KEY, "--cache-dir", str(tmp_path / "plain"),
        )  # fmt: skip
        assert plaintext.wait(timeout=120) == 1, plaintext.output
        assert plaintext.lines[-1].endswith(
            "this swarm's coordinator serves TLS: so must its nodes (--tls-cert, --tls-key "
            "and --tls-ca)"
        ), plaintext.output
        # nor one whose certificate every client would refuse: another CA's, or the swarm
        # CA's for another host
        assert nanoshard("certs", str(certs), "--hosts", "localhost").returncode == 0
        for cert in (other / "127.0.0.1", certs / "localhost"):
            refused = swarm.join(
                "--coordinator", coordinator, "--no-mdns", "--tls-cert", f"{cert}.pem",
                "--tls-key", f"{cert}.key", "--tls-ca", str(certs / "ca.pem"),
                "--swarm-key", KEY, "--cache-dir", str(tmp_path / "refused"),
            )  # fmt: skip
            assert refused.wait(timeout=120) == 1, refused.output
            assert "does not verify against the coordinator's CA" in refused.lines[-1], cert
        assert len(client.status().nodes) == 2  # (neither was placed)


def test_a_volunteer_without_the_ca_is_told_the_coordinator_it_found_needs_tls(
    tmp_path: Path,
) -> None:
    certs = tmp_path / "certs"
    assert nanoshard("certs", str(certs), "--hosts", "127.0.0.1").returncode == 0
    tls = ["--tls-cert", str(certs / "127.0.0.1.pem"), "--tls-key", str(certs / "127.0.0.1.key")]
    name = f"tls-{secrets.token_hex(4)}"
    with Swarm() as swarm:
        swarm.coordinator("--swarm", name, *tls, "--tls-ca", str(certs / "ca.pem"))
        volunteer = swarm.join("--swarm", name, "--cache-dir", str(tmp_path / "n"))
        assert volunteer.wait(timeout=120) == 1, volunteer.output
        assert re.fullmatch(
            r"nanoshard-node: error: the coordinator at 127\.0\.0\.1:\d+ needs TLS: pass "
            r"--tls-ca \(the swarm's CA\), and --tls-cert/--tls-key for this node",
            volunteer.lines[-1],
        ), volunteer.output
