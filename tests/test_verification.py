"""Verification a stranger cannot game: node identities (keys, derived ids, join proofs),
signed steps, and exclusion only on a node's own signed word that the coordinator's re-run
contradicts (``nanoshard/identity.py``, ``coordinator/arbiter.py``, ``ReportCheck``)."""

from __future__ import annotations

import asyncio
import functools
import re
import secrets
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from routes import RouteSession
from swarm import Swarm

from nanoshard import agreement, identity
from nanoshard.checkpoint import open_checkpoint
from nanoshard.client.route import Route, route_from_addresses
from nanoshard.client.session import HeadKey, RetryPolicy, SwarmSession, _forged_trace
from nanoshard.coordinator.exclusions import ExclusionStore
from nanoshard.coordinator.model import ModelStore
from nanoshard.coordinator.registry import Capacity, NodeRecord, Registry
from nanoshard.coordinator.service import REPORTS_PER_MIN, CoordinatorService
from nanoshard.coordinator.trust import PROBATION_PASSES, suggested_rate
from nanoshard.errors import FailedPrecondition, InvalidArgument, Unavailable
from nanoshard.generation import LocalSession, generate
from nanoshard.identity import NodeKey
from nanoshard.sampling import SamplingParams
from nanoshard.v1 import coordinator_pb2 as cpb
from nanoshard.v1 import node_pb2 as pb


def test_a_key_is_kept_per_folder_and_locked_per_process(tmp_path: Path) -> None:
    first = NodeKey.load(tmp_path)
    second = NodeKey.load(tmp_path)  # another node on the same folder meanwhile
    assert first.node_id != second.node_id
    assert first.node_id == identity.node_id_of(first.public_key) and len(first.node_id) == 32
    first.close()
    again = NodeKey.load(tmp_path)  # a restart: the same identity
    assert again.node_id == first.node_id
    assert (tmp_path / "node.key").stat().st_mode & 0o777 == 0o600
    # a key file held by another process is not taken
    held = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from nanoshard.identity import NodeKey; k = NodeKey.load(Path(sys.argv[1])); "
         "print(k.node_id, flush=True); time.sleep(30)", str(tmp_path / "other")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        theirs = held.stdout.readline().strip() if held.stdout else ""
        assert NodeKey.load(tmp_path / "other").node_id != theirs
    finally:
        held.kill()
        held.wait()


