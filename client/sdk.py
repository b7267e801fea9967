"""The SDK: a swarm behind a few calls.

    from nanoshard import Client

    client = Client()                      # finds the coordinator by mDNS (or Client("host:port"))
    result = client.generate("ROMEO:", max_new_tokens=50, temperature=0)
    for token in client.stream("JULIET:"):
        print(token.text, end="")
    with client.session() as chat:        # keeps the KV caches between calls
        chat.generate("To be", max_new_tokens=10)
        chat.generate(", or not", max_new_tokens=10)

Every error is a :class:`nanoshard.errors.NanoshardError` (never a raw gRPC one).
``AsyncClient`` offers the same calls for asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tiktoken

from nanoshard.checkpoint import open_checkpoint
from nanoshard.config import GPTConfig
from nanoshard.errors import InvalidArgument
from nanoshard.generation import check_prompt, generate, max_length_for
from nanoshard.sampling import SamplingParams
from nanoshard.security import Security, SwarmKey, read_key
from nanoshard.statusview import status_json
from nanoshard.tokenizer import encoding_for
from nanoshard.trace import summarize_hops

from .checks import DEFAULT_CHECK_RATE, Checker, CheckResult
from .route import Route, route_from_addresses
from .session import DEFAULT_TIMEOUT_S, Recovery, RetryPolicy, SwarmSession
from .swarm import CoordinatorClient, find_coordinator


@dataclass
class Token:
    """One generated token, as ``stream`` yields it."""

    id: int
    text: str  # its text (may be "" while a multi-byte character is incomplete)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids only
    prompt_token_ids: list[int]
    stop_reason: str  # "eot" | "max_new_tokens" | "context" | "stop"
    ttft_ms: float  # time to first token (the prefill)
    token_ms: list[float]  # each later token
    steps: list[list[dict[str, Any]]] = field(default_factory=list)  # per step, per hop traces
    recoveries: list[Recovery] = field(default_factory=list)  # failures survived, and their cost

    @property
    def mean_token_ms(self) -> float:
        return sum(self.token_ms) / len(self.token_ms) if self.token_ms else 0.0

    @property
    def hops(self) -> list[dict[str, Any]]:
        """Per hop: node, units, compute / queue / transfer ms, bytes (summed over steps)."""
        return summarize_hops(self.steps, [self.ttft_ms, *self.token_ms])

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_token_ids": self.prompt_token_ids,
            "stop_reason": self.stop_reason,
            "timings": {
                "prefill_ms": round(self.ttft_ms, 3),
                "decode_ms": [round(ms, 3) for ms in self.token_ms],
                "decode_ms_mean": round(self.mean_token_ms, 3) if self.token_ms else None,
                "recoveries": [vars(r) for r in self.recoveries],
            },
            "hops": self.hops,
        }


class Client:
    """A connection to a swarm (through its coordinator) or to a fixed route of nodes."""

    def __init__(
        self,
        coordinator: str | None = None,
        *,
        route: Sequence[str] | None = None,
        model: str = "demo",
        mdns_interfaces: list[str] | None = None,
        swarm: str | None = None,
        codec: str = "fp32",
        retry: RetryPolicy | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        swarm_key: str | SwarmKey | None = None,
        tls_ca: str | Path | None = None,
        check_rate: float = DEFAULT_CHECK_RATE,
        check_seed: int | None = None,
    ) -> None:
        """``coordinator`` is HOST:PORT, or None to find one by mDNS. With ``route`` (node
        addresses from embed to head) no coordinator is used and ``model`` names the
        checkpoint whose tokenizer and shape the nodes serve. ``timeout_s`` bounds every
        step and call: a node silent for longer counts as gone (failover takes over).
        A private swarm wants its ``swarm_key`` (default: ``$NANOSHARD_SWARM_KEY``) and,
        if it runs TLS, ``tls_ca``: the CA that signed its servers' certificates.
        ``check_rate`` is the share of steps spot-checked on a replica of their stage (0: no
        checks; results in :attr:`checks`, disagreements reported to the coordinator);
        ``check_seed`` makes the choice of steps repeatable."""
        self.codec, self.retry, self.timeout_s = codec, retry or RetryPolicy(), timeout_s
        key = swarm_key if isinstance(swarm_key, SwarmKey) else read_key(swarm_key, None)
        self.security = Security(key=key, tls_ca=Path(tls_ca) if tls_ca else None)
        self.checker = Checker(
            check_rate, seed=check_seed, security=self.security, timeout_s=timeout_s
        )
        self._coordinator: CoordinatorClient | None = None
        self._route: Route | None = None
        if route is not None:
            self._route = route_from_addresses(list(route), security=self.security)
            checkpoint = open_checkpoint(model)
            self.config: GPTConfig = checkpoint.config
            self.encoding: tiktoken.Encoding = encoding_for(checkpoint.path)
            if self._route.n_units != self.config.n_units:
                raise InvalidArgument(
                    f"the route serves a model of {self._route.n_units} units, {model} has {self.config.n_units}"
                )
        else:
            address = find_coordinator(
                coordinator,
                mdns_interfaces=mdns_interfaces,
                swarm=swarm,
                tls=self.security.tls_ca is not None,
            )
            self._coordinator = CoordinatorClient(address, security=self.security)
            self.config = self._coordinator.config()
            self.encoding = self._coordinator.encoding()
            self.checker.report = self._coordinator.report_check
        special = self.encoding.special_tokens_set
        self.eot_id = self.encoding.eot_token if "<|endoftext|>" in special else None

    # ---- the swarm ----------------------------------------------------------------------

    def _plan(self, avoid: list[str]) -> Route:
        """A route avoiding ``avoid``, for a session recovering (its own retries bound it)."""
        assert self._coordinator is not None
        return self._coordinator.route(avoid)

    def open_session(
        self, params: SamplingParams, max_length: int, codec: str | None = None
    ) -> SwarmSession:
        # With a coordinator, the session asks it for its route (waiting out a restart).
        planner = self._plan if self._coordinator is not None else None
        route = self._route
        return SwarmSession(
            route,
            params,
            max_length,
            codec or self.codec,
            planner=planner,
            retry=self.retry,
            timeout_s=self.timeout_s,
            security=self.security,
            checker=self.checker,
        )

    @property
    def checks(self) -> list[CheckResult]:
        """The spot-checks run so far (the last 1000), oldest first. Checks run in the
        background: :meth:`wait_for_checks` waits for those still queued."""
        return list(self.checker.results)

    def wait_for_checks(self) -> list[CheckResult]:
        self.checker.wait()
        return self.checks

    def status(self) -> dict[str, Any]:
        """The swarm's status, as ``nanoshard status --json`` prints it."""
        if self._coordinator is None:
            raise InvalidArgument("a client of a fixed route has no coordinator to ask for status")
        return status_json(self._coordinator.status())

    def close(self) -> None:
        self.checker.close()
        if self._coordinator is not None:
            self._coordinator.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- generation ---------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.encoding.encode(prompt, allowed_special="all")
            if not ids and self.eot_id is not None:
                ids = [self.eot_id]
            return ids
        return [int(t) for t in prompt]

    def session(
        self,
        *,
        max_length: int | None = None,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        codec: str | None = None,
    ) -> ChatSession:
        """A session that keeps its KV caches between calls (sampling fixed for its life)."""
        params = SamplingParams(temperature, top_k, top_p, seed)
        return ChatSession(self, params, max_length or self.config.block_size, codec)

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 100,
        *,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: str | Sequence[str] | None = None,
        codec: str | None = None,
        on_token: Callable[[Token], bool | None] | None = None,
    ) -> GenerationResult:
        """Generate a continuation of ``prompt`` (text or token ids). Temperature 0 is
        greedy; sampling is a pure function of ``seed`` and position; the text ends before
        the first ``stop`` string; ``on_token`` sees each token as it arrives (returning
        True stops the generation there, with stop_reason "stop")."""
        ids = self.encode(prompt)
        max_length = max_length_for(len(ids), max_new_tokens, self.config.block_size)
        params = SamplingParams(temperature, top_k, top_p, seed)
        with ChatSession(self, params, max_length, codec) as chat:
            return chat.generate(ids, max_new_tokens, stop=stop, on_token=on_token)

    def stream(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 100,
        **options: Any,
    ) -> Iterator[Token]:
        """Like :meth:`generate`, yielding each token as it arrives."""
        return _stream_in_thread(
            lambda on_token: self.generate(prompt, max_new_tokens, on_token=on_token, **options)
        )


