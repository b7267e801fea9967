"""Prometheus metrics: the collectors against in-process nodes and registries, then a
coordinator and two volunteers started with ``--metrics-port``, scraped over HTTP after a
generation, every count checked exactly."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from routes import RouteSession
from swarm import Swarm, settled, wait_until

from nanoshard.checkpoint import open_checkpoint, save_hf_checkpoint
from nanoshard.client import Client
from nanoshard.client.loop import LoopThread
from nanoshard.client.route import route_from_addresses
from nanoshard.client.swarm import CoordinatorClient
from nanoshard.config import GPTConfig
from nanoshard.coordinator.metrics import CHECK_OUTCOMES, HEALTH
from nanoshard.coordinator.service import CoordinatorService
from nanoshard.engine import init_weights
from nanoshard.errors import Unavailable
from nanoshard.metrics import (
    Exposition,
    MetricsConfig,
    add_metrics_args,
    metrics_from_args,
    metrics_line,
    new_registry,
    on_loop,
)
from nanoshard.modelcard import quick_model_id
from nanoshard.node.server import DataPlane
from nanoshard.statusview import status_json
from nanoshard.tokenizer import gpt2_bpe_dir
from nanoshard.v1 import coordinator_pb2 as cpb

TINY = GPTConfig(block_size=128, vocab_size=50257, n_layer=4, n_head=2, n_embd=32)
PROMPT = [464, 3290, 373, 257]
STEADY = ["--heartbeat-interval", "0.5", "--heartbeat-timeout", "10"]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (sample name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[metric, frozenset(labels.items())]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return parse(reply.read().decode())


def collect(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-block GPT-2 (6 units) with GPT-2's tokenizer files."""
    directory = tmp_path_factory.mktemp("metrics")
    tokenizer = directory / "tokenizer"
    tokenizer.mkdir()
    shutil.copy(gpt2_bpe_dir() / "encoder.json", tokenizer / "vocab.json")
    shutil.copy(gpt2_bpe_dir() / "vocab.bpe", tokenizer / "merges.txt")
    model = directory / "tiny-gpt2"
    save_hf_checkpoint(TINY, init_weights(TINY, seed=5), model, tokenizer_dir=tokenizer)
    return model


# ---- the shared pieces --------------------------------------------------------------------


def test_the_flags_bind_the_process_host_and_never_every_interface_by_default() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")
    add_metrics_args(parser)
    assert metrics_from_args(parser.parse_args([])) == MetricsConfig(0, "127.0.0.1")
    assert not metrics_from_args(parser.parse_args([])).enabled
    args = parser.parse_args(["--metrics-port", "9100"])
    assert metrics_from_args(args) == MetricsConfig(9100, "127.0.0.1")  # (a wildcard --host)
    args = parser.parse_args(["--host", "10.0.0.7", "--metrics-port", "9100"])
    assert metrics_from_args(args) == MetricsConfig(9100, "10.0.0.7")
    args = parser.parse_args(["--metrics-port", "9100", "--metrics-host", "0.0.0.0"])
    assert metrics_from_args(args) == MetricsConfig(9100, "0.0.0.0")  # asked for
    assert metrics_line("nanoshard-node", "::1", 9100) == (
        "nanoshard-node: metrics on http://[::1]:9100/metrics"
    )


def test_a_port_in_use_is_one_clear_error() -> None:
    registry = new_registry()
    taken = Exposition(registry, MetricsConfig(port=0))
    try:
        with pytest.raises(Unavailable, match=f"cannot serve metrics on 127.0.0.1:{taken.port}"):
            Exposition(registry, MetricsConfig(port=taken.port))
    finally:
        taken.close()


def test_a_read_runs_on_the_loop_thread_and_a_stuck_loop_times_out() -> None:
    loop = LoopThread("metrics-test")
    try:
        on = on_loop(loop.loop, lambda: threading.current_thread().name)
        assert on == "metrics-test"
        assert on_loop(None, lambda: 7) == 7  # no loop: in place
        gate = threading.Event()
        loop.loop.call_soon_threadsafe(gate.wait, 10)  # the loop is busy for a while
        with pytest.raises(TimeoutError):
            on_loop(loop.loop, lambda: 1)
        gate.set()
    finally:
        loop.close()


# ---- a node, in process -------------------------------------------------------------------


