"""OpenAI's HTTP API as pure functions: requests checked and mapped, the chat template,
errors in OpenAI's shape, and the response and chunk bodies. No I/O (``app.py`` is the shell).

What a request may say (everything else OpenAI clients send by default is ignored, and what
would change the output but cannot be honoured is refused with 400):

=====================  =================================================================
``model``              required; must be the swarm's model (``GET /v1/models``), else 404
``prompt``             completions: a string, a list of one string, token ids, or a list
                       of one list of token ids
``messages``           chat: a non-empty list of ``{role, content}``; role ``system``,
                       ``developer``, ``user`` or ``assistant``; content a string or a
                       non-empty list of ``{"type": "text", "text": ...}`` parts; ``name``
                       (a string) is ignored
``max_tokens``         >= 1 (chat: ``max_completion_tokens`` too, which wins); default 16
                       for completions, the rest of the context for chat
``temperature``        [0, 2], default 1 (0: greedy)
``top_p``              (0, 1], default 1
``seed``               a 64-bit integer; default: a random one per request
``stop``               a string or a list of up to 4 non-empty strings
``stream``             bool; ``stream_options.include_usage`` adds a last chunk with usage
``n``                  1 only
``user``               a string, kept for logs only
``nanoshard``          extension: ``{"hops": true}`` adds each token's per-hop traces to
                       the stream's chunks as ``nanoshard.hops`` (standard chunks otherwise)
=====================  =================================================================

A field this server does not know is refused, at the top level and inside
``stream_options``, ``nanoshard`` and each message, as OpenAI's API refuses it.

The sampling is the CLI's: ``SamplingParams(temperature, top_k=0, top_p, seed)``, so a
request equals ``nanoshard generate --temperature T --top-p P --seed S`` token for token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from nanoshard.errors import (
    FailedPrecondition,
    InvalidArgument,
    NanoshardError,
    NotFound,
    QuotaExceeded,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

MAX_STOPS = 4
MAX_STOP_CHARS = 256
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
# The chat template (see the README): each turn is "ROLE:\n" + content + a blank line, the
# way the demo model's plays write a speech, and the prompt ends with the assistant's
# "ASSISTANT:\n". A reply ends at its first blank line: TURN_END is always a stop string.
ROLES = {"system": "SYSTEM", "developer": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"}
TURN_END = "\n\n"
# Parameters that would change the output and that the swarm cannot honour: refused when set
# to anything but their neutral value (OpenAI clients send some of these as null or 0).
NEUTRAL: dict[str, tuple[object, ...]] = {
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}

# OpenAI's parameters that change nothing here: bookkeeping, or how to use tools a request
# cannot have (``tools`` is refused above unless empty). Accepted and ignored.
IGNORED = frozenset({"metadata", "store", "service_tier", "parallel_tool_calls", "tool_choice"})
# Every parameter a request may carry; any other is refused, as OpenAI's API refuses it, so
# that a misspelt or unsupported one (``top_k``, ``max_new_tokens``) is not silently dropped.
COMMON = frozenset(
    {"model", "n", "seed", "stop", "stream", "stream_options", "nanoshard", "user"}
    | {"temperature", "top_p", "max_tokens"}
    | NEUTRAL.keys()
    | IGNORED
)
COMPLETION = COMMON | {"prompt"}
# (``function_call``: ``tool_choice``'s older name, for the ``functions`` a request cannot
# have either: ignored as it is.)
CHAT = COMMON | {"messages", "max_completion_tokens", "function_call"}
# Inside objects, the same rule: what this server reads, and what OpenAI clients send that
# changes nothing here (``include_obfuscation``: padding of stream events; a message's
# ``name``; the fields of an assistant message handed back as it came, when empty).
STREAM_OPTIONS = frozenset({"include_usage", "include_obfuscation"})
EXTENSION = frozenset({"hops"})
MESSAGE = frozenset({"role", "content", "name"})
MESSAGE_NEUTRAL: dict[str, tuple[object, ...]] = {
    "refusal": (None,),
    "tool_calls": (None, []),
    "function_call": (None,),
    "audio": (None,),
    "annotations": (None, []),
}


class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers  # of the HTTP answer (Retry-After)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value" if param else None)


def error_for(exc: BaseException) -> ApiError:
    """The HTTP answer to an error the SDK raised."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidArgument):
        return ApiError(400, message)
    if isinstance(exc, QuotaExceeded):  # every node of a hop refused: a quota of theirs
        after = exc.retry_after_s
        headers = None if after is None else {"Retry-After": str(max(math.ceil(after), 1))}
        return ApiError(429, message, "rate_limit_error", code="quota_exceeded", headers=headers)
    if isinstance(exc, ResourceExhausted):
        return ApiError(429, message, type="rate_limit_error", code="resource_exhausted")
    if isinstance(exc, Unauthenticated):
        return ApiError(
            503,
            f"the swarm refused this gateway's key ({message}): start it with the swarm's "
            "--swarm-key",
            type="service_unavailable",
            code="swarm_unavailable",
        )
    if isinstance(exc, (Unavailable, NotFound, FailedPrecondition)):
        return ApiError(
            503,
            f"the swarm cannot serve this request now: {message}",
            type="service_unavailable",
            code="swarm_unavailable",
        )
    if isinstance(exc, NanoshardError):
        return ApiError(500, message, type="api_error")
    return ApiError(500, f"internal error: {type(exc).__name__}", type="api_error")


