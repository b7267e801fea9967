"""Tensor-parallel stages (``nanoshard.tp``): k real processes joined by a gloo process group
on 127.0.0.1, each holding its shard; their output equals the unsharded stage's."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import io
import itertools
import multiprocessing as mp
import re
import threading
import time
from typing import Any

import psutil
import pytest
import torch
import torch.distributed as dist
from conftest import with_noisy_biases

from nanoshard.config import GPTConfig
from nanoshard.engine import Stage, init_weights
from nanoshard.errors import InvalidArgument
from nanoshard.node.group import STUCK_S, Membership, give_up_when_stuck
from nanoshard.node.join import rendezvous_store
from nanoshard.tp import Collective, CollectiveError, failure_reason, shard, vocab_range
from nanoshard.v1 import coordinator_pb2 as cpb

CONFIG = GPTConfig(block_size=96, vocab_size=101, n_layer=2, n_head=4, n_embd=32)
PROMPT = [3, 17, 99, 0, 42, 5, 64, 8]
DECODE = 50
TIMEOUT_S = 60.0


def weights() -> dict[str, torch.Tensor]:
    return with_noisy_biases(init_weights(CONFIG, seed=3), seed=4)


def run_member(rank: int, size: int, port: int, job: Any, out: Any) -> None:
    """One member: join the group through the parent's store, run ``job``, send its result."""
    try:
        torch.set_num_threads(1)
        store = dist.TCPStore(
            "127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=TIMEOUT_S)
        )
        collective = Collective.form("test", rank, size, store, "127.0.0.1", TIMEOUT_S)
        buf = io.BytesIO()  # bytes, not tensors: a tensor in a queue outlives its process
        torch.save(job(collective), buf)
        out.put((rank, buf.getvalue()))
    except BaseException as exc:  # reported to the parent, which fails the test
        out.put((rank, exc))


def in_group(size: int, job: Any) -> list[Any]:
    """``job(collective)`` on each of ``size`` member processes; their results by rank."""
    ctx = mp.get_context("spawn")
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )  # fmt: skip
    out = ctx.Queue()
    procs = [
        ctx.Process(target=run_member, args=(r, size, store.port, job, out)) for r in range(size)
    ]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=TIMEOUT_S * 2) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for r in range(size):
        if isinstance(results[r], BaseException):
            raise results[r]
    return [torch.load(io.BytesIO(results[r])) for r in range(size)]


def generate_outputs(start: int, end: int, dtype: torch.dtype, collective: Collective | None):
    """A prefill of PROMPT and DECODE one-token steps through units [start, end), the
    decode inputs fixed (teacher-forced): every step's output."""
    transform = None if collective is None else functools.partial(shard, collective=collective)
    stage = Stage.from_tensors(CONFIG, start, end, weights(), dtype, transform=transform)
    cache = stage.new_cache(len(PROMPT) + DECODE)
    gen = torch.Generator().manual_seed(7)
    if stage.has_embed:
        x = torch.tensor(PROMPT)
        steps = torch.randint(0, CONFIG.vocab_size, (DECODE,), generator=gen)
    else:
        x = torch.randn(len(PROMPT), CONFIG.n_embd, generator=gen)
        steps = torch.randn(DECODE, CONFIG.n_embd, generator=gen)
    outs = []
    with torch.inference_mode():
        outs.append(stage(x, cache, 0, all_logits=True) if stage.has_head else stage(x, cache, 0))
        for i in range(DECODE):
            outs.append(stage(steps[i : i + 1], cache, len(PROMPT) + i))
    return [o.clone() for o in outs], stage.vocab, cache.k.shape


UNITS = [(0, 4), (1, 3), (2, 4), (0, 1)]  # the whole model, blocks, blocks + head, embed


def every_stage(collective: Collective | None) -> list:
    return [generate_outputs(*units, torch.float32, collective) for units in UNITS]


