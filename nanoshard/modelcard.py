"""The model card: what a coordinator publishes about its model and every node checks.

A card carries the config, the tokenizer files and the weights manifest: per unit, each
tensor's name, shape, stored dtype and sha256 of its canonical bytes (see
:func:`nanoshard.checkpoint.tensor_sha256`). The model is named by that manifest
(:func:`manifest_model_id`), so a node can tell a whole card from a broken one
(:func:`check_card`). The coordinator builds cards (``coordinator/model.py``); nodes read them
(``node/weights.py``); both sides of FetchTensors keep to :data:`CHUNK_BYTES`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from nanoshard.checkpoint import FLOATS, Checkpoint, TensorEntry, model_shapes
from nanoshard.config import GPTConfig, unit_tensor_names
from nanoshard.errors import CheckpointError, InvalidArgument
from nanoshard.v1 import coordinator_pb2 as pb

CHUNK_BYTES = 1 << 20  # TensorChunk.data, at most (the proto's promise)
# The dtypes a manifest may name: those a checkpoint may store (torch names, e.g. "float32").
STORED_DTYPES = frozenset(str(d).removeprefix("torch.") for d in FLOATS.values())
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def manifest_model_id(config: GPTConfig, units: Sequence[Sequence[TensorEntry]]) -> str:
    """The model id: sha256 hex of the canonical JSON of the config and the manifest.

    The document is ``{"config": GPTConfig.to_dict(), "units": [[{"name", "shape", "dtype",
    "sha256"}, ...] per unit, in unit order]}`` serialised by ``json.dumps`` with sorted keys,
    ``separators=(",", ":")`` and ASCII only, then UTF-8 encoded. The config is in it because
    two models with the same tensors but another ``layer_norm_epsilon`` compute different
    things; the model's name is not (the same weights in another folder are the same model).
    A node recomputes it from a ModelCard to check that the card is whole.
    """
    doc = {
        "config": config.to_dict(),
        "units": [[entry.to_dict() for entry in unit] for unit in units],
    }
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


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
    a stored dtype and a sha256 each, and ``model_id`` must be its hash (manifest_model_id).
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
            if entry.dtype not in STORED_DTYPES or not SHA256_HEX.match(entry.sha256):
                raise bad(f"{t.name} has dtype {t.dtype!r} and sha256 {t.sha256[:70]!r}")
            if entries.setdefault(t.name, entry) != entry:
                raise bad(f"{t.name} is listed twice with different contents")
            row.append(entry)
        units.append(row)
    if manifest_model_id(config, units) != card.model_id:
        raise bad(f"model_id {card.model_id[:70]!r} is not the hash of its manifest")
    return ModelCardInfo(card.model_id, card.name, config, units, entries)


def quick_model_id(checkpoint: Checkpoint) -> str:
    """An id for the weights a static node serves, from metadata only (no tensor reads):
    nodes of one route must agree on it, and a client given the route's model checks it
    (another model, not other weights of the same shapes). The coordinator's model_id (a
    hash of every tensor) is the exact one."""
    info = [(n, *checkpoint.tensor_info(n)) for n in checkpoint.tensor_names()]
    blob = json.dumps([checkpoint.config.to_dict(), [(n, list(s), str(d)) for n, s, d in info]])
    return "meta-" + hashlib.sha256(blob.encode()).hexdigest()[:16]
