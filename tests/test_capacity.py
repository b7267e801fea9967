"""A node's capacity: measured per unit at the model's shape, cached, checked on the wire
(by the coordinator, which takes it from volunteers)."""

from __future__ import annotations

import math

import pytest
import torch

from nanoshard.config import GPTConfig
from nanoshard.coordinator.service import check_capacity
from nanoshard.errors import InvalidArgument
from nanoshard.node import capacity
from nanoshard.node.capacity import (
    CACHE_FILE,
    Capacity,
    load_or_measure,
    measure_capacity,
    to_wire,
)
from nanoshard.node.join import MIN_SHARE, STEP_BUFFERS, kv_budget
from nanoshard.v1 import coordinator_pb2 as pb

# A small block and a big vocabulary: the head is many times one block's work.
BIG_VOCAB = GPTConfig(block_size=128, vocab_size=32768, n_layer=4, n_head=2, n_embd=128)


@pytest.fixture(autouse=True)
def one_thread():
    """Time one torch thread: on a busy shared CPU, two threads' barriers can stall a whole
    scheduler tick per step (a block of any size then reads ~8 ms), which hides the
    difference between units these tests look for. The thread count is in the cache key."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _meminfo_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable")


def test_measurement_is_sane_and_the_head_costs_more_than_a_block():
    cap = measure_capacity(BIG_VOCAB, "cpu", "fp32")
    assert cap.device == "cpu" and cap.dtype == "fp32"
    assert all(math.isfinite(v) and v > 0 for v in (cap.block_ms, cap.head_ms))
    assert cap.head_ms > cap.block_ms
    # Half of the available RAM unless told otherwise.
    assert 0 < cap.memory_bytes <= _meminfo_available()
    assert measure_capacity(BIG_VOCAB, "cpu", "bf16", max_memory=123 << 20).memory_bytes == (
        123 << 20
    )
    check_capacity(to_wire(cap))


def test_gpt2_small_shape_is_measured():
    # How long measuring takes is part of a node's join time: benchmarks/join.py holds it
    # to its target (a timed unit test fails on a busy machine, not on slow code).
    cap = measure_capacity(GPTConfig(), "cpu", "fp32", max_memory=1 << 30)
    assert 0 < cap.block_ms < cap.head_ms * 20


def test_measurements_are_cached_per_shape_and_dtype(tmp_path, monkeypatch):
    calls: list[str] = []
    real = capacity.measure_timings

    def counting(config, device, dtype):
        calls.append(str(dtype))
        return real(config, device, dtype)

    monkeypatch.setattr(capacity, "measure_timings", counting)
    first = load_or_measure(BIG_VOCAB, "cpu", "fp32", cache_dir=tmp_path)
    assert calls == ["fp32"] and (tmp_path / CACHE_FILE).is_file()
    again = load_or_measure(BIG_VOCAB, "cpu", "fp32", cache_dir=tmp_path, max_memory=1 << 30)
    assert calls == ["fp32"]  # not measured again
    assert (again.block_ms, again.head_ms) == (first.block_ms, first.head_ms)
    assert again.memory_bytes == 1 << 30  # memory is not cached: read at every start
    # Another dtype, or a model of another width, is another measurement.
    load_or_measure(BIG_VOCAB, "cpu", "bf16", cache_dir=tmp_path)
    wider = GPTConfig(block_size=128, vocab_size=32768, n_layer=4, n_head=2, n_embd=192)
    load_or_measure(wider, "cpu", "fp32", cache_dir=tmp_path)
    assert calls == ["fp32", "bf16", "fp32"]
    # More layers change no unit's cost: the cached timings stand.
    deeper = GPTConfig(block_size=128, vocab_size=32768, n_layer=12, n_head=2, n_embd=128)
    load_or_measure(deeper, "cpu", "fp32", cache_dir=tmp_path)
    assert len(calls) == 3
    # Another thread count is another machine, as far as timings go.
    torch.set_num_threads(2)
    load_or_measure(BIG_VOCAB, "cpu", "fp32", cache_dir=tmp_path)
    assert len(calls) == 4
    torch.set_num_threads(1)
    # A garbled cache file is measured over, not a crash.
    (tmp_path / CACHE_FILE).write_bytes(b"\xc1 not msgpack")
    load_or_measure(BIG_VOCAB, "cpu", "fp32", cache_dir=tmp_path)
    assert len(calls) == 5


def test_what_a_node_sends_the_coordinator_reads_whole():
    cap = Capacity("cuda:1", "bf16", 8 << 30, 0.5, 3.25)
    got = check_capacity(to_wire(cap))
    assert (got.device, got.dtype, got.memory_bytes, got.block_ms, got.head_ms) == (
        cap.device,
        cap.dtype,
        cap.memory_bytes,
        cap.block_ms,
        cap.head_ms,
    )


GOOD = dict(device="cpu", dtype="fp32", memory_bytes=4 << 30, block_ms=2.0, head_ms=11.0)


@pytest.mark.parametrize(
    "change",
    [
        dict(block_ms=0.0),
        dict(block_ms=-1.0),
        dict(block_ms=math.nan),
        dict(head_ms=math.inf),
        dict(head_ms=1e6),
        dict(memory_bytes=0),
        dict(memory_bytes=2 << 50),
        dict(dtype="fp8"),
        dict(dtype=""),
        dict(device=""),
        dict(device="cpu; rm -rf /"),
        dict(device="x" * 100),
    ],
    ids=lambda c: f"{next(iter(c))}={str(next(iter(c.values())))[:12]}",
)
def test_nonsense_capacity_is_invalid_argument(change):
    check_capacity(pb.Capacity(**GOOD))
    with pytest.raises(InvalidArgument, match="capacity"):
        check_capacity(pb.Capacity(**{**GOOD, **change}))


def test_a_max_memory_promise_holds_however_small() -> None:
    """`--max-memory` is weights and KV caches: the KV caches get what the weights leave,
    never a floor past the promise (4 MiB promised, 3 of them weights: 1 MiB of KV)."""
    MiB = 2**20
    assert kv_budget(4 * MiB, 3 * MiB, whole_process=False) == MiB
    assert kv_budget(4 * MiB, 5 * MiB, whole_process=False) == 0  # (every Open refused)
    # the whole process as the share: a step's buffers kept out, and a floor to serve on
    assert (
        kv_budget(2048 * MiB, 512 * MiB, whole_process=True)
        == 2048 * MiB - 512 * MiB - STEP_BUFFERS
    )
    assert kv_budget(600 * MiB, 590 * MiB, whole_process=True) == MIN_SHARE
