"""The data plane end to end: real node processes on loopback, driven over real gRPC."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import shutil
import signal
import socket
from pathlib import Path

import grpc
import psutil
import pytest
from routes import RouteSession, fixed_session
from swarm import LISTENING, Swarm, nanoshard, wait_until

from nanoshard import identity, rpc
from nanoshard.checkpoint import save_hf_checkpoint
from nanoshard.client.route import Route, route_from_addresses
from nanoshard.client.session import RetryPolicy
from nanoshard.config import GPTConfig
from nanoshard.engine import init_weights
from nanoshard.errors import InvalidArgument
from nanoshard.generation import generate
from nanoshard.hop import Channels
from nanoshard.node import links
from nanoshard.tokenizer import gpt2_bpe_dir
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

TINY = GPTConfig(block_size=256, vocab_size=50257, n_layer=4, n_head=2, n_embd=32)
PROMPT = "It was the best of times, it was the worst of times"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-block GPT-2 with GPT-2's own tokenizer files (6 units: 0:2, 2:4, 4:6)."""
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = tmp_path_factory.mktemp("gpt2-tokenizer")
    shutil.copy(gpt2_bpe_dir() / "encoder.json", tokenizer / "vocab.json")
    shutil.copy(gpt2_bpe_dir() / "vocab.bpe", tokenizer / "merges.txt")
    save_hf_checkpoint(TINY, init_weights(TINY, seed=3), directory, tokenizer_dir=tokenizer)
    return directory


@pytest.fixture(scope="module")
def tiny_chain(tiny_model: Path):
    with Swarm() as swarm:
        # sessions these tests leave open expire, but never while a test still uses them
        yield swarm.chain(str(tiny_model), ["0:2", "2:4", "4:6"], "--session-ttl", "120")


@pytest.fixture(scope="module")
def demo_chain():
    with Swarm() as swarm:
        yield swarm.chain("demo", ["0:3", "3:6", "6:8"])


