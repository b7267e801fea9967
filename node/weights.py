"""A node's weights: its stage's tensors, from the on-disk cache or fetched from the coordinator.

The cache (``--cache-dir``, default the platform's cache folder: ``~/.cache/nanoshard`` on
Linux, see :mod:`nanoshard.machine`) is content-addressed::

    <cache>/tensors/<sha256>              a tensor's canonical bytes (see tensor_sha256)
    <cache>/models/<model_id>.msgpack     per model: name -> sha256, shape, dtype (+ config)

so a tensor shared by two models, or by two stages (wte: embed and head), is stored once.
Every file is written to a temporary name and renamed, so a reader never sees half of one.

Trust: nothing enters the cache unchecked (each fetched tensor's size and sha256 must match
the model card's manifest), and every cached file is hashed again when read, so a file
corrupted on disk is noticed, deleted and fetched again. Hashing costs far less than a load
from disk or a download, and a node then never serves weights that are not the swarm's.

Memory: a stage's tensors come back memory-mapped from their cache files (copy-on-write),
so until a node makes its own copy they are the files' pages, which the kernel can drop and
read again, not the node's own memory. A tensor-parallel member slices each to its share
(``nanoshard/tp.py``): its own memory holds its share only, never the whole stage, and a
volunteer with less memory than one block can load its share of it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import msgpack
import torch

from nanoshard import machine, rpc
from nanoshard.checkpoint import Checkpoint, TensorEntry, tensor_sha256
from nanoshard.config import check_units, stage_tensor_names
from nanoshard.errors import CheckpointError
from nanoshard.files import write_atomic
from nanoshard.modelcard import CHUNK_BYTES, ModelCardInfo, check_card
from nanoshard.security import Security
from nanoshard.v1 import coordinator_pb2 as pb
from nanoshard.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = machine.cache_dir()
INDEX_FORMAT = 1

Progress = Callable[[int, int], None]  # (bytes_done, bytes_total) of the download


@dataclass
class FetchStats:
    """What one fetch_stage did: tensors and bytes from the cache and over the network."""

    cached_tensors: int = 0
    cached_bytes: int = 0
    fetched_tensors: int = 0
    fetched_bytes: int = 0  # TensorChunk data received


def entry_nbytes(entry: TensorEntry) -> int:
    return torch.Size(entry.shape).numel() * getattr(torch, entry.dtype).itemsize


def _mapped(path: Path, entry: TensorEntry) -> torch.Tensor:
    """The file at ``path`` as the manifest's tensor, memory-mapped copy-on-write."""
    dtype, size = getattr(torch, entry.dtype), entry_nbytes(entry)
    if size == 0:
        return torch.empty(entry.shape, dtype=dtype)
    raw = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    return raw.view(dtype).reshape(entry.shape)


# ---- the content-addressed cache -------------------------------------------------------


def cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()


def tensor_path(cache_dir: Path, sha256: str) -> Path:
    return cache_dir / "tensors" / sha256


def read_cached(cache_dir: Path, entry: TensorEntry) -> torch.Tensor | None:
    """A tensor from the cache, or None when absent; a corrupt file is deleted (and None).

    Blocking: call it in a thread.
    """
    path = tensor_path(cache_dir, entry.sha256)
    size = entry_nbytes(entry)
    try:
        if path.stat().st_size != size:
            raise ValueError(f"{path.stat().st_size} bytes, expected {size}")
        tensor = _mapped(path, entry)
        raw = tensor.reshape(-1).view(torch.uint8)
        if hashlib.sha256(raw.numpy().data).hexdigest() != entry.sha256:
            raise ValueError("sha256 differs")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("cached %s (%s) is corrupt (%s): deleting it", entry.name, path, e)
        with contextlib.suppress(OSError):
            path.unlink()
        raise _Corrupt from None
    return tensor


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
    security: Security | None = None,
    coordinator: str = "",
) -> tuple[dict[str, torch.Tensor], int]:
    """The tensors of units ``[start, end)`` (nanoGPT names, stored dtype, CPU), ready for
    ``Stage.from_tensors``, and the bytes that came over the network: from the cache, the
    missing ones in one FetchTensors call.

    Fetched tensors are checked against the card (size, sha256) before they are cached or
    returned; a mismatch raises CheckpointError naming the tensor. ``progress`` gets
    (bytes_done, bytes_total) of the download; ``stats`` (filled in) says what came from where;
    ``security`` puts the node's swarm token on the call and checks that the coordinator (at
    ``coordinator``, HOST:PORT) proves it holds the key before a byte is taken.
    """
    info = await asyncio.to_thread(check_card, card)  # builds shapes: not on the event loop
    check_units(info.config, start, end)
    root = cache_root(cache_dir)
    stats = stats if stats is not None else FetchStats()
    names = stage_tensor_names(info.config, start, end)
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        try:
            t = await asyncio.to_thread(read_cached, root, info.entries[name])
        except _Corrupt:  # deleted (and logged): fetched again below
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
        fetched = await _fetch(
            stub, info, missing, root, total, progress, stats, security or Security(), coordinator
        )
        tensors.update(fetched)
        log.info(
            "fetched %d bytes (%d tensors) for units [%d, %d); %d bytes (%d tensors) were cached",
            stats.fetched_bytes,
            stats.fetched_tensors,
            start,
            end,
            stats.cached_bytes,
            stats.cached_tensors,
        )
    elif progress is not None:
        progress(0, 0)
    await asyncio.to_thread(write_index, root, info, names)
    return {name: tensors[name] for name in names}, stats.fetched_bytes


async def _fetch(
    stub: pb_grpc.CoordinatorStub,
    info: ModelCardInfo,
    names: list[str],
    root: Path,
    total: int,
    progress: Progress | None,
    stats: FetchStats,
    security: Security,
    coordinator: str,
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
        request = pb.FetchRequest(names=names)
        async for chunk in security.proven_stream(stub.FetchTensors, request, coordinator):
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
        path = tensor_path(root, entry.sha256)
        write_atomic(path, data)
        return _mapped(path, entry)  # (``data`` goes: the stage holds the file's pages)

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


class RichProgress:
    """A rich progress bar driven as a Progress callback: it appears at the first call with
    bytes to download and goes when they are all done, at exit of a ``with`` block, or when
    the process ends (a download that failed halfway)."""

    def __init__(self, description: str) -> None:
        self.description = description
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            if done >= total:
                return  # nothing to download: no bar
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
            )
            self._task = self._bar.add_task(self.description, total=total)
            self._bar.start()
            atexit.register(self.close)
        self._bar.update(self._task, completed=done, total=total)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            atexit.unregister(self.close)

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rich_progress(description: str = "weights") -> RichProgress:
    """A Progress callback that draws a rich bar (bytes, speed, time left); for CLIs."""
    return RichProgress(description)
