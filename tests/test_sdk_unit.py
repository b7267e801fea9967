"""The client in-process: the SDK over a fake session (no nodes), and the client's session
over a fake node on loopback whose failures are scripted (lost answers, rewinds, hangs)."""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from routes import RouteSession

from nanoshard import hop as hop_module
from nanoshard import rpc
from nanoshard.client import AsyncClient, Client, Token
from nanoshard.client.loop import LoopThread
from nanoshard.client.route import Route
from nanoshard.client.sdk import seen_ids
from nanoshard.client.session import RetryPolicy
from nanoshard.config import GPTConfig
from nanoshard.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    Unavailable,
)
from nanoshard.generation import StepResult
from nanoshard.hop import Channels, NextHop, token_replay
from nanoshard.sampling import SamplingParams, float32
from nanoshard.tokenizer import gpt2_encoding
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc
from nanoshard.wire import sampling_from_wire, sampling_to_wire

EOT = 99


def answer(pos: int) -> int:
    """The fake model: the token at ``pos`` (any function of the position will do)."""
    return 1000 + pos


# ---- the SDK over a fake session ------------------------------------------------------


class FakeSession:
    """Answers ``answer(pos)``, or <|endoftext|> at the positions in ``eot_at``."""

    def __init__(self, eot_at: set[int] = frozenset(), step_s: float = 0.0) -> None:
        self.eot_at, self.step_s = eot_at, step_s
        self.fed: list[tuple[list[int], int]] = []  # (tokens, pos) of every step
        self.recoveries: list[Any] = []
        self.closed = False
        self.events: list[str] = []  # (its client's: what closed, in order)

    async def step(self, tokens: list[int], pos: int) -> StepResult:
        await asyncio.sleep(self.step_s)
        self.fed.append((list(tokens), pos))
        at = pos + len(tokens)
        return StepResult(EOT if at in self.eot_at else answer(at))

    async def close(self) -> None:
        self.closed = True
        self.events.append("session closed")


class FakeEncoding:
    name, n_vocab = "fake", 0x110000  # (tiktoken's Encoding: every character its own id)
    special_tokens_set, eot_token = {"<|endoftext|>"}, EOT

    def encode(
        self, text: str, allowed_special: Any = "all", disallowed_special: Any = ()
    ) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], errors: str = "strict") -> str:
        return "".join(f"<{i}>" for i in ids)

    def decode_single_token_bytes(self, token: int) -> bytes:
        return f"<{token}>".encode()


class FakeCore(AsyncClient):
    """The real asyncio SDK (sessions, generate, stream) on fake sessions."""

    def __init__(self, **session_options: Any) -> None:  # no coordinator, no nodes
        super().__init__(check_rate=0)
        self.config = GPTConfig(block_size=64, vocab_size=2000, n_layer=1, n_head=1, n_embd=8)
        self.encoding = FakeEncoding()  # type: ignore[assignment]
        self.eot_id = EOT
        self._connected = True
        self.session_options = session_options
        self.sessions: list[FakeSession] = []
        self.opened_with: list[SamplingParams] = []
        self.events: list[str] = []
        close_channels = self._channels.close

        async def closing_channels() -> None:
            self.events.append("channels closed")
            await close_channels()

        self._channels.close = closing_channels  # type: ignore[method-assign]

    async def open_session(  # type: ignore[override]
        self, params: SamplingParams, max_length: int, codec: str | None = None
    ) -> FakeSession:
        self.sessions.append(FakeSession(**self.session_options))
        self.sessions[-1].events = self.events
        self.opened_with.append(params)
        return self.sessions[-1]


class FakeClient(Client):
    """The real synchronous SDK around :class:`FakeCore`, on a loop thread of its own."""

    def __init__(self, **session_options: Any) -> None:
        self._loop = LoopThread()
        self.core = FakeCore(**session_options)

    @property
    def sessions(self) -> list[FakeSession]:
        return self.core.sessions  # type: ignore[attr-defined, no-any-return]


def contiguous(fed: list[tuple[list[int], int]]) -> bool:
    """Every step starts where the one before it ended."""
    at = 0
    for tokens, pos in fed:
        if pos != at:
            return False
        at += len(tokens)
    return True


def test_a_chat_continues_after_endoftext_and_after_max_new_tokens() -> None:
    client = FakeClient(eot_at={6})
    with client.session(temperature=0) as chat:
        first = chat.generate([1, 2, 3], 10)
        assert first.stop_reason == "eot" and first.token_ids == [1003, 1004, 1005]
        assert (chat.length, chat.pending) == (6, None)  # 1005 was fed; the eot never is
        with pytest.raises(InvalidArgument, match="nothing to continue"):
            chat.generate("", 5)
        second = chat.generate([7], 2)
        assert second.stop_reason == "max_new_tokens" and second.token_ids == [1007, 1008]
        assert (chat.length, chat.pending) == (8, 1008)  # 1008 sampled, not fed yet
        third = chat.generate("", 1)
        assert third.token_ids == [1009]
    fed = client.sessions[0].fed
    assert fed == [
        ([1, 2, 3], 0),
        ([1003], 3),
        ([1004], 4),
        ([1005], 5),
        ([7], 6),  # right after the last token fed, with nothing of the eot
        ([1007], 7),
        ([1008], 8),  # the pending token goes first in the next call
    ]
    assert contiguous(fed) and client.sessions[0].closed


def test_a_chat_may_start_from_an_empty_prompt_as_generate_does() -> None:
    client = FakeClient()
    with client.session(temperature=0) as chat:
        first = chat.generate("", 2)
    assert client.sessions[0].fed[0] == ([EOT], 0)  # a text starts at <|endoftext|>
    assert first.token_ids == client.generate("", 2, temperature=0).token_ids


def test_closing_a_client_closes_its_chat_sessions() -> None:
    """A chat left open when its client closes is closed on its nodes then, not held there
    until their TTL (5 minutes of KV memory each)."""
    client = FakeClient()
    left = client.session(temperature=0)
    left.generate("ab", 2)
    closed = client.session(temperature=0)
    closed.close()  # (by hand: the client does not close it again)
    client.close()
    assert [s.closed for s in client.sessions] == [True, True]
    with pytest.raises(FailedPrecondition, match="client is closed"):
        left.generate("", 2)


@pytest.mark.parametrize("how", ["generate", "stream"])
def test_closing_a_client_stops_its_running_generations_first(how: str) -> None:
    """A client closed while a generation ran (in another thread, or a stream not read
    to its end) closed its connections under it: the session stayed open on its nodes
    until its TTL, and the call ended in a bare CancelledError."""
    client = FakeClient(step_s=0.01)
    outcome: list[BaseException] = []
    if how == "generate":

        def run() -> None:
            try:
                client.generate([1, 2], 1000)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 30
        while (not client.sessions or len(client.sessions[0].fed) < 3) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.01)
        client.close()
        thread.join(timeout=30)
        assert len(outcome) == 1 and isinstance(outcome[0], FailedPrecondition), outcome
        assert "closed during this generation" in str(outcome[0])
    else:
        tokens = client.stream([1, 2], 1000)  # (still referenced: not closed by the loop)
        assert [next(tokens).id for _ in range(2)] == [1002, 1003]
        client.close()
    assert client.sessions[0].closed
    assert client.core.events == ["session closed", "channels closed"]  # type: ignore[attr-defined]


