"""The model a coordinator serves: its card (config, tokenizer, manifest) and its weights.

The coordinator opens the checkpoint once at start, hashes every tensor into a manifest
(per unit: name, shape, dtype, sha256 of the canonical bytes, see
:func:`nanoshard.checkpoint.tensor_sha256`) and names the model by that manifest
(:func:`nanoshard.modelcard.manifest_model_id`; the card's shared parts live there). Nodes
then fetch only their stage's tensors with FetchTensors: each tensor's canonical bytes
(nanoGPT layout, stored dtype, row-major, little-endian: exactly what the hash covers), in
chunks of at most :data:`nanoshard.modelcard.CHUNK_BYTES`.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from nanoshard import hub, rpc
from nanoshard.checkpoint import (
    DEMO,
    Checkpoint,
    TensorEntry,
    open_checkpoint,
    tensor_sha256,
)
from nanoshard.errors import (
    FailedPrecondition,
    InvalidArgument,
    NanoshardError,
)
from nanoshard.modelcard import CHUNK_BYTES, manifest_model_id
from nanoshard.tokenizer import (
    GPT2_N_VOCAB,
    TOKENIZER_FILES,
    encoding_for,
    tokenizer_files,
    vocabulary_mismatch,
)
from nanoshard.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)

MEMORY_CACHE_BYTES = 256 << 20  # a model at most this big is kept in memory once read


def model_name(spec: str | Path, path: Path) -> str:
    """``"demo"``, a hub id (``gpt2``, for a snapshot of the hub's cache), a Hugging Face
    directory's name, or a nanoGPT file's (``out/ckpt.pt`` -> out)."""
    if isinstance(spec, str) and spec == DEMO:
        return DEMO
    if path.is_dir() and (repo := hub.repo_of(path)) is not None:
        return repo
    if path.is_dir() or path.stem == "ckpt":
        return (path if path.is_dir() else path.parent).resolve().name
    return path.stem


def byte_chunks(tensor: torch.Tensor, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """A CPU tensor's canonical bytes (see tensor_sha256) in pieces of at most ``size``."""
    t = tensor.detach().to("cpu").contiguous()  # kept alive while the view below is read
    if not t.nbytes:
        return
    view = memoryview((ctypes.c_ubyte * t.nbytes).from_address(t.data_ptr()))
    for offset in range(0, t.nbytes, size):
        yield bytes(view[offset : offset + size])


class ModelStore:
    """The coordinator's model: a checkpoint, its manifest and card, and tensor reads.

    Build one with :meth:`open`. ``units[u]`` lists unit ``u``'s tensors (the head lists wte
    too, tied); ``entries`` maps every tensor name to its manifest line.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        name: str,
        units: list[list[TensorEntry]],
        vocab_json: bytes = b"",
        merges_txt: bytes = b"",
        *,
        memory_cache_bytes: int = MEMORY_CACHE_BYTES,
    ) -> None:
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.name = name
        self.units = units
        self.entries = {e.name: e for unit in units for e in unit}
        self.vocab_json, self.merges_txt = vocab_json, merges_txt
        self.model_id = manifest_model_id(self.config, units)
        self.nbytes = sum(_nbytes(e) for e in self.entries.values())
        # A small model is read from the file once and then served from memory; a big one is
        # read per request, so the coordinator never holds it twice.
        self._cached: dict[str, torch.Tensor] | None = (
            {} if self.nbytes <= memory_cache_bytes else None
        )
        self._card: pb.ModelCard | None = None

    @classmethod
    def open(
        cls,
        spec: str | Path,
        *,
        trust_pickle: bool = False,
        revision: str | None = None,
        memory_cache_bytes: int = MEMORY_CACHE_BYTES,
    ) -> ModelStore:
        """Open ``"demo"``, a checkpoint path or a hub id (at ``revision``) and hash it
        (reads every tensor once).

        Every problem (missing file, wrong architecture, broken tokenizer files, a hub id
        neither cached nor reachable) raises :class:`CheckpointError` naming the file.
        """
        checkpoint = open_checkpoint(spec, trust_pickle=trust_pickle, revision=revision)
        path = Path(checkpoint.path)
        vocab_json, merges_txt = _tokenizer_files(path, checkpoint.config.vocab_size)
        log.info("hashing %s (%d tensors)", path, len(checkpoint.tensor_names()))
        units = checkpoint.manifest()
        store = cls(
            checkpoint,
            model_name(spec, path),
            units,
            vocab_json,
            merges_txt,
            memory_cache_bytes=memory_cache_bytes,
        )
        log.info(
            "model %s: %d units, %.1f MB, id %s",
            store.name,
            store.config.n_units,
            store.nbytes / 1e6,
            store.model_id[:16],
        )
        return store

    def card(self) -> pb.ModelCard:
        """The ModelCard every node and client asks for (built once)."""
        if self._card is None:
            self._card = pb.ModelCard(
                model_id=self.model_id,
                name=self.name,
                config_json=json.dumps(self.config.to_dict(), sort_keys=True),
                vocab_json=self.vocab_json,
                merges_txt=self.merges_txt,
                units=[
                    pb.UnitManifest(
                        unit=u,
                        tensors=[
                            pb.TensorInfo(
                                name=e.name, shape=list(e.shape), dtype=e.dtype, sha256=e.sha256
                            )
                            for e in unit
                        ],
                    )
                    for u, unit in enumerate(self.units)
                ],
            )
        return self._card

    def check_names(self, names: Sequence[str]) -> list[str]:
        """A FetchRequest's names, validated: known, each once, at least one."""
        if not names:
            raise InvalidArgument("FetchTensors names no tensor")
        if len(names) > len(self.entries):
            raise InvalidArgument(
                f"FetchTensors names {len(names)} tensors; the model has {len(self.entries)}"
            )
        unknown = [n for n in names if n not in self.entries]
        if unknown:
            shown = ", ".join(repr(n[:100]) for n in unknown[:3])
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            raise InvalidArgument(
                f"model {self.name} has no tensor {shown}{more} (names are nanoGPT's, as in "
                "the model card's manifest)"
            )
        if len(set(names)) != len(names):
            dup = next(n for i, n in enumerate(names) if n in names[:i])
            raise InvalidArgument(f"FetchTensors names {dup!r} twice")
        return list(names)

    def read(self, name: str) -> torch.Tensor:
        """One tensor as the manifest describes it (blocking: call it in a thread).

        Read from the file, it is checked against the manifest, so a checkpoint replaced on
        disk after start is refused rather than sent.
        """
        if self._cached is not None and name in self._cached:
            return self._cached[name]
        entry = self.entries[name]
        t = self.checkpoint.read([name])[name].contiguous()
        if (
            tuple(t.shape) != entry.shape
            or str(t.dtype).removeprefix("torch.") != entry.dtype
            or tensor_sha256(t) != entry.sha256
        ):
            raise FailedPrecondition(
                f"{self.checkpoint.path} changed on disk since the coordinator started (tensor "
                f"{name!r} no longer matches model {self.model_id[:16]}): restart the coordinator"
            )
        if self._cached is not None:
            self._cached[name] = t
        return t


def _nbytes(entry: TensorEntry) -> int:
    return torch.Size(entry.shape).numel() * getattr(torch, entry.dtype).itemsize


def _tokenizer_files(path: Path, vocab_size: int) -> tuple[bytes, bytes]:
    """``vocab.json`` and ``merges.txt`` of a model (``tokenizer_files``), checked; empty
    when it has none (GPT-2's). A vocabulary smaller than the tokenizer's is logged."""
    files = tokenizer_files(path)
    n_ids, which = GPT2_N_VOCAB, "GPT-2's: the model has no files of its own"
    if files is not None:  # refuse at start a tokenizer every client would choke on later
        n_ids, which = encoding_for(path).n_vocab, " + ".join(TOKENIZER_FILES)
    if why := vocabulary_mismatch(n_ids, vocab_size, which):
        log.warning("%s: %s", path, why)
    return (b"", b"") if files is None else (files[0].read_bytes(), files[1].read_bytes())


async def fetch_tensors(
    store: ModelStore, request: pb.FetchRequest, context: Any = None
) -> AsyncIterator[pb.TensorChunk]:
    """FetchTensors: the named tensors' canonical bytes, tensor after tensor, in request order.

    Each tensor comes as chunks with increasing ``offset``, each at most CHUNK_BYTES, and
    ``total`` its size; reads run in a thread so the event loop keeps serving heartbeats.
    Errors are nanoshard errors; given the call's ``context``, they end the call with their
    gRPC status instead (the servicer just returns this generator).
    """
    try:
        names = store.check_names(list(request.names))
        for name in names:
            tensor = await asyncio.to_thread(store.read, name)
            total = tensor.nbytes
            if total == 0:
                yield pb.TensorChunk(name=name, offset=0, total=0)
            offset = 0
            for data in byte_chunks(tensor):
                yield pb.TensorChunk(name=name, offset=offset, total=total, data=data)
                offset += len(data)
    except NanoshardError as exc:
        if context is None:
            raise
        log.info("FetchTensors refused: %s", exc)
        await rpc.abort(context, exc)
