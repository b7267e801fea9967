"""Checkpoints people really have: nanoGPT ``ckpt.pt`` files and Hugging Face GPT-2 directories.

Whatever the format on disk, a :class:`Checkpoint` shows its tensors in nanoGPT names and
layout (``transformer.h.0.attn.c_attn.weight`` as an nn.Linear weight, ``(out, in)``): the
names :func:`nanoshard.config.stage_tensor_names` lists, so any stage loads from any file.

- nanoGPT ``ckpt.pt``, as train.py saves it: ``{"model_args": {...}, "model": state_dict}``.
  Keys may carry torch.compile's ``_orig_mod.`` prefix; ``lm_head.weight`` is wte (tied) and
  ``attn.bias`` causal-mask buffers are not weights, so both are skipped.
- Hugging Face GPT-2 directory: ``config.json`` and ``model.safetensors`` (also sharded, with
  ``model.safetensors.index.json``) or ``pytorch_model.bin``. Names come with or without the
  ``transformer.`` prefix; HF's Conv1D stores weights ``(in, out)``, transposed here.
  safetensors is read lazily: opening parses headers only and a stage reads only its tensors.

Every problem with a file raises :class:`~nanoshard.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import pickle
import re
import shutil
import sys
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import nanoshard
from nanoshard import hub
from nanoshard.config import (
    GPTConfig,
    check_units,
    stage_tensor_names,
    tensor_shape,
    unit_tensor_names,
)
from nanoshard.engine import Stage
from nanoshard.errors import CheckpointError, InvalidArgument, NotFound
from nanoshard.files import replace_atomic
from nanoshard.tokenizer import TOKENIZER_FILES

log = logging.getLogger(__name__)

DEMO = "demo"
# HF's Conv1D layers: their weights are stored transposed relative to nn.Linear.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers older GPT-2 code saved next to the weights, and the tied lm_head.
SKIPPED = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|^lm_head\.weight$")
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DistributedDataParallel
EXTRA_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
HF_FILES = ("config.json", "pytorch_model.bin", "model.safetensors.index.json")
GPT2_EOT = 50256  # <|endoftext|> in GPT-2's vocabulary


def resolve_model(spec: str | Path, revision: str | None = None) -> Path:
    """``--model PATH|demo|HUB_ID``: ``"demo"`` is the built-in model directory, an existing
    path is that path, and a name shaped like a Hugging Face repo id (``gpt2``,
    ``owner/name``) is that model's snapshot in the hub's cache, downloaded when missing
    (:mod:`nanoshard.hub`); anything else is a path (which does not exist)."""
    if isinstance(spec, str) and spec == DEMO:
        return Path(nanoshard.__file__).parent / "demo_model"
    path = Path(spec).expanduser()
    if isinstance(spec, str) and not path.exists() and hub.looks_like_repo_id(spec):
        return hub.download(spec, revision)
    if revision is not None:
        raise InvalidArgument(f"{spec}: --revision is for a Hugging Face hub id, not a path")
    return path


def model_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model, nanoGPT name -> shape (nn.Linear layout), in unit order.
    (Not from a ``Stage`` on the meta device: its init imports torch._dynamo, seconds of
    CPU in every process that opens a checkpoint.)"""
    return {
        name: tensor_shape(config, name) for name in stage_tensor_names(config, 0, config.n_units)
    }


def is_conv1d(name: str) -> bool:
    return name.endswith(CONV1D)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """The manifest hash of one tensor: sha256 of its canonical bytes.

    Canonical bytes are the tensor's elements in row-major (C) order, in the tensor's own dtype
    (no conversion: an fp16 checkpoint hashes its fp16 bytes), little-endian, with no header.
    Pass tensors in nanoGPT layout, as :meth:`Checkpoint.read` returns them.
    """
    if sys.byteorder != "little":
        raise NotImplementedError("tensor hashes are defined on little-endian bytes")
    t = tensor.detach().to("cpu").contiguous()
    # A zero-copy view of the tensor's memory (numpy is not a dependency; bf16 has no numpy type).
    buffer = (ctypes.c_ubyte * t.nbytes).from_address(t.data_ptr()) if t.nbytes else b""
    return hashlib.sha256(buffer).hexdigest()