def test_an_async_client_used_from_a_second_event_loop_says_so() -> None:
    """Its channels belong to the loop it first ran on: a second ``asyncio.run`` got
    "RuntimeError: Event loop is closed" from inside gRPC."""
    core = FakeCore()
    assert asyncio.run(core.generate([1, 2], 2)).token_ids == [1002, 1003]
    with pytest.raises(FailedPrecondition, match="first used on another event loop"):
        asyncio.run(core.generate([1, 2], 2))


def test_calls_without_a_seed_sample_with_seeds_of_their_own() -> None:
    """The default seed was 0: every unseeded call sampled the same text."""
    client = FakeClient()
    first, second = client.generate([1], 2), client.generate([1], 2)
    assert first.seed != second.seed  # (two draws of 63 bits)
    assert client.generate([1], 2, seed=7).seed == 7
    with client.session() as chat:
        assert chat.generate([1], 1).seed == chat.generate("", 1).seed  # one per session
    seeds = [p.seed for p in client.core.opened_with]  # type: ignore[attr-defined]
    assert seeds[:3] == [first.seed, second.seed, 7]
    client.close()


def test_a_closed_chat_session_says_so() -> None:
    """Its next call once read "open the session before its first step"."""
    client = FakeClient()
    chat = client.session(temperature=0)
    chat.generate([1, 2], 2)
    chat.close()
    chat.close()  # (twice is fine)
    with pytest.raises(FailedPrecondition, match="this session is closed: open a new one"):
        chat.generate("", 2)
    client.close()


def test_a_chat_session_runs_one_generation_at_a_time() -> None:
    """A second call while one runs was sent on the same stream: both failed, a healthy
    node was blamed and the session broken. It is now refused at once, and the first
    goes on as if alone."""

    async def main() -> None:
        core = FakeCore(step_s=0.01)
        chat = await core.session(temperature=0)
        first = asyncio.ensure_future(chat.generate([1, 2], 5))
        await asyncio.sleep(0.02)  # (the first is under way)
        with pytest.raises(FailedPrecondition, match="already running on this session"):
            await chat.generate([3], 2)
        assert (await first).token_ids == [1002, 1003, 1004, 1005, 1006]
        assert (await chat.generate("", 1)).token_ids == [1007]  # and the session goes on
        assert contiguous(core.sessions[0].fed)
        await core.close()

    asyncio.run(main())


def test_a_sync_call_from_on_token_is_a_nanoshard_error() -> None:
    """It would wait for itself: refused, as every SDK error is, with a NanoshardError."""
    client = FakeClient()
    with pytest.raises(FailedPrecondition, match="from its own event loop thread"):
        client.generate([1, 2], 3, on_token=lambda t: client.generate([1], 1) and True)
    client.close()


def test_a_stream_given_on_token_says_it_yields_them_itself() -> None:
    client = FakeClient()
    with pytest.raises(InvalidArgument, match="on_token is generate's"):
        list(client.stream([1, 2], 3, on_token=print))
    with client.session(temperature=0) as chat, pytest.raises(InvalidArgument, match="on_token"):
        list(chat.stream([1, 2], 3, on_token=print))
    client.close()


def test_a_streams_texts_join_to_the_generations_text() -> None:
    """A stream holds back what may begin a stop string, as the gateway's does: its tokens'
    texts, joined, are ``generate``'s text (the stop string once came out of a stream)."""
    client = FakeClient()
    for stop in ("3><10", "<1005>", "nowhere"):  # over two tokens, one whole, none
        whole = client.generate([1, 2], 6, stop=stop, temperature=0)
        streamed = list(client.stream([1, 2], 6, stop=stop, temperature=0))
        assert "".join(t.text for t in streamed) == whole.text, stop
        assert [t.id for t in streamed] == whole.token_ids
    assert whole.text == "".join(f"<{1002 + k}>" for k in range(6))  # (nothing held at the end)
    client.close()


def test_a_chat_whose_stream_was_left_early_goes_on_from_the_last_token_read() -> None:
    """The swarm runs ahead of a stream's reader: left early, the session holds tokens
    nobody read (the next call once fed them on without a word, so the text it continued
    was not the one its user saw; then it refused to go on). Its next call opens the
    session again and feeds the text as read, from position 0."""
    client = FakeClient(step_s=0.005)
    with client.session(temperature=0) as chat:
        for k, _ in enumerate(chat.stream([1, 2], 20)):
            if k == 2:
                break  # (three tokens read: 1002, 1003, 1004)
        assert len(client.sessions[0].fed) > 3  # (the swarm drew past them)
        assert chat.generate("", 2).token_ids == [1005, 1006]
        assert chat.generate([7], 1).token_ids == [1008]
    first, again = client.sessions
    assert first.closed and again.closed
    assert again.fed == [([1, 2, 1002, 1003, 1004], 0), ([1005], 5), ([1006, 7], 6)]
    with client.session(temperature=0) as chat:  # read to its end: it goes on
        assert len(list(chat.stream([1, 2], 3))) == 3
        for k, _ in enumerate(chat.stream("", 3)):
            if k == 2:
                break  # (at its last token: nothing was drawn past it)
        assert len(chat.generate("", 2).token_ids) == 2
    client.close()


def test_a_chat_goes_on_from_its_text_cut_before_a_stop_string() -> None:
    """The tokens that drew a stop string are not in the result's text: a chat's next call
    once went on from them all the same, continuing text its user never saw. It starts
    again from the text as cut (what it holds of a token cut through: encoded again)."""
    client = FakeClient()
    with client.session(temperature=0) as chat:
        first = chat.generate([1, 2], 10, stop="1004")
        assert first.text == "<1002><1003><" and first.token_ids == [1002, 1003, 1004]
        assert chat.generate("", 2).token_ids == [1005, 1006]
        assert chat.generate("", 1, stop="nowhere").token_ids == [1007]  # (nothing cut)
    first_session, again = client.sessions
    assert first_session.fed[-1] == ([1003], 3)  # (1004 drew the stop string, never fed)
    assert again.fed == [([1, 2, 1002, 1003, ord("<")], 0), ([1005], 5), ([1006], 6)]


def test_a_texts_ids_hold_what_it_holds_of_its_tokens() -> None:
    """``seen_ids``, on GPT-2's tokenizer: for every cut of a text (inside a token, inside a
    character that tokens split, at a special token's name written as text), the ids of
    what is left decode to exactly it, and the tokens it holds whole are kept as drawn."""
    enc = gpt2_encoding()
    text = "Héllo wörld, 😀 naïve king<|endoftext|>日本語 end"
    generated = enc.encode(text, disallowed_special=())
    assert enc.decode(generated) == text

    def held_whole(cut: str) -> int:  # how many tokens the cut text holds, whole
        def fits(k: int) -> bool:
            held = enc.decode_bytes(generated[:k])
            return cut.encode().startswith(held) and held.decode(errors="ignore").encode() == held

        return max(k for k in range(len(generated) + 1) if fits(k))

    for cut in range(len(text) + 1):
        seen = seen_ids(enc, generated, text[:cut])
        assert enc.decode(seen) == text[:cut], cut
        whole = held_whole(text[:cut])
        assert seen[:whole] == generated[:whole], cut
    pieces = [enc.decode_single_token_bytes(t) for t in generated]
    assert any(p.decode(errors="ignore").encode() != p for p in pieces)  # (a character split)
    assert enc.eot_token not in seen_ids(enc, generated, text)  # (the name, as text)


