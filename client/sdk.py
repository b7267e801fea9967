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

``AsyncClient`` is the core: asyncio on ``grpc.aio``, every step's deadline an asyncio
timeout, no thread per stream. ``Client`` is a thin synchronous wrapper that runs it on one
event loop thread (:mod:`nanoshard.client.loop`).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tiktoken

from nanoshard import discovery, rpc
from nanoshard.checkpoint import open_checkpoint
from nanoshard.codec import check_codec
from nanoshard.config import GPTConfig
from nanoshard.errors import FailedPrecondition, InvalidArgument, NanoshardError, Unavailable
from nanoshard.generation import StepResult, agenerate, check_prompt, max_length_for
from nanoshard.hop import Channels
from nanoshard.modelcard import quick_model_id
from nanoshard.sampling import SamplingParams, integer, real
from nanoshard.security import Security, SwarmKey, read_key
from nanoshard.statusview import status_json
from nanoshard.textstream import TextStream
from nanoshard.tokenizer import encoding_for, prompt_ids
from nanoshard.trace import summarize_hops

from .checks import DEFAULT_CHECK_RATE, Checker, CheckResult
from .loop import LoopThread
from .route import Route, route_from_addresses
from .session import DEFAULT_TIMEOUT_S, Recovery, RetryPolicy, SwarmSession
from .swarm import CoordinatorClient, open_coordinator

FIND_AGAIN_S = 2.0  # how long a client browses mDNS for a coordinator that stopped answering