class Planes:
    """Data planes on one loop thread of their own, stopped at the end."""

    def __init__(self, model: Path) -> None:
        self.ckpt = open_checkpoint(str(model))
        self.loop = LoopThread("nodes")
        self.planes: list[DataPlane] = []

    def start(self, start: int, end: int, registry: CollectorRegistry | None = None) -> DataPlane:
        ckpt = self.ckpt

        async def run() -> DataPlane:
            plane = DataPlane(host="127.0.0.1", port=0, name=f"n{len(self.planes)}",
                              model_id=quick_model_id(ckpt), kv_memory=64 * 2**20,
                              session_ttl=60, threads=1, metrics=registry)  # fmt: skip
            stage = await plane.load(lambda: ckpt.load_stage(start, end))
            plane.service.set_stage(stage)
            await plane.start()
            return plane

        plane = self.loop.run(run())
        self.planes.append(plane)
        return plane

    def stop(self, plane: DataPlane) -> None:
        self.planes.remove(plane)
        self.loop.run(plane.stop())

    def close(self) -> None:
        for plane in list(self.planes):
            self.stop(plane)
        self.loop.close()


@pytest.fixture
def planes(tiny_model: Path) -> Iterator[Planes]:
    p = Planes(tiny_model)
    try:
        yield p
    finally:
        p.close()


def test_a_node_counts_its_steps_and_serves_its_live_figures(planes: Planes) -> None:
    registry = new_registry()
    first = planes.start(0, 3, registry)
    last = planes.start(3, 6)  # (a registry of its own: the two never mix)
    exposition = Exposition(registry, MetricsConfig(port=0))  # any free port, in a test
    # a node's counters are there at 0 from the moment it serves, not from its first step
    fresh = collect(last.service.metrics.registry)
    assert value(fresh, "nanoshard_node_tokens_total", units="3-6") == 0
    assert value(fresh, "nanoshard_node_steps_total", units="3-6", kind="decode") == 0
    try:
        session = RouteSession(route_from_addresses([first.address, last.address]), 64)
        tokens = [session.step(PROMPT, 0).token]
        for i in range(5):
            tokens.append(session.step([tokens[-1]], len(PROMPT) + i).token)
        # scraped over HTTP on its own thread: the figures read on the nodes' loop
        open_now = scrape(exposition.url)
        session.close()
        closed = collect(registry)
    finally:
        exposition.close()
    units = {"units": "0-3"}
    assert value(open_now, "nanoshard_node_steps_total", **units, kind="prefill") == 1
    assert value(open_now, "nanoshard_node_steps_total", **units, kind="decode") == 5
    assert value(open_now, "nanoshard_node_positions_total", **units) == len(PROMPT) + 5
    hist = "nanoshard_node_step_compute_seconds"
    assert value(open_now, f"{hist}_count", **units, kind="decode") == 5
    assert value(open_now, f"{hist}_bucket", **units, kind="decode", le="+Inf") == 5
    assert value(open_now, f"{hist}_sum", **units, kind="decode") > 0
    assert value(open_now, "nanoshard_node_sessions_opened_total") == 1
    assert value(open_now, "nanoshard_node_sessions") == 1
    assert value(open_now, "nanoshard_node_kv_bytes_used") > 0
    assert value(open_now, "nanoshard_node_kv_bytes_budget") == 64 * 2**20
    assert value(open_now, "nanoshard_node_queue_depth") == 0
    info = {"name": "n0", "address": first.address, "units": "0-3"}
    assert value(open_now, "nanoshard_node_info", **info) == 1
    # the first stage samples nothing: the tokens are counted where the head is
    assert not any(name == "nanoshard_node_tokens_total" for name, _ in open_now)
    last_samples = collect(last.service.metrics.registry)
    assert value(last_samples, "nanoshard_node_tokens_total", units="3-6") == len(tokens) == 6
    assert value(last_samples, "nanoshard_node_steps_total", units="3-6", kind="decode") == 5
    assert value(closed, "nanoshard_node_sessions") == 0
    assert value(closed, "nanoshard_node_kv_bytes_used") == 0
    for kind in ("replica", "refill", "slow"):
        assert value(closed, "nanoshard_node_failovers_total", kind=kind) == 0


