"""A test-only fault switch: a node that lies, or one that is slow.

``NANOSHARD_FAULT=perturb:SCALE`` makes the node add Gaussian noise of SCALE times each
output row's RMS to everything it computes (activations it sends, logits it samples from,
outputs it returns to a spot-check), the way broken hardware or a tampered build would;
``perturb:SCALE:SHARE`` only to a random SHARE of its steps (0 < SHARE <= 1), as a node
that lies now and then; ``perturb:SCALE:SHARE:AFTER`` from AFTER seconds after it started,
as one that behaves until it is trusted.
Tests and soak runs use it to show that spot-checks find such a node.
``NANOSHARD_FAULT=delay:SECONDS`` makes every step hold the node's compute worker that much
longer (outputs unchanged), so a test can fill the node's queue without betting on timing.
``NANOSHARD_FAULT=slow:FACTOR[:AFTER]`` makes the node's compute FACTOR times slower from
AFTER seconds (default 0) after it started (outputs unchanged; its capacity, measured as it
starts, is not), like a volunteer whose owner starts a game: each compute job then holds
the worker FACTOR - 1 times as long again as it took.
``NANOSHARD_FAULT=forge`` makes the node rewrite what it relays: the token the later hops
drew, one higher (its own outputs unchanged), as a middle hop that games its callers would;
the client's check of the head's word for it (the session key's MAC, else its signature)
catches it.
Nothing else should set it."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from nanoshard.errors import InvalidArgument

ENV = "NANOSHARD_FAULT"


@dataclass(frozen=True)
class Fault:
    scale: float  # noise RMS as a share of each output row's RMS
    share: float = 1.0  # of the steps perturbed, each drawn at random
    after_s: float = 0.0  # from this long after the node started
    started: float = field(default_factory=time.monotonic)

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        if self.after_s and time.monotonic() - self.started < self.after_s:
            return y
        if self.share < 1 and random.random() >= self.share:
            return y
        rms = y.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
        noise = torch.randn(y.shape, dtype=torch.float32, device=y.device) * rms * self.scale
        return (y.float() + noise).to(y.dtype)


@dataclass(frozen=True)
class Delay:
    seconds: float  # added to every step, on the compute worker

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return y


@dataclass(frozen=True)
class Slow:
    factor: float  # compute takes this many times as long ...
    after_s: float = 0.0  # ... from this long after the node started
    started: float = field(default_factory=time.monotonic)

    def hold(self, compute_s: float) -> None:
        """After a compute job that took ``compute_s``: make it take ``factor`` times that."""
        if time.monotonic() - self.started >= self.after_s:
            time.sleep((self.factor - 1) * compute_s)


@dataclass(frozen=True)
class Forge:
    """Rewrites the token in the replies it relays (see the module doc)."""

    def relay(self, reply: Any) -> None:
        if reply.has_token:
            reply.token += 1


def fault_from_env(value: str | None = None) -> Fault | Delay | Slow | Forge | None:
    """The fault ``$NANOSHARD_FAULT`` asks for, or None (the normal case)."""
    value = os.environ.get(ENV, "") if value is None else value
    if not value:
        return None
    kind, _, arg = value.partition(":")
    try:
        numbers = [float(a) for a in arg.split(":")]
    except ValueError:
        numbers = []
    share_ok = len(numbers) == 1 or (len(numbers) in (2, 3) and 0 < numbers[1] <= 1)
    after_ok = len(numbers) < 3 or 0 <= numbers[2] <= 1e6
    if kind == "perturb" and share_ok and after_ok and 0 < numbers[0] <= 100:
        return Fault(*numbers)
    if kind == "delay" and len(numbers) == 1 and 0 < numbers[0] <= 60:
        return Delay(numbers[0])
    slow_after_ok = len(numbers) == 1 or (len(numbers) == 2 and 0 <= numbers[1] <= 1e6)
    if kind == "slow" and slow_after_ok and 1 < numbers[0] <= 100:
        return Slow(*numbers)
    if value == "forge":
        return Forge()
    raise InvalidArgument(
        f"{ENV}={value!r}: expected perturb:SCALE[:SHARE[:AFTER]] with 0 < SCALE <= 100, "
        "0 < SHARE <= 1 and AFTER >= 0 seconds, "
        "delay:SECONDS with 0 < SECONDS <= 60, slow:FACTOR[:AFTER] with 1 < FACTOR <= 100 "
        "and AFTER >= 0 seconds, or forge"
    )
