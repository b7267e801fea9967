"""Quotas and back-pressure: each limit refuses with RESOURCE_EXHAUSTED naming itself, and a
full compute queue refuses at once instead of growing."""

from __future__ import annotations

import secrets
import threading
from pathlib import Path

import grpc
import pytest
from swarm import Swarm

from nanoshard import rpc
from nanoshard.errors import QuotaExceeded, ResourceExhausted
from nanoshard.node.quotas import Holding, QuotaLimits, Quotas
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc

SLOW = {"NANOSHARD_FAULT": "delay:0.5"}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_open_limits_name_themselves() -> None:
    q = Quotas(QuotaLimits(sessions=2, max_length=64, kv_bytes=1000))
    q.check_open("a", 64, 400, [Holding("a", 400), Holding("b", 900)])
    # (with how to ask for less: a chat session asks for the whole context by default)
    with pytest.raises(ResourceExhausted, match=r"is 64 .*client.session\(max_length=64\)"):
        q.check_open("a", 65, 1, [])
    with pytest.raises(ResourceExhausted, match=r"open sessions per client is 2 \(a has 2"):
        q.check_open("a", 8, 1, [Holding("a", 1), Holding("a", 1)])
    with pytest.raises(ResourceExhausted, match="KV memory per client is 1000 bytes"):
        q.check_open("b", 8, 200, [Holding("b", 900)])
    Quotas(QuotaLimits()).check_open("a", 10**6, 10**12, [Holding("a", 1)] * 1000)  # 0 = none


def test_tokens_per_minute_slide() -> None:
    clock = Clock()
    q = Quotas(QuotaLimits(tokens_per_minute=100), clock)
    q.charge_tokens("a", 60)
    q.charge_tokens("b", 100)  # another caller has its own minute
    with pytest.raises(
        QuotaExceeded, match=r"tokens per minute per client is 100 \(a used 60"
    ) as err:
        q.charge_tokens("a", 41)
    assert err.value.retry_after_s == pytest.approx(60)  # when the 60 leave the minute
    q.charge_tokens("a", 40)  # a refusal counted nothing
    clock.now += 61
    q.charge_tokens("a", 100)
    with pytest.raises(QuotaExceeded, match="a step of 101 positions can never pass") as err:
        q.charge_tokens("c", 101)
    assert err.value.retry_after_s is None  # no wait would let it through


# ---- on a node ------------------------------------------------------------------------


def spec(max_length: int) -> pb.SessionSpec:
    return pb.SessionSpec(session_id=secrets.token_bytes(16), max_length=max_length, codec="fp32")


def open_session(stub: pb_grpc.NodeStub, max_length: int = 32) -> pb.SessionSpec:
    s = spec(max_length)
    stub.Open(pb.OpenRequest(spec=s, start=0, end=8), timeout=30)
    return s


def refused(call) -> str:
    """A quota's refusal: RESOURCE_EXHAUSTED, marked as a quota's (a caller tells it from a
    full node), with the seconds until it takes the call if the quota knows."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    after = dict(err.value.trailing_metadata())[rpc.QUOTA_KEY]
    if "tokens per minute" in err.value.details():
        assert 0 < float(after) <= 60
    else:
        assert after == ""
    return err.value.details()


def step(stub: pb_grpc.NodeStub, s: pb.SessionSpec, pos: int, n: int, step_id: int = 1):
    request = pb.StepRequest(
        session_id=s.session_id,
        step_id=step_id,
        pos=pos,
        tokens=pb.Tokens(ids=[5] * n),
        sample=True,
    )
    return stub.Step(request, timeout=60)


def test_a_node_enforces_each_quota(tmp_path: Path) -> None:
    limits = ["--quota-sessions", "2", "--quota-max-length", "48"]
    limits += ["--quota-tokens-per-minute", "40"]
    with Swarm() as swarm:
        (address,) = swarm.chain("demo", ["0:8"], *limits)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.NodeStub(channel)
            assert "max_length per session is 48" in refused(lambda: open_session(stub, 49))
            a, _ = open_session(stub, 48), open_session(stub)
            assert "open sessions per client is 2" in refused(lambda: open_session(stub))
            step(stub, a, 0, 30)
            assert "tokens per minute" in refused(lambda: step(stub, a, 30, 11, 2))
            step(stub, a, 30, 10, 2)  # within the minute's 40
            stub.Close(pb.CloseRequest(session_id=a.session_id), timeout=10)
            open_session(stub)  # a closed session frees its place


def test_a_full_queue_refuses_at_once(tmp_path: Path) -> None:
    # Each step holds the node's compute for 0.5 s (the test-only delay fault): 12 steps
    # sent at once cannot all fit a queue of one, however fast or slow the machine is.
    with Swarm() as swarm:
        _, address = swarm.node("demo", "0:8", "--max-queue", "1", env=SLOW)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.NodeStub(channel)
            sessions = [open_session(stub, 200) for _ in range(12)]
            outcomes: list[str] = []
            together = threading.Barrier(len(sessions))

            def prefill(s: pb.SessionSpec) -> None:
                try:
                    together.wait(timeout=30)
                    step(stub, s, 0, 128)
                    outcomes.append("ok")
                except grpc.RpcError as err:
                    outcomes.append(f"{err.code().name}: {err.details()}")

            threads = [threading.Thread(target=prefill, args=(s,)) for s in sessions]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
        busy = [o for o in outcomes if o.startswith("RESOURCE_EXHAUSTED: node busy")]
        assert len(outcomes) == 12
        assert busy, outcomes  # some were refused instead of queueing without bound
        assert set(outcomes) <= {"ok", *busy}
        assert "ok" in outcomes