def test_a_node_counts_the_failover_of_its_next_hop(planes: Planes) -> None:
    """The next hop's node stops mid-session: the first node switches to its replica and
    refills it, and counts both."""
    first = planes.start(0, 3)
    b1, b2 = planes.start(3, 6), planes.start(3, 6)
    route = route_from_addresses([first.address, b1.address])
    route.hops[1].addresses.append(b2.address)
    route.hops[1].public_keys.append(b2.key.public_key)
    session = RouteSession(route, 64)
    try:
        tokens = [session.step(PROMPT, 0).token]
        tokens.append(session.step([tokens[-1]], len(PROMPT)).token)
        planes.stop(b1)
        tokens.append(session.step([tokens[-1]], len(PROMPT) + 1).token)
    finally:
        session.close()
    samples = collect(first.service.metrics.registry)
    assert value(samples, "nanoshard_node_failovers_total", kind="replica") == 1
    assert value(samples, "nanoshard_node_failovers_total", kind="refill") == 1
    assert value(samples, "nanoshard_node_failovers_total", kind="slow") == 0
    replica = collect(b2.service.metrics.registry)
    # the refill replays the prompt and the first decode step, then the step itself runs
    assert value(replica, "nanoshard_node_steps_total", units="3-6", kind="prefill") == 1
    assert value(replica, "nanoshard_node_steps_total", units="3-6", kind="decode") == 2
    assert value(replica, "nanoshard_node_tokens_total", units="3-6") == 1  # (refills sample not)


# ---- the coordinator, in process ----------------------------------------------------------


class Context:
    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    def invocation_metadata(self) -> tuple:
        return ()


def test_the_coordinator_reads_its_registry_at_each_scrape() -> None:
    from test_live_load import six_nodes

    registry = six_nodes()  # three stages, two replicas each
    now = [5.0]
    svc = CoordinatorService(
        SimpleNamespace(model_id="ab" * 32, name="gpt2"),  # type: ignore[arg-type]
        registry,
        swarm="default",
        heartbeat_interval_s=2.0,
        epoch=b"\0" * 8,
        clock=lambda: now[0],
    )
    records = sorted(registry.nodes.values(), key=lambda r: r.name)

    async def run() -> None:
        for i, r in enumerate(records):
            assert r.assigned is not None
            load = cpb.NodeLoad(sessions=i + 1, kv_bytes_used=100, kv_bytes_budget=1000)
            request = cpb.HeartbeatRequest(
                node_id=r.node_id, ready=True, start=r.assigned[0], end=r.assigned[1], load=load
            )
            await svc.Heartbeat(request, Context())
        await svc.GetRoute(cpb.RouteRequest(peek=True), Context())
        await svc.GetRoute(cpb.RouteRequest(), Context())
        await svc.GetRoute(cpb.RouteRequest(), Context())
        # a check about a node not in the swarm is ignored; a malformed one refused
        gone = cpb.CheckReport(
            start=0, end=3, tolerance=0.1, codec="fp32",
            checked=cpb.CheckOpinion(address="10.9.9.9:1"),
            replicas=[cpb.CheckOpinion(address=records[0].address)],
        )  # fmt: skip
        await svc.ReportCheck(gone, Context())
        with pytest.raises(RuntimeError):
            await svc.ReportCheck(cpb.CheckReport(start=0, end=3, tolerance=-1), Context())

    asyncio.run(run())
    samples = collect(svc.metrics.registry)
    assert value(samples, "nanoshard_coordinator_nodes", health="serving") == 6
    for state in HEALTH[1:]:
        assert value(samples, "nanoshard_coordinator_nodes", health=state) == 0
    n_units = registry.config.n_units
    for u in range(n_units):
        name = "embed" if u == 0 else "head" if u == n_units - 1 else f"block {u - 1}"
        assert value(samples, "nanoshard_coordinator_unit_replicas", unit=str(u), name=name) == 2
    assert value(samples, "nanoshard_coordinator_min_unit_replicas") == 2
    assert value(samples, "nanoshard_coordinator_replicas_target") == 2
    embed = [i + 1 for i, r in enumerate(records) if r.ready and r.ready[0] == 0]
    assert len(embed) == 2
    assert value(samples, "nanoshard_coordinator_sessions") == sum(embed)
    assert value(samples, "nanoshard_coordinator_kv_bytes_used") == 600
    assert value(samples, "nanoshard_coordinator_kv_bytes_budget") == 6000
    assert value(samples, "nanoshard_coordinator_routes_total", result="session") == 2
    assert value(samples, "nanoshard_coordinator_routes_total", result="peek") == 1
    assert value(samples, "nanoshard_coordinator_routes_total", result="none") == 0
    reports = "nanoshard_coordinator_check_reports_total"
    assert value(samples, reports, outcome="ignored") == 1
    assert value(samples, reports, outcome="refused") == 1
    assert value(samples, reports, outcome="verified") == 0
    assert value(samples, "nanoshard_coordinator_excluded") == 0
    assert value(samples, "nanoshard_coordinator_exclusions_total") == 0

    # every node in exactly one state: late, excluded, idle, loading
    late, out, idle, loading = records[:4]
    late.last_heartbeat = now[0] - 10
    registry.excluded[out.address] = "a test"
    idle.assigned = None
    loading.ready = None
    samples = collect(svc.metrics.registry)
    for state in HEALTH:
        expected = 2 if state == "serving" else 1
        assert value(samples, "nanoshard_coordinator_nodes", health=state) == expected, state
    assert value(samples, "nanoshard_coordinator_excluded") == 1


