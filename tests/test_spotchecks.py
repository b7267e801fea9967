"""Spot-checks: a shadow replica follows a hop on its own KV cache, fed in steps of chunks,
and every position it computes is compared within what the codec and the weights allow;
the coordinator's tallies; a perturbing node (the test-only fault switch) found and
excluded, and honest nodes never."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from routes import RouteSession, fixed_session
from swarm import LISTENING, Swarm, nanoshard, wait_until
from test_swarm import STEADY

from nanoshard import Client
from nanoshard import codec as codecs
from nanoshard.agreement import distance, tolerance
from nanoshard.checkpoint import save_hf_checkpoint
from nanoshard.client.checks import CHECK_EVERY, Checker, CheckResult
from nanoshard.client.route import Route
from nanoshard.client.swarm import CoordinatorClient
from nanoshard.config import GPTConfig
from nanoshard.coordinator.trust import ARBITER, Comparison, Ledger
from nanoshard.engine import init_weights
from nanoshard.errors import InvalidArgument
from nanoshard.generation import generate
from nanoshard.node.faults import Slow, fault_from_env
from nanoshard.tokenizer import gpt2_bpe_dir
from nanoshard.v1 import coordinator_pb2 as cpb
from nanoshard.v1 import node_pb2 as pb

TINY = GPTConfig(block_size=128, vocab_size=50257, n_layer=4, n_head=2, n_embd=32)
LIE = {"NANOSHARD_FAULT": "perturb:0.1"}  # noise of 10% of each output row's RMS
PROMPT = [464, 3290, 373, 257]
STEPS = 50  # steps per checked generation: the prompt's, then one per new token

# ---- the policy, pure ----------------------------------------------------------------


def test_distance_and_tolerance() -> None:
    torch.manual_seed(0)
    y = torch.randn(3, 64) * 4
    assert distance(y, y) == 0
    assert distance(y, y * 1.01) == pytest.approx(0.01, rel=1e-4)
    # fp32 travels exactly: only the weights' slack
    assert tolerance("fp32", "fp32", y, logits=False) == pytest.approx(1e-3)
    for codec in ("bf16", "fp16", "int8", "int8-64"):
        decoded = codecs.decode(codecs.encode(y, codec), tuple(y.shape), codec)
        tol = tolerance(codec, "fp32", y, logits=False)
        # what the codec itself does to an honest output is well inside the tolerance ...
        assert distance(y, decoded) < tol / 2, codec
        # ... and the test fault is well outside it
        assert distance(y, y + 0.05 * y.pow(2).mean().sqrt() * torch.randn_like(y)) > 2 * tol
    assert tolerance("int8", "fp32", y, logits=True) == pytest.approx(1e-3)  # logits: exact


def test_fault_switch_is_strict() -> None:
    assert fault_from_env("") is None
    y = torch.randn(2, 16)
    fault = fault_from_env("perturb:0.5")
    assert fault is not None and (fault.scale, fault.share) == (0.5, 1.0)
    sometimes = fault_from_env("perturb:0.5:0.1")
    assert sometimes is not None and sometimes.share == 0.1
    changed = sum(not torch.equal(sometimes(y), y) for _ in range(1000))
    assert 50 < changed < 150  # about a tenth of the steps
    later = fault_from_env("perturb:0.5:1:30")
    assert later is not None and later.after_s == 30 and torch.equal(later(y), y)  # not yet
    assert 0.3 < distance(y, fault(y)) < 0.7
    delay = fault_from_env("delay:0.25")
    assert delay is not None and delay.seconds == 0.25 and torch.equal(delay(y), y)
    slow = fault_from_env("slow:5:30")
    assert isinstance(slow, Slow) and (slow.factor, slow.after_s) == (5.0, 30.0)
    at_once = fault_from_env("slow:5")  # (tour E: refused, AFTER was required)
    assert isinstance(at_once, Slow) and (at_once.factor, at_once.after_s) == (5.0, 0.0)
    for bad in ("perturb", "perturb:x", "perturb:-1", "flip:0.1", "delay:0", "delay:61",
                "perturb:0.5:0", "perturb:0.5:1.5", "perturb:0.5:1:-1", "perturb:0.5:1:1:1", "slow:1", "slow:1:0", "slow:5:-1", "slow:x:1", "slow:5:1:2"):  # fmt: skip
        with pytest.raises(InvalidArgument):
            fault_from_env(bad)


def test_a_slowed_node_holds_each_job_from_its_time_on(monkeypatch: pytest.MonkeyPatch) -> None:
    held: list[float] = []
    monkeypatch.setattr("nanoshard.node.faults.time.sleep", held.append)
    slow = Slow(5.0, 30.0, started=time.monotonic())
    slow.hold(0.002)  # before AFTER: as fast as ever
    assert held == []
    late = Slow(5.0, 30.0, started=time.monotonic() - 31)
    late.hold(0.002)  # then 5x: four times the job's own time again
    assert held == [pytest.approx(0.008)]


def cmp(a: str, b: str, error: float, at: float = 0.0) -> Comparison:
    return Comparison(a, b, 0, 6, 10, error, 1e-3, at)


def test_old_checks_expire_from_the_tallies() -> None:
    ledger = Ledger(window_s=60)
    ledger.add([cmp("H", "L1", 0.05), cmp("H", "L2", 1e-6)])
    assert ledger.tally("H", 0) == (1, 1) and ledger.tally("L2", 0) == (1, 0)
    assert ledger.tally("H", 61) == (0, 0)  # forgotten after the window


def test_a_disagreement_with_a_caught_liar_counts_against_the_liar_only() -> None:
    ledger = Ledger()
    # a client's check: the liar L and its honest witness H disagree; the coordinator's
    # re-run then matches H's signed output and contradicts L's
    ledger.add([cmp("L", "H", 0.1), cmp(ARBITER, "H", 1e-7), cmp(ARBITER, "L", 0.1)])
    assert ledger.tally("H", 0) == (1, 0)
    assert ledger.tally("L", 0) == (0, 2)
    # its later disagreements too, settled or not
    ledger.add([Comparison("H", "L", 0, 6, 44, 0.1, 1e-3, 0.0)])
    assert ledger.tally("H", 0) == (1, 0) and ledger.tally("L", 0) == (0, 3)
    # a disagreement nobody settled stays against both
    unsettled = Ledger()
    unsettled.add([cmp("L", "H", 0.1)])
    assert unsettled.tally("H", 0) == (0, 1) and unsettled.tally("L", 0) == (0, 1)


# ---- real nodes -----------------------------------------------------------------------


def save_tiny_model(directory: Path) -> Path:
    """A random 4-block GPT-2 (6 units) with GPT-2's tokenizer files, in ``directory``."""
    tokenizer = directory / "tokenizer"
    tokenizer.mkdir(parents=True)
    shutil.copy(gpt2_bpe_dir() / "encoder.json", tokenizer / "vocab.json")
    shutil.copy(gpt2_bpe_dir() / "vocab.bpe", tokenizer / "merges.txt")
    model = directory / "tiny-gpt2"
    save_hf_checkpoint(TINY, init_weights(TINY, seed=5), model, tokenizer_dir=tokenizer)
    return model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("spotchecks"))