@dataclass(frozen=True)
class Request:
    """A completion request, checked: what the swarm is asked to do."""

    chat: bool
    model: str
    prompt: str | list[int]  # chat: the rendered template
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    hops: bool = False
    user: str | None = None

    def max_new_tokens(self, prompt_len: int, block_size: int) -> int:
        if self.max_tokens is not None:
            return self.max_tokens
        if not self.chat:
            return DEFAULT_COMPLETION_TOKENS
        return max(block_size - prompt_len, 1)

    @property
    def stops(self) -> tuple[str, ...]:
        """Every stop string: the request's, and a chat turn's end."""
        return (*self.stop, TURN_END) if self.chat else self.stop


def _number(
    body: dict, name: str, default: float, low: float, high: float, low_open: bool
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{name} must be a number, got {value!r}", name)
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise bad(f"{name} must be in {bracket}{low:g}, {high:g}], got {value}", name)
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer, got {value!r}", name)
    return value


def _common(body: Any, chat: bool) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    unknown = body.keys() - (CHAT if chat else COMPLETION)
    if unknown:
        name = min(unknown)
        raise bad(f"unrecognized request argument supplied: {name}", name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"model must be a string, got {model!r}", "model")
    if not model:
        raise bad("model is required: the swarm's model, as GET /v1/models lists it", "model")
    for name, neutral in NEUTRAL.items():
        if name in body and not _neutral(body[name], neutral):
            raise bad(f"{name} is not supported by this server", name)
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise bad(f"n must be 1 (one completion per request), got {n}", "n")
    names = ["max_completion_tokens", "max_tokens"] if chat else ["max_tokens"]
    max_tokens = None
    for name in names:
        value = _integer(body, name)
        if value is not None and value < 1:
            raise bad(f"{name} must be at least 1, got {value}", name)
        if max_tokens is None:
            max_tokens = value
    seed = _integer(body, "seed")
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise bad(f"seed must be a signed 64-bit integer (-2**63 to 2**63 - 1), got {seed}", "seed")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        stops = []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad(
            f"stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters",
            "stop",
        )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise bad("stream_options is an object, allowed with stream: true", "stream_options")
    _known_fields(options, STREAM_OPTIONS, "stream_options")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options.include_usage must be true or false", "stream_options")
    extension = body.get("nanoshard")
    if extension is not None and not isinstance(extension, dict):
        raise bad('nanoshard must be an object, e.g. {"hops": true}', "nanoshard")
    _known_fields(extension, EXTENSION, "nanoshard")
    hops = (extension or {}).get("hops", False)
    if not isinstance(hops, bool):
        raise bad("nanoshard.hops must be true or false", "nanoshard")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user must be a string", "user")
    return {
        "chat": chat,
        "model": model,
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0, low_open=False),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        "seed": seed,
        "stop": tuple(stops),
        "stream": bool(stream),
        "include_usage": include_usage,
        "hops": hops,
        "user": user,
    }