def run_json(*args: str) -> dict:
    done = nanoshard("generate", *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize(
    "sampling", [["--temperature", "0"], ["--temperature", "0.9", "--top-k", "40", "--seed", "7"]]
)
def test_route_equals_local_tiny(
    tiny_model: Path, tiny_chain: list[str], sampling: list[str]
) -> None:
    common = ["--model", str(tiny_model), "--max-new-tokens", "100", *sampling, PROMPT]
    local = run_json("--local", *common)
    routed = run_json("--route", ",".join(tiny_chain), "--codec", "fp32", *common)
    assert routed["token_ids"] == local["token_ids"]
    assert len(local["token_ids"]) == 100
    assert routed["prompt_token_ids"] == local["prompt_token_ids"]
    assert [h["units"] for h in routed["hops"]] == [[0, 2], [2, 4], [4, 6]]
    assert all(h["steps"] == 100 for h in routed["hops"])
    assert routed["hops"][0]["bytes_out"] > 0 and routed["hops"][-1]["bytes_out"] == 0


def test_a_route_may_name_its_nodes_by_another_address(
    tiny_model: Path, tiny_chain: list[str]
) -> None:
    """``localhost:P`` for a node at 127.0.0.1:P: its signed traces name its own address,
    and are still its word (not a forgery by the hop before it)."""
    common = ["--model", str(tiny_model), "--max-new-tokens", "5", "--temperature", "0", PROMPT]
    by_hand = [a.replace("127.0.0.1", "localhost") for a in tiny_chain]
    routed = run_json("--route", ",".join(by_hand), *common)
    assert routed["token_ids"] == run_json("--local", *common)["token_ids"]


def test_a_route_given_another_model_is_refused(
    tiny_model: Path, tiny_chain: list[str], tmp_path: Path
) -> None:
    """``--model`` says what the route's nodes serve (its config and tokenizer): another
    model of the same depth but other shapes once generated garbage without a word."""
    wider = dataclasses.replace(TINY, n_embd=64)
    save_hf_checkpoint(
        wider, init_weights(wider, seed=3), tmp_path / "wider", tokenizer_dir=tiny_model
    )
    done = nanoshard(
        "generate", "--route", ",".join(tiny_chain), "--model", str(tmp_path / "wider"), PROMPT
    )
    assert done.returncode == 1, done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("nanoshard: error: the route's nodes serve another model than"), last


@pytest.mark.parametrize(
    "sampling", [["--temperature", "0"], ["--temperature", "0.8", "--seed", "11"]]
)
def test_route_equals_local_demo(demo_chain: list[str], sampling: list[str]) -> None:
    common = ["--max-new-tokens", "100", *sampling, "ROMEO:"]
    local = run_json("--local", *common)
    routed = run_json("--route", ",".join(demo_chain), *common)
    assert routed["token_ids"] == local["token_ids"]
    assert routed["text"] == local["text"]


def test_int8_agrees_with_fp32_on_demo(demo_chain: list[str]) -> None:
    common = [
        "--route",
        ",".join(demo_chain),
        "--max-new-tokens",
        "200",
        "--temperature",
        "0",
        "KING HENRY:",
    ]
    fp32 = run_json(*common, "--codec", "fp32")["token_ids"]
    int8 = run_json(*common, "--codec", "int8")["token_ids"]
    n = min(len(fp32), len(int8))
    assert n >= 150  # long enough to mean something, even if <|endoftext|> came early
    agree = sum(a == b for a, b in zip(fp32, int8, strict=False)) / max(len(fp32), len(int8))
    assert agree >= 0.95, (agree, fp32, int8)


# ---- talking to a live node directly -------------------------------------------------


def stub(address: str) -> pb_grpc.NodeStub:
    return pb_grpc.NodeStub(grpc.insecure_channel(address, options=rpc.channel_options()))


def spec(max_length: int = 64, codec: str = "fp32", client_share: bytes = b"") -> pb.SessionSpec:
    return pb.SessionSpec(
        session_id=secrets.token_bytes(16),
        max_length=max_length,
        codec=codec,
        sampling=pb.SamplingParams(temperature=0.0, top_p=1.0),
        client_share=client_share,
    )


def route_after(chain: list[str], first: int) -> list[pb.Hop]:
    units = [(0, 2), (2, 4), (4, 6)]
    return [
        pb.Hop(start=s, end=e, addresses=[a])
        for (s, e), a in list(zip(units, chain, strict=True))[first + 1 :]
    ]


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details(), dict(err.value.trailing_metadata() or ())


def test_bad_input_gets_a_status_and_the_node_keeps_serving(
    tiny_model: Path, tiny_chain: list[str]
) -> None:
    head, middle = stub(tiny_chain[2]), stub(tiny_chain[1])
    first = stub(tiny_chain[0])
    s = spec()
    first.Open(pb.OpenRequest(spec=s, route=route_after(tiny_chain, 0)), timeout=30)
    sid = s.session_id
    act = lambda n, codec="fp32", width=32, payload=None: pb.Activations(  # noqa: E731
        codec=codec,
        shape=[n, width],
        payload=payload if payload is not None else bytes(4 * n * width),
    )
    cases = {
        "unknown session": (
            middle.Step,
            pb.StepRequest(session_id=secrets.token_bytes(16), step_id=1, activations=act(1)),
            grpc.StatusCode.NOT_FOUND,
        ),
        "bad session id": (
            middle.Step,
            pb.StepRequest(session_id=b"xx", step_id=1, activations=act(1)),
            grpc.StatusCode.NOT_FOUND,
        ),
        "step id 0": (
            middle.Step,
            pb.StepRequest(session_id=sid, step_id=0, activations=act(1)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "tokens to a middle node": (
            middle.Step,
            pb.StepRequest(session_id=sid, step_id=1, tokens=pb.Tokens(ids=[1])),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "activations to the first node": (
            first.Step,
            pb.StepRequest(session_id=sid, step_id=1, activations=act(1)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "token outside the vocabulary": (
            first.Step,
            pb.StepRequest(session_id=sid, step_id=1, tokens=pb.Tokens(ids=[10**6])),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "no input": (
            middle.Step,
            pb.StepRequest(session_id=sid, step_id=1),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "wrong width": (
            middle.Step,
            pb.StepRequest(session_id=sid, step_id=1, activations=act(1, width=31)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "wrong codec": (
            middle.Step,
            pb.StepRequest(session_id=sid, step_id=1, activations=act(1, codec="fp16")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "unknown codec": (
            middle.Step,
            pb.StepRequest(session_id=sid, step_id=1, activations=act(1, codec="zip")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "truncated payload": (
            middle.Step,
            pb.StepRequest(session_id=sid, step_id=1, activations=act(2, payload=b"\0" * 100)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "NaN activations": (
            middle.Step,
            pb.StepRequest(
                session_id=sid, step_id=1, activations=act(1, payload=b"\xff\xff\xff\x7f" * 32)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "past max_length": (
            middle.Step,
            pb.StepRequest(session_id=sid, step_id=1, activations=act(65)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "sample without the head": (
            middle.Step,
            pb.StepRequest(
                session_id=sid, step_id=1, activations=act(1), sample=True, this_hop_only=True
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "route with a gap": (
            first.Open,
            pb.OpenRequest(spec=spec(), route=[pb.Hop(start=3, end=6, addresses=[tiny_chain[2]])]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "wrong position": (
            head.Step,
            pb.StepRequest(session_id=sid, step_id=1, pos=5, activations=act(1)),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        "max_length over context": (
            first.Open,
            pb.OpenRequest(spec=spec(max_length=10_000)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "bad sampling": (
            first.Open,
            pb.OpenRequest(
                spec=pb.SessionSpec(
                    session_id=secrets.token_bytes(16),
                    max_length=8,
                    codec="fp32",
                    sampling=pb.SamplingParams(top_p=2.0),
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "a client share of 5 bytes": (
            first.Open,
            pb.OpenRequest(spec=spec(client_share=b"short")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "a client share that is no X25519 key": (  # (a low-order point: no shared secret)
            head.Open,
            pb.OpenRequest(spec=spec(client_share=bytes(32)), start=4, end=6),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    }
    # steps of chunks (a shadow's catch-up) to a session ending at the middle node
    ends_here = spec()
    middle.Open(pb.OpenRequest(spec=ends_here, start=2, end=4), timeout=30)
    chunk = lambda pos, shape: pb.InputChunk(  # noqa: E731
        pos=pos, activations=pb.Activations(codec="fp32", shape=shape)
    )
    catch_up = lambda chunks: pb.StepRequest(  # noqa: E731
        session_id=ends_here.session_id, step_id=1, chunks=chunks, return_output=True
    )
    cases["a chunk without a shape"] = (
        middle.Step,
        catch_up([chunk(0, [])]),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    cases["more chunks than the session has positions"] = (
        middle.Step,
        catch_up([chunk(i, [1, 32]) for i in range(65)]),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    for name, (method, request, expected) in cases.items():
        code, details, trailers = code_of(lambda: method(request, timeout=30))  # noqa: B023
        assert code == expected, (name, code, details)
        assert details, name
        if expected == grpc.StatusCode.FAILED_PRECONDITION:
            assert trailers.get(rpc.KV_LENGTH_KEY) == "0", trailers

    # garbage bytes straight onto the wire, and a message over the size limit
    channel = grpc.insecure_channel(tiny_chain[1])
    raw = channel.unary_unary(
        "/nanoshard.v1.Node/Step", request_serializer=None, response_deserializer=None
    )
    code, _, _ = code_of(lambda: raw(b"\xff\xfe\x00garbage\x12\x99", timeout=30))
    assert code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    big = pb.StepRequest(session_id=sid, step_id=1, activations=act(1, payload=bytes(17 * 2**20)))
    code, _, _ = code_of(lambda: middle.Step(big, timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED

    # ... and everyone is still served: a valid generation through the same nodes
    route = route_from_addresses(tiny_chain)
    session = fixed_session(route, max_length=40)
    gen = generate(session, [464, 3290, 373], 20, block_size=TINY.block_size)
    session.close()
    assert len(gen.token_ids) == 20


def test_duplicate_step_is_answered_again_without_recompute(tiny_chain: list[str]) -> None:
    first = stub(tiny_chain[0])
    s = spec()
    hops = route_after(tiny_chain, 0)
    first.Open(pb.OpenRequest(spec=s, route=hops), timeout=30)
    req = pb.StepRequest(
        session_id=s.session_id,
        step_id=1,
        pos=0,
        tokens=pb.Tokens(ids=[1, 2, 3]),
        sample=True,
    )
    a = first.Step(req, timeout=30)
    b = first.Step(req, timeout=30)  # same step id and position: a duplicate
    assert a.has_token and a.token == b.token
    assert [h.handle.length for h in b.hops] == [3, 3, 3]
    assert a.SerializeToString() == b.SerializeToString()  # the very same reply
    late = pb.StepRequest(
        session_id=s.session_id,
        step_id=9,
        pos=0,
        tokens=pb.Tokens(ids=[1]),
        sample=True,
    )
    code, _, trailers = code_of(lambda: first.Step(late, timeout=30))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and trailers[rpc.KV_LENGTH_KEY] == "3"
    first.Close(pb.CloseRequest(session_id=s.session_id), timeout=30)


def test_the_head_macs_every_step_and_signs_what_a_check_may_compare(
    tiny_chain: list[str],
) -> None:
    """With a session key that the client takes (``mac_only``), the head MACs every step's
    trace but signs only a prefill chunk (no token: the client checks it by signature) and
    a step that asks for its output (a check point); a decode step's token is proven by the
    MAC alone. A client that does not take the key gets every step signed. Every other hop
    signs every step."""
    share = identity.SessionShare()
    s = spec(client_share=share.share)
    keys = [hop.public_keys[0] for hop in route_from_addresses(tiny_chain).hops]
    first = stub(tiny_chain[0])
    opened = first.Open(pb.OpenRequest(spec=s, route=route_after(tiny_chain, 0)), timeout=30)
    mac_key = share.client_key(s.session_id, opened.session_key.share)

    def step(step_id: int, pos: int, ids: list[int], **flags: bool) -> pb.StepReply:
        req = pb.StepRequest(
            session_id=s.session_id, step_id=step_id, pos=pos, tokens=pb.Tokens(ids=ids), **flags
        )
        return first.Step(req, timeout=30)

    prefill = step(1, 0, [1, 2, 3], mac_only=True)
    decode = step(2, 3, [5], sample=True, mac_only=True)
    check = step(3, 4, [decode.token], sample=True, return_output=True, mac_only=True)
    unmaced = step(4, 5, [check.token], sample=True)
    for reply, pos, n, head_signed in ((prefill, 0, 3, True), (decode, 3, 1, False),
                                       (check, 4, 1, True), (unmaced, 5, 1, True)):  # fmt: skip
        assert len(reply.hops) == 3
        assert identity.step_maced(mac_key, s.session_id, pos, n, reply.hops[-1])
        signed = [
            identity.step_signed(k, s.session_id, pos, n, h)
            for k, h in zip(keys, reply.hops, strict=True)
        ]
        assert signed == [True, True, head_signed], (pos, signed)
        assert bool(reply.hops[-1].signature) == head_signed
    first.Close(pb.CloseRequest(session_id=s.session_id), timeout=30)


def test_kv_budget_refuses_at_once_and_memory_returns(tiny_model: Path) -> None:
    # Two nodes: on the first no session can expire while the test counts (whatever the
    # machine's speed); on the second one expires by itself (TTL 1 s).
    budget = ["--kv-memory", "600K"]
    with Swarm() as swarm:
        procs = [
            swarm.start(Swarm.serve_args(str(tiny_model), "0:6", *budget, "--session-ttl", ttl))
            for ttl in ("600", "1")
        ]
        node, expiring = (stub(p.wait_for(LISTENING).group(1)) for p in procs)
        info = node.Info(pb.InfoRequest(), timeout=30)
        assert info.kv_bytes_used == 0 and info.kv_bytes_budget == 600 * 1024
        opened = []
        for _ in range(2):  # 4 blocks x (k, v) x 256 positions x 32 wide x 4 bytes = 256 KiB each
            s = spec(max_length=256)
            node.Open(pb.OpenRequest(spec=s), timeout=30)
            opened.append(s.session_id)
        assert node.Info(pb.InfoRequest(), timeout=30).kv_bytes_used == 2 * 262144
        code, details, _ = code_of(
            lambda: node.Open(pb.OpenRequest(spec=spec(max_length=256)), timeout=30)
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "budget" in details
        assert node.Close(pb.CloseRequest(session_id=opened[0]), timeout=30).closed
        assert node.Info(pb.InfoRequest(), timeout=30).kv_bytes_used == 262144

        # an idle session expires after its TTL, and its memory returns
        for _ in range(2):
            expiring.Open(pb.OpenRequest(spec=spec(max_length=256)), timeout=30)

        def freed() -> bool:
            info = expiring.Info(pb.InfoRequest(), timeout=30)
            return info.kv_bytes_used == 0 and info.sessions == 0

        wait_until("the idle sessions to expire (TTL 1 s)", freed, timeout=15, every=0.2)
        expiring.Open(pb.OpenRequest(spec=spec(max_length=256)), timeout=30)  # room again


def test_lost_hop_is_refilled_from_replay_material(tiny_model: Path) -> None:
    """The middle node dies; its replica (named in the route the session was opened with)
    gets exactly what it lacks from the hop before (no recomputation upstream) and the
    generation goes on with the same tokens."""
    prompt = [464, 3290, 373, 257, 1332]
    with Swarm() as swarm:
        a, b, c = swarm.chain(str(tiny_model), ["0:2", "2:4", "4:6"])
        _, b2 = swarm.node(str(tiny_model), "2:4")
        reference_route = route_from_addresses([a, b, c])
        ref = fixed_session(reference_route, max_length=60)
        expected = generate(ref, prompt, 40, block_size=TINY.block_size).token_ids
        ref.close()

        hops = reference_route.hops
        route = Route([hops[0], pb.Hop(start=2, end=4, addresses=[b, b2]), hops[2]], 6)
        session = fixed_session(route, max_length=60)
        tokens: list[int] = []
        result = session.step(prompt, 0)
        for _ in range(20):
            tokens.append(result.token)
            result = session.step([result.token], len(prompt) + len(tokens) - 1)
        assert [h["address"] for h in result.hops] == [a, b, c]
        middle = swarm.serving(b)
        middle.kill()
        while len(tokens) < 40:
            tokens.append(result.token)
            if len(tokens) == 40:
                break
            result = session.step([result.token], len(prompt) + len(tokens) - 1)
            if len(tokens) == 21:  # the first step after the loss: the replica was refilled
                assert [h["address"] for h in result.hops] == [a, b2, c]
                assert [h["kv_length"] for h in result.hops] == [len(prompt) + 21] * 3
                assert f"refilled {b2} from 0 to {len(prompt) + 20}" in result.hops[0]["repair"]
        session.close()
        assert tokens == expected


def links_to(pid: int, address: str) -> set[int]:
    """The local ports of the TCP connections process ``pid`` holds open to ``address``
    (gRPC's sockets are IPv6 ones: 127.0.0.1 reads ::ffff:127.0.0.1)."""
    host, port = address.rsplit(":", 1)
    proc = psutil.Process(pid)
    held = (
        proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
    )
    return {
        c.laddr.port
        for c in held
        if c.raddr
        and c.raddr.port == int(port)
        and c.raddr.ip in (host, f"::ffff:{host}")
        and c.status == psutil.CONN_ESTABLISHED
    }


def hang_the_last_hop(
    tiny_model: Path, back_once_cut: bool = False, **options: object
) -> tuple[list, str, str, str]:
    """A greedy generation of 30 tokens along a 3-hop route whose last hop has a replica;
    after 10 tokens its node hangs (SIGSTOP: its connections stay open, nothing answers).
    The tokens must be those of a run without the hang. With ``back_once_cut``, the node
    stays hung until the middle node's keepalive has cut every connection it had to it
    (a close sent on one of them is lost with it), then comes back (SIGCONT) and must
    free the session. Returns the session's recoveries from the hang on, the first node,
    the hung one and its replica."""
    prompt = [464, 3290, 373, 257, 1332]
    with Swarm() as swarm:
        a, b, c = swarm.chain(str(tiny_model), ["0:2", "2:4", "4:6"])
        _, c2 = swarm.node(str(tiny_model), "4:6")
        hops = route_from_addresses([a, b, c]).hops
        route = Route([hops[0], hops[1], pb.Hop(start=4, end=6, addresses=[c, c2])], 6)
        ref = fixed_session(route, max_length=60)
        expected = generate(ref, prompt, 30, block_size=TINY.block_size).token_ids
        ref.close()

        retry = RetryPolicy(attempts=2, backoff_s=0.01)
        session = RouteSession(route, 60, retry=retry, **options)
        tokens: list[int] = []
        result = session.step(prompt, 0)
        for _ in range(10):
            tokens.append(result.token)
            result = session.step([result.token], len(prompt) + len(tokens) - 1)
        # The node serving the last hop now hangs (b may have left c for c2 already: a
        # link leaves a node whose steps slow down, and a busy host slows a tiny model's
        # steps many times over); what happened before the hang is not this test's.
        assert [h["address"] for h in result.hops][:2] == [a, b]
        serving = result.hops[2]["address"]
        c, c2 = (c, c2) if serving == c else (c2, c)
        before = len(session.recoveries)
        last = swarm.serving(c)
        middle = swarm.serving(b).popen.pid
        hung_links = links_to(middle, c)
        assert hung_links, f"{b} holds no connection to {c}"
        last.popen.send_signal(signal.SIGSTOP)  # (the swarm kills it, SIGCONT too)
        while len(tokens) < 30:
            tokens.append(result.token)
            if len(tokens) < 30:
                result = session.step([result.token], len(prompt) + len(tokens) - 1)
        assert [h["address"] for h in result.hops] == [a, b, c2]
        session.close()
        if back_once_cut:
            wait_until(
                f"{b}'s keepalive to cut its connections to {c}, hung",
                lambda: not links_to(middle, c) & hung_links,
            )
            last.popen.send_signal(signal.SIGCONT)
            wait_until(
                f"{c}, back, to free the session",
                lambda: stub(c).Info(pb.InfoRequest(), timeout=10).sessions == 0,
            )
    assert tokens == expected
    return session.recoveries[before:], a, c, c2


def test_a_silent_hop_is_named_by_the_node_before_it_not_by_the_client(
    tiny_model: Path,
) -> None:
    """Each step carries how long its caller waits and every node gives the hops after it
    less, so when a node hangs, the node before it gives up first and names it (here the
    client's 8 s come before the connection's ping timeout); the client hears whom to
    avoid and tries again, the middle node goes to the hop's replica (refilled), and the
    generation goes on with the same tokens. Before, the client's own deadline came first
    and it blamed the first node, which was fine."""
    (retried, repaired), a, c, c2 = hang_the_last_hop(tiny_model, timeout_s=8.0)
    # the middle node's word reached the client, which blamed nobody of its own ...
    assert retried.kind == "retry", retried
    assert f"{c}: no answer to the step" in retried.detail, retried.detail
    assert f"{a}: no answer" not in retried.detail, retried.detail
    # ... and the middle node moved to the replica when the step came again
    assert repaired.kind == "repair" and f"refilled {c2} from 0" in repaired.detail


def test_a_node_left_hung_frees_the_session_once_back_though_its_connection_was_cut(
    tiny_model: Path,
) -> None:
    """The middle node leaves the hung last hop within the step's time (8 s), long before
    its keepalive cuts the connection: the close of the session there goes out on that
    connection, still open, and is lost with it once cut. It is sent again, so the node,
    back, frees the session; it kept it, and its KV memory, until its TTL (300 s), and
    refused a later failover onto it ("KV memory budget full")."""
    (retried, _), _, c, _ = hang_the_last_hop(tiny_model, back_once_cut=True, timeout_s=8.0)
    assert f"{c}: no answer to the step" in retried.detail, retried.detail


def test_a_hung_hop_is_cut_by_its_ping_and_replaced_within_the_step(tiny_model: Path) -> None:
    """With the client's default timeout (60 s) a hung node is found by its connection's
    ping, unanswered for rpc.PING_TIMEOUT_S, long before any step's deadline: the node before
    it moves to the hop's replica (refilled) inside the same step, and the client retries
    nothing."""
    (repaired,), _, c, c2 = hang_the_last_hop(tiny_model)
    assert repaired.kind == "repair", repaired
    assert f"{c}: no answer to a ping in {rpc.PING_TIMEOUT_S} s" in repaired.detail, repaired
    assert f"refilled {c2} from 0" in repaired.detail, repaired


def test_a_quota_at_a_later_hop_is_routed_around_not_the_users_refusal() -> None:
    """At a later hop a quota's caller is the node before it, not the user: its refusal is
    that hop being full for the relay, so the client re-plans around it (and the step
    goes through another node), instead of answering the user a refusal of theirs."""
    with Swarm() as swarm:
        a = swarm.node("demo", "0:3")[1]
        c = swarm.node("demo", "3:8", "--quota-tokens-per-minute", "20")[1]
        c2 = swarm.node("demo", "3:8")[1]
        asked: list[list[str]] = []

        def planner(avoid: list[str]) -> Route:
            asked.append(sorted(avoid))
            last = c2 if c in avoid else c
            first = pb.Hop(start=0, end=3, addresses=[a])
            return Route([first, pb.Hop(start=3, end=8, addresses=[last])], 8)

        retry = RetryPolicy(attempts=2, backoff_s=0.01)
        session = RouteSession(None, 64, planner=planner, retry=retry)
        result = session.step(list(range(100, 130)), 0)  # 30 positions: over c's 20 a minute
        session.close()
    assert [h["address"] for h in result.hops] == [a, c2]
    assert asked == [[], [c]]
    (rerouted,) = session.recoveries
    assert rerouted.kind == "reroute" and "tokens per minute" in rerouted.detail


def test_int8_weights_on_nodes_equal_local_int8(tiny_model: Path) -> None:
    """`--dtype int8` nodes (weight-only int8) say so in Info and give exactly the local
    int8 path's tokens: quantization is per stage, so the split does not change it."""
    with Swarm() as swarm:
        chain = swarm.chain(str(tiny_model), ["0:3", "3:6"], "--dtype", "int8")
        info = stub(chain[0]).Info(pb.InfoRequest(), timeout=10)
        assert info.dtype == "int8"
        common = ["--model", str(tiny_model), "--max-new-tokens", "40", PROMPT]
        local = run_json("--local", "--dtype", "int8", *common)
        routed = run_json("--route", ",".join(chain), *common)
    assert routed["token_ids"] == local["token_ids"]


def test_a_session_whose_first_node_died_opens_on_a_new_route(tiny_chain: list[str]) -> None:
    """A node can die after the coordinator planned a route through it and before its
    heartbeat times out: opening the session asks for a route avoiding it, not fail."""
    live = route_from_addresses(tiny_chain)
    with socket.socket() as s:  # a port nobody listens on: a node that just died
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    stale = Route([pb.Hop(start=0, end=2, addresses=[dead]), *live.hops[1:]], live.n_units)
    asked: list[list[str]] = []

    def planner(avoid: list[str]) -> Route:
        asked.append(avoid)
        return live

    session = RouteSession(stale, 40, planner=planner, retry=RetryPolicy(backoff_s=0.01))
    gen = generate(session, [464, 3290, 373], 20, block_size=TINY.block_size)
    session.close()
    assert asked == [[dead]]
    expected = fixed_session(live, max_length=40)
    assert gen.token_ids == generate(expected, [464, 3290, 373], 20, block_size=256).token_ids
    expected.close()


def test_closing_this_hop_only_leaves_the_later_hops_their_session(tiny_chain: list[str]) -> None:
    """What a client does when it moves its first hop to a replica: the old first hop frees
    the session, the later hops keep it for the new one."""
    s = spec()
    stub(tiny_chain[0]).Open(pb.OpenRequest(spec=s, route=route_after(tiny_chain, 0)), timeout=30)

    def close(address: str, this_hop_only: bool = False) -> bool:
        request = pb.CloseRequest(session_id=s.session_id, this_hop_only=this_hop_only)
        return stub(address).Close(request, timeout=30).closed

    assert close(tiny_chain[0], this_hop_only=True)
    assert not close(tiny_chain[0])  # gone from the first hop ...
    assert close(tiny_chain[1])  # ... kept at the second (whose Close reaches the third)
    assert not close(tiny_chain[2])


def test_a_hop_may_enter_a_stage_part_way_and_leave_it_early(
    tiny_model: Path, tiny_chain: list[str]
) -> None:
    """Routes chain overlapping stages: a node holding the whole model serves the hop
    [2, 4) of a route, between two nodes of other stages, as the coordinator may plan."""
    with Swarm() as swarm:
        _, whole = swarm.node(str(tiny_model), "0:6")
        hops = [
            pb.Hop(start=0, end=2, addresses=[tiny_chain[0]]),
            pb.Hop(start=2, end=4, addresses=[whole]),
            pb.Hop(start=4, end=6, addresses=[tiny_chain[2]]),
        ]
        session = fixed_session(Route(hops, 6), max_length=40)
        got = generate(session, [464, 3290, 373], 20, block_size=TINY.block_size)
        session.close()
    reference = fixed_session(route_from_addresses(tiny_chain), max_length=40)
    expected = generate(reference, [464, 3290, 373], 20, block_size=TINY.block_size)
    reference.close()
    assert got.token_ids == expected.token_ids


def test_a_node_measures_its_links_to_peers_by_ping(tiny_chain: list[str]) -> None:
    """``node/links.py`` against real nodes: a round trip and a bandwidth per peer, peers
    that do not answer left unmeasured, and an oversized ping refused."""
    own, peer = tiny_chain[0], tiny_chain[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"

    async def run() -> None:
        channels = Channels()
        rtt, rate = await links.round_trip(channels, peer)
        assert 0 < rtt < 1000 and rate > 1e6  # loopback: well under a second, over 1 MB/s
        measured = links.PeerLinks(channels, own)
        measured.want([own, peer, dead])  # (its own address is not a peer)
        assert measured.peers == [peer, dead]
        assert measured._task is not None
        await measured._task
        (report,) = measured.report()
        assert report.address == peer and report.rtt_ms > 0 and report.self_rtt_ms > 0
        measured.want([dead])  # a peer no longer listed is forgotten
        assert measured.report() == []
        await measured.close()
        with pytest.raises(InvalidArgument, match="at most"):
            big = pb.PingRequest(payload=bytes(links.PING_MAX_BYTES + 1))
            await channels.call(peer, "Ping", big, 5.0)
        await channels.close()

    asyncio.run(run())


def test_a_node_serves_every_rpc_of_its_wire(tiny_chain: list[str]) -> None:
    """Each method in node.proto's service answers (an empty request may be refused, but
    never as UNIMPLEMENTED: the node's handler table lists every method)."""
    service = pb.DESCRIPTOR.services_by_name["Node"]
    with grpc.insecure_channel(tiny_chain[0]) as channel:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            try:
                if method.client_streaming:
                    list(channel.stream_stream(path)(iter([b""]), timeout=10))
                else:
                    channel.unary_unary(path)(b"", timeout=10)
            except grpc.RpcError as err:
                assert err.code() != grpc.StatusCode.UNIMPLEMENTED, method.name
