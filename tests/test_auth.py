"""Private swarms: swarm-key tokens (what they accept and refuse), every service refusing
calls without one, the coordinator proving the key back (and volunteers and clients leaving
a coordinator that cannot), and TLS end to end."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import secrets
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from swarm import Swarm, local_tokens, nanoshard, wait_until
from test_swarm import STEADY, covered

from nanoshard import Client, rpc
from nanoshard.certs import make_certs
from nanoshard.client.swarm import CoordinatorClient
from nanoshard.errors import InvalidArgument, NanoshardError, Unauthenticated
from nanoshard.security import (
    CLOCK_SKEW_S,
    PROOF_KEY,
    TOKEN_KEY,
    TOKEN_TTL_S,
    Security,
    SwarmKey,
)
from nanoshard.v1 import coordinator_pb2 as cpb
from nanoshard.v1 import coordinator_pb2_grpc as cpb_grpc

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
# What a volunteer or client says of a coordinator that does not prove the swarm key
STRANGER = (
    r"the coordinator at 127\.0\.0\.1:\d+ does not hold this swarm's key \(it answered "
    r"without proof\): is it a stranger's\?"
)


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


def test_a_refused_caller_is_logged_once_a_minute_a_host(caplog: pytest.LogCaptureFixture) -> None:
    """A volunteer with the wrong key retries every few seconds: its coordinator said
    nothing at all, so only the volunteer's own log told why it never joined."""

    class Call:
        def __init__(self, token: str, port: int) -> None:
            self.token, self.port = token, port

        def invocation_metadata(self) -> tuple:
            return ((TOKEN_KEY, self.token),)

        def peer(self) -> str:
            return f"ipv4:10.9.8.7:{self.port}"

    ours, theirs = SwarmKey("the swarm's key"), SwarmKey("another key")
    security = Security(key=ours)
    with caplog.at_level("WARNING", logger="nanoshard.security"):
        for port in (5000, 5001, 5002):  # (a new connection, a new port, each time)
            with pytest.raises(Unauthenticated, match="uses another key"):
                security.check(Call(theirs.token("n1"), port))
        security.check(Call(ours.token("n1"), 5003))  # (a good one says nothing)
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "refused a call from ipv4:10.9.8.7: bad swarm token: this swarm uses another key"
    ]


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


# ---- the coordinator's proof ------------------------------------------------------------


class Context:
    """What a server's guard reads of a call: its metadata."""

    def __init__(self, metadata) -> None:
        self.metadata = metadata

    def invocation_metadata(self):
        return self.metadata


def test_a_proof_fits_one_call_and_one_key() -> None:
    ours, theirs = Security(key=SwarmKey(KEY)), Security(key=SwarmKey("another swarm's key"))
    sent = ours.metadata()
    answered = Security(key=SwarmKey(KEY)).check_and_prove(Context(sent))  # the server's side
    assert [name for name, _ in answered] == [PROOF_KEY]
    ours.verify_proof(answered, sent, "127.0.0.1:1")  # proven: no error
    other_call = ours.metadata()  # another nonce
    with pytest.raises(Unauthenticated, match="its proof is wrong"):
        ours.verify_proof(answered, other_call, "127.0.0.1:1")
    theirs_sent = theirs.metadata()
    their_proof = theirs.check_and_prove(Context(theirs_sent))
    forged = ((PROOF_KEY, dict(their_proof)[PROOF_KEY]),)  # right nonce, another key
    with pytest.raises(Unauthenticated, match="its proof is wrong"):
        ours.verify_proof(forged, ((TOKEN_KEY, dict(theirs_sent)[TOKEN_KEY]),), "h:1")
    for garbage in ["", "zz", "é" * 64, b"\xff" * 64, dict(answered)[PROOF_KEY][:-1]]:
        with pytest.raises(Unauthenticated, match="its proof is wrong"):
            ours.verify_proof(((PROOF_KEY, garbage),), sent, "h:1")
    for missing in [(), None, (("nanoshard-other", "x"),)]:
        with pytest.raises(Unauthenticated) as err:
            ours.verify_proof(missing, sent, "127.0.0.1:7")
        assert re.fullmatch(STRANGER, str(err.value)), err.value
    # without a key there is nothing to prove, either way
    assert Security().check_and_prove(Context(())) == ()
    Security().verify_proof((), (), "h:1")


