"""The model's shape, and the model seen as a line of units.

unit 0 is ``embed`` (wte + wpe), unit 1+i is ``block i``, unit L+1 is ``head``
(ln_f + lm_head, whose weight is wte's). A *stage* is a half-open unit range
``[start, end)``; the whole model is the stage ``[0, L+2)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nanoshard.errors import InvalidArgument


@dataclass(frozen=True)
class GPTConfig:
    """nanoGPT's GPTConfig, for inference (no dropout)."""

    block_size: int = 1024  # context length
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidArgument(
                    f"model config: {name} must be a positive integer, got {value!r}"
                )
        if self.n_embd % self.n_head:
            raise InvalidArgument(
                f"model config: n_embd ({self.n_embd}) is not a multiple of n_head ({self.n_head})"
            )

    @property
    def n_units(self) -> int:
        return self.n_layer + 2

    @property
    def head_unit(self) -> int:
        return self.n_layer + 1

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def unit_name(config: GPTConfig, unit: int) -> str:
    if unit == 0:
        return "embed"
    if unit == config.head_unit:
        return "head"
    return f"block {unit - 1}"


def describe_units(config: GPTConfig, start: int, end: int) -> str:
    """``[1, 4)`` -> ``"block 0..block 2"``, for people."""
    if end - start == 1:
        return unit_name(config, start)
    return f"{unit_name(config, start)}..{unit_name(config, end - 1)}"


def check_units(config: GPTConfig, start: int, end: int) -> None:
    """Raise InvalidArgument unless ``[start, end)`` is a non-empty range of this model's units."""
    if not (0 <= start < end <= config.n_units):
        raise InvalidArgument(
            f"units [{start}, {end}) are not a stage of this model: it has units 0..{config.n_units - 1} "
            f"(0 = embed, 1..{config.n_layer} = blocks, {config.head_unit} = head)"
        )


def parse_units(text: str, config: GPTConfig | None = None) -> tuple[int, int]:
    """Parse ``START:END`` (END may be omitted for 'to the end' when config is known)."""
    try:
        start_s, end_s = text.split(":")
        start = int(start_s)
        if end_s == "":
            if config is None:
                raise ValueError
            end = config.n_units
        else:
            end = int(end_s)
    except ValueError:
        raise InvalidArgument(
            f"units must look like START:END (for example 0:4), got {text!r}"
        ) from None
    if config is not None:
        check_units(config, start, end)
    elif not 0 <= start < end:
        raise InvalidArgument(f"units {text!r}: need 0 <= START < END")
    return start, end


def block_indices(config: GPTConfig, start: int, end: int) -> range:
    """The transformer blocks inside units ``[start, end)``."""
    return range(max(start, 1) - 1, min(end, config.head_unit) - 1)


def unit_tensor_names(config: GPTConfig, unit: int) -> list[str]:
    """The checkpoint tensors (nanoGPT names) one unit needs. The head reads wte (tied)."""
    if unit == 0:
        return ["transformer.wte.weight", "transformer.wpe.weight"]
    if unit == config.head_unit:
        names = ["transformer.ln_f.weight"] + (["transformer.ln_f.bias"] if config.bias else [])
        return [*names, "transformer.wte.weight"]
    i = unit - 1
    names = []
    for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
        names.append(f"transformer.h.{i}.{part}.weight")
        if config.bias:
            names.append(f"transformer.h.{i}.{part}.bias")
    return names


# A block's Linear layers: (out, in) features in n_embd, nn.Linear's layout.
_LINEAR = {"attn.c_attn": (3, 1), "attn.c_proj": (1, 1), "mlp.c_fc": (4, 1), "mlp.c_proj": (1, 4)}


def tensor_shape(config: GPTConfig, name: str) -> tuple[int, ...]:
    """The shape of the checkpoint tensor ``name`` (a nanoGPT name of ``unit_tensor_names``;
    nn.Linear layout), as the engine's ``Stage`` holds it (tests/test_engine.py checks)."""
    n = config.n_embd
    if name == "transformer.wte.weight":
        return (config.vocab_size, n)
    if name == "transformer.wpe.weight":
        return (config.block_size, n)
    layer, kind = name.rsplit(".", 1)
    if layer.endswith(("ln_1", "ln_2", "ln_f")):
        return (n,)
    out, inp = _LINEAR[layer.split(".", 3)[3]]  # transformer.h.{i}.{attn|mlp}.{name}
    return (out * n, inp * n) if kind == "weight" else (out * n,)


def stage_tensor_names(config: GPTConfig, start: int, end: int) -> list[str]:
    """The tensors of a stage, each once, in unit order."""
    seen: dict[str, None] = {}
    for unit in range(start, end):
        for name in unit_tensor_names(config, unit):
            seen.setdefault(name)
    return list(seen)