@dataclass(frozen=True)
class TensorEntry:
    """One line of the weights manifest: a tensor as nanoGPT names and lays it out."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype without "torch.", e.g. "float32"
    sha256: str  # see tensor_sha256

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "shape": list(self.shape)}


class _SafetensorsFiles:
    """One or more safetensors files (shards), read lazily: opening parses headers only."""

    def __init__(self, paths: list[Path]) -> None:
        self.files: dict[str, Path] = {}  # key -> the shard holding it
        self.meta: dict[str, tuple[tuple[int, ...], torch.dtype | str]] = {}
        for path in paths:
            with _reading(path), safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key in self.files:
                        raise CheckpointError(
                            f"{path}: tensor {key!r} is also in {self.files[key]}"
                        )
                    s = f.get_slice(key)  # header only: no tensor bytes are read
                    dtype = s.get_dtype()
                    self.meta[key] = (tuple(s.get_shape()), FLOATS.get(dtype, dtype))
                    self.files[key] = path

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for path in sorted({self.files[k] for k in keys}):
            with _reading(path), safe_open(path, framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in keys if self.files[k] == path})
        return out


class _StateDict:
    """A state dict from torch.load (memory-mapped when the file allows it)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.meta = {k: (tuple(v.shape), v.dtype) for k, v in self.state.items()}

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return {k: self.state[k].clone() for k in keys}  # own memory, not a view of the file


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn any failure while reading ``path`` into one CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # safetensors, torch and the OS each raise their own kinds
        raise CheckpointError(
            f"{path}: cannot read it, corrupt or truncated? ({_first_line(e)})"
        ) from e


def _canonical_name(key: str) -> str | None:
    """A stored key without wrapper prefixes, or None for what is not a weight to load."""
    for prefix in WRAPPER_PREFIXES:
        key = key.removeprefix(prefix)
    return None if SKIPPED.search(key) else key


