"""The engine: a nanoGPT-compatible GPT-2 that runs any range of units.

Reads top to bottom in the order data flows: attention, MLP, block, stage. A ``Stage``
holds units ``[start, end)`` under nanoGPT's parameter names (blocks keep their global
index), so the same checkpoint tensors load into any stage, and the whole model is just
``Stage(config, 0, config.n_units)``. The single-process path and the distributed path run
exactly this code, which is why their fp32 outputs agree bit for bit. (``Stage.decode``, the
batched decode step of several sessions that a node may opt into, is the one exception: see
there.)
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from nanoshard.config import GPTConfig, block_indices, check_units
from nanoshard.kv import KVCache

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(requested: str | None = None) -> torch.device:
    """The device to run on: the one asked for, else cuda, else mps, else cpu."""
    if requested and requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}") from None


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
        self.n_head = config.n_head

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None, pos: int
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
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
        B, _, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, 1, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
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
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's gelu


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
        with torch.device("meta"):  # modules are replaced by this stage's own below
            sub = Stage(self.config, start, end)
        for name in sub.transformer:
            if name == "h":
                blocks = cast(nn.ModuleDict, self.transformer["h"])
                sub.transformer["h"] = nn.ModuleDict({str(i): blocks[str(i)] for i in sub.blocks})
            else:
                sub.transformer[name] = self.transformer[name]
        return sub.eval()

    def new_cache(self, max_length: int) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.config, self.n_blocks, max_length, p.dtype, p.device)

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
            wte = cast(nn.Embedding, self.transformer["wte"])
            h = F.linear(self.transformer["ln_f"](h), wte.weight)
        return h if batched else h[0]

    def decode(self, x: torch.Tensor, caches: list[KVCache], positions: list[int]) -> torch.Tensor:
        """One decode step for each of B sessions at once, the b-th one token at
        ``positions[b]`` with its own ``caches[b]``.

        Input: token ids ``(B,)`` if the stage holds ``embed``, else activations
        ``(B, n_embd)``; output: logits ``(B, vocab)`` or activations ``(B, n_embd)``, row b
        as ``self(x[b:b+1], caches[b], positions[b])`` would give it. The Linear layers read
        their weights once for all B rows, which is the point; attention stays per session.
        fp32 rows agree with the unbatched call to about 1e-6, not bit for bit: the matrix
        library picks another kernel for B rows than for one.
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
            wte = cast(nn.Embedding, self.transformer["wte"])
            h = F.linear(self.transformer["ln_f"](h), wte.weight)
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
    ) -> Stage:
        """Build a stage straight from its checkpoint tensors (nanoGPT names), no init pass."""
        with torch.device("meta"):
            stage = cls(config, start, end)
        expected = set(stage.state_dict())
        missing = sorted(expected - tensors.keys())
        if missing:
            raise KeyError(f"missing tensors for units [{start}, {end}): {', '.join(missing[:5])}")
        state = {name: tensors[name].to(device=device, dtype=dtype) for name in expected}
        stage.load_state_dict(state, assign=True)
        return stage.eval()


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
