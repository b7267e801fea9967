"""The gateway's policy without I/O: request checks, the chat template, error statuses, and
streamed text (deltas that join to exactly the final text, whatever the token boundaries)."""

from __future__ import annotations

import codecs

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanoshard.api.protocol import (
    ApiError,
    Reply,
    chat_prompt,
    error_for,
    finish_reason,
    parse_chat,
    parse_completion,
)
from nanoshard.errors import (
    Internal,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from nanoshard.textstream import TextStream, final_text, held_back

# ---- streamed text ------------------------------------------------------------------


def stream_all(chunks: list[bytes], stops: list[str]) -> tuple[list[str], int]:
    """Feed chunks until the text stops; the deltas (with finish's) and how many were fed."""
    text = TextStream(stops)
    deltas, fed = [], 0
    for chunk in chunks:
        deltas.append(text.push(chunk))
        fed += 1
        if text.stopped:
            break
    deltas.append(text.finish())
    return deltas, fed


# Byte soup with multi-byte characters split anywhere, and stops made of the same alphabet.
ALPHABET = "ab\n é€😀"
texts = st.text(alphabet=ALPHABET, max_size=40)


@st.composite
def split_bytes(draw: st.DrawFn) -> list[bytes]:
    data = draw(texts).encode() + draw(st.binary(max_size=3))  # maybe a broken tail too
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@given(split_bytes(), st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=3))
def test_deltas_join_to_exactly_the_final_text(chunks: list[bytes], stops: list[str]) -> None:
    deltas, fed = stream_all(chunks, stops)
    assert "".join(deltas) == final_text(b"".join(chunks[:fed]), stops)


@given(split_bytes(), st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=3))
def test_the_text_stops_at_the_first_chunk_that_completes_a_stop(
    chunks: list[bytes], stops: list[str]
) -> None:
    _, fed = stream_all(chunks, stops)
    for k in range(fed - 1):  # no earlier prefix holds a stop string (in complete characters)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        done = decoder.decode(b"".join(chunks[: k + 1]), final=False)
        assert not any(s in done for s in stops)


def test_a_stop_string_spanning_tokens_is_never_sent() -> None:
    text = TextStream(["\n\nUSER"])
    assert text.push(b"Hello") == "Hello"
    assert text.push(b"\n") == ""  # could begin the stop string: held
    assert text.push(b"\nUS") == ""
    assert text.push(b"ER:") == ""
    assert text.stopped and text.text == "Hello"
    other = TextStream(["\n\nUSER"])
    assert other.push(b"a\n") == "a" and other.push(b"\nb") == "\n\nb"  # was not one after all


def test_a_character_split_over_tokens_is_sent_whole() -> None:
    euro = "€".encode()
    text = TextStream()
    assert text.push(euro[:1]) == "" and text.push(euro[1:2]) == ""
    assert text.push(euro[2:] + b"!") == "€!"
    broken = TextStream()
    assert broken.push(euro[:2]) == "" and broken.finish() == "\ufffd"  # as decoding whole does


def test_held_back() -> None:
    assert held_back("abc\n", ["\n\n"]) == 1
    assert held_back("abc", ["cd", "bcx"]) == 2
    assert held_back("abc", ["x"]) == 0


# ---- requests -----------------------------------------------------------------------


