"""A node's weights: its stage's tensors, from the on-disk cache or fetched from the coordinator.

The cache (``--cache-dir``, default ``~/.cache/nanoshard``) is content-addressed::

    <cache>/tensors/<sha256>              a tensor's canonical bytes (see tensor_sha256)
    <cache>/models/<model_id>.msgpack     per model: name -> sha256, shape, dtype (+ config)

so a tensor shared by two models, or by two stages (wte: embed and head), is stored once.
Every file is written to a temporary name and renamed, so a reader never sees half of one.

Trust: nothing enters the cache unchecked (each fetched tensor's size and sha256 must match
the model card's manifest), and every cached file is hashed again when read, so a file
corrupted on disk is noticed, deleted and fetched again. Hashing costs far less than a load
from disk or a download, and a node then never serves weights that are not the swarm's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import msgpack
import torch

from nanoshard import rpc
from nanoshard.checkpoint import Checkpoint, TensorEntry, model_shapes, tensor_sha256
from nanoshard.config import GPTConfig, check_units, stage_tensor_names, unit_tensor_names
from nanoshard.coordinator.model import CHUNK_BYTES, manifest_model_id
from nanoshard.errors import CheckpointError, InvalidArgument
from nanoshard.v1 import coordinator_pb2 as pb
from nanoshard.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/nanoshard")
INDEX_FORMAT = 1
WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "float64")  # what a manifest may name
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[int, int], None]  # (bytes_done, bytes_total) of the download


@dataclass
class FetchStats:
    """What one fetch_stage did: tensors and bytes from the cache and over the network."""

    cached_tensors: int = 0
    cached_bytes: int = 0
    fetched_tensors: int = 0
    fetched_bytes: int = 0  # TensorChunk data received
    corrupt_files: int = 0  # cached files that failed their hash, deleted and fetched again


# ---- the model card, checked -----------------------------------------------------------


@dataclass(frozen=True)
class ModelCardInfo:
    """A ModelCard validated and decoded: config, manifest per unit, entries by name."""

    model_id: str
    name: str
    config: GPTConfig
    units: list[list[TensorEntry]]
    entries: dict[str, TensorEntry]


def check_card(card: pb.ModelCard) -> ModelCardInfo:
    """Decode a ModelCard, refusing one that is not whole and self-consistent.

    The manifest must list exactly the tensors of the config's units, with the config's shapes,
    a float dtype and a sha256 each, and ``model_id`` must be its hash (manifest_model_id).
    """

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"the coordinator's model card is malformed: {what}")

    try:
        config = GPTConfig.from_dict(json.loads(card.config_json))
    except (ValueError, TypeError, InvalidArgument) as e:
        raise bad(f"config_json: {e}") from None
    if len(card.units) != config.n_units:
        raise bad(f"{len(card.units)} units in the manifest, the config has {config.n_units}")
    shapes = model_shapes(config)
    units: list[list[TensorEntry]] = []
    entries: dict[str, TensorEntry] = {}
    for u, unit in enumerate(card.units):
        names = [t.name for t in unit.tensors]
        if unit.unit != u or names != unit_tensor_names(config, u):
            raise bad(f"unit {unit.unit} (at position {u}) does not list unit {u}'s tensors")
        row = []
        for t in unit.tensors:
            entry = TensorEntry(t.name, tuple(t.shape), t.dtype, t.sha256)
            if entry.shape != shapes[t.name]:
                raise bad(f"{t.name} has shape {list(t.shape)}, expected {list(shapes[t.name])}")
            if entry.dtype not in WEIGHT_DTYPES or not SHA256_HEX.match(entry.sha256):
                raise bad(f"{t.name} has dtype {t.dtype!r} and sha256 {t.sha256[:70]!r}")
            if entries.setdefault(t.name, entry) != entry:
                raise bad(f"{t.name} is listed twice with different contents")
            row.append(entry)
        units.append(row)
    if manifest_model_id(config, units) != card.model_id:
        raise bad(f"model_id {card.model_id[:70]!r} is not the hash of its manifest")
    return ModelCardInfo(card.model_id, card.name, config, units, entries)


def entry_nbytes(entry: TensorEntry) -> int:
    return torch.Size(entry.shape).numel() * getattr(torch, entry.dtype).itemsize


def _tensor_from_bytes(data: bytearray, entry: TensorEntry) -> torch.Tensor:
    """A tensor sharing ``data``'s memory (no copy), shaped and typed as the manifest says."""
    dtype = getattr(torch, entry.dtype)
    if not data:
        return torch.empty(entry.shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(entry.shape)


# ---- the content-addressed cache -------------------------------------------------------


def cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()


def tensor_path(cache_dir: Path, sha256: str) -> Path:
    return cache_dir / "tensors" / sha256


def write_atomic(path: Path, data: bytes | bytearray) -> None:
    """Write ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def read_cached(cache_dir: Path, entry: TensorEntry) -> torch.Tensor | None:
    """A tensor from the cache, or None when absent; a corrupt file is deleted (and None).

    Blocking: call it in a thread.
    """
    path = tensor_path(cache_dir, entry.sha256)
    size = entry_nbytes(entry)
    try:
        if path.stat().st_size != size:
            raise ValueError(f"{path.stat().st_size} bytes, expected {size}")
        data = bytearray(size)
        with path.open("rb") as f:
            if f.readinto(data) != size:
                raise ValueError("short read")
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise ValueError("sha256 differs")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("cached %s (%s) is corrupt (%s): deleting it", entry.name, path, e)
        with contextlib.suppress(OSError):
            path.unlink()
        raise _Corrupt from None
    return _tensor_from_bytes(data, entry)


class _Corrupt(Exception):
    """A cached file failed its check (already deleted)."""


def read_index(cache_dir: str | Path | None, model_id: str) -> dict[str, Any]:
    """A model's cache index (``{}`` when absent or unreadable)."""
    path = cache_root(cache_dir) / "models" / f"{model_id}.msgpack"
    try:
        index = msgpack.unpackb(path.read_bytes())
        if isinstance(index, dict) and index.get("format") == INDEX_FORMAT:
            return index
        log.warning("%s: not a cache index of format %d, ignoring it", path, INDEX_FORMAT)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, msgpack.UnpackException) as e:
        log.warning("%s: unreadable cache index (%s), ignoring it", path, e)
    return {}