# Links that never leave a node for slowness, in the client and in the nodes: on a loaded
# machine noise can make a node's tiny steps look slow, and a hop moved onto its shadow's
# node stops the shadow (tested below). The routes stay as given.
STEADY_ROUTE = ("--leave-slower", "0")


@pytest.fixture(scope="module")
def replicas(tiny_model: Path):
    """Stage [0, 2): two honest nodes and a liar; stage [2, 6): an honest node and a liar."""
    model = str(tiny_model)
    with Swarm() as swarm:
        procs = [
            swarm.start(swarm.serve_args(model, units, *STEADY_ROUTE), env)
            for units, env in [("0:2", None), ("0:2", None), ("0:2", LIE), ("2:6", None), ("2:6", LIE)]
        ]  # fmt: skip
        a0, a1, a_liar, b0, b_liar = (p.wait_for(LISTENING).group(1) for p in procs)
        yield {"a": [a0, a1, a_liar], "b": [b0, b_liar]}


def checked_generation(first: list[str], second: list[str], codec: str, seed: int) -> Checker:
    """Generate 3 * CHECK_EVERY tokens along [0, 2) -> [2, 6), a shadow following each
    hop (the first address of each hop runs it, the second is its shadow)."""
    route = Route(
        [pb.Hop(start=0, end=2, addresses=first), pb.Hop(start=2, end=6, addresses=second)], 6
    )
    checker = Checker(1.0, seed=seed)
    session = fixed_session(route, 128, codec=codec, checker=checker, leave_slower=math.inf)
    generate(session, PROMPT, 3 * CHECK_EVERY, block_size=TINY.block_size)
    checker.wait()  # the check points' material is fetched before the session closes
    session.close()
    checker.wait()
    return checker


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_an_honest_shadow_agrees_and_a_perturbing_one_does_not(replicas: dict, codec: str) -> None:
    a0, a1, _ = replicas["a"]
    b0, b_liar = replicas["b"]
    checker = checked_generation([a0, a1], [b0, b_liar], codec, seed=1)
    results = list(checker.results)
    assert not checker.skipped, checker.skipped
    # check points at the first step (the prompt's), then at random, for both hops at once
    by_stage = {(0, 2): [r for r in results if r.start == 0], (2, 6): [r for r in results if r.start == 2]}  # fmt: skip
    assert len(by_stage[(0, 2)]) == len(by_stage[(2, 6)]) >= 2, [r.to_dict() for r in results]
    for r in by_stage[(0, 2)]:  # activations, every position: an honest shadow agrees
        assert r.checked == a0 and set(r.distances) == {a1} and r.agree, r
        # one batched forward instead of the steps: within rounding (fp32), or the codec's error
        assert r.distances[a1] <= (1e-5 if codec == "fp32" else r.tolerance / 2)
    # every position up to the last check point was compared, each once: the prompt's
    # first, then the rest in the check points' chunks
    assert by_stage[(0, 2)][0].positions == len(PROMPT)
    assert sum(r.positions for r in by_stage[(0, 2)]) > len(PROMPT)
    for r in by_stage[(2, 6)]:  # the head's logits at each check point: the liar's are off
        assert r.checked == b0 and set(r.distances) == {b_liar} and r.positions == 1
        assert r.distances[b_liar] > 10 * r.tolerance