def test_a_completion_request_maps_to_the_clis_sampling() -> None:
    r = parse_completion({"model": "demo", "prompt": "Hi", "temperature": 0, "seed": 7})
    assert (r.prompt, r.temperature, r.top_p, r.seed, r.stop) == ("Hi", 0.0, 1.0, 7, ())
    assert r.max_new_tokens(2, 256) == 16  # OpenAI's default for completions
    defaults = parse_completion({"model": "demo", "prompt": [1, 2, 3], "stop": "x", "n": 1})
    assert (defaults.temperature, defaults.top_p, defaults.seed) == (1.0, 1.0, None)
    assert defaults.prompt == [1, 2, 3] and defaults.stops == ("x",)
    assert parse_completion({"model": "m", "prompt": ["one"]}).prompt == "one"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"prompt": "x"}, "model"),
        ({"model": "demo"}, "prompt"),
        ({"model": "demo", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "demo", "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": "demo", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "demo", "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"model": "demo", "prompt": "x", "temperature": 2.5}, "temperature"),
        ({"model": "demo", "prompt": "x", "temperature": -0.1}, "temperature"),
        ({"model": "demo", "prompt": "x", "temperature": "hot"}, "temperature"),
        ({"model": "demo", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "demo", "prompt": "x", "n": 2}, "n"),
        ({"model": "demo", "prompt": "x", "seed": 2**64}, "seed"),
        ({"model": "demo", "prompt": "x", "stop": ""}, "stop"),
        ({"model": "demo", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "demo", "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": "demo", "prompt": "x", "stream_options": {"include_usage": True}}, None),
        ({"model": "demo", "prompt": "x", "echo": True}, "echo"),
        ({"model": "demo", "prompt": "x", "logprobs": 3}, "logprobs"),
        # (0 asks for the chosen tokens' logprobs: not the neutral false, though 0 == False)
        ({"model": "demo", "prompt": "x", "logprobs": 0}, "logprobs"),
        ({"model": "demo", "prompt": 5}, "prompt"),
        # (a parameter this server does not know is refused, not dropped: OpenAI's way)
        ({"model": "demo", "prompt": "x", "top_k": 40}, "top_k"),
        ({"model": "demo", "prompt": "x", "max_new_tokens": 8}, "max_new_tokens"),
        ({"model": "demo", "prompt": "x", "max_completion_tokens": 8}, "max_completion_tokens"),
        ({"model": "demo", "prompt": "x", "messages": []}, "messages"),
        ({"model": ["demo"], "prompt": "x"}, "model"),
        # (inside objects too, a field this server does not know is refused)
        (
            {"model": "demo", "prompt": "x", "stream": True, "stream_options": {"foo": 1}},
            "stream_options",
        ),
        ({"model": "demo", "prompt": "x", "nanoshard": {"bogus": True}}, "nanoshard"),
    ],
)
def test_bad_completion_requests_are_400(body: object, param: str | None) -> None:
    with pytest.raises(ApiError) as err:
        parse_completion(body)
    assert err.value.status == 400
    if param is not None:
        assert err.value.param == param
    if isinstance(body, dict) and "prompt" in body:  # (given, so never called missing)
        assert "prompt is required" not in str(err.value)


def test_a_model_that_is_not_a_string_is_named_so() -> None:
    with pytest.raises(ApiError, match=r"model must be a string, got \['demo'\]"):
        parse_completion({"model": ["demo"], "prompt": "x"})