def test_a_generation_that_fills_the_context_says_so() -> None:
    client = FakeClient()  # a context of 64 positions
    result = client.generate([1, 2, 3], 1000, temperature=0)
    assert result.stop_reason == "context"
    assert len(result.token_ids) == 64 - 3 + 1  # the last one sampled at the last position
    assert client.generate([1, 2, 3], 5, temperature=0).stop_reason == "max_new_tokens"
    with client.session(temperature=0, max_length=8) as chat:  # a session's own positions
        assert chat.generate([1, 2, 3], 100).stop_reason == "context"


def test_breaking_out_of_a_stream_stops_the_generation() -> None:
    client = FakeClient(step_s=0.005)
    seen = []
    for token in client.stream([1, 2], 1000):
        seen.append(token.id)
        if len(seen) == 3:
            break
    session = client.sessions[0]
    assert seen == [1002, 1003, 1004]
    assert session.closed and len(session.fed) <= 5  # stopped at its next token, not 1000
    client.close()


def test_ctrl_c_in_a_sync_call_stops_the_generation_and_closes_its_session() -> None:
    client = FakeClient(step_s=0.05)  # 62 steps to the context's end: about 3 s

    def ctrl_c_at_the_third_token(token: Token) -> None:
        if token.id == 1004:
            _thread.interrupt_main()  # as if Ctrl-C were pressed in the waiting thread

    # Python's own Ctrl-C handler, whatever an earlier test in this process installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            client.generate([1, 2], 1000, on_token=ctrl_c_at_the_third_token)
    finally:
        signal.signal(signal.SIGINT, previous)
    session = client.sessions[0]
    steps = len(session.fed)
    time.sleep(0.2)
    assert session.closed and len(session.fed) == steps < 62  # stopped, and for good
    client.close()
    client.close()  # twice is fine


def test_the_sync_client_runs_every_stream_on_its_one_loop_thread() -> None:
    client = FakeClient(step_s=0.001)
    before = set(threading.enumerate())
    streams = [client.stream([1, 2], 5) for _ in range(4)]
    assert [[t.id for t in s] for s in streams] == [[1002, 1003, 1004, 1005, 1006]] * 4
    assert not set(threading.enumerate()) - before  # no thread per stream
    client.close()


def test_closing_an_async_stream_stops_the_generation() -> None:
    core = FakeCore(step_s=0.005)

    async def main() -> list[int]:
        stream = core.stream([1, 2], 1000)
        seen = [(await stream.__anext__()).id for _ in range(3)]
        await stream.aclose()  # type: ignore[attr-defined]
        return seen

    assert asyncio.run(main()) == [1002, 1003, 1004]
    assert core.sessions[0].closed and len(core.sessions[0].fed) <= 5


def test_sampling_params_are_what_the_wire_carries() -> None:
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=123)
    assert params.temperature == float32(0.7) != 0.7
    assert sampling_from_wire(sampling_to_wire(params)) == params  # nodes divide by the same
    assert sampling_from_wire(pb.SamplingParams(temperature=0.5)).top_p == 1.0


# ---- the client's session over a scripted node ------------------------------------------


