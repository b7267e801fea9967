"""Sampling the next token, deterministic given (seed, position).

The random draw for a position comes from ``(seed, position)`` alone, never from a
generator's running state, so a session that is replayed, rerouted or resumed on another
node samples exactly the same tokens.
"""

from __future__ import annotations

import math
import random
import struct
from dataclasses import dataclass

import torch

from nanoshard.errors import InvalidArgument


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1 keeps all
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise InvalidArgument(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        # The wire carries them as float32: round here too, so this process and every node
        # divide by the very same number (and sample the same tokens from a seed).
        top_p = float32(self.top_p)
        if top_p == 0.0:
            raise InvalidArgument(f"top_p {self.top_p} is below float32's range: use >= 1e-38")
        object.__setattr__(self, "temperature", float32(self.temperature))
        object.__setattr__(self, "top_p", top_p)
        if not -(2**63) <= self.seed < 2**63:
            raise InvalidArgument(f"seed must fit in 64 bits, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def float32(x: float) -> float:
    """``x`` rounded to the nearest float32, as the wire carries it."""
    return struct.unpack("f", struct.pack("f", x))[0]


def uniform(seed: int, position: int) -> float:
    """The draw in [0, 1) for one position: a pure function of (seed, position)."""
    return random.Random(f"nanoshard:{seed}:{position}").random()


def sample(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Pick the token at ``position`` from a row of logits ``(vocab,)``."""
    logits = logits.detach().to("cpu", torch.float64)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs, order = torch.sort(torch.softmax(logits, dim=-1), descending=True, stable=True)
    if params.top_p < 1.0:
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above
        probs = probs.masked_fill(before >= params.top_p, 0.0)
    cdf = torch.cumsum(probs, dim=-1)
    u = uniform(params.seed, position) * float(cdf[-1])
    i = int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype), right=True)[0])
    return int(order[min(i, order.numel() - 1)])
