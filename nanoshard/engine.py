"""The engine: a nanoGPT-compatible GPT-2 that runs any range of units.

Reads top to bottom in the order data flows: attention, MLP, block, stage. A ``Stage``
holds units ``[start, end)`` under nanoGPT's parameter names (blocks keep their global
index), so the same checkpoint tensors load into any stage, and the whole model is just
``Stage(config, 0, config.n_units)``. The single-process path and the distributed path run
exactly this code, which is why their fp32 outputs agree bit for bit. A node's batched
decode step (``Stage.decode``: one token for each of several sessions in one forward) agrees
with each session's step alone bit for bit too, on a CPU: see there.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from nanoshard.config import GPTConfig, block_indices, check_units
from nanoshard.errors import InvalidArgument
from nanoshard.kv import KVCache

log = logging.getLogger(__name__)

# Weights: floats run the whole stage in that dtype; "int8" is weight-only quantization (int8
# Linear and embedding weights with one bf16 scale per output row, activations stay fp32).
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int8": torch.int8,
}


def pick_device(requested: str | None = None) -> torch.device:
    """The device to run on: the one asked for, else cuda, else mps, else cpu."""
    if requested and requested != "auto":
        return _available(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _available(requested: str) -> torch.device:
    """``requested`` as a device of this machine; InvalidArgument if it is none."""
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise InvalidArgument(
            f"unknown device {requested[:40]!r}: give cpu, cuda, cuda:N, mps or auto"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise InvalidArgument(f"no {requested} here: this machine has {count} CUDA device(s)")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if not (mps and mps.is_available()):
            raise InvalidArgument("no mps device here (Apple silicon only)")
    elif device.type != "cpu":
        raise InvalidArgument(f"device {requested!r} is not supported: give cpu, cuda, mps or auto")
    return device


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}") from None


def weights_name(dtype: torch.dtype) -> str:
    """The ``DTYPES`` name of a weights dtype (``torch.int8`` -> ``"int8"``)."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported weights dtype {dtype}: choose one of {', '.join(DTYPES)}")