# ---- a swarm: real processes on loopback --------------------------------------------------


@pytest.mark.slow
def test_a_swarm_scraped_after_a_generation_counts_it_exactly(tmp_path: Path) -> None:
    """A coordinator and two volunteers, each with ``--metrics-port``: the demo model split
    in two stages (its embeddings do not outweigh its blocks, as the tiny model's do), one
    greedy generation through the SDK, and each endpoint scraped: every step, position and
    token the generation took is counted once, where it ran."""
    ckpt = open_checkpoint("demo")
    memory = str(int(ckpt.stage_nbytes(0, ckpt.config.n_units) * 0.7 / 0.8))  # not all: two stages
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{p}/metrics" for p in ports]
    swarm_name = "m" + secrets.token_hex(4)
    new_tokens = 12
    with Swarm() as swarm:
        coord, address = swarm.coordinator(
            "--swarm", swarm_name, "--replicas", "1",
            "--tp", "off", "--no-mdns", "--metrics-port", str(ports[0]), *STEADY,
        )  # fmt: skip
        assert f"nanoshard coordinator: metrics on {urls[0]}" in coord.output
        nodes = []
        for i in range(2):
            flags = ["--coordinator", address, "--no-mdns", "--swarm", swarm_name,
                     "--max-memory", memory, "--cache-dir", str(tmp_path / f"n{i}"),
                     "--name", f"n{i}", "--metrics-port", str(ports[1 + i])]  # fmt: skip
            nodes.append(swarm.join(*flags))
        for node, url in zip(nodes, urls[1:], strict=True):
            wait_until(
                "the node's metrics line", lambda n=node, u=url: f"metrics on {u}" in n.output
            )
        client = CoordinatorClient(address)
        status = wait_until(
            "two nodes serving every unit",
            lambda: settled(status_json(client.status()), 2),
            timeout=120,
        )
        client.close()
        stages = {n["address"]: tuple(n["stage"]) for n in status["nodes"]}
        assert len(set(stages.values())) == 2  # the model really is split

        with Client(address, check_rate=0) as sdk:
            chat = sdk.session(temperature=0)
            got = chat.generate(PROMPT, new_tokens)
            assert len(got.token_ids) == new_tokens and not got.recoveries
            route = [hop["address"] for hop in got.steps[0]]
            assert sorted(route) == sorted(stages) and all(
                [hop["address"] for hop in step] == route for step in got.steps
            )
            by_address = {n["address"]: urls[1 + int(n["name"][1:])] for n in status["nodes"]}
            # while the session is open: one on each node, its KV memory reserved
            during = {a: scrape(by_address[a]) for a in route}
            coordinator_during = wait_until(
                "the coordinator to hear of the session",
                lambda: (
                    (s := scrape(urls[0])) and value(s, "nanoshard_coordinator_sessions") == 1 and s
                ),
            )
            chat.close()

        decodes = new_tokens - 1  # the prompt's step sampled the first token
        for a in route:
            samples = during[a]
            units = {"units": "{}-{}".format(*stages[a])}
            assert value(samples, "nanoshard_node_steps_total", **units, kind="prefill") == 1
            assert value(samples, "nanoshard_node_steps_total", **units, kind="decode") == decodes
            positions = len(PROMPT) + decodes
            assert value(samples, "nanoshard_node_positions_total", **units) == positions
            hist = "nanoshard_node_step_compute_seconds"
            assert value(samples, f"{hist}_count", **units, kind="decode") == decodes
            assert value(samples, f"{hist}_bucket", **units, kind="prefill", le="+Inf") == 1
            assert value(samples, f"{hist}_sum", **units, kind="decode") > 0
            assert value(samples, "nanoshard_node_sessions") == 1
            assert value(samples, "nanoshard_node_sessions_opened_total") == 1
            assert value(samples, "nanoshard_node_kv_bytes_used") > 0
            assert value(samples, "nanoshard_node_kv_bytes_budget") > 0
            tokens = [v for (n, _), v in samples.items() if n == "nanoshard_node_tokens_total"]
            head = stages[a][1] == ckpt.config.n_units
            assert tokens == ([new_tokens] if head else [])
            assert value(samples, "nanoshard_node_failovers_total", kind="replica") == 0
        # closed: every node frees it
        for a in route:
            wait_until(
                "the session closed on every node",
                lambda a=a: value(scrape(by_address[a]), "nanoshard_node_sessions") == 0,
            )
        c = coordinator_during
        assert value(c, "nanoshard_coordinator_nodes", health="serving") == 2
        for state in HEALTH[1:]:
            assert value(c, "nanoshard_coordinator_nodes", health=state) == 0
        for u in range(ckpt.config.n_units):
            replicas = [
                v
                for (n, labels), v in c.items()
                if n == "nanoshard_coordinator_unit_replicas" and ("unit", str(u)) in labels
            ]
            assert replicas == [1], u
        assert value(c, "nanoshard_coordinator_min_unit_replicas") == 1
        assert value(c, "nanoshard_coordinator_routes_total", result="session") == 1
        assert value(c, "nanoshard_coordinator_node_events_total", event="join") >= 2
        assert value(c, "nanoshard_coordinator_placements_total") >= 1
        assert value(c, "nanoshard_coordinator_excluded") == 0
        assert value(c, "nanoshard_coordinator_kv_bytes_used") > 0


