"""Placement off the event loop: the coordinator's thin shell around ``Registry.replan``.

Placing 10,000 nodes takes on the order of a second of CPU; on the event loop that second
would stall every heartbeat, route and status call. So the registry only records that
placement is wanted (``Registry.defer``), and one task here runs it: it copies the
registry's inputs out (``plan_input``), runs ``groups.plan`` on a thread, and puts the
result in force on the loop (``apply``, which skips nodes that left meanwhile). Requests
made while a placement runs are merged into the next run, so a burst of joins costs one or
two placements, not one each.

A caller whose answer depends on the placement (a node's join, carrying its stage) awaits
``placed()``: it returns once a placement that read the registry after the caller's
request is in force.
"""

from __future__ import annotations

import asyncio
import logging

from . import groups
from .registry import Registry

log = logging.getLogger(__name__)


class Replanner:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.requested = 0  # placement requests so far ...
        self.done = 0  # ... and the newest request a placement in force has read
        self.runs = 0  # placements put in force
        self.moved = 0  # units they had nodes newly load, in all
        self._task: asyncio.Task[None] | None = None
        self._placed = asyncio.Condition()
        registry.defer = self.request

    def request(self) -> None:
        """Placement is wanted (called by the registry, on the loop)."""
        self.requested += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def placed(self) -> None:
        """Return once every placement requested before this call is in force."""
        target = self.requested
        if self.done >= target:
            return
        async with self._placed:
            await self._placed.wait_for(lambda: self.done >= target)

    async def _run(self) -> None:
        while self.done < self.requested:
            upto = self.requested
            request = self.registry.plan_input()
            try:
                plan = await asyncio.to_thread(groups.plan, **request.kwargs)
            except Exception:  # a bug in placement must not stop the coordinator
                log.exception("placement failed; the swarm keeps its stages")
            else:
                self.moved += self.registry.apply(request, plan)
                self.runs += 1
            self.done = upto
            async with self._placed:
                self._placed.notify_all()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
