"""The engine: any split of the units chained by hand equals the whole model, bit for bit,
and KV-cache decoding equals full recomputation."""

from __future__ import annotations

import itertools

import pytest
import torch

from nanoshard.checkpoint import open_checkpoint
from nanoshard.config import GPTConfig, parse_units, stage_tensor_names
from nanoshard.engine import Stage, init_weights
from nanoshard.errors import InvalidArgument
from nanoshard.generation import LocalSession, generate
from nanoshard.sampling import SamplingParams, sample

DECODE_STEPS = 50


def splits(n_units: int, max_stages: int = 4):
    """Every way to cut [0, n_units) into 1..max_stages consecutive stages."""
    for k in range(max_stages):
        for cuts in itertools.combinations(range(1, n_units), k):
            bounds = [0, *cuts, n_units]
            yield list(itertools.pairwise(bounds))


def run_chain(stages: list[Stage], prompt: torch.Tensor, steps: list[int]) -> list[torch.Tensor]:
    """Prefill, then one-token decode steps, through stages chained by hand."""
    caches = [s.new_cache(len(prompt) + len(steps)) for s in stages]
    out = []
    with torch.inference_mode():
        pos = 0
        for chunk in [prompt, *[torch.tensor([t]) for t in steps]]:
            x = chunk
            for stage, cache in zip(stages, caches, strict=True):
                x = stage(x, cache, pos, all_logits=True)
            out.append(x)
            pos += len(chunk)
    return out


def check_every_split(
    config: GPTConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> int:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (12,), generator=gen)
    steps = torch.randint(0, config.vocab_size, (DECODE_STEPS,), generator=gen).tolist()
    whole = Stage.from_tensors(config, 0, config.n_units, weights, dtype)
    full = run_chain([whole], prompt, steps)
    stage_cache: dict[tuple[int, int], Stage] = {}
    count = 0
    for split in splits(config.n_units):
        stages = [
            stage_cache.setdefault((a, b), Stage.from_tensors(config, a, b, weights, dtype))
            for a, b in split
        ]
        got = run_chain(stages, prompt, steps)
        for g, f in zip(got, full, strict=True):
            assert torch.equal(g, f), f"split {split} differs from the full model"
        count += 1
    return count


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_every_split_is_bit_identical_tiny(tiny_config: GPTConfig, tiny_weights, dtype) -> None:
    assert check_every_split(tiny_config, tiny_weights, dtype) == 1 + 4 + 6 + 4  # C(4, 0..3)


def test_every_split_is_bit_identical_demo() -> None:
    ckpt = open_checkpoint("demo")
    assert ckpt.config.n_layer >= 6
    weights = ckpt.read(stage_tensor_names(ckpt.config, 0, ckpt.config.n_units))
    n = ckpt.config.n_units - 1
    assert check_every_split(ckpt.config, weights) == sum(
        len(list(itertools.combinations(range(n), k))) for k in range(4)
    )


def test_kv_cache_decoding_equals_recomputation(tiny_config: GPTConfig, tiny_weights) -> None:
    stage = Stage.from_tensors(tiny_config, 0, tiny_config.n_units, tiny_weights)
    ids = torch.randint(
        0, tiny_config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)
    )
    cache = stage.new_cache(40)
    with torch.inference_mode():
        stage(ids[:10], cache, 0)
        for p in range(10, 40):
            step = stage(ids[p : p + 1], cache, p)
            full = stage(ids[: p + 1])  # no cache: recompute everything
            assert torch.allclose(step, full, atol=1e-5, rtol=0), p
        # chunked prefill agrees with one long prefill too
        chunked = stage.new_cache(40)
        a = stage(ids[:16], chunked, 0, all_logits=True)
        b = stage(ids[16:], chunked, 16, all_logits=True)
        whole = stage(ids, all_logits=True)
        assert torch.allclose(torch.cat([a, b]), whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int8])
