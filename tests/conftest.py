"""Shared fixtures: tiny real models, made on the spot (milliseconds, no downloads)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

# isort: off
import nanoshard.threads  # noqa: F401  before torch: the nodes' thread policy (see there)

# isort: on
import pytest
import torch

from nanoshard.checkpoint import save_hf_checkpoint, save_nanogpt_checkpoint
from nanoshard.config import GPTConfig
from nanoshard.engine import init_weights


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Multi-process tests first, in file order: with a worker per core (``make test``),
    the short in-process tests fill in at the end, so no worker is left alone on a long
    test while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def signal_handlers() -> Iterator[None]:
    """Each test ends with the SIGINT and SIGTERM handlers it started with: a CLI run in
    this process (``main(argv)``) sets its own, for the process it expects to end."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture
def tiny_config() -> GPTConfig:
    """A 3-block GPT-2 small enough that every test can afford it."""
    return GPTConfig(block_size=64, vocab_size=96, n_layer=3, n_head=2, n_embd=32)


@pytest.fixture
def tiny_weights(tiny_config: GPTConfig) -> dict[str, torch.Tensor]:
    """Random weights (nanoGPT names). Biases and norms get noise too, so that a bias or norm
    read from the wrong place shows: nanoGPT's init leaves them all exactly 0 or 1."""
    return with_noisy_biases(init_weights(tiny_config, seed=0), seed=1)


def with_noisy_biases(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``weights`` with noise on every bias and norm (in place)."""
    gen = torch.Generator().manual_seed(seed)
    for t in weights.values():
        if t.dim() == 1:
            t.add_(0.05 * torch.randn(t.shape, generator=gen))
    return weights


@pytest.fixture
def tiny_hf_dir(
    tmp_path: Path, tiny_config: GPTConfig, tiny_weights: dict[str, torch.Tensor]
) -> Path:
    """``tiny_weights`` as a Hugging Face GPT-2 directory (config.json + model.safetensors)."""
    directory = tmp_path / "tiny-hf"
    save_hf_checkpoint(tiny_config, tiny_weights, directory)
    return directory


@pytest.fixture
def tiny_nanogpt_ckpt(
    tmp_path: Path, tiny_config: GPTConfig, tiny_weights: dict[str, torch.Tensor]
) -> Path:
    """``tiny_weights`` as a nanoGPT ``ckpt.pt``."""
    path = tmp_path / "tiny-nanogpt" / "ckpt.pt"
    save_nanogpt_checkpoint(tiny_config, tiny_weights, path)
    return path
