"""The compute worker: a node's torch calls run here, on one thread per device, fed by a
queue. The gRPC event loop enqueues and awaits, so it does not block on torch (save one
lone session's short steps, below), and because all work for a device passes one place,
concurrent sessions are batched (by
default; ``max_batch=1`` turns it off): the one-token steps of several sessions on the same
stage that are waiting together run as one forward (``Stage.decode``), which reads each
weight once for all of them and answers each session exactly what it gets alone. To let
batches form, a one-token step waits up to ``GATHER_S`` for the steps of the other open
sessions that computed here in the last ``ACTIVE_S`` (a lone session never waits, nor does
one whose partners have closed); once sessions have shared a forward they travel the route
together, so they keep meeting at every hop.

Two things keep such a group whole. A session counts as active from its prefill on, so the
sessions that start together are waited for from their first decode step (counted only
once they had decoded, they split at every node into the step that came first and the
rest, and stayed split). And a step stops waiting once no step has come for
``GATHER_GAP_S``: a group's steps come a few tenths of a ms apart (the hop before sends
them one by one), while a session in another group is a whole stage away. 8 sessions on
three nodes of this 2-core machine (``benchmarks/concurrency.py``): 134-143 tokens/s with
neither, 305-328 with both, every forward holding all 8.

The hand-off costs two thread wake-ups (the worker's, then the loop's through its
self-pipe): about 30 µs for a trivial job back to back, but 0.2 ms a step on a pipeline,
where both threads have slept while the other hops computed. So a lone session's decode
step runs on the event loop itself (``run_inline``) when nothing else wants the compute:
no job queued or running, no other session active here (no batch could form), no slow
fault. The loop then waits for that one step (a few ms) as it would wait for the worker.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from nanoshard.engine import Stage
from nanoshard.errors import ResourceExhausted
from nanoshard.kv import KVCache

from .faults import Slow

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BATCH = 16  # decode steps per forward (the default; 1 = each step alone)
MAX_QUEUE = 64  # jobs queued or running before new ones are refused (back-pressure)
GATHER_S = 0.008  # how long a decode step waits, at most, for the other active sessions'
GATHER_GAP_S = 0.002  # ... and no longer than this after the last one came
ACTIVE_S = 1.0  # a session that computed here this recently (a prefill too) is expected back
INLINE_MAX_MS = 25.0  # a lone step this slow runs on the worker: the loop answers meanwhile


@dataclass
class Timed:
    """A job's result with where its time went. A batched job's ``compute_ms`` is its share
    of the forward (the forward's time / ``batch``); the rest of its wait is ``queue_ms``."""

    value: Any
    queue_ms: float
    compute_ms: float
    batch: int = 1  # jobs that ran in the same forward


@dataclass
class StageStep:
    """One session's step on a stage: ``finish(stage(make_input(), cache, pos))``.

    Calling it runs it alone. The worker may instead run several one-token steps on the
    same stage together through ``run_decode_batch``; ``finish`` then gets this step's row.
    """

    stage: Stage
    cache: KVCache
    pos: int
    n_tokens: int
    make_input: Callable[[], torch.Tensor]  # ids (T,) or activations (T, n_embd)
    finish: Callable[[torch.Tensor], Any]  # the stage's output (T or 1 rows) -> the answer
    catch_up: bool = False  # a shadow's step of chunks: no decode step of it follows here

    @property
    def batchable(self) -> bool:
        # A tensor-parallel group's steps run one at a time, in the order rank 0 set: every
        # member must run the same collectives in the same order (node/group.py).
        return self.n_tokens == 1 and self.stage.shard is None

    def __call__(self) -> Any:
        try:
            return self.finish(self.stage(self.make_input(), self.cache, self.pos))
        except BaseException:
            self.cache.length = self.pos  # nothing of a failed step counts (the cache rewinds)
            raise


def run_decode_batch(steps: list[StageStep]) -> tuple[list[tuple[Any, Exception | None]], int]:
    """Run one-token steps on one stage as one forward: ``(value, error)`` per step, and how
    many steps the forward held. A step whose input or answer fails fails alone; a failed
    forward fails every step in it."""
    results: list[tuple[Any, Exception | None]] = [(None, None)] * len(steps)
    inputs, ready = [], []
    for i, step in enumerate(steps):
        try:
            inputs.append(step.make_input())
            ready.append(i)
        except Exception as exc:
            results[i] = (None, exc)
    if not ready:
        return results, 0
    batch = [steps[i] for i in ready]
    try:
        ys = batch[0].stage.decode(
            torch.cat(inputs), [s.cache for s in batch], [s.pos for s in batch]
        )
    except Exception as exc:
        for i in ready:
            steps[i].cache.length = steps[i].pos
            results[i] = (None, exc)
        return results, len(ready)
    for row, i in enumerate(ready):
        try:
            results[i] = (steps[i].finish(ys[row : row + 1]), None)
        except Exception as exc:
            steps[i].cache.length = steps[i].pos
            results[i] = (None, exc)
    return results, len(ready)


@dataclass
class _Job:
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float


class ComputeWorker:
    def __init__(
        self,
        name: str = "compute",
        threads: int | None = None,
        max_batch: int = MAX_BATCH,
        max_queue: int = MAX_QUEUE,
    ) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = threads
        self.max_batch = max_batch
        self.max_queue = max_queue
        # id(KV cache) -> (the cache while its session is open, when it last decoded here):
        # a closed session's cache is freed, so nobody waits for it.
        self._active: dict[int, tuple[weakref.ref[KVCache], float]] = {}
        self._outstanding = 0  # jobs submitted and not yet settled (kept on the loop's thread)
        self._inline_threads_set = False
        self._lone_ms = 0.0  # the last lone one-token step's compute
        self.slow: Slow | None = None  # a test's fault switch: each job held longer
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Jobs submitted and not yet answered: queued, or running (the worker takes every
        queued job off ``_jobs`` at once to batch them, so its size says nothing)."""
        return self._outstanding

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[Timed]:
        """Queue ``fn()`` for the worker thread; the future settles with its result (or
        exception). A one-token ``StageStep`` may run batched with others queued beside it."""
        if self._outstanding >= self.max_queue:
            n = self._outstanding
            raise ResourceExhausted(
                f"node busy: {n} step{'s are' if n != 1 else ' is'} queued or running on its "
                f"compute (the limit is {self.max_queue}): retry shortly or use a replica"
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Timed] = loop.create_future()
        self._outstanding += 1
        self._jobs.put(_Job(fn, loop, future, time.perf_counter()))
        return future

    def run_inline(self, fn: Callable[[], T]) -> Timed | None:
        """Run ``fn`` (a one-token ``StageStep``) here, on the calling event loop, if it is
        a lone session's: nothing submitted is unsettled (the worker is idle, and only the
        loop submits), no other session computed here (a decode step or a prefill) in the
        last ``ACTIVE_S`` (a batch could form), no slow fault, and such a step took at most
        ``INLINE_MAX_MS`` last time (a slow device's step runs on the worker, so the loop
        answers pings and heartbeats meanwhile). None: it was not run (``submit`` it)."""
        if self._outstanding or self.slow is not None or self._lone_ms > INLINE_MAX_MS:
            return None
        if not isinstance(fn, StageStep) or not fn.batchable:
            return None
        now = time.perf_counter()
        mine = id(fn.cache)
        for key, (ref, t) in self._active.items():
            if key != mine and now - t < ACTIVE_S and ref() is not None:
                return None
        self._active = {mine: (weakref.ref(fn.cache), now)}
        if self._threads and not self._inline_threads_set:
            torch.set_num_threads(self._threads)  # as the worker thread runs
            self._inline_threads_set = True
        with torch.inference_mode():
            value = fn()
        self._lone_ms = (time.perf_counter() - now) * 1e3
        return Timed(value, 0.0, self._lone_ms)

    async def run(self, fn: Callable[[], T]) -> Timed:
        """Run ``fn()`` on the worker thread and await it."""
        return await self.submit(fn)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
        with torch.inference_mode():  # every job: entered once, not per job
            self._serve()

    def _serve(self) -> None:
        pending: deque[_Job | None] = deque()  # taken off the queue, in arrival order
        while True:
            if not pending:
                pending.append(self._jobs.get())
            if self.max_batch > 1:
                while True:  # everything already waiting, so batches can form
                    try:
                        pending.append(self._jobs.get_nowait())
                    except queue.Empty:
                        break
            job = pending.popleft()
            if job is None:
                break
            if self.max_batch > 1 and isinstance(job.fn, StageStep) and job.fn.batchable:
                self._gather(job.fn, pending)
                self._run_batch([job, *self._take_partners(job.fn, pending)])
            else:
                self._run_one(job)
            job = None  # (while the worker waits, it holds no session's cache alive)
        for job in pending:  # closed with jobs still waiting: their callers get an error
            if job is not None:
                err = RuntimeError("the compute worker stopped")
                job.loop.call_soon_threadsafe(self._settle, job.future, None, err)

    def _gather(self, first: StageStep, pending: deque[_Job | None]) -> None:
        """Wait until the decode steps of every session active here are queued beside
        ``first``: at most GATHER_S, and no longer than GATHER_GAP_S after the last came."""
        now = time.perf_counter()
        self._mark_active(first.cache, now)
        want = min(len(self._active), self.max_batch)
        deadline = now + GATHER_S
        while True:
            queued = {id(first.cache): first.cache}
            for job in pending:
                if job is None:
                    return
                if isinstance(job.fn, StageStep) and job.fn.batchable:
                    queued[id(job.fn.cache)] = job.fn.cache
            left = deadline - time.perf_counter()
            if len(queued) >= want or left <= 0:
                break
            try:
                pending.append(self._jobs.get(timeout=min(left, GATHER_GAP_S)))
            except queue.Empty:
                break
        now = time.perf_counter()
        for key, cache in queued.items():
            self._active[key] = (weakref.ref(cache), now)

    def _mark_active(self, cache: KVCache, now: float) -> None:
        """``cache``'s session computed here at ``now``; the sessions that have not for
        ``ACTIVE_S``, or have closed, are forgotten (a node serving only prefills keeps
        no more than its open sessions)."""
        self._active = {
            c: (ref, t)
            for c, (ref, t) in self._active.items()
            if now - t < ACTIVE_S and ref() is not None
        }
        self._active[id(cache)] = (weakref.ref(cache), now)

    def _take_partners(self, first: StageStep, pending: deque[_Job | None]) -> list[_Job]:
        """Queued one-token steps that can share ``first``'s forward: same stage object,
        another session's cache. They leave ``pending``; the rest keep their order."""
        partners: list[_Job] = []
        caches = {id(first.cache)}
        for job in list(pending):
            if len(partners) + 1 >= self.max_batch or job is None:
                break  # never reach past close()
            fn = job.fn
            if (
                isinstance(fn, StageStep)
                and fn.batchable
                and fn.stage is first.stage
                and id(fn.cache) not in caches
            ):
                partners.append(job)
                caches.add(id(fn.cache))
                pending.remove(job)
        return partners

    def _run_one(self, job: _Job) -> None:
        started = time.perf_counter()
        try:
            value = job.fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            job.loop.call_soon_threadsafe(self._settle, job.future, None, exc)
            return
        done = self._held(started)
        result = Timed(value, (started - job.enqueued) * 1e3, (done - started) * 1e3)
        if isinstance(job.fn, StageStep):
            # A session's prefill (or lone step) makes it one that decodes here soon: its
            # first decode step is waited for too, so the sessions that start together
            # share their forwards from their first decode step on. (Before settling: the
            # loop reads ``_active`` only when nothing is outstanding.)
            if not job.fn.catch_up:
                self._mark_active(job.fn.cache, done)
            if job.fn.batchable:
                self._lone_ms = result.compute_ms  # (may come back under INLINE_MAX_MS)
        job.loop.call_soon_threadsafe(self._settle, job.future, result, None)

    def _run_batch(self, jobs: list[_Job]) -> None:
        if len(jobs) == 1:  # alone: the same result, without stacking a batch of one
            self._run_one(jobs[0])
            return
        started = time.perf_counter()
        results, size = run_decode_batch([job.fn for job in jobs])  # type: ignore[misc]
        done = self._held(started)
        share_ms = (done - started) * 1e3 / max(size, 1)
        for job, (value, exc) in zip(jobs, results, strict=True):
            if exc is not None:
                job.loop.call_soon_threadsafe(self._settle, job.future, None, exc)
                continue
            waited_ms = (done - job.enqueued) * 1e3 - share_ms
            result = Timed(value, waited_ms, share_ms, size)
            job.loop.call_soon_threadsafe(self._settle, job.future, result, None)

    def _held(self, started: float) -> float:
        """Now, once the job that started at ``started`` is over (a slowed node's later)."""
        done = time.perf_counter()
        if self.slow is not None:
            self.slow.hold(done - started)
            done = time.perf_counter()
        return done

    def _settle(self, future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
        """On the loop's thread: a job is over."""
        self._outstanding -= 1
        _resolve(future, result, exc)


def _resolve(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