def write_index(cache_dir: Path, info: ModelCardInfo, names: list[str]) -> None:
    """Add ``names`` (now cached) to the model's index: name -> sha256, shape, dtype."""
    index = read_index(cache_dir, info.model_id) or {
        "format": INDEX_FORMAT,
        "model_id": info.model_id,
        "name": info.name,
        "config": info.config.to_dict(),
        "tensors": {},
    }
    for name in names:
        e = info.entries[name]
        index["tensors"][name] = {"sha256": e.sha256, "shape": list(e.shape), "dtype": e.dtype}
    path = cache_dir / "models" / f"{info.model_id}.msgpack"
    write_atomic(path, msgpack.packb(index))


def cached_range(cache_dir: str | Path | None, card: pb.ModelCard) -> tuple[int, int] | None:
    """The longest run of units whose tensors are all in the cache (files present, not yet
    verified): what a node may report as held when it joins. None when it has none."""
    info = check_card(card)
    root = cache_root(cache_dir)
    held = [
        all(tensor_path(root, e.sha256).is_file() for e in unit) for unit in info.units
    ] + [False]
    best, start = None, None
    for u, ok in enumerate(held):
        if ok and start is None:
            start = u
        elif not ok and start is not None:
            if best is None or u - start > best[1] - best[0]:
                best = (start, u)
            start = None
    return best


# ---- fetching a stage ------------------------------------------------------------------