@dataclass
class Token:
    """One generated token, as ``stream`` yields it."""

    id: int
    text: str  # its text: "" while a character is incomplete or a stop string may begin
    hops: list[dict[str, Any]] = field(default_factory=list)  # the traces of the step that made it


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
    # per step, what went to no hop (failed tries, reroutes, a spot-check's material)
    waited_ms: list[float] = field(default_factory=list)
    seed: int = 0  # the sampling's (drawn at random when the call gave none)

    @property
    def mean_token_ms(self) -> float:
        return sum(self.token_ms) / len(self.token_ms) if self.token_ms else 0.0

    @property
    def hops(self) -> list[dict[str, Any]]:
        """Per hop: node, units, compute / queue / transfer ms, bytes (summed over steps)."""
        walls = [self.ttft_ms, *self.token_ms]
        waited = self.waited_ms or [0.0] * len(walls)
        return summarize_hops(self.steps, [w - x for w, x in zip(walls, waited, strict=False)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_token_ids": self.prompt_token_ids,
            "stop_reason": self.stop_reason,
            "seed": self.seed,
            "timings": {
                "prefill_ms": round(self.ttft_ms, 3),
                "decode_ms": [round(ms, 3) for ms in self.token_ms],
                "decode_ms_mean": round(self.mean_token_ms, 3) if self.token_ms else None,
                "recoveries": [vars(r) for r in self.recoveries],
            },
            "hops": self.hops,
        }


class AsyncClient:
    """A connection to a swarm (through its coordinator) or to a fixed route of nodes, for
    asyncio. It connects on first use (or ``async with``); every call is awaited."""

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
        """``coordinator`` is HOST:PORT, or None to find one by mDNS (of ``swarm``, when
        given). With ``route`` (node addresses from embed to head) no coordinator is used
        and ``model`` names the checkpoint whose tokenizer and shape the nodes serve.
        ``timeout_s`` bounds every step and call: a node silent for longer counts as gone
        (failover takes over). A private swarm wants its ``swarm_key`` (default:
        ``$NANOSHARD_SWARM_KEY``) and, if it runs TLS, ``tls_ca``: the CA that signed its
        servers' certificates. ``check_rate`` is the share of sessions' hops that a
        shadow replica follows and checks (a hop the coordinator asks to have followed
        always is, unless ``check_rate`` is 0: no checks at all; results in :attr:`checks`,
        disagreements reported to the coordinator); ``check_seed`` makes the choices
        repeatable.

        Every option is checked here, before anything connects: a typo is a one-line
        InvalidArgument now, not a node or coordinator blamed for it later."""
        coordinator = coordinator or None  # "" finds one by mDNS, as None
        if coordinator is not None:
            rpc.check_address(coordinator, "the coordinator")
        if route is not None:
            if isinstance(route, str) or not isinstance(route, Sequence) or not route:
                raise InvalidArgument(
                    f"route must be a list of node addresses (HOST:PORT), embed first: got "
                    f"{route!r:.60} (one node: route=['HOST:PORT'])"
                )
            route = [rpc.check_address(a, "a route's node") for a in route]
            if coordinator:
                raise InvalidArgument(
                    "give a coordinator or a route, not both (a route's nodes are asked "
                    "directly: no coordinator is used)"
                )
        timeout_s = real("timeout_s", timeout_s)
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise InvalidArgument(f"timeout_s must be a positive number of seconds: {timeout_s}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise InvalidArgument(f"retry must be a RetryPolicy, got {retry!r:.40}")
        retry = retry or RetryPolicy()
        check_rate = real("check_rate", check_rate)
        self.codec, self.retry, self.timeout_s = check_codec(codec), retry, timeout_s
        key = swarm_key if isinstance(swarm_key, SwarmKey) else read_key(swarm_key, None)
        self.security = Security(key=key, tls_ca=Path(tls_ca) if tls_ca else None)
        self.checker = Checker(
            check_rate, seed=check_seed, security=self.security, timeout_s=timeout_s
        )
        self._where = (coordinator, list(route) if route is not None else None, model)
        self._discovery = (mdns_interfaces, swarm)
        self._strangers = discovery.PassedOver()  # coordinators found on mDNS without the key
        self._coordinator: CoordinatorClient | None = None
        self._route: Route | None = None
        self._channels = Channels(self.security)
        self._connected = False
        self._connecting = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # where it runs: the first call's
        # The stop of the mDNS search connect runs on a worker thread (set on Ctrl-C or
        # close: else the thread searches on for seconds); each connect has its own.
        self._search: threading.Event | None = None
        self._closed = False
        # open chat sessions (a generate call's too): stopped and closed with the client
        self._chats: set[AsyncChatSession] = set()

    # ---- the swarm ----------------------------------------------------------------------

    async def connect(self) -> AsyncClient:
        """Find the swarm and read its model card (done once; every call does it first)."""
        if self._closed:
            raise FailedPrecondition("this client is closed: make a new one")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:  # (its gRPC channels belong to the first one)
            raise FailedPrecondition(
                "this AsyncClient was first used on another event loop (an earlier "
                "asyncio.run?): make one in each loop, or use the synchronous Client"
            )
        async with self._connecting:  # the first calls of several tasks connect once
            if not self._connected:
                stop = self._search = threading.Event()
                try:
                    await asyncio.to_thread(self._connect, stop)
                except asyncio.CancelledError:
                    stop.set()
                    raise
                self._connected = True
        return self

    def _connect(self, stop: threading.Event) -> None:
        coordinator, route, model = self._where
        if route is not None:
            self._route = route_from_addresses(route, security=self.security)
            checkpoint = open_checkpoint(model)
            self.config: GPTConfig = checkpoint.config
            self.encoding: tiktoken.Encoding = encoding_for(checkpoint.path)
            self.model_name: str = model
            if self._route.n_units != self.config.n_units:
                raise InvalidArgument(
                    f"the route serves a model of {self._route.n_units} units, {model} has "
                    f"{self.config.n_units}"
                )
            quick = quick_model_id(checkpoint)  # (static nodes' ids: by names and shapes)
            if self._route.model_id.startswith("meta-") and self._route.model_id != quick:
                raise InvalidArgument(
                    f"the route's nodes serve another model than {model} (their model id "
                    f"{self._route.model_id}, {model}'s {quick}: its tensors' names, shapes and "
                    "dtypes differ): give the checkpoint they serve (--model; Client(model=...))"
                )
        else:
            interfaces, swarm = self._discovery
            found = open_coordinator(
                coordinator,
                self.security,
                mdns_interfaces=interfaces,
                swarm=swarm,
                stop=stop,
                passed_over=self._strangers,
            )
            try:
                self.config = found.config()
                self.encoding = found.encoding()
                self.model_name = found.card().name
            except BaseException:
                found.close()
                raise
            self._coordinator = found
            self.checker.report = found.report_check
        special = self.encoding.special_tokens_set
        self.eot_id = self.encoding.eot_token if "<|endoftext|>" in special else None

    async def route(self, avoid: Sequence[str] = ()) -> Route:
        """The route a new session gets now (avoiding ``avoid``), or the fixed one. The
        coordinator's calls are rare and small: they run on a worker thread."""
        await self.connect()
        if self._coordinator is None:
            assert self._route is not None
            return self._route
        try:
            return await asyncio.to_thread(self._coordinator.route, list(avoid))
        except Unavailable:
            if not await asyncio.to_thread(self._find_again):
                raise
            return await asyncio.to_thread(self._coordinator.route, list(avoid))

    def _find_again(self) -> bool:
        """The coordinator does not answer. One found by mDNS may have restarted on another
        port or host: look for it again, and use it if it moved (True)."""
        assert self._coordinator is not None
        interfaces, swarm = self._discovery
        if self._where[0] is not None:
            return False
        try:
            found = open_coordinator(
                None,
                self.security,
                mdns_interfaces=interfaces,
                swarm=swarm,
                timeout_s=FIND_AGAIN_S,
                passed_over=self._strangers,
            )
        except NanoshardError:
            return False
        if found.address == self._coordinator.address:
            found.close()
            return False
        old, self._coordinator = self._coordinator, found
        self.checker.report = self._coordinator.report_check
        old.close()
        return True

    async def _plan(self, avoid: list[str]) -> Route:
        return await self.route(avoid)

    async def open_session(
        self, params: SamplingParams, max_length: int, codec: str | None = None
    ) -> SwarmSession:
        """A session on the swarm, open along its route (the coordinator's, or the fixed one)."""
        await self.connect()
        session = SwarmSession(
            self._channels,
            self._route,
            params,
            max_length,
            codec or self.codec,
            planner=self._plan if self._coordinator is not None else None,
            retry=self.retry,
            timeout_s=self.timeout_s,
            checker=self.checker,
        )
        try:
            await session.open()
        except BaseException:  # (refused, or cancelled: a node may have opened it already)
            await session.close()
            raise
        return session

    @property
    def coordinator(self) -> str | None:
        """The coordinator's HOST:PORT once connected (given, or found by mDNS); None for a
        fixed route."""
        return self._coordinator.address if self._coordinator is not None else None

    @property
    def checks(self) -> list[CheckResult]:
        """The spot-checks run so far (the last 1000), oldest first. Checks run in the
        background: :meth:`wait_for_checks` waits for those still queued."""
        return list(self.checker.results)

    async def wait_for_checks(self) -> list[CheckResult]:
        await asyncio.to_thread(self.checker.wait)
        return self.checks

    def excluded(self, result: GenerationResult) -> dict[str, int]:
        """The nodes that computed part of ``result`` and that spot-checks have since got
        excluded (the coordinator's re-run contradicted what they signed), each with the
        first generated token that went through it: the text from there on may be wrong.
        A session leaves such a node at its next step; a check that finds it after the
        last one leaves the text as it came. Complete once :meth:`wait_for_checks` returns."""
        first: dict[str, int] = {}
        for k, traces in enumerate(result.steps):
            for trace in traces:
                first.setdefault(trace["address"], k)
        return {a: first[a] for a in self.checker.excluded(list(first))}

    async def status(self) -> dict[str, Any]:
        """The swarm's status, as ``nanoshard status --json`` prints it."""
        await self.connect()
        if self._coordinator is None:
            raise InvalidArgument("a client of a fixed route has no coordinator to ask for status")
        return status_json(await asyncio.to_thread(self._coordinator.status))

    async def close(self) -> None:
        """Stop the generations still running (each ends in FailedPrecondition), close the
        client's chat sessions still open (their nodes free them at once, not at their TTL)
        and its connections; any call after this is a FailedPrecondition."""
        self._closed = True
        chats, self._chats = self._chats, set()
        here = asyncio.current_task()  # (close may be called from inside a generation)
        running = [c._running for c in chats if c._running not in (None, here)]
        for task in running:
            task.cancel()  # (before the channels close: its session closes on its nodes)
        await asyncio.gather(*running, return_exceptions=True)
        await asyncio.gather(*(chat.close() for chat in chats), return_exceptions=True)
        if self._search is not None:
            self._search.set()
        await asyncio.to_thread(self.checker.close)
        if self._coordinator is not None:
            self._coordinator.close()
        await self._channels.close()

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- generation ---------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt's token ids: text encoded, or the ids given (ints: bytes and floats are
        refused, not read as ids or truncated)."""
        if isinstance(prompt, str):
            return prompt_ids(self.encoding, prompt, self.config.vocab_size)
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Iterable):
            raise InvalidArgument(
                f"prompt must be a str or a list of token ids (ints), got {type(prompt).__name__}"
            )
        return [integer("a prompt's token id", t) for t in prompt]

    async def session(
        self,
        *,
        max_length: int | None = None,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        codec: str | None = None,
    ) -> AsyncChatSession:
        """A session that keeps its KV caches between calls (sampling fixed for its life:
        ``seed`` None draws one at random). It holds ``max_length`` positions, 1 to the
        model's context (None: all of it)."""
        params = SamplingParams(temperature, top_k, top_p, _seed(seed))
        await self.connect()
        block_size = self.config.block_size
        if max_length is None:
            max_length = block_size
        else:
            max_length = integer("max_length", max_length)
            if not 1 <= max_length <= block_size:
                raise InvalidArgument(
                    f"max_length must be in [1, {block_size}] (this model's context), "
                    f"got {max_length}"
                )
        return await AsyncChatSession.open(self, params, max_length, codec)

    async def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 100,
        *,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        codec: str | None = None,
        on_token: Callable[[Token], bool | None] | None = None,
    ) -> GenerationResult:
        """Generate a continuation of ``prompt`` (text or token ids). Temperature 0 is
        greedy; sampling is a pure function of ``seed`` and position (None: a seed drawn at
        random for this call, in the result's ``seed``); the text ends before the first
        ``stop`` string; ``on_token`` sees each token as it arrives (returning True stops
        the generation there, with stop_reason "stop")."""
        max_new_tokens = _max_new_tokens(max_new_tokens)
        _stops(stop)  # checked before a session opens on the nodes
        params = SamplingParams(temperature, top_k, top_p, _seed(seed))
        await self.connect()
        ids = self.encode(prompt)
        check_prompt(ids, self.config.vocab_size, self.config.block_size)
        max_length = max_length_for(len(ids), max_new_tokens, self.config.block_size)
        async with await AsyncChatSession.open(self, params, max_length, codec) as chat:
            return await chat.generate(ids, max_new_tokens, stop=stop, on_token=on_token)

    def stream(
        self, prompt: str | Sequence[int], max_new_tokens: int = 100, **options: Any
    ) -> AsyncIterator[Token]:
        """Like :meth:`generate`, yielding each token as it arrives."""
        return _stream(
            lambda on_token: self.generate(prompt, max_new_tokens, on_token=on_token, **options),
            options,
        )