def test_the_coordinator_counts_check_reports_by_outcome_and_its_exclusions() -> None:
    """``test_verification``'s disputes, counted: a bare report is tallied, one with signed
    evidence verified (re-run here), a framed one false, its sender's next one ignored, and
    a node's own signed lie verified and excluded."""
    from test_verification import Context as Caller
    from test_verification import honest_step, report_of, swarm_of_three

    from nanoshard.coordinator.model import ModelStore

    store, ckpt = ModelStore.open("demo"), open_checkpoint("demo")
    ids = [464, 3290, 373]
    stranger = "ipv4:203.0.113.8:1"

    async def run() -> CoordinatorService:
        svc, keys = swarm_of_three(store)
        a, b, c = keys
        bare = report_of(ckpt, ids, a, honest_step(ckpt, keys[a], ids), [b, c])
        bare.ClearField("evidence")
        await svc.ReportCheck(bare, Caller())
        honest = report_of(ckpt, ids, a, honest_step(ckpt, keys[a], ids), [b])
        await svc.ReportCheck(honest, Caller())
        framed = report_of(ckpt, ids, a, honest_step(ckpt, keys[a], ids, perturb=1.0), [b])
        framed.evidence.checked_trace.CopyFrom(honest.evidence.checked_trace)
        with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
            await svc.ReportCheck(framed, Caller(stranger))
        await asyncio.sleep(1.1)  # (one dispute re-run a second)
        liar = honest_step(ckpt, keys[c], ids, perturb=1.0)
        await svc.ReportCheck(report_of(ckpt, ids, c, liar, [a]), Caller(stranger))
        caught = await svc.ReportCheck(report_of(ckpt, ids, c, liar, [a]), Caller())
        assert list(caught.excluded) == [c]
        return svc

    samples = collect(asyncio.run(run()).metrics.registry)
    reports = "nanoshard_coordinator_check_reports_total"
    outcomes = {o: value(samples, reports, outcome=o) for o in CHECK_OUTCOMES}
    assert outcomes == {"tallied": 1, "verified": 2, "ignored": 1, "refused": 0, "false": 1}
    comparisons = "nanoshard_coordinator_check_comparisons_total"
    by = {
        (w, r): value(samples, comparisons, by=w, result=r)
        for w in ("client", "coordinator")
        for r in ("agree", "disagree")
    }
    # bare 2, honest 1, framed 1 (tallied before its evidence fell), caught 1; the
    # coordinator's re-runs: the honest node's output, and the liar's
    assert by == {
        ("client", "agree"): 0,
        ("client", "disagree"): 5,
        ("coordinator", "agree"): 1,
        ("coordinator", "disagree"): 1,
    }
    assert value(samples, "nanoshard_coordinator_exclusions_total") == 1
    assert value(samples, "nanoshard_coordinator_excluded") == 1
    assert value(samples, "nanoshard_coordinator_nodes", health="excluded") == 1