@pytest.mark.parametrize("size", [2, 4])
def test_sharded_stage_equals_unsharded(size: int) -> None:
    """Prefill and 50 decode steps of each stage: each member's hidden states equal the
    whole stage's to fp32 summation order; a head's logits are the member's vocabulary
    slice of the whole stage's; a member caches its own heads only."""
    wholes = every_stage(None)
    members = in_group(size, every_stage)
    for units, (whole, _, full_kv) in zip(UNITS, wholes, strict=True):
        head = units[1] == CONFIG.n_units
        for rank, member in enumerate(members):
            outs, (lo, hi), kv_shape = member[UNITS.index(units)]
            assert kv_shape[1] == CONFIG.n_head // size and full_kv[1] == CONFIG.n_head
            if head:
                assert (lo, hi) == vocab_range(CONFIG.vocab_size, rank, size)
            for step, (got, want) in enumerate(zip(outs, whole, strict=True)):
                want = want[..., lo:hi] if head else want
                assert got.shape == want.shape
                err = ((got - want).abs().max() / want.abs().max()).item()
                assert err <= 1e-5, (units, rank, step, err)


def probe_then_sum(collective: Collective) -> tuple[float, float, float]:
    probe_ms, bytes_per_s = collective.probe(CONFIG.n_embd, rounds=5)
    total = collective.all_reduce(torch.full((3,), float(collective.rank + 1)))
    return probe_ms, bytes_per_s, total[0].item()


def test_a_new_group_measures_its_links_and_still_sums() -> None:
    """The formation probe gives a positive latency and bandwidth on every member, and the
    group's collectives stay matched after it."""
    for probe_ms, bytes_per_s, total in in_group(2, probe_then_sum):
        assert 0 < probe_ms < 1000 and bytes_per_s > 1e6
        assert total == 3.0  # 1 + 2


def outlive_a_member(collective: Collective) -> str:
    """Rank 1 returns once the group works (its process ends); rank 0's next collective
    then fails. (Rank 1 returning as its own side had formed could end its process while
    rank 0 still connected to it: rank 0's forming failed instead, in gloo's words.)"""
    collective.all_reduce(torch.ones(3))  # both ranks hold the group
    if collective.rank == 1:
        return ""
    time.sleep(2.0)
    try:
        collective.all_reduce(torch.ones(3))
    except CollectiveError as exc:
        return str(exc)
    return "no error"


def test_a_member_lost_reads_as_such_not_as_gloos_own_text() -> None:
    """A volunteer reads why its group broke in a line: not gloo's C++ source line, peer
    port and paragraph of advice."""
    message, _ = in_group(2, outlive_a_member)
    assert message == (
        "tensor-parallel group test: a member's connection closed (it stopped, crashed or left)"
    )
    timed_out = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
        "20000ms for recv operation to complete"
    )
    assert "did not answer in time" in failure_reason(timed_out)
    other = RuntimeError("[/x/gloo/transport/tcp/pair.cc:9] Something else. This is typically")
    assert failure_reason(other) == "Something else"


def give_up_while_waiting(collective: Collective) -> tuple[str, float]:
    """Rank 1 never sums (it hangs); rank 0 gives the group up 1 s into its wait, from
    another thread, as a node whose group broke does: how its wait ended, and when."""
    if collective.rank == 1:
        time.sleep(5.0)  # past rank 0's end: no connection closes meanwhile
        return "", 0.0
    threading.Timer(1.0, collective.abort, ("the node was given another stage",)).start()
    started = time.monotonic()
    try:
        collective.all_reduce(torch.ones(3))
    except CollectiveError as exc:
        return str(exc), time.monotonic() - started
    return "no error", time.monotonic() - started


def test_giving_a_group_up_ends_a_collective_already_waiting() -> None:
    """gloo's own abort leaves a waiting collective to its timeout (60 s here, 20 s in a
    node): a member whose group broke would sit out the rest of it, holding its compute
    worker, and join no new group meanwhile."""
    (message, waited), _ = in_group(2, give_up_while_waiting)
    assert message == "tensor-parallel group test: the node was given another stage"
    assert waited < 4.0  # 1 s, and then at most a slice of its wait (ABORT_POLL_S)