class ChatSession:
    """A session on the swarm that lives across calls: each call continues the text."""

    def __init__(
        self, client: Client, params: SamplingParams, max_length: int, codec: str | None
    ) -> None:
        self.client = client
        self.params = params
        self.max_length = max_length
        self._session = client.open_session(params, max_length, codec)
        self.length = 0  # positions the nodes hold
        self.pending: int | None = None  # the last token generated, not yet fed

    def generate(
        self,
        prompt: str | Sequence[int] = "",
        max_new_tokens: int = 100,
        *,
        stop: str | Sequence[str] | None = None,
        on_token: Callable[[Token], bool | None] | None = None,
    ) -> GenerationResult:
        """Continue the text: feed ``prompt`` (may be empty after a first call) and generate.
        ``on_token`` sees each token as it arrives; returning True stops there."""
        client = self.client
        ids = client.encode(prompt) if prompt != "" else []
        feed = ([self.pending] if self.pending is not None else []) + ids
        if self.length == 0:
            check_prompt(feed, client.config.vocab_size, client.config.block_size)
        elif not feed:
            raise InvalidArgument("nothing to continue from: give a prompt")
        if self.length + len(feed) > self.max_length:
            raise InvalidArgument(
                f"this session holds {self.max_length} positions; {self.length + len(feed)} needed"
            )
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        tokens: list[int] = []
        undecoded: list[int] = []

        def each_token(token: int) -> bool:
            tokens.append(token)
            if on_token is not None:
                undecoded.append(token)
                text = client.encoding.decode(undecoded, errors="replace")
                if text.endswith("\ufffd"):  # half a character: its text comes with the next token
                    text = ""
                else:
                    undecoded.clear()
                if on_token(Token(token, text)):
                    return True
            if stops:
                text = client.encoding.decode(tokens, errors="replace")
                return any(s in text for s in stops)
            return False

        budget = min(max_new_tokens, self.max_length - self.length - len(feed) + 1)
        gen = generate(
            self._session,
            feed,
            budget,
            block_size=min(client.config.block_size, self.max_length),
            eot_id=client.eot_id,
            on_token=each_token,
            start_pos=self.length,
        )
        if gen.stop_reason == "eot":
            # Every generated token was fed (the <|endoftext|> was sampled, never fed): the
            # next call starts from its own prompt.
            self.length += len(feed) + len(gen.token_ids)
            self.pending = None
        else:  # the last token was sampled but not fed yet: the next call feeds it first
            self.length += len(feed) + len(gen.token_ids) - 1
            self.pending = gen.token_ids[-1]
        text = client.encoding.decode(gen.token_ids, errors="replace")
        for s in stops:
            if s in text:
                text = text[: text.index(s)]
        return GenerationResult(
            text=text,
            token_ids=gen.token_ids,
            prompt_token_ids=ids,
            stop_reason=gen.stop_reason,
            ttft_ms=gen.prefill_ms,
            token_ms=gen.decode_ms,
            steps=gen.hops,
            recoveries=list(self._session.recoveries),
        )

    def stream(
        self, prompt: str | Sequence[int] = "", max_new_tokens: int = 100, **options: Any
    ) -> Iterator[Token]:
        return _stream_in_thread(
            lambda on_token: self.generate(prompt, max_new_tokens, on_token=on_token, **options)
        )

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stream_in_thread(
    run: Callable[[Callable[[Token], bool]], object], stop: threading.Event | None = None
) -> Generator[Token, None, None]:
    """Run a generation on a thread (``run(on_token)``); yield its tokens as they arrive.

    When the consumer stops early (closes this generator, or breaks out of its loop) or
    ``stop`` is set, the generation stops at its next token; closing waits for its thread.
    """
    events: queue.SimpleQueue = queue.SimpleQueue()
    done = object()
    failure: list[BaseException] = []
    stop = stop or threading.Event()

    def on_token(token: Token) -> bool:
        events.put(token)
        return stop.is_set()

    def target() -> None:
        try:
            run(on_token)
        except BaseException as exc:  # re-raised in the consumer
            failure.append(exc)
        finally:
            events.put(done)

    thread = threading.Thread(target=target, name="nanoshard-stream", daemon=True)
    thread.start()
    try:
        while (token := events.get()) is not done:
            yield token
    finally:  # also on close: the generation ends at its next token, and its session closes
        stop.set()
        thread.join()
    if failure:
        raise failure[0]


