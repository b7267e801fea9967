"""Batched decode: the decode steps of concurrent sessions as one forward. Each row equals
that session's own step bit for bit (fp32, bf16, fp16 and int8 on a CPU: one kernel
whatever the batch, see ``Stage.decode``), the worker batches what is queued together, and
a node serving 8 sessions at once (batching is on by default) answers each one the tokens it
would generate alone."""

from __future__ import annotations

import asyncio
import gc
import shutil
import threading
from pathlib import Path

import pytest
import torch
from routes import fixed_session
from swarm import Swarm

from nanoshard.checkpoint import save_hf_checkpoint
from nanoshard.client.route import route_from_addresses
from nanoshard.config import GPTConfig
from nanoshard.engine import Stage, init_weights
from nanoshard.errors import ResourceExhausted
from nanoshard.generation import LocalSession, generate
from nanoshard.node.worker import ComputeWorker, StageStep
from nanoshard.sampling import SamplingParams
from nanoshard.tokenizer import gpt2_bpe_dir

GREEDY = SamplingParams(temperature=0.0)


def prefilled(stage: Stage, lengths: list[int], seed: int = 0) -> list:
    """One cache per session, filled with ``lengths[b]`` random positions."""
    gen = torch.Generator().manual_seed(seed)
    caches = []
    with torch.inference_mode():
        for n in lengths:
            cache = stage.new_cache(32)
            stage(random_input(stage, n, gen), cache, 0)
            caches.append(cache)
    return caches


def random_input(stage: Stage, n: int, gen: torch.Generator) -> torch.Tensor:
    if stage.has_embed:
        return torch.randint(0, stage.config.vocab_size, (n,), generator=gen)
    return torch.randn(n, stage.config.n_embd, generator=gen).to(stage.act_dtype)


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("units", [(0, 5), (0, 2), (2, 4), (3, 5)])
@pytest.mark.parametrize("batch", [2, 3, 5, 16])
def test_decode_batch_equals_each_session_alone(
    tiny_config, tiny_weights, units, dtype, batch
) -> None:
    """Bit for bit, whatever the batch size (the matrix kernels differ by row count), the
    dtype and the stage, with the sessions at different positions."""
    stage = Stage.from_tensors(tiny_config, *units, tiny_weights, dtype)
    lengths = [3, 11, 1, 7, 20, 2, 9, 4, 13, 6, 8, 5, 17, 10, 12, 15][:batch]
    batched, alone = prefilled(stage, lengths), prefilled(stage, lengths)
    x = random_input(stage, len(lengths), torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ys = stage.decode(x, batched, lengths)
        for b, pos in enumerate(lengths):
            y = stage(x[b : b + 1], alone[b], pos)
            assert ys[b : b + 1].shape == y.shape
            assert torch.equal(ys[b : b + 1], y), (ys[b : b + 1] - y).abs().max()
            assert batched[b].length == alone[b].length == pos + 1
            assert torch.equal(batched[b].k, alone[b].k)
            assert torch.equal(batched[b].v, alone[b].v)


def test_gpt2_shaped_decode_batch_equals_alone() -> None:
    """GPT-2's widths (768, MLP 3072, head 50257: oneDNN sums rows this long differently for
    one row than for several), two blocks so it stays quick."""
    config = GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=12, n_embd=768)
    stage = Stage.from_tensors(config, 0, config.n_units, init_weights(config, seed=1))
    lengths = [3, 9, 1, 5, 12]
    batched, alone = prefilled(stage, lengths), prefilled(stage, lengths)
    ids = torch.tensor([5, 50256, 17, 300, 4242])
    with torch.inference_mode():
        ys = stage.decode(ids, batched, lengths)
        for b, pos in enumerate(lengths):
            assert torch.equal(ys[b : b + 1], stage(ids[b : b + 1], alone[b], pos)), b