class ScriptedNode(pb_grpc.NodeServicer):
    """A one-stage node serving every unit, keeping only a length and its last step, as a
    real node does: the same (step_id, pos) again is answered again; another step at a
    position it does not hold gets FAILED_PRECONDITION with its length."""

    def __init__(self) -> None:
        self.length = 0
        self.last: tuple[int, int, int] | None = None  # (step_id, pos, token)
        self.log: list[tuple[int, int, int, bool]] = []  # (step_id, pos, n, sample)
        self.drop_at: set[int] = set()  # compute, then lose the answer (stream breaks)
        self.hang_at: dict[int, float] = {}  # compute, then answer after this many seconds
        self.rewind_at: dict[int, int] = {}  # lose every position from this length on
        self.slow_from: int | None = None  # steps from this position on take 5 ms, not 1
        self.closed: list[bytes] = []
        self.extra_traces = 0  # traces it adds to each reply (a lying node's)
        self.timeouts: list[int] = []  # the timeout_ms of every Open and step it got
        self.quota: tuple[str, str] | None = None  # refuse everything: (message, retry after)
        self.opening = threading.Event()  # set once an Open arrived ...
        self.open_after = threading.Event()  # ... which is answered once this is set
        self.open_after.set()
        self.closing, self.close_after = threading.Event(), threading.Event()  # (as for Open)
        self.close_after.set()

    def Open(self, request: pb.OpenRequest, context: Any) -> pb.OpenReply:
        self.timeouts.append(request.timeout_ms)
        self.opening.set()
        self.open_after.wait()
        self.refuse_if_over_quota(context)
        return pb.OpenReply(length=self.length)

    def Close(self, request: pb.CloseRequest, context: Any) -> pb.CloseReply:
        self.closing.set()
        self.close_after.wait()
        self.closed.append(request.session_id)
        return pb.CloseReply(closed=True)

    def Steps(self, requests: Any, context: Any) -> Any:
        for req in requests:
            n = len(req.tokens.ids)
            self.timeouts.append(req.timeout_ms)
            self.refuse_if_over_quota(context)
            self.log.append((req.step_id, req.pos, n, req.sample))
            if self.last is not None and self.last[:2] == (req.step_id, req.pos):
                yield pb.StepReply(has_token=True, token=self.last[2])
                continue
            if req.pos in self.rewind_at:
                self.length = self.rewind_at.pop(req.pos)
            if req.pos != self.length:
                context.set_trailing_metadata(((rpc.KV_LENGTH_KEY, str(self.length)),))
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"holds {self.length}")
            self.length += n
            self.last = (req.step_id, req.pos, answer(req.pos + n))
            if req.pos in self.drop_at:
                self.drop_at.discard(req.pos)
                context.abort(grpc.StatusCode.UNAVAILABLE, "the answer was lost")
            time.sleep(self.hang_at.pop(req.pos, 0.0))
            slow = self.slow_from is not None and req.pos >= self.slow_from
            trace = pb.HopTrace(compute_ms=5.0 if slow else 1.0)
            extra = [pb.HopTrace(address="10.9.9.9:1") for _ in range(self.extra_traces)]
            yield pb.StepReply(has_token=True, token=self.last[2], hops=[trace, *extra])

    def refuse_if_over_quota(self, context: Any) -> None:
        if self.quota is not None:  # as a node's quota refuses (rpc.trailing_metadata_of)
            message, after = self.quota
            context.set_trailing_metadata(((rpc.QUOTA_KEY, after),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


@contextlib.contextmanager
def scripted_node() -> Iterator[ScriptedNode]:
    servicer = ScriptedNode()
    server = grpc.server(futures.ThreadPoolExecutor(4, thread_name_prefix="scripted-node"))
    pb_grpc.add_NodeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    try:
        yield servicer
    finally:
        servicer.open_after.set()  # (a call a test held is let go, even if the test failed)
        servicer.close_after.set()
        server.stop(0)


@pytest.fixture
def node() -> Iterator[ScriptedNode]:
    with scripted_node() as servicer:
        yield servicer


def session_on(node: ScriptedNode, timeout_s: float = 10.0) -> RouteSession:
    """A session along a fixed route of one node: failures are retried on the same node."""
    route = Route([pb.Hop(start=0, end=3, addresses=[node.address])], 3)
    retry = RetryPolicy(attempts=3, backoff_s=0.01)
    return RouteSession(route, 32, retry=retry, timeout_s=timeout_s)


def run(session: RouteSession, prompt: list[int], n: int) -> list[int]:
    tokens = [session.step(prompt, 0).token]
    while len(tokens) < n:
        tokens.append(session.step([tokens[-1]], len(prompt) + len(tokens) - 1).token)
    return tokens


def attempts_at(node: ScriptedNode, pos: int) -> list[int]:
    """Step ids of the generation's steps at ``pos`` (not refills: those do not sample)."""
    return [step_id for step_id, p, _, sample in node.log if p == pos and sample]


def test_a_lost_answer_is_asked_again_with_the_same_step_id(node: ScriptedNode) -> None:
    node.drop_at = {4}
    session = session_on(node)
    assert run(session, [1, 2, 3], 4) == [1003, 1004, 1005, 1006]
    first, again = attempts_at(node, 4)
    assert first == again  # the node ran it once and answered the retry from what it kept
    assert node.length == 6 and [r.kind for r in session.recoveries] == ["retry"]
    assert node.closed == []  # its own session on the same node: not closed behind it
    ids = [step_id for step_id, *_ in node.log if step_id != first]
    assert len(set(ids)) == len(ids)  # every other step has an id of its own
    sid = session.session.session_id
    session.close()
    assert node.closed == [sid]


def test_a_rewound_first_hop_is_refilled_then_asked_again(node: ScriptedNode) -> None:
    node.rewind_at = {5: 2}  # at the step at 5 the node holds only 2 positions
    session = session_on(node)
    assert run(session, [1, 2, 3], 4) == [1003, 1004, 1005, 1006]
    refills = [(p, n) for _, p, n, sample in node.log if not sample]
    assert refills == [(2, 1), (3, 1), (4, 1)]  # the prompt chunk cut at 2, then each token
    first, again = attempts_at(node, 5)
    assert first == again
    (recovery,) = session.recoveries
    assert recovery.kind == "repair" and f"refilled {node.address} from 2 to 5" in recovery.detail
    session.close()


def test_a_silent_first_hop_times_out_and_its_answer_is_not_lost(node: ScriptedNode) -> None:
    node.hang_at = {3: 8.0}
    session = session_on(node, timeout_s=0.3)
    started = time.monotonic()
    assert run(session, [1, 2, 3], 3) == [1003, 1004, 1005]
    assert time.monotonic() - started < 6  # did not wait for the hung answer
    first, again = attempts_at(node, 3)
    assert first == again
    (recovery,) = session.recoveries
    assert recovery.kind == "retry" and "within 0.3 s" in recovery.detail
    session.close()


def test_a_step_deadline_names_the_node_and_the_link_goes_on(node: ScriptedNode) -> None:
    """The hop protocol alone: a deadline is an asyncio timeout (no thread), the error
    names the node, and the next step on the same link opens a new stream."""
    node.hang_at = {1: 3.0}

    async def main() -> tuple[Unavailable, int]:
        channels = Channels()
        spec = pb.SessionSpec(session_id=b"s" * 16, max_length=8, codec="fp32")
        hop = pb.Hop(start=0, end=3, addresses=[node.address])
        link = NextHop(channels, spec, [hop], token_replay(), timeout_s=30)
        await link.open()
        sid = spec.session_id
        first = pb.StepRequest(session_id=sid, step_id=1, pos=0, tokens=pb.Tokens(ids=[1]))
        await link.step(first)
        request = pb.StepRequest(session_id=sid, step_id=2, pos=1, tokens=pb.Tokens(ids=[1]))
        link.timeout_s = 0.2  # the step that hangs: the deadline is what is tested
        threads = set(threading.enumerate())
        with pytest.raises(Unavailable, match=r"127\.0\.0\.1:\d+.*within 0\.2 s") as err:
            await link.step(request)
        new = set(threading.enumerate()) - threads
        assert not [t for t in new if not t.name.startswith("scripted-node")]  # no deadline thread
        link.timeout_s = 30
        reply, _ = await link.step(request)  # answered from what the node kept
        await channels.close()
        return err.value, reply.token

    error, token = asyncio.run(main())
    assert error.failed == [node.address] and token == answer(2)


def test_a_hop_whose_steps_slow_down_moves_to_a_replica() -> None:
    """A first hop held by two nodes: when the one in use takes 5 ms a decode step where it
    took 1, the next step goes to the other, refilled from the token ids (same tokens), the
    session on the slow one is freed, and the move shows among the recoveries."""
    with scripted_node() as slow, scripted_node() as spare:
        slow.slow_from = 14  # its owner starts a game at position 14
        hop = pb.Hop(start=0, end=3, addresses=[slow.address, spare.address])
        session = RouteSession(Route([hop], 3), 64, retry=RetryPolicy(attempts=3, backoff_s=0.01))
        assert run(session, [1, 2, 3], 30) == [answer(p) for p in range(3, 33)]
        # its first pace over 8 decode steps (positions 3-10), its pace now over the last 5:
        # at 16 three of them took 5 ms, and the step at 17 went to the spare
        assert max(pos for _, pos, _, sample in slow.log if sample) == 16
        moved = [r for r in session.recoveries if "left" in r.detail]
        assert len(moved) == 1 and moved[0].kind == "repair"
        assert f"left {slow.address}: its decode steps took 5.0 x" in moved[0].detail
        assert f"refilled {spare.address} from 0 to 17" in moved[0].detail
        assert spare.length == 3 + 29 and slow.closed == [session.session.session_id]
        session.close()


def test_a_slowdown_every_hop_shares_moves_nothing() -> None:
    """A link's pace rule divides out what the other paces share: when the node it steps
    on and the hops after it (or the link's owner) all slow down 4 x together — a busy
    swarm, or nodes sharing a machine — nobody is left; when only that node does, it is."""
    hop = pb.Hop(start=0, end=3, addresses=["10.0.0.1:1", "10.0.0.2:1"])
    after = pb.Hop(start=3, end=6, addresses=["10.0.0.9:1"])

    def run_link(after_ms: float, own_ms: float | None = None, later: bool = True) -> NextHop:
        link = NextHop(Channels(), pb.SessionSpec(session_id=b"s"), [hop, after],
                       token_replay(), timeout_s=1.0)  # fmt: skip
        for pos in range(20):
            slow = pos >= 10
            reply = pb.StepReply(
                hops=[pb.HopTrace(address="10.0.0.1:1", compute_ms=4.0 if slow else 1.0)]
            )
            if later:
                reply.hops.add(address="10.0.0.9:1", compute_ms=after_ms if slow else 1.0)
            request = pb.StepRequest(pos=pos, tokens=pb.Tokens(ids=[1]))
            own = None if own_ms is None else (own_ms if slow else 1.0)
            link._paced("10.0.0.1:1", request, reply, own)
        return link

    assert run_link(after_ms=4.0).slowed == {}  # the hop after it slowed as much
    assert run_link(after_ms=1.0, own_ms=4.0, later=False).slowed == {}  # the owner did
    assert run_link(after_ms=1.0).slowed == {"10.0.0.1:1": 4.0}  # only it did
    assert run_link(after_ms=1.0, own_ms=1.0, later=False).slowed == {"10.0.0.1:1": 4.0}


def test_a_link_takes_paces_only_from_the_hops_of_its_route() -> None:
    """A trace is a peer's word: addresses outside the route and NaN or negative times are
    not followed, so a lying next hop cannot grow a link's memory or steer its moves."""
    hop = pb.Hop(start=0, end=3, addresses=["10.0.0.1:1"])
    after = pb.Hop(start=3, end=6, addresses=["10.0.0.9:1"])
    link = NextHop(Channels(), pb.SessionSpec(session_id=b"s"), [hop, after], token_replay(),
                   timeout_s=1.0)  # fmt: skip
    for pos in range(20):
        reply = pb.StepReply(hops=[pb.HopTrace(address="10.0.0.1:1", compute_ms=float("nan"))])
        reply.hops.add(address="10.0.0.9:1", compute_ms=-5.0)
        for i in range(50):
            reply.hops.add(address=f"10.1.{pos}.{i}:1", compute_ms=1.0)
        link._paced("10.0.0.1:1", pb.StepRequest(pos=pos, tokens=pb.Tokens(ids=[1])), reply, None)
    assert list(link.others) == ["10.0.0.9:1"]
    assert not link.others["10.0.0.9:1"].first and not link.pace.first


LINK_SESSION = b"l" * 16


def test_a_link_tries_the_node_it_left_for_slowness_before_one_that_failed() -> None:
    """A link that left c for slowness, for c2, then c2 hangs: the next try of the step goes
    to c, not to c2 again (it was: the current node stayed first, each try spent its time
    on c2 and had none left for c; CI saw the hung-hop test give up after 3 such tries)."""
    hop = pb.Hop(start=4, end=6, addresses=["c:1", "c2:1", "c3:1"])
    link = NextHop(Channels(), pb.SessionSpec(session_id=b"s"), [hop], token_replay(),
                   timeout_s=1.0)  # fmt: skip
    assert link.candidates() == ["c:1", "c2:1", "c3:1"]
    link.address, link.slowed = "c2:1", {"c:1": 4.0}  # (moved to c2: c was slow)
    assert link.candidates() == ["c2:1", "c3:1", "c:1"]
    link.given_up.add("c2:1")  # then c2 failed
    assert link.candidates() == ["c3:1", "c:1", "c2:1"]
    link.given_up.add("c3:1")
    assert link.candidates() == ["c:1", "c2:1", "c3:1"]  # (failed ones last, in route order)


async def link_on(node: ScriptedNode, channels: Channels) -> NextHop:
    """An open link to ``node`` alone (a one-hop route), for session ``LINK_SESSION``."""
    spec = pb.SessionSpec(session_id=LINK_SESSION, max_length=8, codec="fp32")
    hop = pb.Hop(start=0, end=3, addresses=[node.address])
    link = NextHop(channels, spec, [hop], token_replay(), timeout_s=30)
    await link.open()
    return link


def token_step(step_id: int, pos: int) -> pb.StepRequest:
    return pb.StepRequest(
        session_id=LINK_SESSION, step_id=step_id, pos=pos, tokens=pb.Tokens(ids=[1])
    )


def test_a_node_left_while_out_of_reach_frees_the_session_once_back() -> None:
    """A link that leaves a node it cannot reach (hung, cut off) closes the session there
    once the node answers again: the close waits for it. It was dropped at once, and a
    node back from a hang kept the session, and its KV memory, until its TTL."""
    gone = ScriptedNode()

    def serve(port: int) -> tuple[grpc.Server, int]:
        server = grpc.server(futures.ThreadPoolExecutor(4, thread_name_prefix="scripted-node"))
        pb_grpc.add_NodeServicer_to_server(gone, server)
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        return server, bound

    server, port = serve(0)
    address = f"127.0.0.1:{port}"

    async def main() -> None:
        with scripted_node() as spare:
            channels = Channels()
            spec = pb.SessionSpec(session_id=LINK_SESSION, max_length=8, codec="fp32")
            hop = pb.Hop(start=0, end=3, addresses=[address, spare.address])
            link = NextHop(channels, spec, [hop], token_replay(), timeout_s=30)
            await link.open()
            assert link.address == address
            server.stop(0)  # out of reach: the step goes to the spare (opened there)
            reply, _ = await link.step(token_step(1, 0))
            assert reply.token == answer(1) and link.address == spare.address
            await asyncio.sleep(1.0)  # (what gave the close up before)
            back, _ = await asyncio.to_thread(serve, port)
            try:
                for _ in range(300):  # (gRPC's reconnection backoff: seconds)
                    if gone.closed:
                        break
                    await asyncio.sleep(0.1)
                assert gone.closed == [LINK_SESSION]
            finally:
                back.stop(0)
                await channels.close()

    asyncio.run(main())


def test_a_reply_with_more_traces_than_hops_counts_against_its_node(
    node: ScriptedNode,
) -> None:
    """A node answering more traces than there are hops from it on is failing: the link
    leaves it (here: no replica, so the hop is unreachable, naming it)."""
    node.extra_traces = 3

    async def main() -> None:
        channels = Channels()
        link = await link_on(node, channels)
        with pytest.raises(Unavailable, match="4 traces for the 1 hops") as err:
            await link.step(token_step(1, 0))
        assert err.value.failed == [node.address]
        await channels.close()

    asyncio.run(main())


def test_an_open_given_up_midway_is_closed_where_it_went(node: ScriptedNode) -> None:
    """An owner that gives a session up while its link's open is on its way (a node's own
    open cancelled by its caller) abandons the link: the node it asked, which may have
    opened the session, is told to close it (with the hops after it), in the background."""
    node.open_after.clear()

    async def main() -> None:
        channels = Channels()
        spec = pb.SessionSpec(session_id=LINK_SESSION, max_length=8, codec="fp32")
        link = NextHop(
            channels,
            spec,
            [pb.Hop(start=0, end=3, addresses=[node.address])],
            token_replay(),
            timeout_s=30,
        )
        opening = asyncio.ensure_future(link.open())
        await asyncio.to_thread(node.opening.wait, 10)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        link.abandon()
        node.open_after.set()  # (the node opens it after all)
        for _ in range(100):
            if node.closed:
                break
            await asyncio.sleep(0.05)
        assert node.closed == [LINK_SESSION]
        await channels.close()

    asyncio.run(main())


def test_a_session_given_up_past_a_dead_node_is_closed_on_the_hops_after_it() -> None:
    """A close goes to the link's node, which passes it on. When that node is gone (its
    owner gives the session up on a reroute), the nodes after it held the session, and its
    KV memory, until their TTL (5 minutes; a repair found no room on one meanwhile): each
    node of the later hops is now told directly."""
    spec = pb.SessionSpec(session_id=LINK_SESSION, max_length=8, codec="fp32")

    async def main() -> None:
        channels = Channels()
        with scripted_node() as later:
            with scripted_node() as first:
                route = [
                    pb.Hop(start=0, end=3, addresses=[first.address]),
                    pb.Hop(start=3, end=5, addresses=[later.address, "127.0.0.1:1"]),
                ]
                alive = NextHop(channels, spec, route, token_replay(), timeout_s=30)
                await alive.open()
                await alive.close()  # (the node answers: the rest is its to pass on)
                assert first.closed == [LINK_SESSION] and later.closed == []
                dead = NextHop(channels, spec, route, token_replay(), timeout_s=30)
                await dead.open()
            await dead.close(timeout_s=5)  # (its node stopped)
            assert later.closed == [LINK_SESSION]
        await channels.close()

    asyncio.run(main())


def test_a_close_its_owner_gives_up_on_is_seen_through(node: ScriptedNode) -> None:
    """An owner cancelled while its link closes the session (Ctrl-C right after the last
    token) is cancelled once the node answered the close, not before: the session does
    not stay open on the route until the nodes' TTL."""
    node.close_after.clear()

    async def main() -> None:
        channels = Channels()
        link = await link_on(node, channels)
        closing = asyncio.ensure_future(link.close())
        await asyncio.to_thread(node.closing.wait, 10)
        closing.cancel()
        await asyncio.sleep(0.3)
        assert not closing.done()  # waiting for the node's answer
        node.close_after.set()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert node.closed == [LINK_SESSION]
        await channels.close()

    asyncio.run(main())


def test_a_step_carries_how_long_its_caller_waits(node: ScriptedNode) -> None:
    """Open and every step say how long the link waits for them (what is left of its
    deadline); a step whose time is up before any node could be asked blames no node."""

    async def main() -> None:
        channels = Channels()
        link = await link_on(node, channels)  # (its timeout_s: 30)
        await link.step(token_step(1, 0), timeout_s=5.0)
        opened, stepped = node.timeouts
        assert 29_000 < opened <= 30_000 and 4_000 < stepped <= 5_000
        with pytest.raises(Unavailable, match="had no time left to ask") as err:
            await link.step(token_step(2, 1), timeout_s=0.0)
        assert err.value.failed == [] and len(node.timeouts) == 2  # never sent
        await channels.close()

    asyncio.run(main())


def test_a_quota_refusal_reaches_the_caller_at_once_and_names_no_node_gone() -> None:
    """Every node of the first hop refuses for a quota: the session is not re-planned
    around them (they are there) and the caller gets the refusal, with the soonest time
    any of them gave; a refusal mid-generation the same, without a retry."""
    with scripted_node() as a, scripted_node() as b:
        a.quota = ("quota: open sessions per client is 2", "")
        b.quota = ("quota: open sessions per client is 1", "")
        route = Route([pb.Hop(start=0, end=3, addresses=[a.address, b.address])], 3)
        plans: list[list[str]] = []

        def planner(avoid: list[str]) -> Route:
            plans.append(avoid)
            return route

        with pytest.raises(QuotaExceeded, match=r"refused the client.*per client is 2") as err:
            RouteSession(None, 32, planner=planner)
        assert plans == [[]] and err.value.retry_after_s is None
        assert len(a.timeouts) == len(b.timeouts) == 1  # each asked once

        a.quota = b.quota = None
        session = RouteSession(None, 32, planner=planner)
        session.step([1, 2, 3], 0)
        a.quota = ("quota: tokens per minute per client is 3: retry in 40 s", "40.000")
        b.quota = ("quota: tokens per minute per client is 3: retry in 12 s", "12.000")
        with pytest.raises(QuotaExceeded, match="tokens per minute") as err:
            session.step([1003], 3)
        assert err.value.retry_after_s == 12.0 and session.recoveries == []
        assert plans == [[], []]  # no new route asked for
        session.close()


def test_a_search_stopped_by_one_call_does_not_stop_the_next() -> None:
    """A connect given up on (a timeout, Ctrl-C) stops its mDNS search; a later call
    searches again for its whole time instead of failing at once."""

    async def main() -> None:
        client = AsyncClient(mdns_interfaces=["127.0.0.1"], swarm=f"none-{os.getpid()}")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.connect(), 0.5)
        started = time.monotonic()
        with pytest.raises(NotFound, match="answered on mDNS within 5 s"):
            await client.connect()
        assert time.monotonic() - started >= 4.0  # it searched (5 s), not stopped at once
        await client.close()

    asyncio.run(main())


def test_waiting_for_a_first_route_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    """A swarm with no route yet (a coordinator just started): the session waits for one,
    and says so once, not silently for up to 20 s."""
    with scripted_node() as node:
        route = Route([pb.Hop(start=0, end=3, addresses=[node.address])], 3)
        plans: list[list[str]] = []

        def planner(avoid: list[str]) -> Route:
            plans.append(avoid)
            if len(plans) < 3:
                raise Unavailable("no ready node serves units [0, 3)", [])
            return route

        with caplog.at_level(logging.WARNING, logger="nanoshard.client.session"):
            session = RouteSession(None, 32, planner=planner)
        session.close()
    said = [r.getMessage() for r in caplog.records]
    assert len(plans) == 3 and len(said) == 1, said
    assert said[0].startswith("no route yet (no ready node serves units [0, 3)): waiting up to ")


def test_a_node_given_too_little_of_a_step_is_not_blamed_for_its_silence() -> None:
    """As a node's own deadline runs out, the node it was asking is named silent only if
    it had a fair try (``FAIR_TRY_S``): a replica left with a fraction of a second after a
    refill is not blamed, and the link does not give up on it."""
    with scripted_node() as late, scripted_node() as silent:
        late.hang_at = {1: 1.0}
        silent.hang_at = {0: 3.0}

        async def main() -> None:
            channels = Channels()
            link = await link_on(late, channels)
            await link.step(token_step(1, 0))
            with pytest.raises(Unavailable, match="time ran out asking") as err:
                await link.step(token_step(2, 1), timeout_s=0.3)
            assert err.value.failed == [] and not link.given_up
            other = await link_on(silent, channels)
            with pytest.raises(Unavailable, match="no answer") as err:
                await other.step(token_step(1, 0), timeout_s=hop_module.FAIR_TRY_S + 0.2)
            assert err.value.failed == [silent.address] and other.given_up == {silent.address}
            await channels.close()

        asyncio.run(main())


def test_a_node_gives_the_hops_after_it_less_time_than_its_caller_gives_it() -> None:
    assert hop_module.onward_timeout(0, 120.0) == 120.0  # unsaid: the node's own limit
    assert hop_module.onward_timeout(60_000, 120.0) == pytest.approx(60 * hop_module.HOP_SHARE)
    assert hop_module.onward_timeout(600_000, 120.0) == 120.0  # never past its own limit
    budgets = [60.0]
    for _ in range(5):  # down a route: each hop's caller gives up after the hop itself
        budgets.append(hop_module.onward_timeout(round(budgets[-1] * 1000), 120.0))
    assert budgets == sorted(budgets, reverse=True) and len(set(budgets)) == 6


def test_a_peer_cut_for_an_unanswered_ping_is_named_hung_and_a_relayed_one_is_not() -> None:
    """gRPC's "ping timeout" (the connection to a hung peer cut) names that peer in words a
    volunteer reads; an UNAVAILABLE a node relays (the hops behind it) keeps its own."""
    cut = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
        "Stream removed (ping timeout)",
    )  # fmt: skip
    err = rpc.error_from_rpc(cut, "10.0.0.7:7001")
    assert isinstance(err, Unavailable) and err.failed == ["10.0.0.7:7001"]
    assert f"no answer to a ping in {rpc.PING_TIMEOUT_S} s: hung" in str(err)
    relayed = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
        grpc.aio.Metadata((rpc.FAILED_KEY, "10.0.0.9:7001")),
        "units [4, 6) unreachable from 10.0.0.7:7001: Stream removed (ping timeout)",
    )  # fmt: skip
    err = rpc.error_from_rpc(relayed, "10.0.0.7:7001")
    assert err.failed == ["10.0.0.9:7001"] and "no answer to a ping" not in str(err)
    assert ("grpc.http2.ping_timeout_ms", rpc.PING_TIMEOUT_S * 1000) in rpc.channel_options()
    # (a coordinator's channel carries weights: a slow link's queue must not cut it)
    bulk = rpc.channel_options(ping_timeout_s=rpc.BULK_PING_TIMEOUT_S)
    assert ("grpc.http2.ping_timeout_ms", rpc.BULK_PING_TIMEOUT_S * 1000) in bulk


