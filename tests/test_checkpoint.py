"""Checkpoints: both formats round-trip, stages read lazily, bad files fail clearly, and a
Hugging Face GPT-2 runs in our engine exactly as in transformers."""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import json
import mmap
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nanoshard
import nanoshard.checkpoint as checkpoint_module
from nanoshard.checkpoint import (
    open_checkpoint,
    resolve_model,
    save_hf_checkpoint,
    save_nanogpt_checkpoint,
    tensor_sha256,
)
from nanoshard.config import GPTConfig, stage_tensor_names, unit_tensor_names
from nanoshard.engine import Stage, init_weights
from nanoshard.errors import CheckpointError, InvalidArgument, NotFound

try:  # a dev dependency: only the tests against transformers need it
    import transformers

    transformers.logging.set_verbosity_error()
except ImportError:
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers not installed")
CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def hf_layout(weights: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """nanoGPT tensors under Hugging Face names and Conv1D layout, written by hand."""
    out = {}
    for name, t in weights.items():
        t = t.t().contiguous() if name.endswith(CONV1D) else t.clone()
        out[prefix + name.removeprefix("transformer.")] = t
    return out


# ---- round trips -----------------------------------------------------------------------------


def test_hf_round_trip_writes_the_published_gpt2_layout(tiny_hf_dir, tiny_config, tiny_weights):
    ckpt = open_checkpoint(tiny_hf_dir)
    assert (ckpt.kind, ckpt.path, ckpt.config) == ("hf", tiny_hf_dir, tiny_config)
    assert ckpt.tensor_names() == stage_tensor_names(tiny_config, 0, tiny_config.n_units)
    assert_same_tensors(ckpt.read(ckpt.tensor_names()), tiny_weights)

    stored = load_file(tiny_hf_dir / "model.safetensors")
    assert stored.keys() == hf_layout(tiny_weights).keys()  # no "transformer.", no lm_head
    assert stored["h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)
    assert torch.equal(
        stored["h.1.mlp.c_proj.weight"], tiny_weights["transformer.h.1.mlp.c_proj.weight"].t()
    )
    hf = json.loads((tiny_hf_dir / "config.json").read_text())
    assert hf["model_type"] == "gpt2" and hf["architectures"] == ["GPT2LMHeadModel"]
    assert hf["n_positions"] == hf["n_ctx"] == 64 and hf["activation_function"] == "gelu_new"
    assert hf["layer_norm_epsilon"] == 1e-5 and hf["torch_dtype"] == "float32"


def test_nanogpt_round_trip_as_train_py_writes_it(tiny_nanogpt_ckpt, tiny_config, tiny_weights):
    raw = torch.load(tiny_nanogpt_ckpt, weights_only=True)
    assert raw["model_args"]["n_layer"] == 3 and raw["model_args"]["bias"] is True
    assert torch.equal(raw["model"]["lm_head.weight"], raw["model"]["transformer.wte.weight"])
    ckpt = open_checkpoint(tiny_nanogpt_ckpt)
    assert (ckpt.kind, ckpt.config) == ("nanogpt", tiny_config)
    assert_same_tensors(ckpt.read(ckpt.tensor_names()), tiny_weights)


def test_nanogpt_out_dir_and_sizes_without_reading(tiny_nanogpt_ckpt, tiny_config):
    ckpt = open_checkpoint(tiny_nanogpt_ckpt.parent)  # nanoGPT's out_dir stands for its ckpt.pt
    assert (ckpt.kind, ckpt.path) == ("nanogpt", tiny_nanogpt_ckpt)
    block = 4 * (2 * 32 + 3 * 32 * 32 + 3 * 32 + 32 * 32 + 32 + 2 * 32 + 4 * 32 * 32 + 4 * 32)
    block += 4 * (4 * 32 * 32 + 32)  # mlp.c_proj
    assert ckpt.stage_nbytes(1, 4) == 3 * block
    assert ckpt.stage_nbytes(0, 5) == sum(t.nbytes for t in ckpt.read_stage(0, 5).values())


def test_nanogpt_compiled_prefix_and_mask_buffers(tmp_path, tiny_config, tiny_weights):
    model = {f"_orig_mod.{k}": v for k, v in tiny_weights.items()}
    model["_orig_mod.lm_head.weight"] = tiny_weights["transformer.wte.weight"]
    model["_orig_mod.transformer.h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    args = {k: v for k, v in dataclasses.asdict(tiny_config).items() if k != "layer_norm_epsilon"}
    torch.save({"model": model, "model_args": {**args, "dropout": 0.0}}, tmp_path / "ckpt.pt")
    ckpt = open_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt.config == tiny_config
    assert_same_tensors(ckpt.read(ckpt.tensor_names()), tiny_weights)


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_hf_names_with_or_without_prefix_and_old_buffers(tiny_hf_dir, tiny_weights, prefix):
    tensors = hf_layout(tiny_weights, prefix)
    tensors[f"{prefix}h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    tensors[f"{prefix}h.0.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = tiny_weights["transformer.wte.weight"].clone()
    save_file(tensors, tiny_hf_dir / "model.safetensors", metadata={"format": "pt"})
    ckpt = open_checkpoint(tiny_hf_dir)
    assert_same_tensors(ckpt.read(ckpt.tensor_names()), tiny_weights)


def test_hf_pytorch_model_bin(tiny_hf_dir, tiny_weights):
    (tiny_hf_dir / "model.safetensors").unlink()
    state = hf_layout(tiny_weights, "transformer.")
    state["transformer.h.2.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tiny_hf_dir / "pytorch_model.bin")
    ckpt = open_checkpoint(tiny_hf_dir / "pytorch_model.bin")  # a file stands for its directory
    assert (ckpt.kind, ckpt.path) == ("hf", tiny_hf_dir)
    assert_same_tensors(ckpt.read_stage(0, 5), tiny_weights)


def test_save_accepts_a_compiled_models_state_dict_and_checks_it(
    tmp_path, tiny_config, tiny_weights
):
    state = {f"_orig_mod.{k}": v for k, v in tiny_weights.items()}
    state["_orig_mod.lm_head.weight"] = tiny_weights["transformer.wte.weight"]
    save_hf_checkpoint(tiny_config, state, tmp_path / "a", dtype=torch.float16)
    ckpt = open_checkpoint(tmp_path / "a")
    assert ckpt.tensor_info("transformer.wte.weight") == ((96, 32), torch.float16)
    assert_same_tensors(ckpt.read_stage(0, 5), {k: v.half() for k, v in tiny_weights.items()})
    del state["_orig_mod.transformer.h.1.ln_2.bias"]
    with pytest.raises(InvalidArgument, match=r"h\.1\.ln_2\.bias"):
        save_nanogpt_checkpoint(tiny_config, state, tmp_path / "b.pt")


def test_bias_free_model_saves_as_hf_with_zero_biases(tmp_path):
    config = GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16, bias=False)
    weights = init_weights(config, seed=3)
    save_nanogpt_checkpoint(config, weights, tmp_path / "ckpt.pt")
    assert open_checkpoint(tmp_path / "ckpt.pt").config.bias is False
    save_hf_checkpoint(config, weights, tmp_path / "hf")
    hf = open_checkpoint(tmp_path / "hf")
    assert hf.config == dataclasses.replace(config, bias=True)
    assert not hf.read(["transformer.h.0.mlp.c_fc.bias"])["transformer.h.0.mlp.c_fc.bias"].any()
    ids = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = Stage.from_tensors(config, 0, 4, weights)(ids, all_logits=True)
        torch.testing.assert_close(
            hf.load_stage(0, 4)(ids, all_logits=True), want, atol=1e-6, rtol=0
        )


def test_tokenizer_files_are_copied(tmp_path, tiny_config, tiny_weights):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.json").write_text('{"a": 0}')
    (tok / "merges.txt").write_text("#version: 0.2\n")
    save_hf_checkpoint(tiny_config, tiny_weights, tmp_path / "m", tokenizer_dir=tok)
    assert (tmp_path / "m" / "vocab.json").read_text() == '{"a": 0}'
    assert (tmp_path / "m" / "merges.txt").read_text() == "#version: 0.2\n"
    (tok / "merges.txt").unlink()
    with pytest.raises(NotFound, match=r"merges\.txt"):
        save_hf_checkpoint(tiny_config, tiny_weights, tmp_path / "n", tokenizer_dir=tok)


def test_demo_resolves_to_the_packaged_model_directory(
    tmp_path, monkeypatch, tiny_config, tiny_weights
):
    assert resolve_model("demo") == Path(nanoshard.__file__).parent / "demo_model"
    assert resolve_model("runs/ckpt.pt") == Path("runs/ckpt.pt")
    monkeypatch.setattr(nanoshard, "__file__", str(tmp_path / "__init__.py"))
    with pytest.raises(CheckpointError, match="demo model is not in this install"):
        open_checkpoint("demo")
    save_hf_checkpoint(tiny_config, tiny_weights, tmp_path / "demo_model")
    assert open_checkpoint("demo").path == tmp_path / "demo_model"


# ---- stages ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "end"), [(0, 1), (1, 3), (3, 5), (4, 5), (0, 5)])
def test_read_stage_is_exactly_the_stage(tiny_hf_dir, tiny_nanogpt_ckpt, tiny_config, start, end):
    for path in (tiny_hf_dir, tiny_nanogpt_ckpt):
        tensors = open_checkpoint(path).read_stage(start, end)
        assert list(tensors) == stage_tensor_names(tiny_config, start, end)


def test_stages_from_a_checkpoint_chain_to_the_whole_model(tiny_hf_dir):
    ckpt = open_checkpoint(tiny_hf_dir)
    ids = torch.arange(20) % 96
    with torch.inference_mode():
        whole = ckpt.load_stage(0, 5)(ids, all_logits=True)
        h = ckpt.load_stage(0, 2)(ids)
        h = ckpt.load_stage(2, 4)(h)
        assert torch.equal(ckpt.load_stage(4, 5)(h, all_logits=True), whole)
    with pytest.raises(NotFound, match="lm_head"):
        ckpt.read(["lm_head.weight"])


class RecordingSafeOpen:
    """Wraps safetensors.safe_open: records which tensors are read. Its slices expose shape and
    dtype only, so tensor data cannot sneak out through get_slice unrecorded."""

    def __init__(self) -> None:
        self.requested: list[str] = []

    def __call__(self, *args, **kwargs):
        recorder = self

        class Handle:
            def __enter__(self):
                self.f = safe_open(*args, **kwargs).__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_slice(self, key):
                s = self.f.get_slice(key)
                return type("Meta", (), {"get_shape": s.get_shape, "get_dtype": s.get_dtype})()

            def get_tensor(self, key):
                recorder.requested.append(key)
                return self.f.get_tensor(key)

        return Handle()


def test_safetensors_stage_reads_request_only_the_stages_tensors(
    tiny_hf_dir, tiny_config, monkeypatch
):
    recorder = RecordingSafeOpen()
    monkeypatch.setattr(checkpoint_module, "safe_open", recorder)
    ckpt = open_checkpoint(tiny_hf_dir)
    assert recorder.requested == []  # opening validates from the header alone
    ckpt.load_stage(2, 3)  # block 1
    assert sorted(recorder.requested) == sorted(
        n.removeprefix("transformer.") for n in stage_tensor_names(tiny_config, 2, 3)
    )


def _resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache: mincore on a fresh mapping (which reads nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size, page = path.stat().st_size, mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    try:
        pages = (ctypes.c_ubyte * ((size + page - 1) // page))()
        if libc.mincore(address, size, pages) != 0:
            pytest.skip("mincore is unavailable here")
        return sum(p & 1 for p in pages) * page
    finally:
        libc.munmap(address, size)


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(sys.platform != "linux", reason="page-cache residency is Linux-specific")
def test_safetensors_stage_read_touches_only_that_stages_bytes(tmp_path):
    """Which bytes of the file reach memory, seen through the page cache. The kernel reads
    ahead (up to 8 MiB here), so the bound is loose: one block of a 50 MB file must leave
    most of the file unread."""
    config = GPTConfig(block_size=64, vocab_size=256, n_layer=16, n_head=4, n_embd=256)
    save_hf_checkpoint(config, init_weights(config), tmp_path)
    file = tmp_path / "model.safetensors"
    _drop_from_page_cache(file)
    if _resident_bytes(file) > 0:
        pytest.skip("this filesystem keeps the file in memory (tmpfs?)")
    ckpt = open_checkpoint(tmp_path)
    after_open = _resident_bytes(file)
    stage = ckpt.read_stage(9, 10)  # block 8, in the middle of the file
    stage_bytes = sum(t.nbytes for t in stage.values())
    touched = _resident_bytes(file) - after_open
    unread = file.stat().st_size - after_open
    assert stage_bytes <= touched < unread / 2, (stage_bytes, touched, unread)
    ckpt.read_stage(0, config.n_units)  # the same measure sees a full read
    assert _resident_bytes(file) - after_open >= unread - mmap.PAGESIZE


# ---- the manifest ----------------------------------------------------------------------------


def test_manifest_is_per_unit_and_the_same_for_both_formats(
    tiny_hf_dir, tiny_nanogpt_ckpt, tiny_config, tiny_weights
):
    manifest = open_checkpoint(tiny_hf_dir).manifest()
    assert [[e.name for e in unit] for unit in manifest] == [
        unit_tensor_names(tiny_config, u) for u in range(tiny_config.n_units)
    ]
    assert manifest == open_checkpoint(tiny_hf_dir).manifest()  # stable
    assert manifest == open_checkpoint(tiny_nanogpt_ckpt).manifest()  # layout-independent
    c_attn = next(e for e in manifest[1] if e.name == "transformer.h.0.attn.c_attn.weight")
    want = tiny_weights["transformer.h.0.attn.c_attn.weight"]  # nanoGPT layout (out, in)
    assert (c_attn.shape, c_attn.dtype) == ((96, 32), "float32")
    assert c_attn.sha256 == hashlib.sha256(want.numpy().tobytes()).hexdigest()
    assert manifest[0][0] == manifest[-1][-1]  # wte: under embed and, tied, under head
    assert c_attn.to_dict()["shape"] == [96, 32]


def test_manifest_hashes_stored_dtype_and_follow_changes(tmp_path, tiny_config, tiny_weights):
    save_hf_checkpoint(tiny_config, tiny_weights, tmp_path / "a", dtype=torch.bfloat16)
    before = open_checkpoint(tmp_path / "a").manifest()
    wpe = tiny_weights["transformer.wpe.weight"].bfloat16()
    assert before[0][1].dtype == "bfloat16"
    assert (
        before[0][1].sha256 == hashlib.sha256(wpe.view(torch.int16).numpy().tobytes()).hexdigest()
    )
    assert (
        tensor_sha256(wpe.t())
        == hashlib.sha256(wpe.t().contiguous().view(torch.int16).numpy().tobytes()).hexdigest()
    )
    tiny_weights["transformer.h.2.ln_1.bias"][0] += 1
    save_hf_checkpoint(tiny_config, tiny_weights, tmp_path / "a", dtype=torch.bfloat16)
    after = open_checkpoint(tmp_path / "a").manifest()
    changed = [
        e.name
        for unit_a, unit_b in zip(before, after, strict=True)
        for e, f in zip(unit_a, unit_b, strict=True)
        if e != f
    ]
    assert changed == ["transformer.h.2.ln_1.bias"]


# ---- errors ----------------------------------------------------------------------------------


# Each case spoils the tiny checkpoints and returns (what to open, the file the error must name).


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _edit_config(directory: Path, **changes) -> Path:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


def _rewrite(ckpt: Path, change) -> Path:
    raw = torch.load(ckpt, weights_only=True)
    change(raw)
    torch.save(raw, ckpt)
    return ckpt


def _int_weight(raw: dict) -> None:
    raw["model"]["transformer.h.0.ln_1.weight"] = torch.ones(32, dtype=torch.int64)


def _pickled_object(raw: dict) -> None:
    raw["config"] = argparse.Namespace(learning_rate=6e-4)  # not loadable with weights_only


def _overwrite(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _unlink(path: Path) -> Path:
    path.unlink()
    return path.parent


ERRORS = {
    "missing path": (lambda hf, nano: (hf / "nope",) * 2, "no such file"),
    "no config.json": (lambda hf, nano: (_unlink(hf / "config.json"),) * 2, "no config.json"),
    "no weights": (lambda hf, nano: (_unlink(hf / "model.safetensors"),) * 2, "no weights"),
    "truncated safetensors": (
        lambda hf, nano: (hf, _truncate(hf / "model.safetensors")),
        "truncated",
    ),
    "truncated ckpt.pt": (lambda hf, nano: (nano, _truncate(nano)), "truncated"),
    "garbage ckpt.pt": (
        lambda hf, nano: (nano, _overwrite(nano, b"not a checkpoint" * 50)),
        "corrupt",
    ),
    "config.json not JSON": (lambda hf, nano: (hf, _truncate(hf / "config.json")), "JSON"),
    "llama": (lambda hf, nano: (hf, _edit_config(hf, model_type="llama")), "model_type is 'llama'"),
    "exact gelu": (
        lambda hf, nano: (hf, _edit_config(hf, activation_function="gelu")),
        "activation",
    ),
    "bad n_head": (lambda hf, nano: (hf, _edit_config(hf, n_head=5)), "multiple of n_head"),
    "wrong shapes": (
        lambda hf, nano: (_edit_config(hf, n_embd=64).parent, hf / "model.safetensors"),
        "shape",
    ),
    "missing blocks": (
        lambda hf, nano: (_edit_config(hf, n_layer=5).parent, hf / "model.safetensors"),
        "missing 24",
    ),
    "extra blocks": (
        lambda hf, nano: (_edit_config(hf, n_layer=2).parent, hf / "model.safetensors"),
        "unexpected",
    ),
    "integer weights": (lambda hf, nano: (nano, _rewrite(nano, _int_weight)), "int64, not a float"),
    "no model_args": (
        lambda hf, nano: (nano, _rewrite(nano, lambda raw: raw.pop("model_args"))),
        "model_args",
    ),
    "pickled object": (
        lambda hf, nano: (nano, _rewrite(nano, _pickled_object)),
        "(argparse.Namespace) besides tensors, and loading it runs code from the file. If you trust the file, pass --trust-pickle (trust_pickle=True from Python)",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_checkpoints_raise_one_clear_error_naming_the_file(
    case, tiny_hf_dir, tiny_nanogpt_ckpt
):
    make, fragment = ERRORS[case]
    path, culprit = make(tiny_hf_dir, tiny_nanogpt_ckpt)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    assert str(culprit) in str(err.value) and fragment in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_trusted_pickles_open_when_asked(tiny_nanogpt_ckpt, tiny_weights):
    _rewrite(tiny_nanogpt_ckpt, _pickled_object)
    ckpt = open_checkpoint(tiny_nanogpt_ckpt, trust_pickle=True)
    assert_same_tensors(ckpt.read(ckpt.tensor_names()), tiny_weights)


# ---- against transformers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A random GPT2LMHeadModel saved by transformers itself (safetensors, 'transformer.' names)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=64,
        vocab_size=128,
        n_positions=96,
        bos_token_id=None,
        eos_token_id=None,
        initializer_range=0.1,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases and norms away from 0 and 1, so each one matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("hf-gpt2")
    model.save_pretrained(directory)
    return model, directory


@needs_transformers
def test_greedy_generation_matches_transformers_token_for_token(hf_model):
    model, directory = hf_model
    ckpt = open_checkpoint(directory)
    stage = ckpt.load_stage(0, ckpt.config.n_units)
    prompt, n_new = torch.tensor([5, 17, 99, 3, 42, 8, 64, 1]), 30
    with torch.inference_mode():
        ref = model.generate(
            prompt[None],
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
        cache = stage.new_cache(len(prompt) + n_new)
        logits = stage(prompt, cache, pos=0)  # prefill: the last position's logits
        tokens, steps = [], []
        for i in range(n_new):
            steps.append(logits[-1])
            tokens.append(int(logits[-1].argmax()))
            logits = stage(torch.tensor(tokens[-1:]), cache, pos=len(prompt) + i)
    assert tokens == ref.sequences[0, len(prompt) :].tolist()
    assert len(set(tokens)) > 5  # a real sequence, not one token repeated
    torch.testing.assert_close(torch.stack(steps), torch.cat(ref.logits), atol=1e-4, rtol=0)


@needs_transformers
def test_engine_logits_equal_transformers_on_its_checkpoint(hf_model):
    model, directory = hf_model
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = open_checkpoint(directory).load_stage(0, 4)(ids, all_logits=True)
        torch.testing.assert_close(ours, model(ids[None]).logits[0], atol=1e-5, rtol=0)


@needs_transformers
def test_transformers_runs_our_saved_directory_like_the_engine(
    tiny_hf_dir, tiny_config, tiny_weights
):
    model = transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    ids = torch.randint(0, 96, (30,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ours = Stage.from_tensors(tiny_config, 0, 5, tiny_weights)(ids, all_logits=True)
        torch.testing.assert_close(model(ids[None]).logits[0], ours, atol=1e-5, rtol=0)


@needs_transformers
def test_sharded_safetensors_from_transformers(hf_model, tmp_path):
    model, directory = hf_model
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded, single = open_checkpoint(tmp_path), open_checkpoint(directory)
    assert_same_tensors(sharded.read_stage(0, 4), single.read_stage(0, 4))
