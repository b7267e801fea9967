"""Sessions along a route, driven synchronously from test code (the SDK's own loop thread)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nanoshard.client.loop import LoopThread
from nanoshard.client.route import Route
from nanoshard.client.session import RetryPolicy, SwarmSession
from nanoshard.generation import StepResult
from nanoshard.hop import Channels
from nanoshard.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


class RouteSession:
    """A :class:`SwarmSession` (opened when made) with synchronous ``step`` and ``close``,
    so :func:`nanoshard.generation.generate` drives it. ``planner`` is a plain function
    here (avoid list -> Route); without one the route is fixed."""

    def __init__(
        self,
        route: Route | None,
        max_length: int,
        params: SamplingParams = GREEDY,
        *,
        planner: Callable[[list[str]], Route] | None = None,
        **options: Any,
    ) -> None:
        self.loop = LoopThread("test-session")
        self.channels = Channels(options.pop("security", None))

        async def plan(avoid: list[str]) -> Route:
            assert planner is not None
            return planner(avoid)

        self.session = SwarmSession(
            self.channels,
            route,
            params,
            max_length,
            planner=plan if planner is not None else None,
            **options,
        )
        try:
            self.loop.run(self.session.open())
        except BaseException:
            self.loop.close()
            raise

    @property
    def recoveries(self) -> list[Any]:
        return self.session.recoveries

    def step(self, tokens: list[int], pos: int) -> StepResult:
        return self.loop.run(self.session.step(tokens, pos))

    def close(self) -> None:
        try:
            self.loop.run(self.session.close())
            self.loop.run(self.channels.close())
        finally:
            self.loop.close()


def fixed_session(route: Route, max_length: int, **options: Any) -> RouteSession:
    """A greedy session along a fixed route: a hop gone with all its replicas fails it."""
    return RouteSession(route, max_length, retry=RetryPolicy(attempts=0), **options)


def led_by(route: Route, address: str) -> Route | None:
    """``route``, with ``address`` moved first in the hop that names it (in place; None if
    no hop does)."""
    for hop in route.hops:
        if address in hop.addresses:
            i = list(hop.addresses).index(address)
            for name in ("addresses", "public_keys", "check_rates"):
                values = list(getattr(hop, name))
                if len(values) > i:
                    values.insert(0, values.pop(i))
                    del getattr(hop, name)[:]
                    getattr(hop, name).extend(values)
            return route
    return None
