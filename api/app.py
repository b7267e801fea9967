"""The gateway's HTTP shell: OpenAI's endpoints, the web view and ``/metrics`` on one
FastAPI app, over one :class:`~nanoshard.client.sdk.AsyncClient` (the process's only link
to the swarm; it holds no weights).

Policy is elsewhere and pure: what a request may say and what an answer looks like
(``protocol.py``), which text a stream may send when (``nanoshard/textstream.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanoshard.client.sdk import AsyncClient, GenerationResult, Token
from nanoshard.errors import InvalidArgument, NanoshardError
from nanoshard.generation import check_prompt
from nanoshard.textstream import TextStream
from nanoshard.tokenizer import prompt_ids

from .metrics import GatewayMetrics
from .protocol import (
    ApiError,
    Reply,
    bad,
    error_for,
    finish_reason,
    hop_view,
    parse_chat,
    parse_completion,
    usage,
)
from .protocol import Request as ApiRequest

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused with 413
WATCH_S = 0.1  # how often a request waiting for its first token checks its client is there
CLIENT_GONE = 499  # the status of a request whose client left first (nobody reads it)
SHUTDOWN_GRACE_S = 2.0  # a gateway stopping gives its open streams this long to say so
# The endpoints /metrics counts requests by (any other path: "other"), each a path or a
# path's template.
ENDPOINTS = (
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/metrics",
    "/",
    "/nanoshard/status",
    "/nanoshard/status/events",
)


def endpoint_of(path: str) -> str:
    """The label a request to ``path`` is counted under."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/") and "/" not in path[len("/v1/models/") :]:
        return "/v1/models/{model}"
    if path.startswith("/static/"):
        return "/static"
    return "other"


def event(data: str) -> ServerSentEvent:
    """One SSE event (``data: ...`` and a blank line, lines ended by "\n")."""
    return ServerSentEvent(data=data, sep="\n")


@dataclass
class GatewayOptions:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    status_every_s: float = 1.0  # how often the web view's feed asks the coordinator


class Gateway:
    """What the app's handlers share: the swarm client, the metrics, the status feed."""

    def __init__(self, client: AsyncClient, options: GatewayOptions | None = None) -> None:
        self.client = client
        self.options = options or GatewayOptions()
        self.metrics = GatewayMetrics()
        self.created = int(time.time())
        self.tasks: set[asyncio.Task] = set()  # generations running (also those abandoned)
        # Set when the server is asked to stop (server.py): what still runs ends at once.
        self.stopping = asyncio.Event()
        self._status: tuple[float, dict[str, Any]] = (0.0, {})
        self._status_lock = asyncio.Lock()

    async def model(self, requested: str | None = None) -> str:
        """The swarm's model name (connecting first); 404 if ``requested`` is another."""
        await self.client.connect()
        name = self.client.model_name
        if requested is not None and requested != name:
            raise ApiError(
                404,
                f"the model {requested!r} does not exist here: this swarm serves {name!r}",
                param="model",
                code="model_not_found",
            )
        return name

    async def status(self) -> dict[str, Any]:
        """The swarm's status for the web view, asked of the coordinator at most once per
        ``status_every_s`` however many viewers there are."""
        async with self._status_lock:
            at, last = self._status
            if time.monotonic() - at < self.options.status_every_s:
                return last
            try:
                out: dict[str, Any] = {"ok": True, "status": await self.client.status()}
            except NanoshardError as exc:
                out = {"ok": False, "error": str(exc)}
            out["gateway"] = {
                "generations": len(self.tasks),
                "checks": [c.to_dict() for c in self.client.checks[-20:]],
            }
            self._status = (time.monotonic(), out)
            return out