@pytest.mark.parametrize("n_embd", [20, 36, 100])
def test_odd_width_decode_batch_equals_alone(n_embd) -> None:
    """Widths that are not a multiple of the vector length: vectorized gelu takes part of a
    row on its scalar path, and which part depends on the number of rows."""
    config = GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=n_embd)
    stage = Stage.from_tensors(config, 0, config.n_units, init_weights(config, seed=2))
    lengths = [3, 9, 1, 5, 12, 7, 2]
    batched, alone = prefilled(stage, lengths), prefilled(stage, lengths)
    ids = torch.tensor([5, 96, 17, 30, 42, 0, 61])
    with torch.inference_mode():
        ys = stage.decode(ids, batched, lengths)
        for b, pos in enumerate(lengths):
            assert torch.equal(ys[b : b + 1], stage(ids[b : b + 1], alone[b], pos)), b


def test_decode_batch_refuses_a_session_twice(tiny_config, tiny_weights) -> None:
    stage = Stage.from_tensors(tiny_config, 0, tiny_config.n_units, tiny_weights)
    cache = prefilled(stage, [4])[0]
    with pytest.raises(ValueError, match="twice"), torch.inference_mode():
        stage.decode(torch.tensor([1, 2]), [cache, cache], [4, 4])
    with pytest.raises(ValueError, match="outside the cache"), torch.inference_mode():
        stage.decode(torch.tensor([1]), [cache], [32])


def step_for(stage: Stage, cache, pos: int, x: torch.Tensor) -> StageStep:
    return StageStep(stage, cache, pos, len(x), lambda: x, lambda y: y.clone())


def test_worker_batches_queued_decode_steps(tiny_config, tiny_weights) -> None:
    """Steps queued while the worker is busy run as one forward per stage; prefill chunks
    and other stages run on their own; a step whose input fails fails alone (cache rewound)."""
    full = Stage.from_tensors(tiny_config, 0, tiny_config.n_units, tiny_weights)
    other = Stage.from_tensors(tiny_config, 0, tiny_config.n_units, tiny_weights)
    lengths = [2, 5, 9, 4, 13, 6, 1, 8]
    caches, reference = prefilled(full, lengths), prefilled(full, lengths)
    other_cache = prefilled(other, [3])[0]
    prefill_cache = full.new_cache(32)
    ids = torch.arange(len(lengths)) + 10
    with torch.inference_mode():
        expected = [full(ids[b : b + 1], reference[b], p) for b, p in enumerate(lengths)]

    def broken() -> torch.Tensor:
        raise ValueError("bad payload")

    async def main() -> tuple[list, list, object, object]:
        worker = ComputeWorker(max_batch=16)
        gate, busy = threading.Event(), threading.Event()

        def block() -> None:
            busy.set()
            assert gate.wait(timeout=30)

        try:
            blocker = asyncio.ensure_future(worker.run(block))  # the worker is busy ...
            assert await asyncio.to_thread(busy.wait, 30)
            steps = [
                worker.run(step_for(full, caches[b], p, ids[b : b + 1]))
                for b, p in enumerate(lengths)
            ]
            steps.append(worker.run(step_for(other, other_cache, 3, ids[:1])))
            steps.append(worker.run(step_for(full, prefill_cache, 0, ids[:4])))
            bad = StageStep(full, full.new_cache(32), 0, 1, broken, lambda y: y)
            steps.append(worker.run(bad))
            tasks = [asyncio.ensure_future(s) for s in steps]
            for _ in range(10_000):  # each task queues its job when it starts
                if worker.queue_depth == len(steps) + 1:  # (and the blocker runs)
                    break
                await asyncio.sleep(0.001)
            assert worker.queue_depth == len(steps) + 1, worker.queue_depth
            gate.set()  # ... while everything queues up behind it
            await blocker
            done = await asyncio.gather(*tasks, return_exceptions=True)
            return done[: len(lengths)], done[len(lengths) : -1], done[-1], bad.cache
        finally:
            worker.close()

    decoded, (other_step, prefill_step), failure, bad_cache = asyncio.run(main())
    assert isinstance(failure, ValueError) and bad_cache.length == 0
    assert [t.batch for t in decoded] == [len(lengths)] * len(lengths)  # one forward for all
    assert other_step.batch == 1 and prefill_step.batch == 1
    for timed, want in zip(decoded, expected, strict=True):
        assert torch.equal(timed.value, want)
        assert timed.compute_ms > 0 and timed.queue_ms > 0
    assert [c.length for c in caches] == [p + 1 for p in lengths]