class AsyncClient:
    """:class:`Client` for asyncio: the same calls, awaited; ``stream`` is an async iterator."""

    def __init__(self, coordinator: str | None = None, **options: Any) -> None:
        self._options = (coordinator, options)
        self._client: Client | None = None

    async def _get(self) -> Client:
        if self._client is None:
            coordinator, options = self._options
            self._client = await asyncio.to_thread(Client, coordinator, **options)
        return self._client

    async def generate(
        self, prompt: str | Sequence[int], max_new_tokens: int = 100, **options: Any
    ) -> GenerationResult:
        client = await self._get()
        return await asyncio.to_thread(client.generate, prompt, max_new_tokens, **options)

    async def stream(
        self, prompt: str | Sequence[int], max_new_tokens: int = 100, **options: Any
    ) -> AsyncIterator[Token]:
        client = await self._get()
        stop = threading.Event()
        iterator = _stream_in_thread(
            lambda on_token: client.generate(prompt, max_new_tokens, on_token=on_token, **options),
            stop,
        )
        done = object()
        try:
            while (token := await asyncio.to_thread(next, iterator, done)) is not done:
                yield token  # type: ignore[misc]
        finally:  # the consumer stopped early (or was cancelled): stop the generation too
            stop.set()
            # A next() still running on a worker thread (cancelled above) cannot be joined
            # here; the stop flag ends its generation all the same.
            with contextlib.suppress(ValueError):
                await asyncio.to_thread(iterator.close)

    async def status(self) -> dict[str, Any]:
        client = await self._get()
        return await asyncio.to_thread(client.status)

    async def session(self, **options: Any) -> AsyncChatSession:
        client = await self._get()
        return AsyncChatSession(await asyncio.to_thread(client.session, **options))

    async def close(self) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.close)

    async def __aenter__(self) -> AsyncClient:
        await self._get()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncChatSession:
    """:class:`ChatSession` for asyncio."""

    def __init__(self, session: ChatSession) -> None:
        self._session = session

    async def generate(
        self, prompt: str | Sequence[int] = "", max_new_tokens: int = 100, **options: Any
    ) -> GenerationResult:
        return await asyncio.to_thread(self._session.generate, prompt, max_new_tokens, **options)

    async def close(self) -> None:
        await asyncio.to_thread(self._session.close)

    async def __aenter__(self) -> AsyncChatSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