async def fetch_stage(
    stub: pb_grpc.CoordinatorStub,
    card: pb.ModelCard,
    start: int,
    end: int,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    *,
    stats: FetchStats | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of units ``[start, end)`` (nanoGPT names, stored dtype, CPU), ready for
    ``Stage.from_tensors``: from the cache, the missing ones in one FetchTensors call.

    Fetched tensors are checked against the card (size, sha256) before they are cached or
    returned; a mismatch raises CheckpointError naming the tensor. ``progress`` gets
    (bytes_done, bytes_total) of the download; ``stats`` (filled in) says what came from where.
    """
    info = check_card(card)
    check_units(info.config, start, end)
    root = cache_root(cache_dir)
    stats = stats if stats is not None else FetchStats()
    names = stage_tensor_names(info.config, start, end)
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        try:
            t = await asyncio.to_thread(read_cached, root, info.entries[name])
        except _Corrupt:
            stats.corrupt_files += 1
            t = None
        if t is not None:
            tensors[name] = t
            stats.cached_tensors += 1
            stats.cached_bytes += t.nbytes
    missing = [n for n in names if n not in tensors]
    if missing:
        total = sum(entry_nbytes(info.entries[n]) for n in missing)
        log.info(
            "fetching %d tensors (%.1f MB) of units [%d, %d) from the coordinator",
            len(missing),
            total / 1e6,
            start,
            end,
        )
        fetched = await _fetch(stub, info, missing, root, total, progress, stats)
        tensors.update(fetched)
    elif progress is not None:
        progress(0, 0)
    await asyncio.to_thread(write_index, root, info, names)
    return {name: tensors[name] for name in names}


async def _fetch(
    stub: pb_grpc.CoordinatorStub,
    info: ModelCardInfo,
    names: list[str],
    root: Path,
    total: int,
    progress: Progress | None,
    stats: FetchStats,
) -> dict[str, torch.Tensor]:
    """One FetchTensors call for ``names``; every chunk checked, every tensor verified."""
    wanted = set(names)
    out: dict[str, torch.Tensor] = {}
    current: str | None = None
    buffer = bytearray()
    received = 0
    if progress is not None:
        progress(0, total)

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"the coordinator sent bad weights: {what}")

    try:
        async for chunk in stub.FetchTensors(pb.FetchRequest(names=names)):
            if chunk.name != current:
                if current is not None and received != len(buffer):
                    raise bad(f"{current!r} ended after {received} of {len(buffer)} bytes")
                if current is not None:
                    out[current] = await _accept(root, info.entries[current], buffer, stats)
                if chunk.name not in wanted or chunk.name in out:
                    raise bad(f"tensor {chunk.name[:100]!r} was not asked for (or came twice)")
                current, received = chunk.name, 0
                size = entry_nbytes(info.entries[current])
                if chunk.total != size:
                    raise bad(f"{current!r} is {chunk.total} bytes, the manifest says {size}")
                buffer = bytearray(size)
            n = len(chunk.data)
            if chunk.offset != received or n > CHUNK_BYTES or received + n > len(buffer):
                raise bad(
                    f"{current!r}: chunk of {n} bytes at offset {chunk.offset}, expected at "
                    f"most {CHUNK_BYTES} bytes at offset {received} of {len(buffer)}"
                )
            buffer[received : received + n] = chunk.data
            received += n
            stats.fetched_bytes += n
            if progress is not None:
                progress(stats.fetched_bytes, total)
    except grpc.RpcError as err:
        raise rpc.error_from_rpc(err, "coordinator") from None
    if current is not None and received != len(buffer):
        raise bad(f"the stream ended after {received} of {len(buffer)} bytes of {current!r}")
    if current is not None:
        out[current] = await _accept(root, info.entries[current], buffer, stats)
    lacking = [n for n in names if n not in out]
    if lacking:
        raise bad(f"the stream ended without {', '.join(lacking[:3])}")
    return out


async def _accept(
    root: Path, entry: TensorEntry, data: bytearray, stats: FetchStats
) -> torch.Tensor:
    """Check a received tensor against the manifest, then cache it (never before)."""

    def check_and_store() -> torch.Tensor:
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise CheckpointError(
                f"the coordinator sent tensor {entry.name!r} with sha256 {digest}, but the "
                f"model card says {entry.sha256}: not cached; is the coordinator's checkpoint "
                "intact?"
            )
        write_atomic(tensor_path(root, entry.sha256), data)
        return _tensor_from_bytes(data, entry)

    tensor = await asyncio.to_thread(check_and_store)
    stats.fetched_tensors += 1
    return tensor


# ---- a local checkpoint instead of a download ------------------------------------------


def verify_local_stage(
    checkpoint: Checkpoint, card: pb.ModelCard, start: int, end: int
) -> dict[str, torch.Tensor]:
    """Read units ``[start, end)`` from a node's own ``--model`` and check them against the
    swarm's card: the same config, and every tensor's shape, dtype and sha256. Returns the
    tensors (so they are read once). Blocking: call it in a thread.
    """
    info = check_card(card)
    where = checkpoint.path
    if checkpoint.config != info.config:
        raise CheckpointError(
            f"{where} is not the swarm's model {info.name!r}: its config is {checkpoint.config}, "
            f"the swarm's {info.config}. Leave out --model to download the swarm's weights"
        )
    tensors = checkpoint.read_stage(start, end)
    for name, t in tensors.items():
        e = info.entries[name]
        dtype = str(t.dtype).removeprefix("torch.")
        if tuple(t.shape) != e.shape or dtype != e.dtype or tensor_sha256(t) != e.sha256:
            raise CheckpointError(
                f"{where} is not the swarm's model {info.name!r} (id {info.model_id[:16]}): "
                f"tensor {name!r} differs ({dtype}, sha256 {tensor_sha256(t)[:16]}..., the swarm's "
                f"is {e.dtype}, {e.sha256[:16]}...). Leave out --model to download the swarm's "
                "weights, or point it at the same checkpoint the coordinator serves"
            )
    return tensors


# ---- for CLIs ---------------------------------------------------------------------------


@contextlib.contextmanager
def rich_progress(description: str = "weights") -> Iterator[Progress]:
    """A rich progress bar (bytes, speed, time left) and the callback that moves it."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update

