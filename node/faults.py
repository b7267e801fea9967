"""A test-only fault switch: a node that lies. ``NANOSHARD_FAULT=perturb:SCALE`` makes the
node add Gaussian noise of SCALE times each output row's RMS to everything it computes
(activations it sends, logits it samples from, outputs it returns to a spot-check), the way
broken hardware or a tampered build would. Tests and soak runs use it to show that
spot-checks find such a node; nothing else should set it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from nanoshard.errors import InvalidArgument

ENV = "NANOSHARD_FAULT"


@dataclass(frozen=True)
class Fault:
    scale: float  # noise RMS as a share of each output row's RMS

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        rms = y.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
        noise = torch.randn(y.shape, dtype=torch.float32, device=y.device) * rms * self.scale
        return (y.float() + noise).to(y.dtype)


def fault_from_env(value: str | None = None) -> Fault | None:
    """The fault ``$NANOSHARD_FAULT`` asks for, or None (the normal case)."""
    value = os.environ.get(ENV, "") if value is None else value
    if not value:
        return None
    kind, _, arg = value.partition(":")
    try:
        scale = float(arg)
    except ValueError:
        scale = -1.0
    if kind != "perturb" or not 0 < scale <= 100:
        raise InvalidArgument(f"{ENV}={value!r}: expected perturb:SCALE with 0 < SCALE <= 100")
    return Fault(scale)