def test_worker_without_batching_runs_each_step_alone(tiny_config, tiny_weights) -> None:
    stage = Stage.from_tensors(tiny_config, 0, tiny_config.n_units, tiny_weights)
    caches = prefilled(stage, [3, 4])

    async def main() -> list:
        worker = ComputeWorker(max_batch=1)
        try:
            return await asyncio.gather(
                *(
                    worker.run(step_for(stage, c, p, torch.tensor([7])))
                    for c, p in zip(caches, [3, 4], strict=True)
                )
            )
        finally:
            worker.close()

    reference = prefilled(stage, [3, 4])
    for timed, cache, pos in zip(asyncio.run(main()), reference, [3, 4], strict=True):
        assert timed.batch == 1
        with torch.inference_mode():
            assert torch.equal(timed.value, stage(torch.tensor([7]), cache, pos))


def test_the_queue_limit_counts_the_jobs_the_worker_took_to_batch() -> None:
    # The worker takes every queued job off its queue at once (to batch them): jobs it
    # holds that way still wait, and count against --max-queue.
    first, second = threading.Event(), threading.Event()
    running = threading.Semaphore(0)

    def hold(gate: threading.Event) -> None:
        running.release()
        assert gate.wait(timeout=30)

    async def main() -> None:
        worker = ComputeWorker(max_batch=16, max_queue=3)
        try:
            a = worker.submit(lambda: hold(first))
            assert await asyncio.to_thread(running.acquire, True, 30)
            b = worker.submit(lambda: hold(second))  # queued behind a ...
            c = worker.submit(lambda: None)
            first.set()  # ... and taken off the queue with c once a is done
            assert await asyncio.to_thread(running.acquire, True, 30)
            await a
            assert worker.queue_depth == 2  # b runs, c waits
            d = worker.submit(lambda: None)
            with pytest.raises(ResourceExhausted, match="3 steps are queued or running"):
                worker.submit(lambda: None)
            second.set()
            await asyncio.gather(b, c, d)
            assert worker.queue_depth == 0
        finally:
            first.set()
            second.set()
            worker.close()

    asyncio.run(main())


def test_a_lone_sessions_decode_step_runs_inline_and_equals_the_workers(
    tiny_config, tiny_weights
) -> None:
    """A lone session's one-token step runs on the loop itself, with the worker's answer;
    not while a job is unsettled, nor while another session decodes here (a batch could
    form), nor a prefill chunk."""
    stage = Stage.from_tensors(tiny_config, 0, tiny_config.n_units, tiny_weights)
    mine, other = prefilled(stage, [5, 3])
    reference = prefilled(stage, [5])[0]  # the same positions as ``mine``

    async def main() -> None:
        worker, elsewhere = ComputeWorker(max_batch=16), ComputeWorker(max_batch=16)
        gate, busy = threading.Event(), threading.Event()

        def block() -> None:
            busy.set()
            assert gate.wait(timeout=30)

        try:
            timed = worker.run_inline(step_for(stage, mine, 5, torch.tensor([7])))
            assert timed is not None and timed.queue_ms == 0 and mine.length == 6
            want = await elsewhere.run(step_for(stage, reference, 5, torch.tensor([7])))
            assert torch.equal(timed.value, want.value)
            assert worker.run_inline(step_for(stage, mine, 6, torch.tensor([1, 2]))) is None
            blocker = asyncio.ensure_future(worker.run(block))  # a job in the worker
            assert await asyncio.to_thread(busy.wait, 30)
            assert worker.run_inline(step_for(stage, mine, 6, torch.tensor([7]))) is None
            gate.set()
            await blocker
            assert worker.run_inline(step_for(stage, mine, 6, torch.tensor([7]))) is not None
            await worker.run(step_for(stage, other, 3, torch.tensor([7])))  # another session
            assert worker.run_inline(step_for(stage, mine, 7, torch.tensor([7]))) is None
            assert mine.length == 7
        finally:
            worker.close()
            elsewhere.close()

    asyncio.run(main())