class Checkpoint:
    """A checkpoint on disk, seen in nanoGPT names and layout whatever its format.

    ``kind`` is ``"hf"`` (a Hugging Face GPT-2 directory) or ``"nanogpt"`` (a ``ckpt.pt``);
    ``path`` is the directory or file. Build one with :func:`open_checkpoint`.
    """

    def __init__(
        self,
        path: Path,
        kind: str,
        config: GPTConfig,
        source: _SafetensorsFiles | _StateDict,
        weights: Path,
    ) -> None:
        self.path, self.kind, self.config = path, kind, config
        self._source = source
        self._weights = weights  # the file errors name
        self._keys: dict[str, str] = {}  # nanoGPT name -> the key in the file
        self._info: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._check()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, kind={self.kind!r}, {self.config})"

    def _check(self) -> None:
        """Map the file's keys to nanoGPT names; refuse anything that is not this GPT-2."""
        where = self._weights
        for key in self._source.meta:
            name = _canonical_name(key)
            if name is None:
                continue
            if self.kind == "hf":
                name = "transformer." + name.removeprefix("transformer.")
            if name in self._keys:
                raise CheckpointError(
                    f"{where}: tensor {name!r} is stored twice ({self._keys[name]!r}, {key!r})"
                )
            self._keys[name] = key
        expected = model_shapes(self.config)
        missing = [n for n in expected if n not in self._keys]
        unexpected = sorted(n for n in self._keys if n not in expected)
        if missing or unexpected:
            problems = []
            if missing:
                problems.append(f"missing {len(missing)} tensors ({', '.join(missing[:3])}, ...)")
            if unexpected:
                problems.append(f"unexpected tensors ({', '.join(unexpected[:3])}, ...)")
            raise CheckpointError(
                f"{where}: not the GPT-2 its config describes (n_layer={self.config.n_layer}, "
                f"n_embd={self.config.n_embd}, bias={self.config.bias}): {'; '.join(problems)}"
            )
        for name, shape in expected.items():
            stored, dtype = self._source.meta[self._keys[name]]
            # What the file must hold: HF's Conv1D weights are (in, out).
            want = shape[::-1] if self.kind == "hf" and is_conv1d(name) else shape
            if stored != want:
                raise CheckpointError(
                    f"{where}: tensor {self._keys[name]!r} has shape {list(stored)}, expected "
                    f"{list(want)} for this config: another architecture or a wrong config?"
                )
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise CheckpointError(
                    f"{where}: tensor {self._keys[name]!r} has dtype {dtype}, not a float type"
                )
            self._info[name] = (shape, dtype)

    def tensor_names(self) -> list[str]:
        """Every tensor of the model (nanoGPT names), in unit order."""
        return list(self._info)

    def tensor_info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape (nanoGPT layout) and stored dtype of one tensor, without reading it."""
        if name not in self._info:
            raise NotFound(f"{self.path} has no tensor {name!r}")
        return self._info[name]

    def stage_nbytes(self, start: int, end: int) -> int:
        """Bytes of units ``[start, end)`` as stored (each tensor once), without reading them."""
        check_units(self.config, start, end)
        total = 0
        for name in stage_tensor_names(self.config, start, end):
            shape, dtype = self._info[name]
            total += torch.Size(shape).numel() * dtype.itemsize
        return total

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, nanoGPT names and layout, stored dtype, on the CPU.

        Reads only these tensors from a safetensors file.
        """
        names = list(dict.fromkeys(names))
        for name in names:
            self.tensor_info(name)  # NotFound for a name this model does not have
        raw = self._source.read([self._keys[n] for n in names])
        out = {}
        for name in names:
            t = raw[self._keys[name]]
            out[name] = t.t().contiguous() if self.kind == "hf" and is_conv1d(name) else t
        return out

    def read_stage(self, start: int, end: int) -> dict[str, torch.Tensor]:
        """Exactly the tensors ``stage_tensor_names(config, start, end)`` lists."""
        check_units(self.config, start, end)
        return self.read(stage_tensor_names(self.config, start, end))

    def load_stage(
        self,
        start: int,
        end: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Stage:
        """A ready :class:`Stage` of units ``[start, end)`` (eval mode)."""
        return Stage.from_tensors(
            self.config, start, end, self.read_stage(start, end), dtype, device
        )

    def manifest(self) -> list[list[TensorEntry]]:
        """Per unit (index = unit), its tensors with shape, stored dtype and sha256.

        Reads the whole checkpoint once, a unit at a time. The head lists wte too (tied), with
        the same hash as under embed.
        """
        entries: dict[str, TensorEntry] = {}
        units = []
        for unit in range(self.config.n_units):
            names = unit_tensor_names(self.config, unit)
            for name, t in self.read(n for n in names if n not in entries).items():
                entries[name] = TensorEntry(
                    name, tuple(t.shape), str(t.dtype).removeprefix("torch."), tensor_sha256(t)
                )
            units.append([entries[n] for n in names])
        return units


def open_checkpoint(
    path: str | Path, *, trust_pickle: bool = False, revision: str | None = None
) -> Checkpoint:
    """Open a nanoGPT ``ckpt.pt``, a Hugging Face GPT-2 directory, ``"demo"``, or a hub id
    (at ``revision``; see :func:`resolve_model`).

    A directory is read as Hugging Face, or as nanoGPT's out_dir when it holds a ``ckpt.pt``
    and no config.json; a ``.safetensors``, ``pytorch_model.bin`` or ``config.json`` file
    stands for its directory; any other file is a nanoGPT checkpoint. Opening validates the
    whole architecture (names, shapes, dtypes) from metadata, without reading safetensors data.
    torch pickles are loaded with ``weights_only=True``; ``trust_pickle=True`` lifts that for
    old checkpoints holding other Python objects, which runs code from the file: only for
    files you trust.
    """
    path = resolve_model(path, revision)
    if not path.exists():
        hint = " (the demo model is not in this install)" if path == resolve_model(DEMO) else ""
        raise CheckpointError(f"{path}: no such file or directory{hint}")
    if path.is_file() and (path.suffix == ".safetensors" or path.name in HF_FILES):
        path = path.parent
    elif path.is_dir() and not (path / "config.json").exists() and (path / "ckpt.pt").is_file():
        path = path / "ckpt.pt"  # nanoGPT's out_dir
    if path.is_dir():
        return _open_hf(path, trust_pickle)
    return _open_nanogpt(path, trust_pickle)


def _open_hf(directory: Path, trust_pickle: bool) -> Checkpoint:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory}: no config.json, so not a Hugging Face GPT-2 directory "
            "(a nanoGPT checkpoint is a ckpt.pt file: pass the file)"
        )
    try:
        hf = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    config = _config_from_hf(hf, config_path)
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    binary = directory / "pytorch_model.bin"
    if single.is_file():
        return Checkpoint(directory, "hf", config, _SafetensorsFiles([single]), single)
    if index.is_file():
        with _reading(index):
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for shard in shards:
            if not (directory / shard).is_file():
                raise CheckpointError(f"{index}: lists {shard}, which is not in {directory}")
        source = _SafetensorsFiles([directory / shard for shard in shards])
        return Checkpoint(directory, "hf", config, source, index)
    if binary.is_file():
        state = _torch_load(binary, trust_pickle)
        if not isinstance(state, dict):
            raise CheckpointError(f"{binary}: holds a {type(state).__name__}, not a state dict")
        return Checkpoint(directory, "hf", config, _StateDict(state), binary)
    raise CheckpointError(
        f"{directory}: no weights: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin next to config.json"
    )