async def answers_of(server_security: Security, names: list[str]) -> tuple[list, list]:
    """Call a server guarded by ``server_security`` (a unary call, then a stream of one
    chunk per name; "fail" ends it with an error first) as a member of the swarm: what each
    call gave, or the error it raised."""

    async def status(request: cpb.StatusRequest, context) -> cpb.SwarmStatus:
        return cpb.SwarmStatus()

    async def chunks(request: cpb.FetchRequest, context):
        for name in request.names:
            if name == "fail":
                await rpc.abort(context, InvalidArgument("no such tensor"))
            yield cpb.TensorChunk(name=name)

    service = rpc.strict_service(
        "nanoshard.v1.Coordinator",
        {
            "GetStatus": ("unary", status, cpb.StatusRequest),
            "FetchTensors": ("server_stream", chunks, cpb.FetchRequest),
        },
        guard=server_security.check_and_prove,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((service,))
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    member = Security(key=SwarmKey(KEY))
    unary: list = []
    streamed: list = []
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = cpb_grpc.CoordinatorStub(channel)
            try:
                unary.append(await member.proven(stub.GetStatus, cpb.StatusRequest(), address))
            except (Unauthenticated, grpc.aio.AioRpcError) as exc:
                unary.append(exc)
            request = cpb.FetchRequest(names=names)
            try:
                async for chunk in member.proven_stream(stub.FetchTensors, request, address):
                    streamed.append(chunk.name)
            except (Unauthenticated, grpc.aio.AioRpcError) as exc:
                streamed.append(exc)
    finally:
        await server.stop(None)
    return unary, streamed


def test_calls_take_no_reply_from_a_coordinator_without_the_key() -> None:
    proving = Security(key=SwarmKey(KEY))
    unary, streamed = asyncio.run(answers_of(proving, ["a", "b"]))
    assert unary == [cpb.SwarmStatus()] and streamed == ["a", "b"]
    # a stranger (no key: any token passes) gets nothing of a stream past its door
    for names in [["a", "b"], []]:
        unary, streamed = asyncio.run(answers_of(Security(), names))
        for answer in (unary, streamed):
            assert len(answer) == 1 and isinstance(answer[0], Unauthenticated), answer
            assert re.fullmatch(STRANGER, str(answer[0])), answer
    # a stream that fails before its first reply raises its own error, not a missing proof
    _, streamed = asyncio.run(answers_of(Security(), ["fail"]))
    assert isinstance(streamed[0], grpc.aio.AioRpcError), streamed
    assert streamed[0].code() == grpc.StatusCode.INVALID_ARGUMENT


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


def test_the_coordinator_proves_the_key_to_members_only(keyed_swarm) -> None:
    coordinator, nodes = keyed_swarm
    member = Security(key=SwarmKey(KEY))
    card = CoordinatorClient(coordinator, security=member).card()  # (itself proven)
    fetch = cpb.FetchRequest(names=[card.units[0].tensors[0].name]).SerializeToString()
    with grpc.insecure_channel(coordinator) as channel:
        for method, kind, request in [
            ("GetStatus", "unary_unary", b""),
            ("FetchTensors", "unary_stream", fetch),
        ]:
            call = getattr(channel, kind)(f"/nanoshard.v1.Coordinator/{method}")
            sent = member.metadata()
            if kind == "unary_unary":
                _, answer = call.with_call(request, timeout=10, metadata=sent)
            else:
                answer = call(request, timeout=10, metadata=sent)
                assert list(answer)
            member.verify_proof(answer.initial_metadata(), sent, coordinator)
        # a stranger's token gets a refusal, and no proof to take away
        stranger = Security(key=SwarmKey("not this swarm's key"))
        status = channel.unary_unary("/nanoshard.v1.Coordinator/GetStatus")
        with pytest.raises(grpc.RpcError) as err:
            status(b"", timeout=10, metadata=stranger.metadata())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert PROOF_KEY not in dict(err.value.initial_metadata() or ())
    # nodes prove nothing (their callers' routes came from a coordinator that did)
    with grpc.insecure_channel(nodes[0]) as channel:
        info = channel.unary_unary("/nanoshard.v1.Node/Info")
        _, answer = info.with_call(b"", timeout=10, metadata=member.metadata())
        assert PROOF_KEY not in dict(answer.initial_metadata() or ())


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


# ---- a stranger's coordinator ---------------------------------------------------------


def test_a_volunteer_looking_by_mdns_passes_strangers_over(tmp_path: Path) -> None:
    """A coordinator without the key accepts any token. Announcing the swarm's name on
    mDNS, it is found first, and the volunteer passes it over at its first answer and looks
    on. The swarm's own then starts at that very address (as when a coordinator started
    without its key is restarted with it): the volunteer tries the address again once its
    pass is over, and joins it. A client looking by mDNS passes the stranger over too: it
    names it when it finds no other, and reaches the swarm's own once there is one. When a
    stranger's then takes that coordinator's address and the swarm's own restarts
    elsewhere, the volunteer passes the stranger over again and joins its own there."""
    name = f"stranger-{secrets.token_hex(4)}"
    passed = re.compile(re.escape("(passed over: looking on by mDNS for the swarm's own)"))
    own = ["--swarm", name, "--swarm-key", KEY, *STEADY]
    status = ["status", "--json", "--swarm", name, "--swarm-key", KEY]
    status += ["--mdns-interface", "127.0.0.1"]
    with Swarm() as swarm:
        stranger, address = swarm.coordinator("--swarm", name, "--state-dir", str(tmp_path / "s1"))
        volunteer = swarm.join("--swarm", name, "--swarm-key", KEY, "--cache-dir", str(tmp_path))
        volunteer.wait_for(passed)
        done = nanoshard(*status)
        assert done.returncode == 1, done.stderr
        assert re.fullmatch(f"nanoshard: error: {STRANGER}", done.stderr.strip()), done.stderr
        stranger.kill()
        first, _ = swarm.coordinator(*own, port=int(address.rsplit(":", 1)[1]))
        member = CoordinatorClient(address, security=Security(key=SwarmKey(KEY)))
        wait_until("the node serving", lambda: covered(member, 1), timeout=120)
        member.close()
        done = nanoshard(*status)
        assert done.returncode == 0, done.stderr
        assert len(json.loads(done.stdout)["nodes"]) == 1
        first.kill()
        port = int(address.rsplit(":", 1)[1])
        said = len(volunteer.lines)  # (it passed a stranger over at this address before)
        swarm.coordinator("--swarm", name, "--state-dir", str(tmp_path / "s2"), port=port)
        again = re.compile(STRANGER.replace(r"\d+", str(port)) + r" \(passed over")
        wait_until(
            "the stranger passed over again",
            lambda: any(again.search(line) for line in volunteer.lines[said:]),
            timeout=60,
        )
        _, moved = swarm.coordinator(*own)
        member = CoordinatorClient(moved, security=Security(key=SwarmKey(KEY)))
        wait_until("the node serving again", lambda: covered(member, 1), timeout=120)
        member.close()
        assert volunteer.popen.poll() is None, volunteer.output
        assert "Traceback" not in volunteer.output


def test_a_volunteer_stops_when_a_stranger_takes_its_coordinators_address(
    tmp_path: Path,
) -> None:
    """The coordinator a node joined is replaced at the same address by one without the
    key: the node's heartbeats reach it, and it stops instead of joining it."""
    with Swarm() as swarm:
        first, coordinator = swarm.coordinator("--swarm-key", KEY, "--no-mdns", *STEADY)
        volunteer = swarm.join(
            "--coordinator", coordinator, "--no-mdns", "--swarm-key", KEY,
            "--cache-dir", str(tmp_path),
        )  # fmt: skip
        member = CoordinatorClient(coordinator, security=Security(key=SwarmKey(KEY)))
        wait_until("the node serving", lambda: covered(member, 1), timeout=120)
        member.close()
        first.kill()
        port = int(coordinator.rsplit(":", 1)[1])
        swarm.coordinator("--no-mdns", *STEADY, port=port)
        assert volunteer.wait(timeout=120) == 1, volunteer.output
        assert re.fullmatch(f"nanoshard-node: error: {STRANGER}", volunteer.lines[-1]), (
            volunteer.output
        )
        assert "Traceback" not in volunteer.output


def test_a_client_with_the_key_refuses_a_strangers_coordinator() -> None:
    with Swarm() as swarm:
        _, coordinator = swarm.coordinator("--no-mdns")
        for command in [["status"], ["generate", "--max-new-tokens", "3", "ROMEO:"]]:
            done = nanoshard(*command, "--coordinator", coordinator, "--swarm-key", KEY)
            assert done.returncode == 1, done.stderr
            last = done.stderr.strip().splitlines()[-1]
            assert re.fullmatch(f"nanoshard: error: {STRANGER}", last), done.stderr
            assert "Traceback" not in done.stderr
        with pytest.raises(Unauthenticated, match=STRANGER):
            Client(coordinator, swarm_key=KEY)
        # without a key there is nothing to prove: an open swarm's clients are unchanged
        assert nanoshard("status", "--coordinator", coordinator).returncode == 0


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
        # nor does one speaking plaintext, which is told what is missing
        assert raw_call(coordinator, "Coordinator", "GetStatus") == grpc.StatusCode.UNAVAILABLE
        plain = nanoshard("status", "--coordinator", coordinator, "--swarm-key", KEY)
        assert plain.returncode == 1, plain.stderr
        assert plain.stderr.strip().splitlines()[-1] == (
            f"nanoshard: error: the coordinator at {coordinator} needs TLS: pass --tls-ca (the "
            "swarm's CA)"
        ), plain.stderr
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


def test_a_volunteer_without_the_ca_is_told_its_coordinator_needs_tls(
    tmp_path: Path,
) -> None:
    certs = tmp_path / "certs"
    assert nanoshard("certs", str(certs), "--hosts", "127.0.0.1").returncode == 0
    tls = ["--tls-cert", str(certs / "127.0.0.1.pem"), "--tls-key", str(certs / "127.0.0.1.key")]
    name = f"tls-{secrets.token_hex(4)}"
    with Swarm() as swarm:
        _, address = swarm.coordinator("--swarm", name, *tls, "--tls-ca", str(certs / "ca.pem"))
        found = swarm.join("--swarm", name, "--cache-dir", str(tmp_path / "n"))
        # given its address, the same (once retried for ever: its connection only closed)
        told = swarm.join("--coordinator", address, "--no-mdns", "--cache-dir", str(tmp_path / "m"))
        for volunteer in (found, told):
            assert volunteer.wait(timeout=120) == 1, volunteer.output
            assert volunteer.lines[-1] == (
                f"nanoshard-node: error: the coordinator at {address} needs TLS: pass "
                "--tls-ca (the swarm's CA), and --tls-cert/--tls-key for this node"
            ), volunteer.output


def test_certs_signs_more_hosts_only_with_the_folders_own_whole_ca(tmp_path: Path) -> None:
    """``nanoshard certs`` into a folder that holds a CA signs with it, and with nothing
    else: half a CA (``ca.key`` kept elsewhere), another CA's key, a file that is no PEM or
    a passphrase-protected key are each refused in one line, the files left as they were.
    It wrote a new CA over a ``ca.pem`` without its key (the swarm's nodes trust the old
    one), signed with a key that was not ``ca.pem``'s, or ended in a traceback."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_certs(a, ["127.0.0.1"])
    make_certs(b, ["127.0.0.1"])
    key = serialization.load_pem_private_key((a / "ca.key").read_bytes(), None)
    locked = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    cases = {
        "half": ((a / "ca.pem").read_bytes(), None, "holds a CA without ca.key"),
        "two": ((a / "ca.pem").read_bytes(), (b / "ca.key").read_bytes(), "is not the key of"),
        "junk": (b"junk\n", (a / "ca.key").read_bytes(), "is not a readable PEM certificate"),
        "locked": ((a / "ca.pem").read_bytes(), locked, "is not an unencrypted private key"),
    }
    for name, (pem, ca_key, said) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "ca.pem").write_bytes(pem)
        if ca_key is not None:
            (folder / "ca.key").write_bytes(ca_key)
        done = nanoshard("certs", str(folder), "--hosts", "127.0.0.2")
        assert done.returncode == 1 and said in done.stderr, (name, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert (folder / "ca.pem").read_bytes() == pem and not (folder / "127.0.0.2.pem").exists()
    # the folder's own whole CA signs one more host, and stays the same
    before = (a / "ca.pem").read_bytes()
    make_certs(a, ["127.0.0.2"])
    assert (a / "ca.pem").read_bytes() == before
    issued = x509.load_pem_x509_certificate((a / "127.0.0.2.pem").read_bytes())
    issued.verify_directly_issued_by(x509.load_pem_x509_certificate(before))


def test_a_tls_caller_at_a_plaintext_coordinator_is_told_it_does_not_serve_tls(
    tmp_path: Path,
) -> None:
    """The mirror of a plaintext caller at a TLS coordinator: a volunteer with TLS flags
    stops at once, and a client says so in one line. The volunteer retried forever and
    both blamed the certificate ("does not verify against --tls-ca")."""
    certs = tmp_path / "certs"
    make_certs(certs, ["127.0.0.1"])
    tls = ["--tls-cert", str(certs / "127.0.0.1.pem"), "--tls-key", str(certs / "127.0.0.1.key")]
    tls += ["--tls-ca", str(certs / "ca.pem")]
    with Swarm() as swarm:
        _, coordinator = swarm.coordinator("--no-mdns")
        status = nanoshard(
            "status", "--coordinator", coordinator, "--tls-ca", str(certs / "ca.pem")
        )
        assert status.returncode == 1, status.stderr
        (line,) = status.stderr.strip().splitlines()
        assert f"the coordinator at {coordinator}: it does not serve TLS: drop --tls-ca" in line
        node = swarm.join(
            "--coordinator", coordinator, "--no-mdns", *tls, "--cache-dir", str(tmp_path / "n")
        )
        assert node.wait(timeout=120) == 1, node.output
        assert node.lines[-1].endswith(
            f"the coordinator at {coordinator} does not serve TLS: drop --tls-ca, --tls-cert "
            "and --tls-key (a swarm's servers all serve TLS or none does)"
        ), node.output


def test_an_expired_certificate_is_refused_at_start(tmp_path: Path) -> None:
    """A server given an expired certificate (or a client an expired CA) says so at once:
    it served it, and every client then read that the certificate did not verify against
    its CA (another swarm's?), the expiry only at the end of gRPC's text."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    then = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(then)
        .not_valid_after(then + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "old.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "old.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(InvalidArgument, match=r"old\.pem expired on 2020-01-31"):
        Security(tls_cert=tmp_path / "old.pem", tls_key=tmp_path / "old.key")
    with pytest.raises(InvalidArgument, match=r"old\.pem expired on 2020-01-31"):
        Security(tls_ca=tmp_path / "old.pem")
