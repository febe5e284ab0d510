"""The OpenAI chat-completions wire format: request validation, prompt rendering, response bodies.

No Ray and no vLLM here, so every error case can be reasoned about (and
tested) without a running server. Bad input raises `APIError`, which the app
turns into an OpenAI-style 4xx body: {"error": {"message", "type", "param", "code"}}.

Unknown request fields are ignored (clients send `user`, `logit_bias`, ...);
known fields of the wrong type or out of range are refused, naming the field.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from hh_ray.conversation import Message, end_of_turn_token_ids, render, stop_strings

ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """An error answered to the client: its status, an OpenAI-shaped body and any headers
    (e.g. Retry-After)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class Limits:
    """What one request may ask for; each bounds the work a single client can cause."""
    max_request_bytes: int = 1 << 20
    max_tokens: int = 512          # per choice
    default_max_tokens: int = 128  # the paper's response cap
    max_n: int = 8
    max_best_of: int = 16
    max_stop: int = 4


@dataclass
class ChatRequest:
    messages: list[dict]
    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128
    max_tokens_given: bool = False
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    best_of: int | None = None  # extension: candidates per choice, ranked by the PM


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise APIError(400, f"'{name}' must be a number, got {json.dumps(v)[:50]}", name, "invalid_type")
    if v > hi or v < lo or (lo_open and v == lo):
        raise APIError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name,
                       "invalid_value")
    return float(v)


def _int(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise APIError(400, f"'{name}' must be an integer, got {json.dumps(v)[:50]}", name, "invalid_type")
    if not lo <= v <= hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {v}", name, "invalid_value")
    return v


def _content_text(content, i: int) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                    "are supported", f"messages[{i}].content", "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                   f"messages[{i}].content", "invalid_type")


def parse_json_object(raw: bytes) -> dict:
    """A request body that must be a JSON object (this API and the collection page's)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return body


def parse_chat_request(raw: bytes, limits: Limits) -> ChatRequest:
    """Validate a request body; raise APIError (4xx) naming the first problem."""
    if len(raw) > limits.max_request_bytes:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {limits.max_request_bytes}",
                       code="request_too_large")
    body = parse_json_object(raw)

    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise APIError(400, "'messages' is required and must be a list", "messages", "invalid_type")
    if not msgs:
        raise APIError(400, "'messages' must not be empty", "messages", "empty_array")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(role)[:50]}",
                           f"messages[{i}].role", "invalid_value")
        messages.append({"role": "system" if role == "developer" else role, "content": _content_text(m.get("content"), i)})
    if not any(m["role"] == "user" for m in messages):
        raise APIError(400, "'messages' must hold at least one user message", "messages", "invalid_value")

    for name in ("tools", "functions", "tool_choice", "function_call", "response_format"):
        if body.get(name) is not None:
            raise APIError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    if body.get("logprobs"):
        raise APIError(400, "'logprobs' is not supported by this server", "logprobs", "unsupported_parameter")

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", "model", "invalid_type")

    req = ChatRequest(messages=messages, model=model)
    req.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    req.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    req.presence_penalty = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    req.frequency_penalty = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    # max_completion_tokens is the newer name of max_tokens; either may come.
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    req.max_tokens_given = body.get(name) is not None
    req.max_tokens = _int(body, name, limits.default_max_tokens, 1, limits.max_tokens)
    req.n = _int(body, "n", 1, 1, limits.max_n)
    req.best_of = _int(body, "best_of", None, 1, limits.max_best_of)
    req.seed = _int(body, "seed", None, -(2 ** 63), 2 ** 63 - 1)

    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise APIError(400, "'stop' must be a non-empty string or a list of them", "stop", "invalid_type")
        if len(stop) > limits.max_stop:
            raise APIError(400, f"'stop' may hold at most {limits.max_stop} sequences", "stop", "invalid_value")
        req.stop = stop

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", "stream", "invalid_type")
    req.stream = bool(stream)
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            raise APIError(400, "'stream_options' must be {\"include_usage\": bool}", "stream_options", "invalid_type")
        req.include_usage = bool(opts.get("include_usage", False))
    return req


# ---------------------------------------------------------------- prompts

def _messages(messages: list[dict]) -> list[Message]:
    return [Message(m["role"], m["content"].strip()) for m in messages]


def hh_prompt(messages: list[dict]) -> str:
    """The conversation as an HH transcript ending in "\\n\\nAssistant:", content escaped so it
    cannot open a turn: the canonical form the PM service, the OOD detector and the comparison
    store take (each renders it in its own format). System text goes first, as a preamble,
    like the paper's HHH prompt."""
    return render(_messages(messages), None, "hh", add_generation_prompt=True)


def policy_prompt(messages: list[dict], tokenizer, fmt: str) -> tuple[str, list[str], list[int]]:
    """(the prompt the policy sees, stop strings, stop token ids) in the conversation format the
    policy was trained in: the reply ends where the assistant's turn ends."""
    return (render(_messages(messages), tokenizer, fmt, add_generation_prompt=True), stop_strings(fmt),
            end_of_turn_token_ids(tokenizer, fmt))


# ---------------------------------------------------------------- responses

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion_body(cid: str, model: str, choices: list[dict], usage: dict, extension: dict) -> dict:
    """`choices`: [{"text", "finish_reason"}]. `extension` goes under "hh_ray" (best-of-n, OOD)."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                         "finish_reason": c["finish_reason"], "logprobs": None} for i, c in enumerate(choices)],
            "usage": usage, "hh_ray": extension}


def chunk_body(cid: str, created: int, model: str, index: int, delta: dict, finish_reason: str | None = None,
               **extra) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"