def move_on(collective: Collective) -> tuple[str, str, float, float]:
    """Rank 0 sums on a thread, as a compute worker does, while its node, placed elsewhere,
    watches the group (``give_up_when_stuck``): first while rank 1 sums alike (healthy),
    then while rank 1 hangs past rank 0's end. Why rank 0 gave the group up each time (""
    if it did not), when its sums ended the second time, and how long a collective waited
    then (0: none waits)."""
    rounds, pause = 100, 0.025  # (healthy: over STUCK_S in all)
    if collective.rank == 1:
        for _ in range(rounds):
            collective.all_reduce(torch.ones(3))
            time.sleep(pause)
        time.sleep(STUCK_S + 3.0)  # hung: no connection closes before rank 0 gives up
        return "", "", 0.0, 0.0

    def give_up(g: Membership, why: str) -> None:  # as a node's service breaks a group
        g.broken = why
        g.collective.abort(why)

    def sums() -> None:
        with contextlib.suppress(CollectiveError):
            for _ in range(rounds):
                collective.all_reduce(torch.ones(3))
                time.sleep(pause)

    async def watch() -> tuple[str, float]:
        group = Membership(cpb.TpGroup(id="test", rank=0, size=2), collective)
        started = time.monotonic()
        watcher = asyncio.create_task(give_up_when_stuck(group, give_up))
        await asyncio.to_thread(sums)
        watcher.cancel()
        return group.broken, time.monotonic() - started

    healthy, _ = asyncio.run(watch())
    hung, ended = asyncio.run(watch())
    return healthy, hung, ended, collective.waiting_s()


def test_a_node_placed_elsewhere_gives_its_group_up_only_when_stuck() -> None:
    """Tour D: a member regrouped while its old group's collective waited for a partner
    that hung sat out gloo's timeout, its new stage queued behind that collective (a
    stream stalled 23 s). It gives the old group up once a collective has waited STUCK_S;
    a healthy group (collectives of milliseconds) serves on until the new stage is ready."""
    (healthy, hung, ended, waiting), _ = in_group(2, move_on)
    assert healthy == ""
    assert re.fullmatch(r"a collective waited [23] s for a partner as this node moved on", hung)
    assert ended < STUCK_S + 2.0  # not gloo's timeout (60 s here)
    assert waiting == 0.0


def test_a_group_runs_on_gloo_or_on_nccl_with_cuda_only() -> None:
    store = dist.HashStore()
    with pytest.raises(InvalidArgument, match="NCCL needs a CUDA device"):
        Collective.form("g", 0, 2, store, "127.0.0.1", 1.0, backend="nccl", device="cpu")
    with pytest.raises(InvalidArgument, match="not gloo or nccl"):
        Collective.form("g", 0, 2, store, "127.0.0.1", 1.0, backend="mpi")


def test_vocab_range_covers_the_vocabulary_once() -> None:
    for vocab in (1, 7, 50257):
        for size in (1, 2, 3, 4):
            ranges = [vocab_range(vocab, r, size) for r in range(size)]
            assert ranges[0][0] == 0 and ranges[-1][1] == vocab
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_a_rendezvous_store_listens_on_its_nodes_host_only() -> None:
    """torch's store, given a port, listens on every interface, and takes no swarm key: a
    node's rendezvous listens on its data plane's host alone, and serves a member there."""
    store = rendezvous_store("127.0.0.1", 10.0)
    listening = [
        c.laddr.ip
        for c in psutil.Process().net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == store.port
    ]
    assert listening == ["127.0.0.1"]  # (torch's own: "::", every interface)
    member = dist.TCPStore(
        "127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=10)
    )
    member.set("rank 1", "here")
    assert store.get("rank 1") == b"here"
