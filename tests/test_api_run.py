"""The gateway's run of one request, against a stand-in for the SDK: a client that leaves
before the first token (during the prefill) cancels its generation at once."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from nanoshard.api.app import CLIENT_GONE, Gateway, complete
from nanoshard.api.protocol import parse_completion


class Prefilling:
    """An SDK client whose generation never gets past its prefill: it waits until it is
    cancelled, and says so (the real one then closes its session on every hop)."""

    model_name = "demo"
    config = SimpleNamespace(vocab_size=50257, block_size=64)

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def connect(self) -> Prefilling:
        return self

    def encode(self, prompt: str) -> list[int]:
        return [464, 3290, 373]

    async def generate(self, *args: Any, **kwargs: Any) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def test_a_client_that_leaves_during_the_prefill_cancels_its_generation() -> None:
    async def run() -> None:
        client = Prefilling()
        gateway = Gateway(client)  # type: ignore[arg-type]
        body = {"model": "demo", "prompt": "hi", "max_tokens": 4, "stream": True}

        async def gone() -> bool:  # the client leaves once its prefill is under way
            return client.started.is_set()

        reply = await asyncio.wait_for(complete(gateway, parse_completion(body), gone), 10)
        assert reply.status_code == CLIENT_GONE
        await asyncio.wait_for(client.cancelled.wait(), 10)  # exactly what is asserted
        await asyncio.sleep(0)  # the task's done callback runs after its cancellation
        assert not gateway.tasks
        assert gateway.metrics.registry.get_sample_value("nanoshard_api_disconnects_total") == 1

    asyncio.run(run())
