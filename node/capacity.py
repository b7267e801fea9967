"""What a node can give: memory for weights and KV caches, and measured speed per unit.

Placement weighs units by time, so a node measures, on its own device and dtype, a decode
step of its blocks (with a KV cache of :data:`CONTEXT` positions) and one of the head
(ln_f + lm_head over the vocabulary), at the swarm model's shape with random weights. The
blocks are timed as a stage runs them: several in a row, as many as it takes to stream
:data:`STREAM_BYTES` of weights (at most the model's), so that a small block is not timed
from a warm cache it never has when a stage runs (GPT-2 124M: 5 blocks; here one alone
took 0.42 ms a step, 0.56 ms each three in a row, 0.61 ms six in a row). Only those units
are built, never the whole model. The fastest of several timed steps after a warm-up is
kept: other work on the machine only ever adds time to a step (timeit's reasoning), and
nodes that start together measure while the others do. Four volunteers measuring the
demo model at once on this project's 2-core machine read a block at 0.35-2.2 ms by the
median of 9 steps, 0.17-0.42 ms by the fastest. On GPT-2 124M's shape on a CPU it takes
well under two seconds.

Timings are cached in ``<cache>/capacity.msgpack``, keyed by everything that changes them
(model shape, device, dtype, torch version, CPU count and threads), so a node that joins
again does not measure again. Memory is not cached: it is read at every start.

Memory, unless ``max_memory`` says: on a CPU half of the available system RAM (psutil's
figure, or less inside a container: see :mod:`nanoshard.machine`), since a volunteer's
machine has other work; on Apple silicon (MPS) the same, the GPU's memory being that RAM
(counted once); on CUDA 80% of the GPU's free memory.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import msgpack
import torch

from nanoshard import machine
from nanoshard.config import GPTConfig
from nanoshard.engine import DTYPES, Stage, parse_dtype, weights_name
from nanoshard.errors import InvalidArgument
from nanoshard.files import write_atomic
from nanoshard.v1 import coordinator_pb2 as pb

from .weights import cache_root

log = logging.getLogger(__name__)

CONTEXT = 96  # positions in the KV cache when a decode step is timed
WARMUP = 3
REPEATS = 9
STREAM_BYTES = 128 * 2**20  # weights the timed blocks hold together (well over a CPU's cache)
MAX_TIMED_BLOCKS = 8
MEASURE_VERSION = 3  # bump when the method changes: old cached timings are then ignored
RAM_FRACTION = 0.5
CUDA_FRACTION = 0.8
CACHE_FILE = "capacity.msgpack"
MAX_CACHED = 32  # measurements kept in the cache file (newest win)


@dataclass(frozen=True)
class Capacity:
    """What a node offers for one model: the wire's Capacity as a dataclass."""

    device: str  # "cpu", "cuda:0", "mps"
    dtype: str  # weights dtype: a name of nanoshard.engine.DTYPES
    memory_bytes: int  # for weights and KV caches
    block_ms: float  # one block's decode step
    head_ms: float  # the head's decode step


def _device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _dtype_name(dtype: torch.dtype | str) -> str:
    try:
        return weights_name(parse_dtype(dtype) if isinstance(dtype, str) else dtype)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


# ---- measuring --------------------------------------------------------------------------


def available_memory(device: torch.device | str) -> int:
    """Bytes a node may use by default on ``device`` (see the module docstring)."""
    device = _device(device)
    if device.type == "cuda":
        return int(machine.cuda_free(device) * CUDA_FRACTION)
    # cpu, and mps: unified memory is system RAM, counted once
    return int(machine.available_ram() * RAM_FRACTION)