def test_channels_past_their_bound_never_cut_a_live_stream(
    node: ScriptedNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Routes naming many addresses push old channels out, but never one a session is
    stepping on: its stream goes on; an idle channel goes instead."""
    monkeypatch.setattr(hop_module, "MAX_CHANNELS", 2)

    async def main() -> None:
        channels = Channels()
        link = await link_on(node, channels)
        await link.step(token_step(1, 0))
        for i in range(1, 6):  # newcomers: each evicts the oldest idle channel
            channels.stub(f"127.0.0.1:{i}")
        assert node.address in channels._channels and len(channels._channels) == 2
        reply, repair = await link.step(token_step(2, 1))
        assert reply.token == answer(2) and repair == ""
        await link.close()
        await channels.close()
        assert not channels._streams  # the stream's end was counted

    asyncio.run(main())


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_a_bad_check_rate_is_refused_before_anything_connects(rate: float) -> None:
    with pytest.raises(InvalidArgument, match="spot-check rate"):
        Client("127.0.0.1:1", check_rate=rate)


# ---- bad input: a clear error, and nothing lost --------------------------------------------


def test_a_bad_argument_leaves_a_chat_session_able_to_go_on() -> None:
    """Arguments are checked before anything is sent: the session is not broken by them."""
    client = FakeClient()
    with client.session(temperature=0) as chat:
        assert chat.generate([1, 2], 3).token_ids == [1002, 1003, 1004]
        for bad in [{"max_new_tokens": 0}, {"max_new_tokens": 2.5}, {"stop": 5}]:
            with pytest.raises(InvalidArgument):
                chat.generate([7], **bad)
        with pytest.raises(InvalidArgument, match="prompt"):
            chat.generate(None, 3)  # type: ignore[arg-type]
        for ids in ([-1], [client.config.vocab_size]):  # (checked on every call, not the first)
            with pytest.raises(InvalidArgument, match="outside the vocabulary"):
                chat.generate(ids, 3)
        again = chat.generate([7], 2)
        assert again.token_ids == [1006, 1007]
    # nothing of the refused calls reached the nodes; the next call went on from position 4
    assert client.sessions[0].fed == [
        ([1, 2], 0),
        ([1002], 2),
        ([1003], 3),
        ([1004, 7], 4),
        ([1006], 6),
    ]
    client.close()


@pytest.mark.parametrize(
    ("args", "options", "named"),
    [
        ((None, 3), {}, "prompt must be a str or a list of token ids"),
        ((5, 3), {}, "prompt must be a str or a list of token ids"),
        ((b"abc", 3), {}, "prompt must be a str or a list of token ids"),  # not ids 97, 98, 99
        ((["a"], 3), {}, "token id must be an integer"),
        (([1.7], 3), {}, "token id must be an integer, got 1.7"),  # not token 1
        (([True], 3), {}, "token id must be an integer"),
        (([1], 3), {"temperature": "hot"}, "temperature must be a number"),
        (([1], 3), {"temperature": None}, "temperature must be a number"),
        (([1], 3), {"top_k": "5"}, "top_k must be an integer"),
        (([1], 3), {"top_p": "x"}, "top_p must be a number"),
        (([1], 3), {"seed": "x"}, "seed must be an integer"),
        (([1], 3), {"seed": 1.5}, "seed must be an integer"),
        (([1], 2.5), {}, "max_new_tokens must be an integer"),
        (([1], "3"), {}, "max_new_tokens must be an integer"),
        (([1], None), {}, "max_new_tokens must be an integer"),
        (([1], True), {}, "max_new_tokens must be an integer"),
        (([1], 0), {}, "max_new_tokens must be >= 1"),
        (([1], 3), {"stop": 5}, "stop must be"),
        (([1], 3), {"stop": ["x", 3]}, "stop must be"),
        (([1], 3), {"stop": ""}, "stop must be"),  # "" would stop every generation at once
    ],
)
def test_a_wrong_argument_is_an_invalid_argument_before_any_session_opens(
    args: tuple[Any, ...], options: dict[str, Any], named: str
) -> None:
    client = FakeClient()
    with pytest.raises(InvalidArgument, match=named):
        client.generate(*args, **options)
    with pytest.raises(InvalidArgument, match=named):
        list(client.stream(*args, **options))
    assert client.sessions == []  # refused before a session opened on the nodes
    client.close()


def test_integers_and_numbers_of_numpy_and_torch_are_still_taken() -> None:
    client = FakeClient()
    result = client.generate(
        np.array([1, 2]),
        np.int64(2),
        temperature=np.float32(0.5),
        top_k=np.int64(5),
        seed=np.int64(7),
    )
    assert result.prompt_token_ids == [1, 2] and result.token_ids == [1002, 1003]
    assert client.generate(torch.tensor([1, 2]), 1).prompt_token_ids == [1, 2]
    with client.session(temperature=0) as chat:  # a session's calls too
        assert chat.generate(np.array([1, 2]), 1).prompt_token_ids == [1, 2]
    with pytest.raises(InvalidArgument, match="token id must be an integer"):
        client.generate(torch.tensor([1.0, 2.0]), 1)
    client.close()


@pytest.mark.parametrize("max_length", [0, -1, 65, 2.5, "8"])
def test_a_session_of_a_bad_length_is_refused(max_length: Any) -> None:
    client = FakeClient()  # a context of 64 positions
    with pytest.raises(InvalidArgument, match="max_length must be"):
        client.session(max_length=max_length)
    assert client.sessions == []
    with client.session(max_length=None) as chat:  # None: the whole context
        assert chat.core.max_length == 64
    with client.session(max_length=1) as chat:
        assert chat.core.max_length == 1
    client.close()


@pytest.mark.parametrize(
    ("coordinator", "options", "named"),
    [
        (1234, {}, "the coordinator .* is not HOST:PORT"),
        ("localhost", {}, "the coordinator .* is not HOST:PORT"),  # no port
        ("127.0.0.1:99999", {}, "the coordinator .* is not HOST:PORT"),
        ("[::1", {}, "the coordinator .* is not HOST:PORT"),
        (None, {"route": "127.0.0.1:1"}, "route must be a list"),  # not 11 one-character hops
        (None, {"route": []}, "route must be a list"),
        (None, {"route": ["127.0.0.1:1", "nowhere"]}, "a route's node .* is not HOST:PORT"),
        ("127.0.0.1:1", {"route": ["127.0.0.1:2"]}, "a coordinator or a route, not both"),
        ("127.0.0.1:1", {"timeout_s": 0}, "timeout_s must be a positive number"),
        ("127.0.0.1:1", {"timeout_s": -1}, "timeout_s must be a positive number"),
        ("127.0.0.1:1", {"timeout_s": float("inf")}, "timeout_s must be a positive number"),
        ("127.0.0.1:1", {"timeout_s": "5"}, "timeout_s must be a number"),
        ("127.0.0.1:1", {"codec": "bogus"}, "unknown codec 'bogus'"),
        ("127.0.0.1:1", {"retry": "x"}, "retry must be a RetryPolicy"),
        ("127.0.0.1:1", {"check_rate": "all"}, "check_rate must be a number"),
    ],
)
def test_a_bad_client_option_is_refused_before_anything_connects(
    coordinator: Any, options: dict[str, Any], named: str
) -> None:
    threads = set(threading.enumerate())
    with pytest.raises(InvalidArgument, match=named):
        Client(coordinator, **options)
    assert set(threading.enumerate()) <= threads  # no loop thread left behind


def test_a_misspelt_client_option_is_named_as_written() -> None:
    with pytest.raises(
        TypeError, match=r"^Client\(\) got an unexpected keyword argument 'timeout'"
    ):
        Client("127.0.0.1:1", timeout=5)  # (timeout_s)


def test_good_addresses_are_taken() -> None:
    for address in ["127.0.0.1:7960", "node-1.local:0", "[::1]:65535"]:
        assert AsyncClient(address, check_rate=0)._where[0] == address
        assert AsyncClient(route=[address], check_rate=0)._where[1] == [address]


def test_a_closed_client_says_so_and_nothing_warns() -> None:
    client = FakeClient()
    chat = client.session(temperature=0)
    client.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for call in [
            lambda: client.generate([1, 2], 3),
            lambda: list(client.stream([1, 2], 3)),
            lambda: client.session(),
            lambda: chat.generate([1, 2], 3),
        ]:
            with pytest.raises(FailedPrecondition, match="client is closed"):
                call()
        gc.collect()
    assert [str(w.message) for w in caught] == []  # no "coroutine was never awaited"
    assert client.sessions[0].fed == []


def test_a_closed_async_client_says_so() -> None:
    core = FakeCore()

    async def main() -> None:
        chat = await core.session(temperature=0)
        await core.close()
        with pytest.raises(FailedPrecondition, match="client is closed"):
            await core.generate([1, 2], 3)
        with pytest.raises(FailedPrecondition, match="client is closed"):
            await core.session()
        with pytest.raises(FailedPrecondition, match="client is closed"):
            await chat.generate([1, 2], 3)

    asyncio.run(main())
    assert len(core.sessions) == 1 and core.sessions[0].fed == []


def test_a_peer_nothing_listens_at_is_named_so_not_in_grpcs_words() -> None:
    refused = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:17999: "
        "Failed to connect to remote host: Connection refused",
    )  # fmt: skip
    err = rpc.error_from_rpc(refused, "127.0.0.1:17999")
    assert isinstance(err, Unavailable) and err.failed == ["127.0.0.1:17999"]
    assert str(err) == (
        "127.0.0.1:17999: nothing listens there (connection refused): stopped, or not that port"
    )
    closed = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
        "Stream removed (Socket closed)",
    )  # fmt: skip
    assert str(rpc.error_from_rpc(closed, "127.0.0.1:17999")) == (
        "127.0.0.1:17999: the connection closed: it stopped, crashed or left "
        "(gRPC: Stream removed (Socket closed))"
    )
    cut = grpc.aio.AioRpcError(  # (a node stopping as a step was on its way: it left)
        grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(),
        "Internal error from Core",
    )  # fmt: skip
    err = rpc.error_from_rpc(cut, "127.0.0.1:17999")
    assert isinstance(err, Unavailable) and err.failed == ["127.0.0.1:17999"]
    assert str(err) == (
        "127.0.0.1:17999: the stream was cut: it stopped, crashed or left mid-call "
        "(gRPC: Internal error from Core)"
    )
    # a coordinator's call is labelled so (its own errors name nodes: not to be taken for
    # a node that failed), and still names the address that failed
    err = rpc.error_from_rpc(refused, "127.0.0.1:17999", "the coordinator at 127.0.0.1:17999")
    assert str(err).startswith("the coordinator at 127.0.0.1:17999: nothing listens there")
    assert isinstance(err, Unavailable) and err.failed == ["127.0.0.1:17999"]
    unknown = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
        "errors resolving nosuch.invalid:7960: [field:hostname lookup error:address lookup "
        "failed for nosuch.invalid:7960: Domain name not found]",
    )  # fmt: skip
    assert str(rpc.error_from_rpc(unknown, "nosuch.invalid:7960")) == (
        "nosuch.invalid:7960: nosuch.invalid does not resolve: no such host (a typo, or a name "
        "this network's DNS does not know)"
    )


def test_a_stream_dropped_under_a_step_fails_the_step_not_its_task(node: ScriptedNode) -> None:
    """The link's owner drops its stream while a step waits on it (at a node: the session
    was closed there meanwhile, its tensor-parallel group broken as placement gave it
    another stage): the step fails with UNAVAILABLE. It was cancelled, as if its own
    caller had left, and the node's stream handler then ended without a status: its
    client waited out its 60 s before it rerouted."""
    node.hang_at = {0: 5.0}  # (by position)

    async def main() -> None:
        channels = Channels()
        link = await link_on(node, channels)
        written = asyncio.Event()
        step = asyncio.ensure_future(link.step(token_step(1, 0), meanwhile=written.set))
        await written.wait()
        link.drop_stream()
        with pytest.raises(Unavailable, match="the client closed the session while its step"):
            await step
        await channels.close()

    asyncio.run(main())