def test_a_key_file_that_is_no_key_is_refused_with_its_path(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    (keys / "node.key").mkdir(parents=True)  # a folder in its place
    with pytest.raises(FailedPrecondition, match=r"cannot keep this node's key in .*node\.key"):
        NodeKey.load(keys)
    (keys / "node.key").rmdir()
    (keys / "node.key").write_text("garbage\n")
    with pytest.raises(InvalidArgument, match=r"node\.key does not hold an Ed25519 key in PEM"):
        NodeKey.load(keys)


def test_a_signed_step_binds_its_session_positions_stage_and_digests() -> None:
    key = NodeKey.generate()
    sid = secrets.token_bytes(16)
    trace = pb.HopTrace(start=0, end=3, input_digest=b"i" * 32)
    trace.output_digest = identity.output_digest(None, 42)
    identity.sign_step(key, sid, 5, 1, trace)
    assert identity.step_signed(key.public_key, sid, 5, 1, trace)
    assert not identity.step_signed(key.public_key, sid, 6, 1, trace)  # another position
    assert not identity.step_signed(NodeKey.generate().public_key, sid, 5, 1, trace)
    forged = pb.HopTrace()
    forged.CopyFrom(trace)
    forged.output_digest = identity.output_digest(None, 43)  # another token
    assert not identity.step_signed(key.public_key, sid, 5, 1, forged)
    forged.CopyFrom(trace)
    forged.end = 4
    assert not identity.step_signed(key.public_key, sid, 5, 1, forged)
    assert not identity.verify(b"short", trace.signature, b"")


def checking_session(n: int) -> tuple[list[NodeKey], list[str], SwarmSession]:
    """A client session on a route of ``n`` one-unit hops with keys, opened (an id, the
    route's keys) without any node: its checks of traces, run by hand."""
    keys = [NodeKey.generate() for _ in range(n)]
    addresses = [f"10.0.0.{i + 1}:1" for i in range(n)]
    hops = [
        pb.Hop(start=i, end=i + 1, addresses=[a], public_keys=[k.public_key])
        for i, (a, k) in enumerate(zip(addresses, keys, strict=True))
    ]
    session = SwarmSession(None, Route(hops, n), SamplingParams(), 16)  # type: ignore[arg-type]
    session.session_id = secrets.token_bytes(16)
    session._keys = session.route.keys()  # type: ignore[union-attr]
    return keys, addresses, session


def test_a_relays_forged_trace_fails_the_next_step_and_a_forged_token_its_own() -> None:
    """The client checks the head's trace (it vouches for the token) before answering the
    token, and a followed hop's (spot-checks compare it) while the next step is on its way:
    a relay that rewrote one fails that next step, naming itself and the hops before it.
    The trace of a hop nobody follows vouches for nothing the client uses: not checked."""
    keys, addresses, session = checking_session(3)
    sid = session.session_id

    def reply(pos: int, token: int) -> pb.StepReply:
        r = pb.StepReply(has_token=True, token=token)
        for i, (a, k) in enumerate(zip(addresses, keys, strict=True)):
            trace = pb.HopTrace(address=a, start=i, end=i + 1, input_digest=bytes([i]) * 32)
            trace.output_digest = identity.output_digest(None, token) if i == 2 else b"o" * 32
            identity.sign_step(k, sid, pos, 1, trace)
            r.hops.append(trace)
        return r

    good = reply(5, 42)
    session._check_signatures(good, 5, 1, followed=[0, 1])
    session._check_pending()
    session._raise_forged()  # all three are their nodes' word

    relayed = reply(6, 42)
    relayed.hops[1].output_digest = b"x" * 32  # the first hop rewrote the second's trace
    session._check_signatures(relayed, 6, 1, followed=[0])
    session._check_pending()
    session._raise_forged()  # the second hop is not followed: its trace vouches for nothing
    session._check_signatures(relayed, 6, 1, followed=[1])  # the token is the head's word
    session._check_pending()  # ... and the next step finds the forgery
    with pytest.raises(Unavailable, match=re.escape("relayed by 10.0.0.1:1")) as caught:
        session._raise_forged()
    assert caught.value.failed == addresses[:2]
    session._raise_forged()  # reported once

    token = reply(7, 42)
    token.token = 43  # a relay rewrote the token itself: refused before it is answered
    with pytest.raises(Unavailable, match=re.escape("a trace of 10.0.0.3:1")):
        session._check_signatures(token, 7, 1)


def test_the_head_and_the_client_share_a_session_key_no_relay_can_swap() -> None:
    """The client opens with an X25519 share; the head answers its own, signed with its node
    key; both derive one key. A share signed by another key, or by a node that is not the
    route's head, is not used (the head's traces are then checked by signature alone). A
    replica the hop before the head moved to tells its share in its first trace: the
    client takes its tokens on the MAC from then on."""
    keys, addresses, session = checking_session(2)
    sid = session.session_id
    client = session._share.share
    head = identity.SessionShare()

    def told(address: str, signer: NodeKey, share: bytes = head.share) -> pb.SessionKey:
        statement = identity.session_key_statement(sid, client, share)
        return pb.SessionKey(address=address, share=share, signature=signer.sign(statement))

    key = head.head_key(sid, client)
    assert session._mac_key(told(addresses[1], keys[1])) == (addresses[1], head.share, key)
    assert session._mac_key(told(addresses[1], keys[0])) is None  # a relay's own share
    assert session._mac_key(told(addresses[0], keys[0])) is None  # not the head
    assert session._mac_key(told(addresses[1], keys[1], share=bytes(32))) is None  # no key
    with pytest.raises(InvalidArgument, match="X25519"):
        head.head_key(sid, b"short")

    session._mac = session._mac_key(told(addresses[1], keys[1]))
    replica, moved = NodeKey.generate(), identity.SessionShare()
    last = session.route.hops[-1]  # type: ignore[union-attr]
    last.addresses.append("10.0.0.9:1")
    last.public_keys.append(replica.public_key)
    session._keys = session.route.keys()  # type: ignore[union-attr]

    def reply(pos: int, signer: NodeKey, key: pb.SessionKey) -> pb.StepReply:
        r = pb.StepReply(has_token=True, token=42)
        first = pb.HopTrace(address=addresses[0], start=0, end=1, input_digest=b"i" * 32)
        first.output_digest = b"o" * 32
        identity.sign_step(keys[0], sid, pos, 1, first)
        trace = pb.HopTrace(address="10.0.0.9:1", start=1, end=2, input_digest=b"j" * 32)
        trace.output_digest = identity.output_digest(None, 42)
        identity.sign_step(signer, sid, pos, 1, trace, moved.head_key(sid, client))
        trace.signature = b"s" * 64  # taken on the MAC alone, or not at all
        trace.session_key.CopyFrom(key)
        r.hops.extend([first, trace])
        return r

    with pytest.raises(Unavailable, match="signature does not hold"):  # a relay's share
        session._check_signatures(reply(5, replica, told("10.0.0.9:1", keys[0], moved.share)), 5, 1)
    assert session._mac is not None and session._mac.address == addresses[1]
    session._check_signatures(reply(5, replica, told("10.0.0.9:1", replica, moved.share)), 5, 1)
    assert session._mac is not None and session._mac.address == "10.0.0.9:1"


def test_the_heads_token_is_taken_on_its_mac_and_judged_by_signature_without_it() -> None:
    """A head trace carrying the session key's MAC is its word without a signature check;
    one whose MAC fails (a relay's rewrite, a head restarted with a new key) is judged by
    its signature. A followed head taken on its MAC has its check point's signature checked
    while the next step travels: the evidence spot-checks rest on is still the signature.
    It signs no other decode step (their MAC is the token's proof, and no check compares
    them): their signatures are not checked."""
    keys, addresses, session = checking_session(2)
    sid, route_keys = session.session_id, session._keys
    mac_key = secrets.token_bytes(32)
    session._mac = HeadKey(addresses[1], b"", mac_key)

    def reply(pos: int, token: int, mac: bytes | None = mac_key) -> pb.StepReply:
        r = pb.StepReply(has_token=True, token=token)
        for i, (a, k) in enumerate(zip(addresses, keys, strict=True)):
            trace = pb.HopTrace(address=a, start=i, end=i + 1, input_digest=bytes([i]) * 32)
            trace.output_digest = identity.output_digest(None, token) if i == 1 else b"o" * 32
            identity.sign_step(k, sid, pos, 1, trace, mac if i == 1 else None)
            r.hops.append(trace)
        return r

    unsigned = reply(5, 42)
    unsigned.hops[1].signature = b"s" * 64  # the MAC alone holds
    assert identity.step_maced(mac_key, sid, 5, 1, unsigned.hops[1])
    session._check_signatures(unsigned, 5, 1)
    forged = functools.partial(_forged_trace, sid, route_keys, unsigned, 1, 5, 1)
    assert forged(session._mac) is None
    assert forged(None) is not None  # by signature alone it is caught
    # a MAC of another head's session
    assert forged(HeadKey(addresses[0], b"", mac_key)) is not None
    session._check_signatures(unsigned, 5, 1, followed=[1])  # not a check point: the MAC
    session._check_pending()
    session._raise_forged()
    session._check_signatures(unsigned, 5, 1, followed=[1], check_point=True)  # taken now ...
    session._check_pending()
    with pytest.raises(Unavailable, match=re.escape("a trace of 10.0.0.2:1")):
        session._raise_forged()  # ... and its signature found wrong before the next step

    restarted = reply(6, 42, mac=secrets.token_bytes(32))  # its MAC fails, its signature holds
    session._check_signatures(restarted, 6, 1)
    rewritten = reply(7, 42)
    rewritten.token = 43  # a relay rewrote the token: the digest holds neither MAC nor token
    with pytest.raises(Unavailable, match=re.escape("relayed by 10.0.0.1:1")):
        session._check_signatures(rewritten, 7, 1)
    rewritten = reply(8, 42)
    rewritten.token = 43
    rewritten.hops[1].output_digest = identity.output_digest(None, 43)  # ... and the digest
    with pytest.raises(Unavailable, match=re.escape("relayed by 10.0.0.1:1")):
        session._check_signatures(rewritten, 8, 1)


# ---- the coordinator: reports and the evidence they carry ------------------------------


class Context:
    def __init__(self, peer: str = "ipv4:203.0.113.7:5555") -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple:
        return ()

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass


@pytest.fixture(scope="module")
def demo() -> tuple[ModelStore, Any]:
    store = ModelStore.open("demo")
    return store, open_checkpoint("demo")


def swarm_of_three(
    store: ModelStore, clock: Any = time.monotonic
) -> tuple[CoordinatorService, dict[str, NodeKey]]:
    """A coordinator whose registry holds three honest nodes, each serving the whole model."""
    registry = Registry(store.config, replicas=2, tp="off")
    keys = {}
    for i in range(3):
        key = NodeKey.generate()
        address = f"10.0.0.{i + 1}:7961"
        keys[address] = key
        record = NodeRecord(
            node_id=key.node_id, name=f"n{i}", address=address,
            capacity=Capacity("cpu", "fp32", 2**30, 1.0, 1.0), last_heartbeat=0.0,
            public_key=key.public_key,
        )  # fmt: skip
        registry.join(record)
    svc = CoordinatorService(store, registry, swarm="default", heartbeat_interval_s=2.0,
                             epoch=b"\0" * 8, clock=clock)  # fmt: skip
    return svc, keys


@functools.cache
def whole(ckpt: Any) -> Any:
    return ckpt.load_stage(0, ckpt.config.n_units)


def honest_step(ckpt: Any, key: NodeKey, ids: list[int], perturb: float = 0.0) -> dict:
    """What a node serving the whole model answers for a first step of ``ids`` (the head's
    logits returned, as a check asks), signed by ``key``; ``perturb`` makes it lie."""
    n = ckpt.config.n_units
    stage = whole(ckpt)
    with torch.inference_mode():
        logits = stage(torch.tensor(ids), stage.new_cache(len(ids)), 0)[-1:].float()
    logits = logits + perturb
    output = agreement.to_wire(logits)
    token = int(logits[0].argmax())
    sid = secrets.token_bytes(16)
    trace = pb.HopTrace(start=0, end=n, address="")
    trace.input_digest = agreement.input_digest([(0, ids)])
    trace.output_digest = identity.output_digest(output, token)
    identity.sign_step(key, sid, 0, len(ids), trace)
    return {"sid": sid, "output": output, "token": token, "trace": trace}


def report_of(
    ckpt: Any, ids: list[int], checked: str, step: dict, others: list[str]
) -> cpb.CheckReport:
    evidence = cpb.CheckEvidence(
        checked_output=step["output"], weights="fp32", checked_trace=step["trace"],
        session_id=step["sid"], has_token=True, token=step["token"],
        replica_outputs=[step["output"]] * len(others),
    )  # fmt: skip
    evidence.inputs.add(pos=0, tokens=pb.Tokens(ids=ids))
    return cpb.CheckReport(
        start=0, end=ckpt.config.n_units, pos=0, tokens=len(ids), codec="fp32",
        input_digest=agreement.input_digest([(0, ids)]), tolerance=1e-3,
        checked=cpb.CheckOpinion(address=checked),
        replicas=[cpb.CheckOpinion(address=a, error=5.0) for a in others],
        evidence=evidence,
    )  # fmt: skip


def test_a_nodes_own_signed_lie_excludes_it_and_nothing_else_does(demo: tuple) -> None:
    store, ckpt = demo
    ids = [464, 3290, 373]

    async def run() -> None:
        svc, keys = swarm_of_three(store)
        a, b, c = keys
        # a caller's word: "b and c disagree with a", no evidence: nobody is excluded
        bare = report_of(ckpt, ids, a, honest_step(ckpt, keys[a], ids), [b, c])
        bare.ClearField("evidence")
        assert list((await svc.ReportCheck(bare, Context())).excluded) == []
        # a's own honest signed output, called a lie: re-run here, and a stays
        honest = report_of(ckpt, ids, a, honest_step(ckpt, keys[a], ids), [b])
        assert list((await svc.ReportCheck(honest, Context())).excluded) == []
        # an output a never signed, pinned on it: the caller is not heard again
        framed = report_of(ckpt, ids, a, honest_step(ckpt, keys[a], ids, perturb=1.0), [b])
        framed.evidence.checked_trace.CopyFrom(honest.evidence.checked_trace)
        with pytest.raises(RuntimeError, match=r"INVALID_ARGUMENT: evidence"):
            await svc.ReportCheck(framed, Context("ipv4:203.0.113.8:1"))
        await asyncio.sleep(1.1)  # (one dispute re-run a second)
        liar_step = honest_step(ckpt, keys[c], ids, perturb=1.0)
        ignored = await svc.ReportCheck(report_of(ckpt, ids, c, liar_step, [a]),
                                        Context("ipv4:203.0.113.8:1"))  # fmt: skip
        assert list(ignored.excluded) == [] and not svc.registry.excluded
        # c's own signed lie, from an honest client: c is out, with why
        caught = await svc.ReportCheck(report_of(ckpt, ids, c, liar_step, [a]), Context())
        assert list(caught.excluded) == [c]
        assert "its signed output" in svc.registry.excluded[c]
        assert set(svc.registry.excluded) == {c}

    asyncio.run(run())


def test_a_thousand_forged_reports_exclude_no_one(demo: tuple) -> None:
    """Random, replayed and well-formed-but-false reports from strangers without keys."""
    store, ckpt = demo
    ids = [464, 3290, 373]
    rng = secrets.SystemRandom()

    async def run() -> dict[str, int]:
        svc, keys = swarm_of_three(store)
        addresses = list(keys)
        replayed = report_of(ckpt, ids, addresses[0], honest_step(ckpt, keys[addresses[0]], ids),
                             addresses[1:])  # fmt: skip
        outcomes = {"refused": 0, "answered": 0}
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1000):
            kind = i % 3
            if kind == 0:  # random: well-formed fields, random digests, no evidence
                checked, *others = rng.sample(addresses, 3)
                report = cpb.CheckReport(
                    start=0, end=ckpt.config.n_units, pos=rng.randrange(100), tokens=1,
                    codec="fp32", input_digest=secrets.token_bytes(32), tolerance=1e-3,
                    checked=cpb.CheckOpinion(address=checked, digest=secrets.token_bytes(32)),
                    replicas=[cpb.CheckOpinion(address=o, error=9.0) for o in others],
                )  # fmt: skip
            elif kind == 1:  # replayed: a real, honest signed step, over and over
                report = replayed
            else:  # well-formed but false: an output the node never signed
                report = report_of(ckpt, ids, addresses[i % 3], honest_step(
                    ckpt, NodeKey.generate(), ids, perturb=1.0), addresses[:1] if i % 3 else addresses[1:2])  # fmt: skip
            peer = f"ipv4:198.51.100.{i % 50}:4000"  # fifty strangers
            try:
                await svc.ReportCheck(report, Context(peer))
                outcomes["answered"] += 1
            except RuntimeError as exc:
                assert "INVALID_ARGUMENT" in str(exc) or "RESOURCE_EXHAUSTED" in str(exc), exc
                outcomes["refused"] += 1
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert not svc.registry.excluded
        assert grown < 20 * 2**20, grown
        return outcomes

    outcomes = asyncio.run(run())
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == 1000