def _random_stage(
    config: GPTConfig, unit: int, device: torch.device, dtype: torch.dtype, count: int = 1
) -> Stage:
    """``count`` units from ``unit`` with random weights (nn's default init), built straight on the device.

    Not via the meta device: its first use in a process costs about a second here.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(0)  # the node's own random streams are left as they were
        stage = Stage(config, unit, unit + count)
    return stage.to_weights(dtype).eval()


def _fastest_ms(step: Callable[[], object], device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(REPEATS):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000.0


def measure_timings(
    config: GPTConfig, device: torch.device | str, dtype: torch.dtype | str
) -> tuple[float, float]:
    """(block_ms, head_ms): the fastest decode-step times of one block and of the head."""
    device = _device(device)
    dtype = DTYPES[_dtype_name(dtype)]
    gen = torch.Generator(device=device).manual_seed(1)
    act = torch.float32 if dtype == torch.int8 else dtype
    x = torch.randn(1, config.n_embd, generator=gen, device=device).to(act)
    with torch.inference_mode():
        block_ms = _time_block(config, device, dtype, x, gen)
        head = _random_stage(config, config.head_unit, device, dtype)
        head_ms = _fastest_ms(lambda: head(x), device)
    return block_ms, head_ms


def _time_block(
    config: GPTConfig,
    device: torch.device,
    dtype: torch.dtype,
    x: torch.Tensor,
    gen: torch.Generator,
) -> float:
    """One block's decode step over a KV cache of CONTEXT positions, in a row of
    ``timed_blocks`` (freed on return)."""
    context = min(CONTEXT, config.block_size - 1)
    n = timed_blocks(config, dtype)
    blocks = _random_stage(config, 1, device, dtype, n)
    cache = blocks.new_cache(context + 1)
    blocks(torch.randn(context, config.n_embd, generator=gen, device=device).to(x.dtype), cache)
    # Every timed step writes position `context` again: the same work each time.
    return _fastest_ms(lambda: blocks(x, cache, pos=context), device) / n


def timed_blocks(config: GPTConfig, dtype: torch.dtype) -> int:
    """How many blocks in a row the speed of one is measured over (``STREAM_BYTES``)."""
    per_block = 12 * config.n_embd**2 * dtype.itemsize
    return max(1, min(config.n_layer, MAX_TIMED_BLOCKS, math.ceil(STREAM_BYTES / per_block)))


def measure_capacity(
    config: GPTConfig,
    device: torch.device | str,
    dtype: torch.dtype | str,
    *,
    max_memory: int | None = None,
) -> Capacity:
    """Measure this machine for ``config``'s shape (no cache; see load_or_measure)."""
    started = time.perf_counter()
    block_ms, head_ms = measure_timings(config, device, dtype)
    capacity = _capacity(device, dtype, max_memory, block_ms, head_ms)
    log.info(
        "measured %s %s: block %.2f ms, head %.2f ms per decode step (%.2f s)",
        capacity.device,
        capacity.dtype,
        block_ms,
        head_ms,
        time.perf_counter() - started,
    )
    return capacity


def _capacity(
    device: torch.device | str,
    dtype: torch.dtype | str,
    max_memory: int | None,
    block_ms: float,
    head_ms: float,
) -> Capacity:
    memory = max_memory if max_memory is not None else available_memory(device)
    if memory <= 0:
        raise InvalidArgument(f"max memory must be positive, got {memory}")
    return Capacity(str(_device(device)), _dtype_name(dtype), int(memory), block_ms, head_ms)


# ---- the measurement cache ------------------------------------------------------------


def cache_key(config: GPTConfig, device: torch.device | str, dtype: torch.dtype | str) -> str:
    """What the timings depend on, as one string."""
    device = _device(device)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return (
        f"v{MEASURE_VERSION} embd={config.n_embd} head={config.n_head} vocab={config.vocab_size} "
        f"bias={config.bias} ctx={min(CONTEXT, config.block_size - 1)} device={device} "
        f"{hardware} dtype={_dtype_name(dtype)} torch={torch.__version__} "
        f"cpus={os.cpu_count()} threads={torch.get_num_threads()}"
    )


def _read_cache(path: Path) -> dict:
    try:
        data = msgpack.unpackb(path.read_bytes())
        if isinstance(data, dict):
            return data
    except FileNotFoundError:
        pass
    except (OSError, ValueError, msgpack.UnpackException) as e:
        log.warning("%s: unreadable (%s), measuring again", path, e)
    return {}


def load_or_measure(
    config: GPTConfig,
    device: torch.device | str,
    dtype: torch.dtype | str,
    *,
    cache_dir: str | Path | None = None,
    max_memory: int | None = None,
) -> Capacity:
    """The cached timings for this model shape and machine, else a fresh measurement (cached)."""
    path = cache_root(cache_dir) / CACHE_FILE
    key = cache_key(config, device, dtype)
    cached = _read_cache(path)
    hit = cached.get(key)
    if isinstance(hit, dict):
        block_ms, head_ms = hit.get("block_ms"), hit.get("head_ms")
        if _positive(block_ms) and _positive(head_ms):
            log.info("capacity from %s: block %.2f ms, head %.2f ms", path, block_ms, head_ms)
            return _capacity(device, dtype, max_memory, block_ms, head_ms)
    capacity = measure_capacity(config, device, dtype, max_memory=max_memory)
    cached[key] = {"block_ms": capacity.block_ms, "head_ms": capacity.head_ms, "at": time.time()}
    newest = sorted(cached.items(), key=lambda kv: _at(kv[1]), reverse=True)[:MAX_CACHED]
    try:
        write_atomic(path, msgpack.packb(dict(newest)))
    except OSError as e:  # a read-only home is no reason to fail: measure again next time
        log.warning("cannot cache the capacity measurement in %s: %s", path, e)
    return capacity


def _positive(value: object) -> TypeGuard[float]:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def _at(record: object) -> float:
    at = record.get("at") if isinstance(record, dict) else None
    return at if isinstance(at, float) else 0.0


# ---- the wire ---------------------------------------------------------------------------


def to_wire(capacity: Capacity) -> pb.Capacity:
    return pb.Capacity(
        device=capacity.device,
        dtype=capacity.dtype,
        memory_bytes=capacity.memory_bytes,
        block_ms=capacity.block_ms,
        head_ms=capacity.head_ms,
    )
