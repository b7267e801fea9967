"""One event loop on a thread of its own: how the synchronous SDK runs the asyncio core."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from nanoshard.errors import FailedPrecondition

T = TypeVar("T")
CANCEL_GRACE_S = 10.0  # how long an interrupted call may take to clean up (close its session)
WAIT_SLICE_S = 0.1  # a waiting caller looks for signals (Ctrl-C) this often


class LoopThread:
    """An asyncio loop running on a daemon thread; :meth:`run` waits for a coroutine on it.

    A caller interrupted while it waits (Ctrl-C) cancels the coroutine and waits for its
    clean-up (a session closes on its nodes) before the interruption goes on."""

    def __init__(self, name: str = "nanoshard-client") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result (or its exception). After
        :meth:`close`, FailedPrecondition (``coro`` is closed unrun, so nothing warns)."""
        if self.loop.is_closed():
            coro.close()
            raise FailedPrecondition("this client is closed: make a new one")
        if threading.current_thread() is self._thread:
            coro.close()
            raise FailedPrecondition(  # (it would wait for itself for ever)
                "a synchronous nanoshard call from its own event loop thread (inside "
                "on_token?): make it after the call that runs the callback returns"
            )
        finished = threading.Event()

        async def tracked() -> T:
            try:
                return await coro
            finally:
                finished.set()

        future = asyncio.run_coroutine_threadsafe(tracked(), self.loop)
        try:
            while True:  # waits in slices, so a Ctrl-C is seen at once, not at the end
                try:
                    return future.result(timeout=WAIT_SLICE_S)
                except concurrent.futures.TimeoutError:
                    if future.done():  # the coroutine's own TimeoutError
                        raise
        except BaseException:  # interrupted here (or the call failed: then it is over)
            future.cancel()
            finished.wait(CANCEL_GRACE_S)
            raise

    def iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        """``items`` as a synchronous iterator; closing it early closes ``items`` too."""
        try:
            while True:
                try:
                    item: T = self.run(items.__anext__())  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
                yield item
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None and not self.loop.is_closed():
                with contextlib.suppress(RuntimeError):  # already finished or running
                    self.run(aclose())

    def close(self) -> None:
        """Cancel what still runs, let it finish, and stop the loop and its thread."""
        if self.loop.is_closed():
            return

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()
            await self.loop.shutdown_default_executor()

        with contextlib.suppress(Exception):
            self.run(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
