"""A test-only fault switch: a node that lies, or one that is slow.
``NANOSHARD_FAULT=perturb:SCALE`` makes the node add Gaussian noise of SCALE times each
output row's RMS to everything it computes (activations it sends, logits it samples from,
outputs it returns to a spot-check), the way broken hardware or a tampered build would.
Tests and soak runs use it to show that spot-checks find such a node.
``NANOSHARD_FAULT=delay:SECONDS`` makes every step hold the node's compute worker that much
longer (outputs unchanged), so a test can fill the node's queue without betting on timing.
Nothing else should set it."""

from __future__ import annotations

import os
import time
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


@dataclass(frozen=True)
class Delay:
    seconds: float  # added to every step, on the compute worker

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return y


def fault_from_env(value: str | None = None) -> Fault | Delay | None:
    """The fault ``$NANOSHARD_FAULT`` asks for, or None (the normal case)."""
    value = os.environ.get(ENV, "") if value is None else value
    if not value:
        return None
    kind, _, arg = value.partition(":")
    try:
        number = float(arg)
    except ValueError:
        number = -1.0
    if kind == "perturb" and 0 < number <= 100:
        return Fault(number)
    if kind == "delay" and 0 < number <= 60:
        return Delay(number)
    raise InvalidArgument(
        f"{ENV}={value!r}: expected perturb:SCALE with 0 < SCALE <= 100, "
        "or delay:SECONDS with 0 < SECONDS <= 60"
    )