@pytest.mark.slow
def test_a_perturbing_node_on_the_route_disagrees_with_its_shadow(replicas: dict) -> None:
    a0, _, a_liar = replicas["a"]
    b0, _ = replicas["b"]
    # the liar runs stage [0, 2); hop 2 has no replica, so no shadow follows it
    checker = checked_generation([a_liar, a0], [b0], "fp32", seed=2)
    results = list(checker.results)
    assert len(results) >= 2 and checker.skipped["no replica"] == 0, checker.skipped
    for r in results:  # the first chunk compared disagrees already: the lie is everywhere
        assert r.checked == a_liar and set(r.distances) == {a0}
        assert r.distances[a0] > 10 * r.tolerance and r.positions == r.tokens


@pytest.mark.slow
def test_a_session_leaves_a_node_its_checks_got_excluded(replicas: dict) -> None:
    a0, a1, a_liar = replicas["a"]
    b0, _ = replicas["b"]
    stale = Route(
        [
            pb.Hop(start=0, end=2, addresses=[a_liar, a0, a1]),
            pb.Hop(start=2, end=6, addresses=[b0]),
        ],
        6,
    )
    clean = Route(
        [pb.Hop(start=0, end=2, addresses=[a0, a1]), pb.Hop(start=2, end=6, addresses=[b0])], 6
    )
    reports: list[cpb.CheckReport] = []

    def coordinator(report: cpb.CheckReport) -> list[str]:  # excludes at the first disagreement
        reports.append(report)
        return [report.checked.address] if report.replicas[0].error > report.tolerance else []

    checker = Checker(1.0, seed=4, report=coordinator)
    session = RouteSession(
        stale, 40, planner=lambda avoid: clean, checker=checker, leave_slower=math.inf
    )

    def first_check_answered(_token: int) -> None:
        # Checks run beside the generation: without this wait, a fast generation could end
        # before the coordinator's answer to the first (the prompt step's) check arrives.
        if not checker.excluded([a_liar]):
            wait_until("the coordinator's answer", lambda: checker.excluded([a_liar]), 30, 0.01)

    greedy = generate(
        session, PROMPT, 12, block_size=TINY.block_size, on_token=first_check_answered
    )
    session.close()
    checker.wait()
    assert reports and reports[0].checked.address == a_liar
    # once the coordinator answered "excluded", the next step left it: a new route, replayed
    (leave,) = [r for r in session.recoveries if "excluded" in r.detail]
    assert leave.kind == "reroute" and leave.detail == f"{a_liar} excluded"
    assert session.session.route is clean and session.session._served[0] == a0
    # from there on the tokens are honest ones: an honest run continues the same prefix so
    k = leave.pos - len(PROMPT) + 1  # tokens sampled before the switch
    honest = RouteSession(clean, 40)
    prefix = PROMPT + greedy.token_ids[:k]
    expected = generate(honest, prefix, 12 - k, block_size=TINY.block_size).token_ids
    honest.close()
    assert 0 < k < 12 and greedy.token_ids[k:] == expected


# ---- a swarm: found, excluded, shown --------------------------------------------------


def whole_model_swarm(swarm: Swarm, model: Path, nodes: int, liar: bool) -> str:
    """A coordinator with ``--replicas nodes`` and that many nodes that each hold the whole
    model (the last one perturbing when ``liar``); the coordinator's address."""
    _, address = swarm.coordinator("--model", str(model), "--replicas", str(nodes), *STEADY)
    names = [f"honest-{i + 1}" for i in range(nodes - 1)] + ["liar" if liar else f"honest-{nodes}"]
    for name in names:
        swarm.join("--coordinator", address, "--name", name, env=LIE if name == "liar" else None)
    return address