def test_a_caller_is_held_to_its_rate(demo: tuple) -> None:
    store, ckpt = demo

    async def run() -> int:
        svc, keys = swarm_of_three(store)
        a, b, _ = keys
        report = cpb.CheckReport(start=0, end=ckpt.config.n_units, pos=0, tokens=1, codec="fp32",
                                 tolerance=1e-3, checked=cpb.CheckOpinion(address=a),
                                 replicas=[cpb.CheckOpinion(address=b)])  # fmt: skip
        heard = 0
        for _ in range(REPORTS_PER_MIN + 10):
            try:
                await svc.ReportCheck(report, Context())
                heard += 1
            except RuntimeError as exc:
                assert "RESOURCE_EXHAUSTED" in str(exc)
        return heard

    assert asyncio.run(run()) == REPORTS_PER_MIN


def test_a_callers_word_raises_a_nodes_check_rate_and_nothing_more(demo: tuple) -> None:
    """Routes ask clients to follow every session through a node new to checks or under
    suspicion; agreeing checks end a node's probation, reports of disagreement (no
    evidence) bring it back, and exclude no one."""
    store, ckpt = demo
    now = [0.0]

    async def run() -> None:
        svc, keys = swarm_of_three(store, clock=lambda: now[0])
        a, b, c = keys
        assert all(svc._check_rates().get(x, 1.0) == 1.0 for x in keys)  # new: followed

        def report(checked: str, other: str, error: float) -> cpb.CheckReport:
            return cpb.CheckReport(start=0, end=ckpt.config.n_units, pos=0, tokens=1,
                                   codec="fp32", tolerance=1e-3,
                                   checked=cpb.CheckOpinion(address=checked),
                                   replicas=[cpb.CheckOpinion(address=other, error=error)])  # fmt: skip

        for i in range(PROBATION_PASSES):
            for checked, other in ((a, b), (b, c), (c, a)):
                await svc.ReportCheck(report(checked, other, 0.0), Context(f"ipv4:10.1.0.{i}:1"))
        now[0] += 2
        assert svc._check_rates() == {a: 0.0, b: 0.0, c: 0.0}  # the client's own rate
        for i in range(PROBATION_PASSES):  # strangers say a disagreed, with nothing to show
            await svc.ReportCheck(report(a, b, 9.0), Context(f"ipv4:198.51.100.{i}:1"))
        now[0] += 2
        rates = svc._check_rates()
        assert rates[a] == 1.0 and rates[c] == 0.0  # a, and b beside it, followed always
        assert not svc.registry.excluded

    asyncio.run(run())
    assert (
        suggested_rate(PROBATION_PASSES, 0) == 0.0
        and suggested_rate(PROBATION_PASSES - 1, 0) == 1.0
    )
    assert suggested_rate(80, 20) == 0.0 and suggested_rate(80, 21) == 1.0