# ---- int8 weight-only quantization -------------------------------------------------------


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (N, K) as int8 rows and one bf16 scale per row: ``w ~ q * scale[:, None]``."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
    q = (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (q * scale).T`` in ``x``'s dtype. The product runs in bf16 (PyTorch's int8
    weight kernel, ``_weight_int8pack_mm``, which reads a quarter of fp32's weight bytes);
    where that kernel is missing, the weight is dequantized on the fly."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    try:
        y = torch.ops.aten._weight_int8pack_mm(x2, q, scale)
    except (RuntimeError, NotImplementedError):
        y = F.linear(x2, q.to(torch.bfloat16)) * scale
    return y.to(x.dtype).reshape(*shape[:-1], q.shape[0])


def prepack_int8(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """``q`` and ``scale`` packed for fbgemm's dynamic int8 Linear (CPU): the activations are
    quantized to int8 on the fly and the product runs in integers, about 2.5x faster than
    fp32 on an AVX2 CPU. None where that engine is missing (CUDA, MPS, other CPUs)."""
    if q.device.type != "cpu" or "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    zeros = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated, not yet replaced
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qweight, bias)


def linear_dynamic(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """fbgemm's dynamic int8 Linear, one activation scale per sequence: the sessions of a
    decode batch ``(B, 1, C)`` run one by one, so none shifts another's scale and each gets
    exactly what it gets alone (the int8 weights are re-read per session, a quarter of fp32's
    bytes)."""
    if x.dim() == 3 and len(x) > 1:
        return torch.cat([torch.ops.quantized.linear_dynamic(r, packed, True) for r in x.split(1)])
    return torch.ops.quantized.linear_dynamic(x, packed, True)


class Int8Linear(nn.Module):
    """A ``nn.Linear`` with int8 weights (see ``quantize_rows``) and its float bias."""

    weight_q: torch.Tensor
    scale: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("weight_q", q)
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.packed = prepack_int8(q, scale, None if self.bias is None else self.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dtype == torch.float32:
            return linear_dynamic(x, self.packed)
        y = int8_matmul(x, self.weight_q, self.scale)
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """``wte`` with int8 rows: looks tokens up (embed) and projects onto the vocabulary
    (the tied lm_head) with the same per-row scales."""

    weight_q: torch.Tensor
    scale: torch.Tensor

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        q, scale = quantize_rows(embedding.weight)
        self.register_buffer("weight_q", q)
        self.register_buffer("scale", scale)
        self.dtype = embedding.weight.dtype
        self.packed = prepack_int8(q, scale, None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_q[ids].to(self.dtype) * self.scale[ids].to(self.dtype)[..., None]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dtype == torch.float32:
            return linear_dynamic(x, self.packed)
        return int8_matmul(x, self.weight_q, self.scale)


def quantize_int8(module: nn.Module) -> None:
    """Replace every ``nn.Linear`` and ``nn.Embedding`` named ``wte`` under ``module`` by
    its int8 counterpart, in place (``wpe`` and the LayerNorms stay float)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        elif isinstance(child, nn.Embedding) and name == "wte":
            setattr(module, name, Int8Embedding(child))
        else:
            quantize_int8(child)


# ---- packed Linear layers: one kernel whatever the number of rows (CPU) -----------------
#
# A node runs the decode steps of concurrent sessions as one forward, and a session's output
# must not depend on who shared that forward. A matrix library picks its kernel by the
# number of rows, and each kernel sums in its own order: on this project's CPU, MKL
# (``F.linear``) has one kernel for 1 row, another for 2-3 and a third for 4+; oneDNN with
# plain weights takes an AVX2 kernel for 1 row and AVX-512 for more. With the weight laid out
# once in oneDNN's blocked format, every row count runs one kernel family whose rows depend
# only on themselves, from some row count on (below it, oneDNN's AVX-512 kernel sums a
# long row differently). So each layer runs at least ``min_rows`` rows, a shorter input
# padded with zero rows, and ``min_rows`` is probed when the layer is packed: the first
# candidate whose lone-row result equals the same row inside a batch. The packed kernel
# is also faster than MKL here, for one row and more so for a batch.

PACK_ROWS = 16  # the batch size oneDNN lays the weight out for (MAX_BATCH's default)
SMALL_LINEAR = 1 << 18  # weights below which a layer runs row by row instead (``RowLinear``)
PACKABLE = (torch.float32, torch.bfloat16, torch.float16)


def row_candidates() -> tuple[int, ...]:
    """``min_rows`` to try, fastest first: oneDNN's AVX-512 kernel for fewer than 4 rows is
    slower than for 4 (and sums long rows differently); on AVX2 one row is fastest."""
    return (4, 1, 2) if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else (1, 2, 4)


def _packed_mm(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _probe_min_rows(packed: torch.Tensor, bias: torch.Tensor | None, shape: tuple) -> int:
    """The fewest rows a layer of this shape must run for each row's result to equal that
    row's inside a batch (of 5 and of PACK_ROWS rows)."""
    n, k = shape
    gen = torch.Generator().manual_seed(n * 7919 + k)
    x = torch.randn(PACK_ROWS, k, generator=gen).to(packed.dtype)
    whole = _packed_mm(x, packed, bias)
    small = _packed_mm(x[:5], packed, bias)
    candidates = row_candidates()
    for rows in candidates:
        lone = _packed_mm(F.pad(x[:1], (0, 0, 0, rows - 1)), packed, bias)[:1]
        if torch.equal(lone, whole[:1]) and torch.equal(small, whole[:5]):
            return rows
    log.warning(
        "no row count makes a [%d x %d] %s layer's rows independent of the batch on this CPU: "
        "batched decode steps may differ from lone ones in the last bits",
        n,
        k,
        packed.dtype,
    )
    return candidates[0]


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` (CPU, fp32, bf16 or fp16) on oneDNN with its weight packed
    once; runs at least ``min_rows`` rows so a row's result never depends on the others."""

    weight_packed: torch.Tensor

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, probed: dict[tuple, int]
    ) -> None:
        super().__init__()
        weight = weight.detach()
        self.register_buffer(
            "weight_packed", torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        )
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        key = (*weight.shape, weight.dtype, bias is not None)
        if key not in probed:
            probed[key] = _probe_min_rows(self.weight_packed, self.bias, tuple(weight.shape))
        self.min_rows = probed[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        x2 = x.reshape(rows, x.shape[-1])
        if rows < self.min_rows:
            x2 = F.pad(x2, (0, 0, 0, self.min_rows - rows))
        y = _packed_mm(x2, self.weight_packed, self.bias)
        return y[:rows].view(*x.shape[:-1], y.shape[-1])


class RowLinear(nn.Module):
    """A Linear layer too small to be worth packing (oneDNN's fixed cost, ~0.1 ms a call here,
    is ten times ``F.linear``'s on a toy layer): each row runs alone, on the one-row kernel, so
    no row depends on the others either. Weights are read once per row, which a small layer
    does not notice."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if len(rows) == 1:
            return F.linear(x, self.weight, self.bias)
        y = torch.cat([F.linear(row, self.weight, self.bias) for row in rows.split(1)])
        return y.view(*x.shape[:-1], y.shape[-1])


def fast_linear(weight: torch.Tensor, bias: torch.Tensor | None, probed: dict) -> nn.Module:
    """The layer ``pack_linears`` puts in place of a Linear layer with these weights."""
    if weight.numel() < SMALL_LINEAR:
        return RowLinear(weight, bias)
    return PackedLinear(weight, bias, probed)


class PackedEmbedding(nn.Module):
    """``wte`` of a stage holding the head: the tied lm_head as a packed layer and, only if
    the stage embeds too, the plain rows for the lookup (wte is then held twice)."""

    def __init__(self, embedding: nn.Embedding, lookup: bool, probed: dict[tuple, int]) -> None:
        super().__init__()
        self.head = fast_linear(embedding.weight, None, probed)
        self.weight = embedding.weight if lookup else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError("this stage holds the head only: it has no embedding rows")
        return F.embedding(ids, self.weight)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``pack_linears`` applies: oneDNN on a CPU, for weights of this dtype."""
    if device.type != "cpu" or dtype not in PACKABLE or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:  # (on a CPU with AVX512-FP16, plain fp16 ``F.linear`` sums
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())  # one row differently)
    return True


def pack_linears(stage: Stage) -> None:
    """Replace every ``nn.Linear`` of ``stage`` (and its tied head) by a ``PackedLinear``, or a
    ``RowLinear`` if it is small, in place. Inference only: packed layers have no gradient."""
    probed: dict[tuple, int] = {}  # min_rows per layer shape: blocks repeat a few shapes
    for module in list(stage.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, fast_linear(child.weight, child.bias, probed))
    wte = stage.transformer["wte"] if stage.has_head else None
    if isinstance(wte, nn.Embedding):  # not a vocabulary-parallel slice (tp.py)
        stage.transformer["wte"] = PackedEmbedding(wte, stage.has_embed, probed)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has none to switch off)."""

    def __init__(self, ndim: int, bias: bool, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head  # heads this module computes (fewer when tensor parallel)
        self.head_dim = config.head_dim

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None, pos: int
    ) -> torch.Tensor:
        B, T, _ = x.shape
        C = self.n_head * self.head_dim
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if kv is not None:
            # Write this chunk's keys and values at [pos, pos+T), then attend over [0, pos+T).
            k_cache, v_cache = kv
            k_cache[:, pos : pos + T] = k[0]
            v_cache[:, pos : pos + T] = v[0]
            k = k_cache[None, :, : pos + T]
            v = v_cache[None, :, : pos + T]
        if T == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # one query sees every cached key
        elif pos == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # a later prefill chunk: query i sits at absolute position pos+i
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def decode(
        self, x: torch.Tensor, kvs: list[tuple[torch.Tensor, torch.Tensor]], positions: list[int]
    ) -> torch.Tensor:
        """One new token for each of B sessions, ``x`` (B, 1, C): the projections see the
        whole batch, each query attends to its own session's cache."""
        B = x.shape[0]
        C = self.n_head * self.head_dim
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, 1, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        ys = []
        for b, ((k_cache, v_cache), pos) in enumerate(zip(kvs, positions, strict=True)):
            k_cache[:, pos] = k[b, :, 0]
            v_cache[:, pos] = v[b, :, 0]
            kb, vb = k_cache[None, :, : pos + 1], v_cache[None, :, : pos + 1]
            ys.append(F.scaled_dot_product_attention(q[b : b + 1], kb, vb))
        y = torch.cat(ys)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, 1, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu(self.c_fc(x)))


# torch's vectorized elementwise kernels step through a tensor this many floats at a time
# (at most: two AVX-512 vectors here), and finish on a scalar path whose tanh differs in the
# last bit: rows whose width is a multiple start on the same lanes whatever the batch.
VECTOR_FLOATS = 64


def gelu(h: torch.Tensor) -> torch.Tensor:
    """GPT-2's gelu, each row's result the same whatever rows come with it: a width that
    is not a multiple of ``VECTOR_FLOATS`` (toy models, never GPT-2's) runs row by row."""
    rows = h.reshape(-1, h.shape[-1])
    if len(rows) == 1 or h.shape[-1] % VECTOR_FLOATS == 0:
        return F.gelu(h, approximate="tanh")
    return torch.cat([F.gelu(row, approximate="tanh") for row in rows.split(1)]).view(h.shape)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias, config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None, pos: int
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv, pos)
        return x + self.mlp(self.ln_2(x))

    def decode(
        self, x: torch.Tensor, kvs: list[tuple[torch.Tensor, torch.Tensor]], positions: list[int]
    ) -> torch.Tensor:
        x = x + self.attn.decode(self.ln_1(x), kvs, positions)
        return x + self.mlp(self.ln_2(x))


class _SkipInit(TorchFunctionMode):
    """Module constructors without their init pass: ``torch.nn.init``'s functions leave the
    tensor as it is (its values are loaded next). On the meta device those inits run Python
    decompositions that import torch._dynamo: seconds of CPU in every process that builds a
    stage. A torch function mode is per thread, so other threads keep their inits."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else next(iter((kwargs or {}).values()))
        return func(*args, **(kwargs or {}))


class Stage(nn.Module):
    """Units ``[start, end)`` of a GPT-2.

    Input: token ids ``(T,)`` if the stage holds ``embed``, else activations ``(T, n_embd)``.
    Output: logits ``(T, vocab)`` (or only the last row) if it holds ``head``, else activations.
    A leading batch dimension (``(B, T)`` / ``(B, T, n_embd)``) is accepted without a cache,
    for training. Inference callers wrap calls in ``torch.inference_mode()``.
    """

    def __init__(self, config: GPTConfig, start: int, end: int) -> None:
        super().__init__()
        check_units(config, start, end)
        self.config, self.start, self.end = config, start, end
        self.has_embed = start == 0
        self.has_head = end == config.n_units
        self.blocks = block_indices(config, start, end)
        self.heads = config.n_head  # attention heads per block it computes and caches
        self.vocab = (0, config.vocab_size)  # the token ids its logits cover
        self.shard: Any = None  # a tp.Shard when its blocks are split across a group
        self.transformer = nn.ModuleDict()
        if self.has_embed or self.has_head:  # the head reads wte too (tied lm_head)
            self.transformer["wte"] = nn.Embedding(config.vocab_size, config.n_embd)
        if self.has_embed:
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer["h"] = nn.ModuleDict({str(i): Block(config) for i in self.blocks})
        if self.has_head:
            self.transformer["ln_f"] = LayerNorm(
                config.n_embd, config.bias, config.layer_norm_epsilon
            )

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def view(self, start: int, end: int) -> Stage:
        """Units ``[start, end)`` of this stage as a stage of their own, sharing its weights
        (a route may enter a node's stage part-way, or leave it early)."""
        if (start, end) == (self.start, self.end):
            return self
        if not self.start <= start < end <= self.end:
            raise ValueError(
                f"[{start}, {end}) is not inside this stage [{self.start}, {self.end})"
            )
        with torch.device("meta"), _SkipInit():  # its modules are replaced by ours below
            sub = Stage(self.config, start, end)
        for name in sub.transformer:
            if name == "h":
                blocks = cast(nn.ModuleDict, self.transformer["h"])
                sub.transformer["h"] = nn.ModuleDict({str(i): blocks[str(i)] for i in sub.blocks})
            else:
                sub.transformer[name] = self.transformer[name]
        sub.heads, sub.vocab, sub.shard = self.heads, self.vocab, self.shard
        return sub.eval()

    # Read on every step, so worked out once: a stage is not moved or cast once it serves.
    @functools.cached_property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @functools.cached_property
    def act_dtype(self) -> torch.dtype:
        """The dtype activations and the KV cache run in: the weights' float dtype (fp32
        when the weights are int8: their LayerNorms, biases and ``wpe`` stay fp32)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def weights(self) -> str:
        """The weights' ``DTYPES`` name: fp32, bf16, fp16 or int8."""
        quantized = any(isinstance(m, Int8Linear | Int8Embedding) for m in self.modules())
        return "int8" if quantized else weights_name(self.act_dtype)

    @property
    def weight_nbytes(self) -> int:
        """Bytes of its weights (parameters and quantized buffers) in memory."""
        tensors = [*self.parameters(), *self.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The tied lm_head: normalized activations -> logits."""
        wte = self.transformer["wte"]
        if isinstance(wte, nn.Embedding):
            return F.linear(x, wte.weight)
        return cast(Any, wte).project(x)  # packed, quantized or vocabulary-parallel

    def to_weights(self, dtype: torch.dtype) -> Stage:
        """This stage with its weights cast to ``dtype`` (``torch.int8``: quantized) and, where
        oneDNN runs them (CPU, fp32, bf16 or fp16), its Linear layers packed: ready for inference,
        no longer for training."""
        if dtype == torch.int8:
            quantize_int8(self.float())
            return self
        self.to(dtype)
        if can_pack(next(self.parameters()).device, dtype):
            pack_linears(self)
        return self

    def new_cache(self, max_length: int) -> KVCache:
        return KVCache(
            self.config, self.n_blocks, max_length, self.act_dtype, self.device, self.heads
        )

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        pos: int = 0,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run the stage on one chunk of a sequence starting at position ``pos``.

        With a cache, the chunk's keys and values are stored and ``cache.length`` moves to
        ``pos + T``; without one, ``pos`` must be 0 (a full recomputation).
        """
        batched = x.dim() == (2 if self.has_embed else 3)
        if batched and cache is not None:
            raise ValueError("a KV cache holds one sequence: pass an unbatched chunk")
        if not batched:
            x = x.unsqueeze(0)
        T = x.shape[1]
        if cache is None and pos != 0:
            raise ValueError("a chunk at pos > 0 needs the cache of the positions before it")
        if pos + T > self.config.block_size:
            raise ValueError(
                f"positions up to {pos + T} exceed the context length {self.config.block_size}"
            )
        if cache is not None and T == 1:  # a decode step: exactly a batch of one (see decode)
            return self.decode(x[0], [cache], [pos])
        if self.has_embed:
            positions = torch.arange(pos, pos + T, device=x.device)
            h = self.transformer["wte"](x) + self.transformer["wpe"](positions)
        else:
            h = x
        blocks = cast(nn.ModuleDict, self.transformer["h"])
        for j, i in enumerate(self.blocks):
            h = blocks[str(i)](h, cache.block(j) if cache else None, pos)
        if cache is not None:
            cache.length = pos + T
        if self.has_head:
            if not all_logits:
                h = h[:, -1:]
            h = self.project(self.transformer["ln_f"](h))
        return h if batched else h[0]

    def decode(self, x: torch.Tensor, caches: list[KVCache], positions: list[int]) -> torch.Tensor:
        """One decode step for each of B sessions at once, the b-th one token at
        ``positions[b]`` with its own ``caches[b]``.

        Input: token ids ``(B,)`` if the stage holds ``embed``, else activations
        ``(B, n_embd)``; output: logits ``(B, vocab)`` or activations ``(B, n_embd)``, row b
        as ``self(x[b:b+1], caches[b], positions[b])`` would give it. The Linear layers read
        their weights once for all B rows, which is the point; attention stays per session.

        On a CPU row b equals that lone step bit for bit, whatever the other rows: a lone
        decode step *is* this code with B = 1, fp32, bf16 and fp16 Linear layers are packed so
        their rows do not depend on B (``PackedLinear``), and int8 layers quantize each
        session's activations on their own (``linear_dynamic``). On CUDA and MPS the
        Linear layers are plain ``F.linear``, and the matrix library may pick another kernel
        for B rows than for one: rows may then differ from a lone step by rounding (about
        1e-6 relative in fp32; not measured here, this machine has no GPU).
        """
        B = x.shape[0]
        if not B == len(caches) == len(positions):
            raise ValueError(f"{B} inputs for {len(caches)} caches and {len(positions)} positions")
        if len({id(c) for c in caches}) != B:
            raise ValueError("a session appears twice in one decode batch")
        for cache, pos in zip(caches, positions, strict=True):
            if not 0 <= pos < min(cache.max_length, self.config.block_size):
                raise ValueError(
                    f"position {pos} is outside the cache (max_length {cache.max_length})"
                )
        if self.has_embed:
            where = torch.tensor(positions, device=x.device)
            h = self.transformer["wte"](x) + self.transformer["wpe"](where)
        else:
            h = x
        h = h.unsqueeze(1)  # (B, 1, C): each session's chunk of one token
        blocks = cast(nn.ModuleDict, self.transformer["h"])
        for j, i in enumerate(self.blocks):
            block = cast(Block, blocks[str(i)])
            h = block.decode(h, [c.block(j) for c in caches], positions)
        for cache, pos in zip(caches, positions, strict=True):
            cache.length = pos + 1
        if self.has_head:
            h = self.project(self.transformer["ln_f"](h))
        return h[:, 0]

    @classmethod
    def from_tensors(
        cls,
        config: GPTConfig,
        start: int,
        end: int,
        tensors: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        transform: Callable[[Stage], Stage] | None = None,
    ) -> Stage:
        """Build a stage straight from its checkpoint tensors (nanoGPT names), no init pass;
        ``transform`` (e.g. ``tp.shard``) rewrites it before its weights are cast and packed."""
        with torch.device("meta"), _SkipInit():
            stage = cls(config, start, end)
        expected = set(stage.state_dict())
        missing = sorted(expected - tensors.keys())
        if missing:
            raise KeyError(f"missing tensors for units [{start}, {end}): {', '.join(missing[:5])}")
        load_as = torch.float32 if dtype == torch.int8 else dtype
        state = {name: tensors[name].to(device=device, dtype=load_as) for name in expected}
        stage.load_state_dict(state, assign=True)
        if transform is not None:
            stage = transform(stage)
        return stage.to_weights(dtype).eval()


def init_weights(config: GPTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random GPT-2-style weights for the whole model (nanoGPT's init), for tests and training."""
    gen = torch.Generator().manual_seed(seed)
    stage = Stage(config, 0, config.n_units)
    std_proj = 0.02 / math.sqrt(2 * config.n_layer)
    with torch.no_grad():
        for name, p in stage.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0.0, std_proj, generator=gen)
            elif p.dim() == 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif "ln_" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return {k: v.detach().clone() for k, v in stage.state_dict().items()}