def _known_fields(fields: dict | None, known: frozenset[str], where: str) -> None:
    """400 for a field of the object ``where`` that this server does not know."""
    if unknown := (fields or {}).keys() - known:
        raise bad(f"unrecognized argument supplied in {where}: {min(unknown)}", where)


def _neutral(value: object, neutral: tuple[object, ...]) -> bool:
    """``value`` is one of ``neutral``, of the same JSON type: a completion's ``logprobs: 0``
    asks for the chosen tokens' logprobs, although 0 == False in Python."""
    return any(type(value) is type(n) and value == n for n in neutral)


def parse_completion(body: Any) -> Request:
    """``POST /v1/completions``'s body, checked."""
    fields = _common(body, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise bad("prompt must be a string or token ids (one prompt per request)", "prompt")
    elif prompt is None:
        raise bad("prompt is required: a string or a list of token ids", "prompt")
    elif not isinstance(prompt, str):
        kind = type(prompt).__name__
        raise bad(f"prompt must be a string or a list of token ids, not {kind}", "prompt")
    return Request(prompt=prompt, **fields)


def parse_chat(body: Any) -> Request:
    """``POST /v1/chat/completions``'s body, checked; the messages rendered."""
    fields = _common(body, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content}", "messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(
                f"messages[{i}] must have a role among {', '.join(ROLES)}", f"messages[{i}].role"
            )
        for name in m.keys() - MESSAGE:
            if name not in MESSAGE_NEUTRAL:
                raise bad(
                    f"unrecognized argument supplied in messages[{i}]: {name}", f"messages[{i}]"
                )
            if not _neutral(m[name], MESSAGE_NEUTRAL[name]):
                raise bad(f"messages[{i}].{name} is not supported by this server", f"messages[{i}]")
        if "name" in m and not isinstance(m["name"], str):
            raise bad(f"messages[{i}].name must be a string", f"messages[{i}].name")
        turns.append((m["role"], _content(m.get("content"), i, m["role"])))
    return Request(prompt=chat_prompt(turns), **fields)


def _content(content: Any, i: int, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":  # (as OpenAI takes an assistant turn back)
        return ""
    if (
        isinstance(content, list)
        and content
        and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        )
    ):
        return "".join(p["text"] for p in content)
    raise bad(
        f"messages[{i}].content must be a string or a non-empty list of text parts",
        f"messages[{i}].content",
    )


def chat_prompt(turns: list[tuple[str, str]]) -> str:
    """The chat template for base models: ``ROLE:\\ncontent\\n\\n`` per turn, then the
    assistant's turn opened (``ASSISTANT:\\n``)."""
    rendered = "".join(f"{ROLES[role]}:\n{content}{TURN_END}" for role, content in turns)
    return rendered + f"{ROLES['assistant']}:\n"


def finish_reason(stop_reason: str) -> str:
    """OpenAI's name for why a generation stopped (the SDK's ``stop_reason``)."""
    return "length" if stop_reason in ("max_new_tokens", "context") else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class Reply:
    """What every body of one answer shares."""

    id: str
    created: int
    model: str
    chat: bool

    def whole(self, text: str, finish: str, counts: dict[str, int]) -> dict[str, Any]:
        """The non-streamed answer."""
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head(chunk=False), "choices": [choice], "usage": counts}

    def chunk(
        self,
        text: str | None,
        finish: str | None = None,
        *,
        first: bool = False,
        include_usage: bool = False,
        hops: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """One streamed chunk: a text delta (the chat's first carries the role), or the
        last one with its ``finish_reason``."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish)
        out = {**self._head(chunk=True), "choices": [choice]}
        if include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the usage chunk
        if hops is not None:
            out["nanoshard"] = {"hops": hops}
        return out

    def usage_chunk(self, counts: dict[str, int]) -> dict[str, Any]:
        return {**self._head(chunk=True), "choices": [], "usage": counts}

    def _head(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def hop_view(trace: dict[str, Any]) -> dict[str, Any]:
    """The part of a hop's trace the stream carries: who computed which units, how long."""
    return {
        "node": trace["node"],
        "address": trace["address"],
        "units": trace["units"],
        "compute_ms": round(trace["compute_ms"], 3),
        "queue_ms": round(trace["queue_ms"], 3),
        "tp": trace["tp"],
    }