# ---- a middle hop that rewrites what it relays ------------------------------------------


@pytest.mark.slow
def test_a_hop_that_rewrites_a_later_hops_token_is_caught_by_the_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first hop relays the later hops' replies, and rewrites their token (``forge``):
    the head's word (its MAC under the session's key) does not hold for it, so the client
    leaves that hop for its replica and the generation gives the local tokens. The head's
    traces are taken on their MACs: no signature of the head is checked on the way."""
    ckpt = open_checkpoint("demo")
    prompt = [464, 3290, 373, 257, 1332]
    local = LocalSession(whole(ckpt), SamplingParams(0.0), 64)
    expected = generate(local, prompt, 12, block_size=ckpt.config.block_size).token_ids
    signed = identity.step_signed
    checked: list[str] = []

    def spy(key: bytes, session_id: bytes, pos: int, n: int, trace: pb.HopTrace) -> bool:
        checked.append(trace.address)
        return signed(key, session_id, pos, n, trace)

    monkeypatch.setattr(identity, "step_signed", spy)
    with Swarm() as swarm:
        _, forger = swarm.node("demo", "0:3", env={"NANOSHARD_FAULT": "forge"})
        honest, b, c = swarm.chain("demo", ["0:3", "3:6", "6:8"])
        route = route_from_addresses([forger, b, c])
        (spare,) = route_from_addresses([honest, b, c]).hops[0:1]
        route.hops[0].addresses.append(honest)
        route.hops[0].public_keys.extend(spare.public_keys)
        session = RouteSession(route, 64, retry=RetryPolicy(attempts=3, backoff_s=0.01))
        tokens = [session.step(prompt, 0).token]
        while len(tokens) < 12:
            tokens.append(session.step([tokens[-1]], len(prompt) + len(tokens) - 1).token)
        recoveries = [r.detail for r in session.recoveries]
        mac = session.session._mac
        session.close()
    assert tokens == expected
    assert any(f"a trace of {c} that its signature does not hold, relayed by {forger}, {b}" in r
               for r in recoveries), recoveries  # fmt: skip
    assert mac is not None and mac[0] == c
    assert c not in checked, checked


# ---- exclusions that last ---------------------------------------------------------------


def test_a_state_dir_that_is_a_file_is_named_so(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(FailedPrecondition, match=r"state: it is a file, not a folder"):
        ExclusionStore(tmp_path / "state" / "exclusions.sqlite", ttl_s=3600)


def test_an_exclusion_outlives_a_restart_follows_the_key_and_expires(tmp_path: Path) -> None:
    clock = [1_000_000.0]
    path = tmp_path / "exclusions.sqlite"
    store = ExclusionStore(path, ttl_s=3600, clock=lambda: clock[0])
    registry = Registry(open_checkpoint("demo").config, replicas=2, tp="off")
    registry.on_exclude = lambda n, a, why: store.add(n, a, why).describe()
    key = NodeKey.generate()
    liar = NodeRecord(node_id=key.node_id, name="liar", address="10.0.0.9:7961",
                      capacity=Capacity("cpu", "fp32", 2**30, 1.0, 1.0), last_heartbeat=0.0)  # fmt: skip
    registry.join(liar)
    registry.exclude(liar.address, "spot-check: its signed output differs")
    why = registry.excluded[liar.address]
    assert why.startswith("spot-check: its signed output differs (since 1970-01-12 13:46 UTC")
    store.close()

    # the coordinator restarts: a new registry, the same file
    clock[0] += 600
    store = ExclusionStore(path, ttl_s=3600, clock=lambda: clock[0])
    again = Registry(open_checkpoint("demo").config, replicas=2, tp="off")
    again.restore((e.node_id, e.address, e.describe()) for e in store.active())
    moved = NodeRecord(node_id=key.node_id, name="liar", address="10.0.0.9:8000",
                       capacity=Capacity("cpu", "fp32", 2**30, 1.0, 1.0), last_heartbeat=0.0)  # fmt: skip
    again.join(moved)  # back on another port, with the same key: still out
    assert moved.assigned is None and again.excluded[moved.address] == why
    # an hour after it was excluded, it is let back in
    clock[0] += 3600
    again.keep_excluded({(e.node_id, e.address) for e in store.active()})
    assert not again.excluded and not again.excluded_ids
    assert moved.assigned == (0, open_checkpoint("demo").config.n_units)
    store.close()
