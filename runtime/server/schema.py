"""Validation of OpenAI-style request bodies, and the error shape every API error uses.

Pure functions: a decoded JSON body in, a typed request (or an ApiError) out. No IO here, so the
rules can be tested without a server. Unknown fields are ignored (clients send many optional
OpenAI fields we do not use); fields we do read are type-checked strictly, because a wrong type
silently coerced would hide the caller's bug. Features we cannot honour (n > 1, logprobs, tools)
are refused with a 400 rather than ignored, so a client never gets a silently different answer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ggufile.runtime.sampling import SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


class ApiError(Exception):
    """An error that reaches the client as OpenAI's `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_param(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class GenerationRequest:
    """What both endpoints reduce to: a prompt (messages or text/tokens) and how to continue it."""

    model: str | None
    params: SamplingParams
    max_tokens: int | None  # None: as much as the context allows
    stop: list[str]
    stream: bool = False
    include_usage: bool = False
    messages: list[dict] | None = None  # chat
    prompt: str | list[int] | None = None  # completions
    echo: bool = False
    extra: dict = field(default_factory=dict)


# -- field readers -------------------------------------------------------------------------------

def _number(body: dict, name: str, lo: float, hi: float, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_param(name, f"'{name}' must be a number", "invalid_type")
    if not lo <= value <= hi:
        raise bad_param(name, f"'{name}' must be between {lo:g} and {hi:g}, got {value:g}")
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_param(name, f"'{name}' must be an integer", "invalid_type")
    if not lo <= value <= hi:
        raise bad_param(name, f"'{name}' must be between {lo} and {hi}, got {value}")
    return value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_param(name, f"'{name}' must be a boolean", "invalid_type")
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad_param("stop", "'stop' must be a string or a list of strings", "invalid_type")
    if len(value) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in value):
        raise bad_param("stop", f"at most {MAX_STOP_STRINGS} stop strings of up to {MAX_STOP_LENGTH} characters")
    return [s for s in value if s]


def _model(body: dict) -> str | None:
    value = body.get("model")
    if value is not None and not isinstance(value, str):
        raise bad_param("model", "'model' must be a string", "invalid_type")
    return value


def _sampling(body: dict) -> SamplingParams:
    """OpenAI's fields plus llama.cpp's extras; anything absent keeps SamplingParams' default
    (llama.cpp's defaults, not OpenAI's temperature=1/top_p=1: they suit small local models)."""
    d = SamplingParams()
    return SamplingParams(
        temperature=_number(body, "temperature", 0.0, 100.0, d.temperature),
        top_p=_number(body, "top_p", 0.0, 1.0, d.top_p),
        top_k=_integer(body, "top_k", 0, 1 << 30, d.top_k),
        min_p=_number(body, "min_p", 0.0, 1.0, d.min_p),
        # 0 would divide logits by zero; llama.cpp treats it (like 1) as "off".
        repeat_penalty=_number(body, "repeat_penalty", 0.0, 100.0, d.repeat_penalty) or 1.0,
        repeat_last_n=_integer(body, "repeat_last_n", 0, 1 << 20, d.repeat_last_n),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, d.presence_penalty),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, d.frequency_penalty),
        seed=_seed(body),
    )


def _seed(body: dict) -> int | None:
    seed = _integer(body, "seed", -1, (1 << 64) - 1, None)
    return None if seed == -1 else seed  # -1: a random seed, as in llama.cpp


def _max_tokens(body: dict) -> int | None:
    # max_completion_tokens is the newer name; when both are given it wins, as in OpenAI's API.
    # -1 means "until the context is full" (llama.cpp's n_predict convention).
    tokens = _integer(body, "max_tokens", -1, 1 << 30, None)
    tokens = _integer(body, "max_completion_tokens", -1, 1 << 30, tokens)
    if tokens == 0:
        raise bad_param("max_tokens", "'max_tokens' must be at least 1")
    return None if tokens == -1 else tokens


def _refuse_unsupported(body: dict) -> None:
    n = _integer(body, "n", 1, 1 << 30, 1)
    if n != 1:
        raise bad_param("n", "only n=1 is supported", "unsupported_value")
    if body.get("logprobs") not in (None, False, 0):
        raise bad_param("logprobs", "logprobs are not supported", "unsupported_value")
    if body.get("tools") not in (None, []) or body.get("functions") not in (None, []):
        raise bad_param("tools", "tool calling is not supported", "unsupported_value")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad_param("response_format", "only response_format {\"type\": \"text\"} is supported",
                        "unsupported_value")


def _stream_options(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise bad_param("stream_options", "'stream_options' must be an object", "invalid_type")
    if not stream:
        raise bad_param("stream_options", "'stream_options' is only allowed when 'stream' is true")
    return _boolean(opts, "include_usage")


def _common(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    _refuse_unsupported(body)
    stream = _boolean(body, "stream")
    return dict(model=_model(body), params=_sampling(body), max_tokens=_max_tokens(body), stop=_stop(body),
                stream=stream, include_usage=_stream_options(body, stream))


# -- the two generation endpoints ----------------------------------------------------------------

ROLES = ("system", "developer", "user", "assistant", "tool")


def _message(i: int, m: Any) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad_param(where, f"'{where}' must be an object", "invalid_type")
    role = m.get("role")
    if role not in ROLES:
        raise bad_param(f"{where}.role", f"'{where}.role' must be one of {', '.join(ROLES)}")
    content = m.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        # Content parts: only text parts are meaningful to a text model; refuse images etc.
        parts = []
        for p in content:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise bad_param(f"{where}.content", "only text content parts are supported", "unsupported_value")
            parts.append(p["text"])
        content = "".join(parts)
    elif not isinstance(content, str):
        raise bad_param(f"{where}.content", f"'{where}.content' must be a string or a list of parts",
                        "invalid_type")
    # Templates know "system", not OpenAI's newer "developer" role.
    return {"role": "system" if role == "developer" else role, "content": content}


def parse_chat_request(body: Any) -> GenerationRequest:
    common = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_param("messages", "'messages' must be a non-empty list", "invalid_type")
    return GenerationRequest(messages=[_message(i, m) for i, m in enumerate(messages)], **common)


def parse_completion_request(body: Any) -> GenerationRequest:
    common = _common(body)
    prompt = body.get("prompt")
    # A single prompt as text, one-element list of text, or a list of token ids.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise bad_param("prompt", "'prompt' must be a string or a list of token ids", "invalid_type")
    elif not isinstance(prompt, str):
        raise bad_param("prompt", "'prompt' must be a string (batches of prompts are not supported)",
                        "invalid_type")
    if body.get("suffix") not in (None, ""):
        raise bad_param("suffix", "'suffix' is not supported", "unsupported_value")
    if _integer(body, "best_of", 1, 1, 1) != 1:
        raise bad_param("best_of", "only best_of=1 is supported", "unsupported_value")
    return GenerationRequest(prompt=prompt, echo=_boolean(body, "echo"), **common)


# -- llama.cpp's /tokenize and /detokenize -------------------------------------------------------

def parse_tokenize(body: Any) -> tuple[str, bool, bool]:
    """-> (content, add_special, parse_special), llama.cpp's fields and defaults."""
    if not isinstance(body, dict) or not isinstance(body.get("content"), str):
        raise bad_param("content", "'content' must be a string", "invalid_type")
    return body["content"], _boolean(body, "add_special", False), _boolean(body, "parse_special", True)


def parse_detokenize(body: Any) -> list[int]:
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad_param("tokens", "'tokens' must be a list of integers", "invalid_type")
    return tokens