def test_lower_precision_weights_run(tiny_config: GPTConfig, tiny_weights, dtype) -> None:
    full = Stage.from_tensors(tiny_config, 0, tiny_config.n_units, tiny_weights)
    low = Stage.from_tensors(tiny_config, 0, tiny_config.n_units, tiny_weights, dtype=dtype)
    ids = torch.arange(20) % tiny_config.vocab_size
    with torch.inference_mode():
        ref, got = full(ids, all_logits=True), low(ids, all_logits=True)
    assert got.dtype == (torch.float32 if dtype == torch.int8 else dtype)
    assert torch.allclose(got.float(), ref, atol=0.05), (got.float() - ref).abs().max()
    assert low.weight_nbytes < full.weight_nbytes


def test_int8_weights_follow_fp32_on_the_demo_model() -> None:
    """Weight-only int8 (activations quantized on the fly where fbgemm runs the product)
    picks fp32's top token at nearly every position of real text."""
    ckpt = open_checkpoint("demo")
    config = ckpt.config
    full, low = (ckpt.load_stage(0, config.n_units, d) for d in (torch.float32, torch.int8))
    assert low.weights == "int8" and full.weights == "fp32"
    ids = torch.randint(0, config.vocab_size, (1,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():  # a greedy fp32 text, then both models read all of it
        cache = full.new_cache(config.block_size)
        seq = [int(ids[0])]
        for p in range(config.block_size - 1):
            seq.append(int(full(torch.tensor(seq[-1:]), cache, p).argmax()))
        ref = full(torch.tensor(seq), all_logits=True)
        got = low(torch.tensor(seq), all_logits=True)
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert agree >= 0.95, agree


def test_units_are_validated(tiny_config: GPTConfig) -> None:
    assert parse_units("1:3", tiny_config) == (1, 3)
    assert parse_units("2:", tiny_config) == (2, tiny_config.n_units)
    for bad in ["3:1", "0:0", "0:99", "x:2", "1-3", "-1:2"]:
        with pytest.raises(InvalidArgument):
            parse_units(bad, tiny_config)


def test_sampling_is_a_function_of_seed_and_position() -> None:
    logits = torch.randn(500, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=42)
    draws = [sample(logits, p, pos) for pos in range(200)]
    assert draws == [sample(logits, p, pos) for pos in range(200)]
    assert len(set(draws)) > 5  # it really samples
    allowed = set(torch.topk(logits, 50).indices.tolist())
    assert set(draws) <= allowed
    assert sample(logits, SamplingParams(temperature=0), 3) == int(logits.argmax())
    other = [sample(logits, SamplingParams(1.0, 50, 0.9, seed=43), pos) for pos in range(200)]
    assert other != draws


def test_local_generation_stops_at_the_context(tiny_config: GPTConfig, tiny_weights) -> None:
    stage = Stage.from_tensors(tiny_config, 0, tiny_config.n_units, tiny_weights)
    session = LocalSession(stage, SamplingParams(temperature=0), tiny_config.block_size)
    gen = generate(session, [1, 2, 3], 1000, block_size=tiny_config.block_size)
    assert gen.stop_reason == "context"
    assert len(gen.prompt_token_ids) + len(gen.token_ids) == tiny_config.block_size + 1


def test_init_weights_is_deterministic(tiny_config: GPTConfig) -> None:
    a, b = init_weights(tiny_config, seed=5), init_weights(tiny_config, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bias", [True, False])
def test_checkpoint_shapes_are_the_engines(bias: bool) -> None:
    """config.tensor_shape (what checkpoints and model cards are checked against) names the
    shapes the engine's Stage really holds, tensor for tensor."""
    from nanoshard.checkpoint import model_shapes

    config = GPTConfig(block_size=48, vocab_size=97, n_layer=3, n_head=4, n_embd=32, bias=bias)
    with torch.device("meta"):
        state = Stage(config, 0, config.n_units).state_dict()
    expected = {n: tuple(state[n].shape) for n in stage_tensor_names(config, 0, config.n_units)}
    assert model_shapes(config) == expected


def test_building_a_stage_never_imports_dynamo(tiny_hf_dir) -> None:
    """A stage is built on the meta device and then given its tensors: the modules' init
    functions are skipped there (on meta they import torch._dynamo: seconds of CPU in every
    node that loads a stage)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from nanoshard.checkpoint import open_checkpoint\n"
        f"ckpt = open_checkpoint({str(tiny_hf_dir)!r})\n"
        "stage = ckpt.load_stage(0, ckpt.config.n_units)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