@pytest.mark.parametrize(
    "message, param",
    [
        ({"role": "user", "content": "hi", "extra": "x"}, "messages[0]"),
        ({"role": "user", "content": []}, "messages[0].content"),
        ({"role": "user", "content": "hi", "name": 3}, "messages[0].name"),
        ({"role": "assistant", "content": "hi", "refusal": "no"}, "messages[0]"),
    ],
)
def test_bad_chat_message_fields_are_400(message: dict, param: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_chat({"model": "demo", "messages": [message]})
    assert err.value.status == 400 and err.value.param == param


def test_what_openai_clients_send_in_objects_passes() -> None:
    """A message's name, an assistant message handed back as it came (its empty fields),
    and stream options this server has nothing to do with."""
    handed_back = {"role": "assistant", "content": "Hail.", "refusal": None, "tool_calls": None}
    handed_back |= {"function_call": None, "audio": None, "annotations": []}
    messages = [{"role": "user", "content": "Hi", "name": "ann"}, handed_back]
    options = {"include_usage": True, "include_obfuscation": False}
    r = parse_chat(
        {"model": "demo", "messages": messages, "stream": True, "stream_options": options}
    )
    assert r.prompt == "USER:\nHi\n\nASSISTANT:\nHail.\n\nASSISTANT:\n" and r.include_usage
    # an assistant turn whose content is null (OpenAI takes it back so: it was refused 400)
    nothing = parse_chat({"model": "demo", "messages": [{"role": "assistant", "content": None}]})
    assert nothing.prompt == "ASSISTANT:\n\n\nASSISTANT:\n"
    with pytest.raises(ApiError) as err:  # (a user's turn needs its content)
        parse_chat({"model": "demo", "messages": [{"role": "user", "content": None}]})
    assert err.value.param == "messages[0].content"


def test_neutral_values_of_unsupported_parameters_pass() -> None:
    body = {"model": "demo", "prompt": "x", "logprobs": None, "echo": False}
    body |= {"presence_penalty": 0, "frequency_penalty": 0.0, "best_of": 1}
    assert parse_completion(body).prompt == "x"


def test_parameters_that_change_nothing_here_pass() -> None:
    """OpenAI's bookkeeping parameters, and tool choices without tools, are ignored."""
    ignored = {"metadata": {"k": "v"}, "store": False, "service_tier": "auto", "user": "u"}
    ignored |= {"parallel_tool_calls": True, "tool_choice": "none"}
    assert parse_completion({"model": "demo", "prompt": "x"} | ignored).prompt == "x"
    chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    assert parse_chat(chat | ignored | {"function_call": "none", "max_completion_tokens": 3})
    with pytest.raises(ApiError, match="unrecognized request argument supplied: prompt") as err:
        parse_chat(chat | {"prompt": "x"})
    assert err.value.status == 400 and err.value.param == "prompt"


def test_chat_messages_render_with_the_template() -> None:
    r = parse_chat(
        {
            "model": "demo",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "Hail."},
                {"role": "user", "content": "Again"},
            ],
            "max_completion_tokens": 5,
            "max_tokens": 9,
        }
    )
    assert r.prompt == (
        "SYSTEM:\nBe brief.\n\nUSER:\nHi\n\nASSISTANT:\nHail.\n\nUSER:\nAgain\n\nASSISTANT:\n"
    )
    assert r.max_tokens == 5 and r.stops == ("\n\n",)  # a reply ends with its turn
    assert chat_prompt([("user", "x")]) == "USER:\nx\n\nASSISTANT:\n"
    assert (
        parse_chat({"model": "d", "messages": [{"role": "user", "content": "x"}]}).max_new_tokens(
            10, 256
        )
        == 246
    )  # chat: the rest of the context by default


@pytest.mark.parametrize(
    "messages",
    [[], None, [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}], ["hi"]],
)
def test_bad_chat_messages_are_400(messages: object) -> None:
    with pytest.raises(ApiError) as err:
        parse_chat({"model": "demo", "messages": messages})
    assert err.value.status == 400 and err.value.param and err.value.param.startswith("messages")


# ---- answers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (InvalidArgument("the prompt is 300 tokens"), 400),
        (QuotaExceeded("quota: open sessions per client is 2"), 429),
        (ResourceExhausted("node busy: 4 steps queued"), 429),
        # a node gone beside one that refused: the swarm cannot serve now
        (Unavailable("gave up after 6 attempts: a: gone; b: quota: max_length per session"), 503),
        (Unavailable("no ready node serves units 3"), 503),
        (NotFound("no coordinator answered on mDNS"), 503),
        (Unauthenticated("bad token"), 503),
        (Internal("oops"), 500),
        (RuntimeError("bug"), 500),
    ],
)
def test_errors_map_to_statuses(exc: Exception, status: int) -> None:
    answer = error_for(exc)
    assert answer.status == status
    assert set(answer.body()["error"]) == {"message", "type", "param", "code"}


def test_a_quota_that_knows_when_says_retry_after() -> None:
    assert error_for(QuotaExceeded("quota: tokens per minute", retry_after_s=12.2)).headers == {
        "Retry-After": "13"
    }
    answer = error_for(QuotaExceeded("quota: open sessions per client is 2"))
    assert (answer.status, answer.code, answer.headers) == (429, "quota_exceeded", None)


def test_finish_reasons() -> None:
    assert [finish_reason(r) for r in ("eot", "stop", "max_new_tokens", "context")] == [
        "stop",
        "stop",
        "length",
        "length",
    ]


def test_chunks_share_the_id_and_the_chat_role_comes_first() -> None:
    reply = Reply("chatcmpl-1", 0, "demo", chat=True)
    first = reply.chunk("", first=True)
    later = reply.chunk("x", hops=[{"node": "a"}])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert later["choices"][0]["delta"] == {"content": "x"} and later["id"] == first["id"]
    assert later["nanoshard"] == {"hops": [{"node": "a"}]} and "nanoshard" not in first
    assert reply.usage_chunk({"total_tokens": 1})["choices"] == []
