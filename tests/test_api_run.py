"""The gateway's run of one request, against a stand-in for the SDK: a client that leaves
before the first token (during the prefill) cancels its generation at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
from types import SimpleNamespace
from typing import Any

from nanoshard.api.app import CLIENT_GONE, Gateway, complete, create_app, endpoint_of
from nanoshard.api.protocol import parse_completion
from nanoshard.client.sdk import Token
from nanoshard.errors import QuotaExceeded


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


class Generating(Prefilling):
    """An SDK client whose generation draws a token every 10 ms until it is cancelled."""

    encoding = SimpleNamespace(decode_single_token_bytes=lambda token: b" x")

    def __init__(self) -> None:
        super().__init__()
        self.tokens = 0

    async def generate(self, *args: Any, on_token: Any, **kwargs: Any) -> None:
        self.started.set()
        try:
            while True:
                await asyncio.sleep(0.01)
                self.tokens += 1
                on_token(Token(500, " x", []))
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def test_a_client_that_leaves_a_whole_completion_midway_cancels_its_generation() -> None:
    """A client that gave up on a whole (not streamed) completion once held the swarm until
    its max_tokens, counted as answered."""

    async def run() -> None:
        client = Generating()
        gateway = Gateway(client)  # type: ignore[arg-type]
        body = {"model": "demo", "prompt": "hi", "max_tokens": 200, "stream": False}

        async def gone() -> bool:  # the client leaves once 5 tokens are drawn
            return client.tokens >= 5

        reply = await asyncio.wait_for(complete(gateway, parse_completion(body), gone), 10)
        assert reply.status_code == CLIENT_GONE
        assert client.cancelled.is_set() and client.tokens < 200
        await asyncio.sleep(0)  # the task's done callback runs after its cancellation
        assert not gateway.tasks
        assert gateway.metrics.registry.get_sample_value("nanoshard_api_disconnects_total") == 1

    asyncio.run(run())


class Broken:
    """An SDK client that fails inside (a defect of the gateway's, not the caller's)."""

    async def connect(self) -> None:
        raise RuntimeError("a defect")


async def call(app: Any, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request through the ASGI ``app``, in process: its status and body."""
    request = [{"type": "http.request", "body": body, "more_body": False}]
    answer: dict[str, Any] = {"body": b""}
    answered = asyncio.Event()

    async def receive() -> dict:
        if request:
            return request.pop(0)
        await answered.wait()  # the caller stays until it has its answer
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")
            if not message.get("more_body"):
                answered.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    with contextlib.suppress(RuntimeError):  # (Starlette raises a defect on, once answered)
        await app(scope, receive, send)
    return answer["status"], answer["body"]


async def post(app: Any, path: str, body: bytes) -> tuple[int, dict]:
    """One POST through the ASGI ``app``: its status and JSON answer."""
    status, answer = await call(app, "POST", path, body)
    return status, json.loads(answer)


def test_the_web_view_and_metrics_answer_head() -> None:
    """Uptime monitors and load balancers probe with HEAD (the server drops the body)."""
    app = create_app(Gateway(Broken()))  # type: ignore[arg-type]

    async def run() -> None:
        for path in ("/", "/metrics"):
            status, got = await call(app, "GET", path)
            assert status == 200 and got, path
            assert (await call(app, "HEAD", path))[0] == 200, path
        assert (await call(app, "PUT", "/"))[0] == 405

    asyncio.run(run())


def test_requests_are_counted_by_endpoint() -> None:
    """/metrics told a model's page, the web view's files and its status feed from unknown
    paths no better than "other"."""
    gateway = Gateway(Broken())  # type: ignore[arg-type]
    app = create_app(gateway)
    paths = ["/v1/models/demo", "/v1/models/x/y", "/static/app.js", "/no"]

    async def run() -> None:
        for path in paths:
            await call(app, "GET", path)

    asyncio.run(run())
    counted = {
        s.labels["endpoint"]
        for metric in gateway.metrics.registry.collect()
        for s in metric.samples
        if s.name == "nanoshard_api_requests_total"
    }
    assert counted == {"/v1/models/{model}", "/static", "other"}
    for path in ("/nanoshard/status", "/nanoshard/status/events", "/v1/chat/completions"):
        assert endpoint_of(path) == path


def test_a_body_nested_too_deeply_is_a_400_and_a_defect_a_counted_json_500() -> None:
    gateway = Gateway(Broken())  # type: ignore[arg-type]
    app = create_app(gateway)

    async def run() -> None:
        status, deep = await post(app, "/v1/completions", b"[" * 5000 + b"]" * 5000)
        assert status == 400 and "nested too deeply" in deep["error"]["message"]
        body = json.dumps({"model": "demo", "prompt": "hi"}).encode()
        status, failed = await post(app, "/v1/completions", body)
        assert status == 500 and failed["error"]["type"] == "server_error"
        assert "RuntimeError" in failed["error"]["message"]

    asyncio.run(run())

    def answered(status: str) -> float | None:
        return gateway.metrics.registry.get_sample_value(
            "nanoshard_api_requests_total", {"endpoint": "/v1/completions", "status": status}
        )

    assert answered("400") == 1 and answered("500") == 1


class FailingMidway(Prefilling):
    """An SDK client whose generation draws three tokens, then fails (a quota used up)."""

    encoding = SimpleNamespace(decode_single_token_bytes=lambda token: b" x")

    async def generate(self, *args: Any, on_token: Any, **kwargs: Any) -> None:
        for token in (464, 3290, 373):
            on_token(Token(token, " x"))
            await asyncio.sleep(0)
        raise QuotaExceeded("127.0.0.1:1: caller over its tokens per minute", 60.0)


def test_a_stream_that_fails_midway_counts_its_tokens_and_its_failure() -> None:
    """``nanoshard_api_completion_tokens`` counts what the swarm generated, as the
    per-token latencies do: a stream that ends in an error event generated its tokens too
    (they were counted only for generations that ended well)."""
    gateway = Gateway(FailingMidway())  # type: ignore[arg-type]
    app = create_app(gateway)
    body = {"model": "demo", "prompt": "hi", "max_tokens": 8, "stream": True}
    status, answer = asyncio.run(call(app, "POST", "/v1/completions", json.dumps(body).encode()))
    assert status == 200 and b"quota_exceeded" in answer, answer
    samples = gateway.metrics.registry.get_sample_value
    assert samples("nanoshard_api_completion_tokens_total") == 3
    # ... and its failure is counted, which its 200 does not say
    failed = "nanoshard_api_generations_failed_total"
    assert samples(failed, {"error": "QuotaExceeded"}) == 1
