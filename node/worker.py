"""The compute worker: every torch call of a node runs here, on one thread per device,
fed by a queue. The gRPC event loop only enqueues and awaits, so it never blocks on torch,
and because all work for a device passes one place, concurrent sessions can be batched.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Timed:
    """A job's result with where its time went."""

    value: Any
    queue_ms: float
    compute_ms: float


class ComputeWorker:
    def __init__(self, name: str = "compute", threads: int | None = None) -> None:
        self._jobs: queue.Queue[tuple | None] = queue.Queue()
        self._threads = threads
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def queue_length(self) -> int:
        return self._jobs.qsize()

    async def run(self, fn: Callable[[], T]) -> Timed:
        """Run ``fn()`` on the worker thread; await its result (exceptions propagate)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Timed] = loop.create_future()
        self._jobs.put((fn, loop, future, time.perf_counter()))
        return await future

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
        while (job := self._jobs.get()) is not None:
            fn, loop, future, enqueued = job
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    value = fn()
                done = time.perf_counter()
                result = Timed(value, (started - enqueued) * 1e3, (done - started) * 1e3)
                loop.call_soon_threadsafe(_settle, future, result, None)
            except BaseException as exc:  # handed to the awaiting coroutine
                loop.call_soon_threadsafe(_settle, future, None, exc)


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
