"""The generation loop, shared by every path.

A *session* is one sequence being generated: give it tokens starting at a position, it
answers the next token. ``LocalSession`` runs the whole model in this process (the
reference path); the client SDK's remote session sends the same steps along a route of
nodes, awaited. One loop (``_loop``) decides every step, and two thin drivers run it
(``generate``, ``agenerate``), so both paths stop, time and count identically.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from nanoshard.engine import Stage
from nanoshard.errors import InvalidArgument
from nanoshard.sampling import SamplingParams, sample

DEFAULT_PREFILL_CHUNK = 128  # tokens per prefill chunk (the same chunks on every path)
STOP_NOTES = {
    "eot": "stopped at <|endoftext|>",
    "max_new_tokens": "stopped after max_new_tokens",
    "context": "stopped at the model's context length",
    "stop": "stopped at a stop sequence",
}


@dataclass
class StepResult:
    token: int
    hops: list[dict[str, Any]] = field(default_factory=list)  # per-hop trace, empty locally
    # Of the step's time, what went to no hop: failed tries and reroutes, a spot-check's
    # material (so a hop's transfer time is not charged with it).
    waited_ms: float = 0.0


class Session(Protocol):
    def step(self, tokens: list[int], pos: int) -> StepResult:
        """Feed ``tokens`` at positions ``pos..``; return the token at ``pos + len(tokens)``."""
        ...

    def close(self) -> None: ...


class AsyncSession(Protocol):
    async def step(self, tokens: list[int], pos: int) -> StepResult:
        """As :meth:`Session.step`, awaited."""
        ...

    async def close(self) -> None: ...


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids only, without a final <|endoftext|>
    stop_reason: str  # "eot" | "max_new_tokens" | "context" | "stop"
    prefill_ms: float = 0.0  # time to first token
    decode_ms: list[float] = field(default_factory=list)  # one per later token
    hops: list[list[dict[str, Any]]] = field(default_factory=list)  # trace of each step
    waited_ms: list[float] = field(default_factory=list)  # each step's (StepResult)
    text: str = ""


def check_prompt(prompt_ids: list[int], vocab_size: int, block_size: int) -> None:
    if not prompt_ids:
        raise InvalidArgument("the prompt is empty: give at least one token")
    if len(prompt_ids) >= block_size:
        raise InvalidArgument(
            f"the prompt is {len(prompt_ids)} tokens; this model's context is {block_size}, "
            "so it must be shorter to leave room for a new token"
        )
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidArgument(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")


def max_length_for(prompt_len: int, max_new_tokens: int, block_size: int) -> int:
    """Positions a session must reserve: the prompt plus every generated token but the last."""
    return min(block_size, prompt_len + max(max_new_tokens - 1, 0))


def _loop(
    prompt_ids: list[int],
    max_new_tokens: int,
    block_size: int,
    eot_id: int | None,
    on_token: Callable[[int], bool | None] | None,
    start_pos: int,
) -> Generator[tuple[list[int], int], StepResult, Generation]:
    """The generation loop, as a generator: it yields each step to run (tokens, position)
    and is sent its result; it returns the Generation. The drivers below run the steps on
    a session, synchronously or awaited, so every path shares this one loop."""
    if max_new_tokens < 1:
        raise InvalidArgument(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    gen = Generation(list(prompt_ids), [], "max_new_tokens")
    t0 = time.perf_counter()
    result = yield list(prompt_ids), start_pos
    gen.prefill_ms = (time.perf_counter() - t0) * 1e3
    gen.hops.append(result.hops)
    gen.waited_ms.append(result.waited_ms)
    while True:
        token = result.token
        if token == eot_id:
            gen.stop_reason = "eot"
            break
        gen.token_ids.append(token)
        if on_token is not None and on_token(token):
            gen.stop_reason = "stop"
            break
        if len(gen.token_ids) >= max_new_tokens:
            break
        pos = start_pos + len(prompt_ids) + len(gen.token_ids) - 1  # where this token sits
        if pos >= block_size:
            gen.stop_reason = "context"
            break
        t0 = time.perf_counter()
        result = yield [token], pos
        gen.decode_ms.append((time.perf_counter() - t0) * 1e3)
        gen.hops.append(result.hops)
        gen.waited_ms.append(result.waited_ms)
    return gen


def generate(
    session: Session,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    block_size: int,
    eot_id: int | None = None,
    on_token: Callable[[int], bool | None] | None = None,
    start_pos: int = 0,
) -> Generation:
    """Run a session until <|endoftext|>, max_new_tokens or the context length.

    ``prompt_ids`` are fed at ``start_pos`` (0 for a new session; later for a session that
    continues). ``on_token`` sees every generated token; returning True stops.
    """
    loop = _loop(prompt_ids, max_new_tokens, block_size, eot_id, on_token, start_pos)
    try:
        step = next(loop)
        while True:
            step = loop.send(session.step(*step))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def agenerate(
    session: AsyncSession,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    block_size: int,
    eot_id: int | None = None,
    on_token: Callable[[int], bool | None] | None = None,
    start_pos: int = 0,
) -> Generation:
    """:func:`generate` for a session whose steps are awaited (the swarm's)."""
    loop = _loop(prompt_ids, max_new_tokens, block_size, eot_id, on_token, start_pos)
    try:
        step = next(loop)
        while True:
            step = loop.send(await session.step(*step))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


class LocalSession:
    """The reference path: the whole model (or any full-coverage stage) in this process."""

    def __init__(
        self,
        stage: Stage,
        params: SamplingParams,
        max_length: int,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        if not (stage.has_embed and stage.has_head):
            raise ValueError("a local session needs a stage holding every unit")
        self.stage, self.params, self.prefill_chunk = stage, params, prefill_chunk
        self.cache = stage.new_cache(max_length)

    def step(self, tokens: list[int], pos: int) -> StepResult:
        if not tokens:
            raise InvalidArgument("a step needs at least one token")
        device = self.stage.device
        ids = torch.tensor(tokens, dtype=torch.long, device=device)
        with torch.inference_mode():
            for i in range(0, len(tokens), self.prefill_chunk):
                logits = self.stage(ids[i : i + self.prefill_chunk], self.cache, pos + i)
        return StepResult(sample(logits[-1], self.params, pos + len(tokens)))

    def close(self) -> None:
        self.cache = None  # type: ignore[assignment]