def run_checked(
    address: str,
    replicas: int,
    seed: int = 3,
    rate: float = 1.0,
    runs: int = 1,
    until: Callable[[list[CheckResult]], bool] | None = None,
    served: list[tuple[dict[str, int], dict[str, int]]] | None = None,
) -> tuple[list[CheckResult], dict]:
    """Generations of 50 steps (a prompt, then 49 tokens) with spot-checks at ``rate``,
    once every unit has ``replicas``: ``runs`` of them, or fewer once ``until`` holds of
    the checks so far; the checks and the status after them. ``served`` gets, per run,
    the first step of each node in it and what ``Client.excluded`` said of it."""
    with Client(address, check_rate=rate, check_seed=seed) as client:
        wait_until(
            f"{replicas} replicas of every unit",
            lambda: all(u["replicas"] == replicas for u in client.status()["units"]),
            timeout=120,
        )
        checks: list[CheckResult] = []
        for _ in range(runs):
            got = client.generate(PROMPT, STEPS - 1, temperature=0)
            assert len(got.token_ids) == STEPS - 1
            checks = client.wait_for_checks()
            if served is not None:
                first: dict[str, int] = {}
                for k, traces in enumerate(got.steps):
                    for trace in traces:
                        first.setdefault(trace["address"], k)
                served.append((first, client.excluded(got)))
            if until is not None and until(checks):
                break
        status = client.status()
    return checks, {n["name"]: n for n in status["nodes"]}


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [3, 2])
def test_a_perturbing_node_is_found_within_50_steps_and_excluded(
    tiny_model: Path, replicas: int
) -> None:
    """Whether the liar ran the step or re-ran it as a replica, the client sends its signed
    output with the dispute, and the coordinator re-runs the step itself and excludes it."""
    with Swarm() as swarm:
        address = whole_model_swarm(swarm, tiny_model, replicas, liar=True)
        # a session's hop and its shadow are two of the nodes: with three, the liar may be
        # in neither, so sessions go on until a check disagrees (10 in all at most)
        served: list[tuple[dict[str, int], dict[str, int]]] = []
        checks, nodes = run_checked(
            address, replicas, runs=10, until=lambda cs: any(not c.agree for c in cs), served=served
        )
        liar = nodes["liar"]
        # the generation that went through it says so, from the liar's first step on
        first, excluded = served[-1]
        a_liar = liar["address"]
        assert excluded == ({a_liar: first[a_liar]} if a_liar in first else {}), served[-1]
        assert all(not excluded for _, excluded in served[:-1])
        assert checks, "no step was checked"
        for c in checks:  # the liar's checks disagree; once it is out, the rest agree
            assert c.agree == (liar["address"] not in {c.checked, *c.distances}), c
        assert liar["excluded"] and "its signed output" in liar["excluded"], nodes
        assert "coordinator's re-run" in liar["excluded"]
        assert liar["checks"]["failed"] >= 1 and liar["stage"] is None
        for name in [n for n in nodes if n != "liar"]:  # honest ones keep serving
            honest = nodes[name]
            assert honest["excluded"] is None, nodes
            assert honest["checks"]["failed"] == 0, nodes  # its disagreements were the liar's
            assert honest["stage"] is not None and honest["serving"] == honest["stage"], nodes
        # status says so, to people too
        shown = nanoshard("status", "--coordinator", address)
        assert shown.returncode == 0, shown.stderr
        assert f"excluded liar ({liar['address']}): spot-check" in " ".join(shown.stdout.split())
        # and routes go around it
        coordinator = CoordinatorClient(address)
        route = coordinator.route()
        coordinator.close()
        assert liar["address"] not in {a for h in route.hops for a in h.addresses}


@pytest.mark.slow
def test_honest_nodes_are_never_excluded(tiny_model: Path) -> None:
    with Swarm() as swarm:
        address = whole_model_swarm(swarm, tiny_model, 3, liar=False)
        checks, nodes = run_checked(address, 3)
        assert checks and all(c.agree for c in checks), [c.to_dict() for c in checks]
        for node in nodes.values():
            assert node["excluded"] is None and node["checks"]["failed"] == 0
        # agreements feed the tallies (at most one report every few seconds): both nodes
        passed = sum(n["checks"]["passed"] for n in nodes.values())
        assert 0 < passed <= 2 * len(checks) and passed % 2 == 0, nodes