def test_a_prefill_makes_a_session_one_to_wait_for(tiny_config, tiny_weights) -> None:
    """Sessions that start together batch from their first decode step: another session's
    prefill keeps a lone step off the loop (a batch could form) until that session closes
    and its cache goes; a shadow's catch-up (a step of chunks) does not."""
    stage = Stage.from_tensors(tiny_config, 0, tiny_config.n_units, tiny_weights)
    (mine,) = prefilled(stage, [5])
    prompt = torch.tensor([1, 2, 3])

    async def main() -> None:
        worker = ComputeWorker(max_batch=16)
        try:
            shadow = StageStep(stage, stage.new_cache(32), 0, 3, lambda: prompt, lambda y: y)
            shadow.catch_up = True
            await worker.run(shadow)
            assert worker.run_inline(step_for(stage, mine, 5, torch.tensor([7]))) is not None
            other = stage.new_cache(32)
            await worker.run(step_for(stage, other, 0, prompt))  # its prefill
            assert worker.run_inline(step_for(stage, mine, 6, torch.tensor([7]))) is None
            del other  # its session closed
            gc.collect()
            assert worker.run_inline(step_for(stage, mine, 6, torch.tensor([7]))) is not None
            assert len(worker._active) == 1  # (closed sessions are forgotten)
        finally:
            worker.close()

    asyncio.run(main())


# ---- a node serving concurrent sessions ------------------------------------------------

TINY = GPTConfig(block_size=128, vocab_size=50257, n_layer=4, n_head=2, n_embd=32)
SESSIONS = 8
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = tmp_path_factory.mktemp("gpt2-tokenizer")
    shutil.copy(gpt2_bpe_dir() / "encoder.json", tokenizer / "vocab.json")
    shutil.copy(gpt2_bpe_dir() / "vocab.bpe", tokenizer / "merges.txt")
    save_hf_checkpoint(TINY, init_weights(TINY, seed=3), directory, tokenizer_dir=tokenizer)
    return directory


@pytest.mark.slow
def test_batching_node_answers_each_of_8_sessions_as_alone(tiny_model: Path) -> None:
    weights = init_weights(TINY, seed=3)
    local_stage = Stage.from_tensors(TINY, 0, TINY.n_units, weights)
    prompts = [[(97 * s + 13 * i) % 50000 for i in range(3 + s)] for s in range(SESSIONS)]
    expected = []
    for ids in prompts:
        local = LocalSession(local_stage, GREEDY, len(ids) + NEW_TOKENS)
        expected.append(generate(local, ids, NEW_TOKENS, block_size=TINY.block_size).token_ids)

    with Swarm() as swarm:
        route = route_from_addresses(
            swarm.chain(str(tiny_model), ["0:2", "2:4", "4:6"])  # batching: the default
        )
        results: list = [None] * SESSIONS
        start = threading.Barrier(SESSIONS)

        def run(s: int) -> None:
            session = fixed_session(route, len(prompts[s]) + NEW_TOKENS)
            try:
                start.wait(timeout=30)
                results[s] = generate(session, prompts[s], NEW_TOKENS, block_size=TINY.block_size)
            finally:
                session.close()

        threads = [threading.Thread(target=run, args=(s,)) for s in range(SESSIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)

    assert all(r is not None for r in results), "a session did not finish"
    for s in range(SESSIONS):
        assert results[s].token_ids == expected[s], f"session {s}"
    batches = [h["batch"] for r in results for step in r.hops[1:] for h in step]
    assert max(batches) > 1, "no two sessions ever shared a forward"
    assert min(batches) >= 1
