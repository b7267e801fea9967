"""The KV cache of one session on one stage: keys and values of its blocks, reserved
for ``max_length`` positions up front so a node knows its memory when the session opens."""

from __future__ import annotations

import torch

from nanoshard.config import GPTConfig


class KVCache:
    def __init__(
        self,
        config: GPTConfig,
        n_blocks: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        heads: int | None = None,
    ) -> None:
        """``heads``: the heads it caches (a tensor-parallel member caches its own only)."""
        shape = (n_blocks, heads or config.n_head, max_length, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0  # positions filled so far

    @staticmethod
    def nbytes_for(
        config: GPTConfig,
        n_blocks: int,
        max_length: int,
        dtype: torch.dtype,
        heads: int | None = None,
    ) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        width = (heads or config.n_head) * config.head_dim
        return 2 * n_blocks * max_length * width * itemsize

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def block(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(n_head, max_length, head_dim)`` of the i-th block of this stage."""
        return self.k[i], self.v[i]