class AsyncChatSession:
    """A session on the swarm that lives across calls: each call continues the text."""

    def __init__(
        self,
        client: AsyncClient,
        params: SamplingParams,
        max_length: int,
        session: SwarmSession,
        codec: str | None = None,
    ) -> None:
        self.client = client
        self.params = params
        self.max_length = max_length
        self.codec = codec
        self._session = session
        self.length = 0  # positions the nodes hold
        self.pending: int | None = None  # the last token generated, not yet fed
        self.ids: list[int] = []  # the text's token ids: what the nodes hold, then ``pending``
        # The text as its caller saw it, when the nodes hold more (a stop string cut it, or
        # a stream was left before its last tokens): the next call starts again from it.
        self._seen: list[int] | None = None
        self._broken = ""  # why the session cannot go on (a generation failed midway)
        self._closed = False
        self._running: asyncio.Task | None = None  # the generation running: one at a time

    @classmethod
    async def open(
        cls, client: AsyncClient, params: SamplingParams, max_length: int, codec: str | None
    ) -> AsyncChatSession:
        session = await client.open_session(params, max_length, codec)
        chat = cls(client, params, max_length, session, codec)
        client._chats.add(chat)
        return chat

    async def generate(
        self,
        prompt: str | Sequence[int] = "",
        max_new_tokens: int = 100,
        *,
        stop: str | Sequence[str] | None = None,
        on_token: Callable[[Token], bool | None] | None = None,
    ) -> GenerationResult:
        """Continue the text: feed ``prompt`` (may be empty after a first call) and generate.
        ``on_token`` sees each token as it arrives; returning True stops there. Bad
        arguments are refused before anything is sent: the session goes on after them."""
        client = self.client
        if client._closed:
            raise FailedPrecondition("this session's client is closed")
        if self._closed:
            raise FailedPrecondition("this session is closed: open a new one")
        if self._broken:
            raise FailedPrecondition(f"this session cannot go on ({self._broken}): open a new one")
        if self._running is not None:
            raise FailedPrecondition(
                "a generation is already running on this session: a session continues one "
                "text, one call at a time (await it, or open another session)"
            )
        max_new_tokens = _max_new_tokens(max_new_tokens)
        stops = _stops(stop)
        # The nodes hold tokens the caller never saw: the session starts again (one prefill)
        # from the text it did see, rather than go on from text nobody read.
        seen = self._seen
        length, pending = (0, None) if seen is not None else (self.length, self.pending)
        # An empty text continues the session; as its first prompt it starts a text at
        # <|endoftext|>, as ``generate("")`` does.
        ids = (
            []
            if isinstance(prompt, str) and not prompt and (length or seen)
            else client.encode(prompt)
        )
        before = self.ids if seen is None else seen  # the text's ids so far
        feed = (seen or []) + ([pending] if pending is not None else []) + ids
        if length == 0:
            check_prompt(feed, client.config.vocab_size, client.config.block_size)
        elif not feed:
            raise InvalidArgument("nothing to continue from: give a prompt")
        elif bad := [t for t in ids if not 0 <= t < client.config.vocab_size]:
            raise InvalidArgument(
                f"token id {bad[0]} is outside the vocabulary [0, {client.config.vocab_size})"
            )
        if length + len(feed) > self.max_length:
            raise InvalidArgument(
                f"this session holds {self.max_length} positions; {length + len(feed)} needed"
            )
        self._running = asyncio.current_task()
        if seen is not None:
            try:
                await self._reopen()
            except BaseException:
                self._running = None
                raise
        traced = _Traced(self._session)
        budget = min(max_new_tokens, self.max_length - self.length - len(feed) + 1)
        # Each token's text as the result's text will have it: what a stop string may begin
        # (or half a character) is held until a later token shows it is not, and the text
        # ends before a stop string: the texts of the tokens ``on_token`` sees, joined, are
        # the result's text (unless ``on_token`` itself stops the generation).
        texts = TextStream(stops)
        drawn = 0

        def each_token(token: int) -> bool:
            nonlocal drawn
            drawn += 1
            text = texts.push(client.encoding.decode_single_token_bytes(token))
            if not texts.stopped and (drawn == budget or token == client.eot_id):
                text += texts.finish()  # (the last token: nothing is held past it)
            if on_token is not None and on_token(Token(token, text, traced.hops)):
                return True
            return texts.stopped

        earlier = len(self._session.recoveries)  # (the session's, from its calls before)
        try:
            gen = await agenerate(
                traced,
                feed,
                budget,
                block_size=min(client.config.block_size, self.max_length),
                eot_id=client.eot_id,
                on_token=each_token,
                start_pos=self.length,
            )
        except BaseException as exc:  # the nodes may hold more than this session counted
            self._broken = f"a generation failed midway: {type(exc).__name__}"
            if isinstance(exc, asyncio.CancelledError) and client._closed:
                raise FailedPrecondition("the client was closed during this generation") from None
            raise
        finally:
            self._running = None
        if gen.stop_reason == "max_new_tokens" and len(gen.token_ids) < max_new_tokens:
            gen.stop_reason = "context"  # the session's positions ran out first (``budget``)
        if gen.stop_reason == "eot":
            # Every generated token was fed (the <|endoftext|> was sampled, never fed): the
            # next call starts from its own prompt.
            self.length += len(feed) + len(gen.token_ids)
            self.pending = None
        else:  # the last token was sampled but not fed yet: the next call feeds it first
            self.length += len(feed) + len(gen.token_ids) - 1
            self.pending = gen.token_ids[-1]
        self.ids = before + ids + gen.token_ids
        whole = text = client.encoding.decode(gen.token_ids, errors="replace")
        for s in stops:
            if s in text:
                text = text[: text.index(s)]
        if text != whole:  # (a stop string: the tokens that drew it are not in the text)
            self._seen = before + ids + seen_ids(client.encoding, gen.token_ids, text)
        return GenerationResult(
            text=text,
            token_ids=gen.token_ids,
            prompt_token_ids=ids,
            stop_reason=gen.stop_reason,
            ttft_ms=gen.prefill_ms,
            token_ms=gen.decode_ms,
            steps=gen.hops,
            waited_ms=gen.waited_ms,
            recoveries=self._session.recoveries[earlier:],
            seed=self.params.seed,
        )

    def stream(
        self, prompt: str | Sequence[int] = "", max_new_tokens: int = 100, **options: Any
    ) -> AsyncIterator[Token]:
        """Like :meth:`generate`, yielding each token as it arrives. Left early, after the
        swarm drew tokens past the last one yielded (it runs ahead of its reader), the
        session's next call goes on from the last token yielded, not from those."""
        return _stream(
            lambda on_token: self.generate(prompt, max_new_tokens, on_token=on_token, **options),
            options,
            self._unread,
        )

    def _unread(self, tokens: int) -> None:
        seen = self.ids[: len(self.ids) - tokens]
        if self._seen is None or len(seen) < len(self._seen):
            self._seen = seen

    async def _reopen(self) -> None:
        """Close the session on the swarm and open it again, holding nothing: the next step
        feeds the text seen from position 0. A failure leaves ``_seen`` for the next call."""
        await self._session.close()
        self._session = await self.client.open_session(self.params, self.max_length, self.codec)
        self.ids, self.length, self.pending, self._seen = [], 0, None, None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.client._chats.discard(self)
        await self._session.close()

    async def __aenter__(self) -> AsyncChatSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def seen_ids(encoding: Any, generated: Sequence[int], text: str) -> list[int]:
    """The token ids of ``text``, a generation's text cut short of its tokens' (before a stop
    string): the ``generated`` tokens it holds whole, then what it holds of the next ones
    encoded again, as text (a special token's name in it is not that token)."""
    want, held, k = text.encode(), b"", 0
    for token in generated:
        more = held + encoding.decode_single_token_bytes(token)
        if not want.startswith(more):
            break
        held, k = more, k + 1
    while True:  # (``held`` may end inside a character that a token split)
        try:
            rest = want[len(held) :].decode()
            break
        except UnicodeDecodeError:
            k -= 1
            held = held[: -len(encoding.decode_single_token_bytes(generated[k]))]
    return list(generated[:k]) + (encoding.encode(rest, disallowed_special=()) if rest else [])