def _open_nanogpt(path: Path, trust_pickle: bool) -> Checkpoint:
    ckpt = _torch_load(path, trust_pickle)
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        found = sorted(map(str, ckpt))[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: not a nanoGPT checkpoint: expected a dict with 'model_args' and 'model' "
            f"as nanoGPT's train.py saves, found {found}"
        )
    args = ckpt["model_args"]
    try:
        config = GPTConfig(
            block_size=args["block_size"],
            vocab_size=args["vocab_size"],
            n_layer=args["n_layer"],
            n_head=args["n_head"],
            n_embd=args["n_embd"],
            bias=bool(args.get("bias", True)),  # nanoGPT before the bias flag always had biases
            layer_norm_epsilon=float(args.get("layer_norm_epsilon", 1e-5)),
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: model_args has no {e.args[0]!r}") from None
    except (InvalidArgument, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: bad model_args: {e}") from None
    if not isinstance(ckpt["model"], dict):
        raise CheckpointError(
            f"{path}: 'model' is a {type(ckpt['model']).__name__}, not a state dict"
        )
    return Checkpoint(path, "nanogpt", config, _StateDict(ckpt["model"]), path)


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """torch.load, safely by default; memory-mapped when the file is torch's zip format."""
    try:
        return torch.load(
            path, map_location="cpu", weights_only=not trust_pickle, mmap=zipfile.is_zipfile(path)
        )
    except pickle.UnpicklingError as e:
        # A well-formed pickle naming a class (an old train.py's config object, say) vs. garbage.
        if named := re.search(r"Unsupported global: GLOBAL (\S+)", str(e)):
            raise CheckpointError(
                f"{path}: holds a Python object ({named[1]}) besides tensors, and loading it runs "
                "code from the file. If you trust the file, pass --trust-pickle "
                "(trust_pickle=True from Python)"
            ) from None
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint, or corrupt ({_first_line(e)})"
        ) from e
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... for a bad file
        raise CheckpointError(
            f"{path}: cannot read it as a PyTorch checkpoint: corrupt, truncated or another "
            f"format? ({_first_line(e)})"
        ) from e


def _first_line(err: BaseException) -> str:
    """The gist of a library's error: its type and first sentence."""
    text = str(err).strip().splitlines()[0].split(". ")[0][:160] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _config_from_hf(hf: Any, path: Path) -> GPTConfig:
    """GPTConfig from a Hugging Face config.json; refuse what the engine does not compute."""
    if not isinstance(hf, dict) or hf.get("model_type") != "gpt2":
        kind = hf.get("model_type") if isinstance(hf, dict) else None
        raise CheckpointError(
            f"{path}: model_type is {kind!r}; nanoshard runs GPT-2 models ('gpt2') only"
        )
    refusals = {
        "activation_function": (
            hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh")
        ),
        "n_inner": hf.get("n_inner") in (None, 4 * hf.get("n_embd", 0)),
        "scale_attn_weights": hf.get("scale_attn_weights", True) is True,
        "scale_attn_by_inverse_layer_idx": not hf.get("scale_attn_by_inverse_layer_idx", False),
        "add_cross_attention": not hf.get("add_cross_attention", False),
        "tie_word_embeddings": hf.get("tie_word_embeddings", True) is True,
    }
    for field, ok in refusals.items():
        if not ok:
            raise CheckpointError(
                f"{path}: {field}={hf.get(field)!r} is a GPT-2 variant the engine does not run"
            )
    try:
        return GPTConfig(
            block_size=hf["n_positions"] if "n_positions" in hf else hf["n_ctx"],
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            bias=True,  # HF GPT-2 always has biases
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: no {e.args[0]!r} field") from None
    except (InvalidArgument, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _state_for_saving(
    config: GPTConfig, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The model's tensors, nanoGPT names, checked against the config, detached on the CPU.

    Accepts a nanoGPT model's state_dict as is: wrapper prefixes, lm_head.weight and attn.bias
    buffers are dropped.
    """
    state = {name: t for key, t in tensors.items() if (name := _canonical_name(key)) is not None}
    expected = model_shapes(config)
    missing = [n for n in expected if n not in state]
    unexpected = sorted(set(state) - expected.keys())
    if missing or unexpected:
        raise InvalidArgument(
            f"tensors do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise InvalidArgument(
                f"tensor {name!r} has shape {list(state[name].shape)}, expected {list(shape)}"
            )
        if not state[name].is_floating_point():
            raise InvalidArgument(
                f"tensor {name!r} has dtype {state[name].dtype}; weights must be floats"
            )
    return {name: state[name].detach().to("cpu") for name in expected}


def save_hf_checkpoint(
    config: GPTConfig,
    tensors: dict[str, torch.Tensor],
    directory: Path,
    *,
    dtype: torch.dtype | None = None,
    tokenizer_dir: Path | None = None,
) -> None:
    """Write a Hugging Face GPT-2 directory from nanoGPT-named tensors.

    ``config.json`` holds GPT2Config's fields (``model_type`` gpt2, ``GPT2LMHeadModel``,
    ``gelu_new``, tied embeddings); ``model.safetensors`` holds the weights under the names
    of the published ``gpt2`` checkpoint (no ``transformer.`` prefix, no lm_head: it is wte),
    with Conv1D weights (c_attn, c_proj, c_fc) transposed to ``(in, out)``. ``dtype`` casts the
    weights (default: keep theirs). ``tokenizer_dir`` supplies ``vocab.json`` + ``merges.txt``
    (and tokenizer.json / tokenizer_config.json / special_tokens_map.json when present).
    bos/eos_token_id are 50256 with GPT-2's vocabulary, else the last id (where a GPT-2 style
    tokenizer puts ``<|endoftext|>``). A model without biases is written with zero biases, which computes the same function
    (HF GPT-2 always has them). Files are replaced atomically, so a reader never sees half.
    """
    state = _state_for_saving(config, tensors)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    full = model_shapes(dataclasses.replace(config, bias=True))
    weights: dict[str, torch.Tensor] = {}
    for name, shape in full.items():
        t = (
            state[name]
            if name in state
            else torch.zeros(shape, dtype=state["transformer.wte.weight"].dtype)
        )
        t = t.to(dtype) if dtype is not None else t
        weights[name.removeprefix("transformer.")] = (t.t() if is_conv1d(name) else t).contiguous()
    stored_dtype = weights["wte.weight"].dtype
    eot = GPT2_EOT if config.vocab_size > GPT2_EOT else config.vocab_size - 1
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # GPT-2's tanh-approximated gelu, as the engine
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": str(stored_dtype).removeprefix("torch."),
    }
    replace_atomic(
        directory / "model.safetensors",
        lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}),
    )
    replace_atomic(
        directory / "config.json",
        lambda tmp: tmp.write_text(json.dumps(hf_config, indent=2) + "\n"),
    )
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        for name in TOKENIZER_FILES + EXTRA_TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                source = tokenizer_dir / name
                replace_atomic(directory / name, functools.partial(shutil.copyfile, source))
            elif name in TOKENIZER_FILES:
                raise NotFound(
                    f"{tokenizer_dir}: no {name} (a GPT-2 tokenizer is vocab.json + merges.txt)"
                )
    log.info(
        "saved %s (%d layers, %s) as a Hugging Face GPT-2 directory",
        directory,
        config.n_layer,
        stored_dtype,
    )


def save_nanogpt_checkpoint(
    config: GPTConfig, tensors: dict[str, torch.Tensor], path: Path
) -> None:
    """Write a nanoGPT ``ckpt.pt`` as train.py does: ``model_args`` + the model's state_dict.

    ``lm_head.weight`` is stored as wte itself (tied, saved once), like nanoGPT's model. No
    optimizer state, so nanoGPT can sample from it, not resume training. ``layer_norm_epsilon``
    goes into model_args only when it is not nanoGPT's fixed 1e-5.
    """
    state = _state_for_saving(config, tensors)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model_args = {
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "block_size": config.block_size,
        "bias": config.bias,
        "vocab_size": config.vocab_size,
        "dropout": 0.0,
    }
    if config.layer_norm_epsilon != 1e-5:
        model_args["layer_norm_epsilon"] = config.layer_norm_epsilon
    ckpt = {
        "model": state,
        "model_args": model_args,
        "iter_num": 0,
        "best_val_loss": 1e9,
        "config": {},
    }
    replace_atomic(Path(path), lambda tmp: torch.save(ckpt, tmp))