class Run:
    """One request's generation on the swarm, as pieces of text (with the hop traces of
    the tokens that made them) arriving on a queue. It runs as a task of its own, so a
    client that leaves (during the prefill, or mid-stream) only cancels it: its session
    closes at once."""

    def __init__(self, gateway: Gateway, request: ApiRequest) -> None:
        self.gateway, self.request = gateway, request
        self.client = gateway.client
        self.text = TextStream(request.stops)
        self.queue: asyncio.Queue[tuple[str, list[dict]] | None] = asyncio.Queue()
        self.result: GenerationResult | None = None
        self.prompt_ids: list[int] = []
        self._first: tuple[str, list[dict]] | None = None
        self._task: asyncio.Task | None = None
        self._last = 0.0
        self._stopped: ApiError | None = None  # why the gateway stopped it, if it did

    async def start(self, gone: Callable[[], Awaitable[bool]] | None = None) -> bool:
        """Start the generation and wait for its first token: an error before it (a bad
        prompt, no route, a quota) is raised here, so it gets its own HTTP status. While
        it waits (the prefill), ``gone`` is asked every ``WATCH_S`` whether the client
        left; if so the generation is cancelled (its session closes) and False returned."""
        r, client = self.request, self.client
        if self.gateway.stopping.is_set():
            raise going()
        if r.chat:  # (a message's "<|endoftext|>" is its text, not the end of a document)
            assert isinstance(r.prompt, str)  # (the rendered template)
            self.prompt_ids = prompt_ids(
                client.encoding, r.prompt, client.config.vocab_size, special=False
            )
        else:
            self.prompt_ids = client.encode(r.prompt)
        try:
            check_prompt(self.prompt_ids, client.config.vocab_size, client.config.block_size)
        except InvalidArgument as exc:
            raise bad(str(exc), "messages" if r.chat else "prompt") from None
        max_new = r.max_new_tokens(len(self.prompt_ids), client.config.block_size)
        self._last = time.perf_counter()
        started = self._last

        async def run() -> None:
            try:
                self.result = await client.generate(
                    self.prompt_ids,
                    max_new,
                    temperature=r.temperature,
                    top_k=0,
                    top_p=r.top_p,
                    seed=r.seed,  # (None: the SDK draws one, as OpenAI does)
                    on_token=self._on_token,
                )
                if tail := self.text.finish():
                    self.queue.put_nowait((tail, []))
            finally:
                self.queue.put_nowait(None)

        metrics = self.gateway.metrics
        metrics.active.inc()
        self._task = task = asyncio.ensure_future(run())
        self.gateway.tasks.add(task)
        task.add_done_callback(self._done)
        first = asyncio.ensure_future(self.queue.get())
        if not await self._unless_gone(first, gone):
            first.cancel()
            return False
        self._first = first.result()
        if self._first is None:
            if self._stopped is not None:
                raise self._stopped  # the gateway stopped before the first token
            task.result()  # the generation's error, if it failed before its first token
        else:
            metrics.first_token.observe(time.perf_counter() - started)
        metrics.prompt_tokens.inc(len(self.prompt_ids))
        return True

    def _done(self, task: asyncio.Task) -> None:
        self.gateway.tasks.discard(task)
        self.gateway.metrics.active.dec()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.info("generation failed: %s", exc)
            self.gateway.metrics.failures.labels(type(exc).__name__).inc()
        if self.result is not None:
            for recovery in self.result.recoveries:
                self.gateway.metrics.recoveries.labels(recovery.kind).inc()

    def _on_token(self, token: Token) -> bool:
        now = time.perf_counter()
        # (as it comes: a generation that fails or is left midway generated these too)
        self.gateway.metrics.completion_tokens.inc()
        if self._first is not None:
            self.gateway.metrics.token.observe(now - self._last)
        self._last = now
        delta = self.text.push(self.client.encoding.decode_single_token_bytes(token.id))
        self.queue.put_nowait((delta, token.hops))
        return self.text.stopped  # True ends the generation at a stop string

    async def pieces(self) -> AsyncIterator[tuple[str, list[dict]]]:
        """(text, hop traces) per token, then the held-back tail; the generation's error,
        if it fails midway, is raised after the pieces before it."""
        assert self._task is not None
        piece = self._first
        while piece is not None:
            yield piece
            piece = await self.queue.get()
        if self._stopped is not None:
            raise self._stopped
        await self._task

    async def whole(self, gone: Callable[[], Awaitable[bool]] | None = None) -> str | None:
        """The whole text (the pieces joined), or None if the client left first: ``gone``
        is asked every ``WATCH_S``, as during the prefill, and the generation cancelled
        (a client that gave up must not hold the swarm until its ``max_tokens``)."""
        joined = asyncio.ensure_future(self._joined())
        try:
            if not await self._unless_gone(joined, gone):
                await asyncio.wait({joined})  # (its session closed on every hop)
                return None
            return joined.result()
        finally:
            joined.cancel()

    async def _joined(self) -> str:
        return "".join([piece async for piece, _ in self.pieces()])

    async def _unless_gone(
        self, work: asyncio.Future, gone: Callable[[], Awaitable[bool]] | None
    ) -> bool:
        """Wait for ``work``, asking ``gone`` every ``WATCH_S``; if the client left, cancel
        the generation (its session closes) and say so (False)."""
        while not (await asyncio.wait({work}, timeout=WATCH_S))[0]:
            if gone is not None and await gone():
                self.cancel()
                return False
        return True

    def cancel(self) -> None:
        """Its client left: stop the generation (its session closes at once)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            self.gateway.metrics.disconnects.inc()

    def stop(self, why: ApiError) -> None:
        """The gateway stops: end the generation, and its pieces with ``why``."""
        if self._task is not None and not self._task.done():
            self._stopped = why
            self._task.cancel()

    @property
    def finish_reason(self) -> str:
        assert self.result is not None
        return finish_reason(self.result.stop_reason)

    def usage(self) -> dict[str, int]:
        assert self.result is not None
        return usage(len(self.prompt_ids), len(self.result.token_ids))


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body: 413 past ``limit`` bytes (read no further), 400 if malformed."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over {limit} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="body_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # (json's parser recurses once per level of nesting)
        raise ApiError(400, "the request body is not valid JSON: nested too deeply") from None


class CountRequests:
    """Counts every answer by endpoint and status (plain ASGI: streams pass untouched)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = endpoint_of(scope["path"])

        started = False

        async def counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            if not started:  # a failure in the gateway: Starlette answers it (500), outside
                self.metrics.requests.labels(endpoint, "500").inc()
            raise


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="nanoshard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway
    app.add_middleware(CountRequests, metrics=gateway.metrics)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        # (Starlette raises it on after this answer: the server logs its traceback)
        why = f"the gateway failed on this request ({type(exc).__name__}); it keeps serving"
        return JSONResponse(ApiError(500, why, type="server_error").body(), status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            ApiError(exc.status_code, str(exc.detail), type=kind).body(),
            status_code=exc.status_code,
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        try:
            name = await gateway.model()
        except NanoshardError as exc:
            raise error_for(exc) from None
        entry = {"id": name, "object": "model", "created": gateway.created, "owned_by": "swarm"}
        return {"object": "list", "data": [entry]}

    @app.get("/v1/models/{model}")
    async def model(model: str) -> dict[str, Any]:
        try:
            name = await gateway.model(model)
        except NanoshardError as exc:
            raise error_for(exc) from None
        return {"id": name, "object": "model", "created": gateway.created, "owned_by": "swarm"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json(request, gateway.options.max_body_bytes)
        return await complete(gateway, parse_completion(body), request.is_disconnected)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request, gateway.options.max_body_bytes)
        return await complete(gateway, parse_chat(body), request.is_disconnected)

    @app.api_route("/metrics", methods=["GET", "HEAD"])  # (HEAD: monitors probe)
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.api_route("/", methods=["GET", "HEAD"])  # (HEAD: monitors probe)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/nanoshard/status")
    async def status() -> dict[str, Any]:
        return await gateway.status()

    @app.get("/nanoshard/status/events")
    async def status_events(request: Request) -> EventSourceResponse:
        async def events() -> AsyncIterator[ServerSentEvent]:
            while not await request.is_disconnected():
                yield event(json.dumps(await gateway.status()))
                await asyncio.sleep(gateway.options.status_every_s)

        return EventSourceResponse(events(), sep="\n")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def complete(
    gateway: Gateway, request: ApiRequest, gone: Callable[[], Awaitable[bool]] | None = None
) -> Response:
    """A completion (text or chat), whole or streamed. ``gone`` says whether the client
    left (watched until the first token, and to the end of a whole completion; then
    sse-starlette watches a stream). If the gateway stops before the first token, or
    before a whole completion's end, the generation stops at once and the request is
    answered 503 (``going``), rather than holding the gateway up until the generation's
    end."""
    run = Run(gateway, request)
    watch = asyncio.ensure_future(_stop_on(gateway.stopping, run))
    try:
        try:
            model = await gateway.model(request.model)
            if not await run.start(gone):
                return Response(status_code=CLIENT_GONE)  # nobody reads it
        except NanoshardError as exc:
            raise error_for(exc) from None
        prefix = "chatcmpl-" if request.chat else "cmpl-"
        reply = Reply(prefix + secrets.token_hex(12), int(time.time()), model, request.chat)
        if not request.stream:
            try:
                text = await run.whole(gone)
            except NanoshardError as exc:
                raise error_for(exc) from None
            if text is None:
                return Response(status_code=CLIENT_GONE)
            return JSONResponse(reply.whole(text, run.finish_reason, run.usage()))
    finally:
        watch.cancel()
    return EventSourceResponse(
        stream(run, reply, gateway.stopping),
        sep="\n",
        # (sse-starlette sets it when the server stops, then gives the stream this grace to
        # end by itself, which ``gateway.stopping`` makes it do, on its error event)
        shutdown_event=anyio.Event(),
        shutdown_grace_period=SHUTDOWN_GRACE_S,
    )


def going() -> ApiError:
    """What a completion still running when the gateway stops ends with."""
    return ApiError(
        503,
        "the gateway is shutting down: this completion was stopped before its end",
        type="service_unavailable",
        code="gateway_shutting_down",
    )


async def stream(
    run: Run, reply: Reply, stopping: asyncio.Event | None = None
) -> AsyncIterator[ServerSentEvent]:
    """The chunks of one streamed completion. A client that leaves cancels this generator
    (sse-starlette watches for the disconnect): the generation stops and its session
    closes at once. When the gateway stops (``stopping``), the generation stops too and
    the stream ends on an error event saying so, not as if the text were whole."""
    r = run.request
    done = False
    watch = asyncio.ensure_future(_stop_on(stopping, run)) if stopping is not None else None
    try:
        first = True
        if r.chat:  # the role comes first, as OpenAI sends it
            chunk = reply.chunk("", first=True, include_usage=r.include_usage)
            yield event(json.dumps(chunk))
            first = False
        try:
            async for text, traces in run.pieces():
                hops = [hop_view(t) for t in traces] if r.hops else None
                if not text and hops is None:
                    continue  # held back (half a character, or maybe a stop string)
                chunk = reply.chunk(text, first=first, include_usage=r.include_usage, hops=hops)
                yield event(json.dumps(chunk))
                first = False
        except (NanoshardError, ApiError) as exc:  # midway: OpenAI's clients raise on it
            done = True
            yield event(json.dumps(error_for(exc).body()))
            return
        last = reply.chunk(None if r.chat else "", run.finish_reason, include_usage=r.include_usage)
        if r.chat:
            last["choices"][0]["delta"] = {}
        yield event(json.dumps(last))
        if r.include_usage:
            yield event(json.dumps(reply.usage_chunk(run.usage())))
        done = True
        yield event("[DONE]")
    finally:
        if watch is not None:
            watch.cancel()
        if not done:
            run.cancel()


async def _stop_on(stopping: asyncio.Event, run: Run) -> None:
    await stopping.wait()
    run.stop(going())