def _seed(seed: int | None) -> int:
    """The seed a call samples with: the one given (checked by ``SamplingParams``), or a
    new one at random, so that calls without a seed differ, as OpenAI's do."""
    return secrets.randbits(63) if seed is None else seed


def _max_new_tokens(value: object) -> int:
    n = integer("max_new_tokens", value)
    if n < 1:
        raise InvalidArgument(f"max_new_tokens must be >= 1, got {n}")
    return n


def _stops(stop: object) -> list[str]:
    """The stop strings, from one, a list of them, or None. None of them may be empty: ""
    is in every text, so it would stop every generation at its first token."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, Sequence) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidArgument(f"stop must be a non-empty str or a list of them, got {stop!r:.60}")
    return list(stops)


class _Traced:
    """A session that keeps the hop traces of its last step (for the token it answered)."""

    def __init__(self, session: SwarmSession) -> None:
        self.session = session
        self.hops: list[dict[str, Any]] = []

    async def step(self, tokens: list[int], pos: int) -> StepResult:
        result = await self.session.step(tokens, pos)
        self.hops = result.hops
        return result

    async def close(self) -> None:
        await self.session.close()


async def _stream(
    run: Callable[[Callable[[Token], bool]], Awaitable[object]],
    options: dict[str, Any],
    unread: Callable[[int], None] | None = None,
) -> AsyncIterator[Token]:
    """Run a generation (``run(on_token)``) as a task; yield its tokens as they arrive.
    ``options``: the caller's, which cannot hold its own ``on_token``.

    When the consumer stops early (closes this iterator, or breaks out of its loop), the
    generation stops at its next token and its session closes before this returns; the
    tokens it drew past the last one yielded are counted to ``unread``, if any."""
    if "on_token" in options:
        raise InvalidArgument("stream yields each token itself: on_token is generate's")
    tokens: asyncio.Queue[Token | None] = asyncio.Queue()
    stopped = False
    drawn = yielded = 0

    def on_token(token: Token) -> bool:
        nonlocal drawn
        drawn += 1
        tokens.put_nowait(token)
        return stopped

    task = asyncio.ensure_future(run(on_token))
    task.add_done_callback(lambda _: tokens.put_nowait(None))
    try:
        while (token := await tokens.get()) is not None:
            yielded += 1  # (before: a consumer that leaves does so at the yield)
            yield token
    except asyncio.CancelledError:  # the consumer was cancelled: so is the generation
        task.cancel()
        raise
    finally:
        stopped = True
        if not task.done():
            await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # a consumer that left early does not see it
        if unread is not None and drawn > yielded:
            unread(drawn - yielded)
    await task  # the generation's error, if it failed


class Client:
    """:class:`AsyncClient` for synchronous code: the same options and calls, run on one
    event loop thread of its own. Connects when made (errors are raised here)."""

    def __init__(self, coordinator: str | None = None, **options: Any) -> None:
        try:  # options checked before a thread starts
            self.core = AsyncClient(coordinator, **options)
        except TypeError as exc:  # (a wrong keyword: named as the caller wrote it)
            raise TypeError(str(exc).replace("AsyncClient.__init__()", "Client()")) from None
        self._loop = LoopThread()
        try:
            self._loop.run(self.core.connect())
        except BaseException:
            try:
                self._loop.run(self.core.close())
            finally:
                self._loop.close()
            raise

    @property
    def config(self) -> GPTConfig:
        return self.core.config

    @property
    def coordinator(self) -> str | None:
        return self.core.coordinator

    @property
    def encoding(self) -> tiktoken.Encoding:
        return self.core.encoding

    @property
    def eot_id(self) -> int | None:
        return self.core.eot_id

    @property
    def checks(self) -> list[CheckResult]:
        return self.core.checks

    def wait_for_checks(self) -> list[CheckResult]:
        return self._loop.run(self.core.wait_for_checks())

    def excluded(self, result: GenerationResult) -> dict[str, int]:
        """As :meth:`AsyncClient.excluded`."""
        return self.core.excluded(result)

    def status(self) -> dict[str, Any]:
        return self._loop.run(self.core.status())

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        return self.core.encode(prompt)

    def route(self, avoid: Sequence[str] = ()) -> Route:
        return self._loop.run(self.core.route(avoid))

    def session(self, **options: Any) -> ChatSession:
        """As :meth:`AsyncClient.session`."""
        return ChatSession(self._loop, self._loop.run(self.core.session(**options)))

    def generate(
        self, prompt: str | Sequence[int], max_new_tokens: int = 100, **options: Any
    ) -> GenerationResult:
        """As :meth:`AsyncClient.generate` (``on_token`` runs on the client's loop thread)."""
        return self._loop.run(self.core.generate(prompt, max_new_tokens, **options))

    def stream(
        self, prompt: str | Sequence[int], max_new_tokens: int = 100, **options: Any
    ) -> Iterator[Token]:
        """Like :meth:`generate`, yielding each token as it arrives."""
        return self._loop.iterate(self.core.stream(prompt, max_new_tokens, **options))

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self.core.close())
        finally:
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChatSession:
    """:class:`AsyncChatSession` for synchronous code."""

    def __init__(self, loop: LoopThread, core: AsyncChatSession) -> None:
        self._loop = loop
        self.core = core

    @property
    def length(self) -> int:
        return self.core.length

    @property
    def pending(self) -> int | None:
        return self.core.pending

    def generate(
        self, prompt: str | Sequence[int] = "", max_new_tokens: int = 100, **options: Any
    ) -> GenerationResult:
        return self._loop.run(self.core.generate(prompt, max_new_tokens, **options))

    def stream(
        self, prompt: str | Sequence[int] = "", max_new_tokens: int = 100, **options: Any
    ) -> Iterator[Token]:
        return self._loop.iterate(self.core.stream(prompt, max_new_tokens, **options))

    def close(self) -> None:
        self._loop.run(self.core.close())

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
