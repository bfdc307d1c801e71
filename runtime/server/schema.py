"""Validation of OpenAI-style request bodies, and the error shape every API error uses.

Pure functions: a decoded JSON body in, a typed request (or an ApiError) out. No IO here, so the
rules can be tested without a server. Unknown fields are ignored (clients send many optional
fields that do not change the answer: user, metadata, store, ...); fields we do read are
type-checked strictly, because a wrong type silently coerced would hide the caller's bug. Fields
that would change the answer in a way this server does not implement (REFUSED_UNLESS_NEUTRAL)
are refused with a 400 naming them unless they hold their "off" value, so a client never gets a
silently different answer.
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


@dataclass(frozen=True)
class Constraint:
    """What the output must match: a JSON schema (dict) or a GBNF / Lark grammar (text)."""

    kind: str  # "json_schema", "grammar" (GBNF or Lark, the client's) or "lark" (ours: tool calls)
    source: object
    param: str  # the request field it came from, for error messages


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
    n: int = 1
    top_logprobs: int | None = None  # None: no logprobs; else alternatives per token
    logit_bias: list[tuple[int | str, float]] = field(default_factory=list)  # token id or text
    ignore_eos: bool = False
    constraint: Constraint | None = None  # what the output must match (constrained.py)
    tools: Any = None  # tools.ToolSpec (chat)
    template_tools: list | None = None  # the tools as the chat template's `tools` variable gets them
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


def boolean(body: dict, name: str, default: bool = False) -> bool:
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


def _sampling(body: dict, defaults: SamplingParams | None = None) -> SamplingParams:
    """OpenAI's fields plus llama.cpp's extras; anything absent keeps the server's default (the
    command line's sampling flags, else llama.cpp's defaults, not OpenAI's temperature=1/top_p=1:
    they suit small local models)."""
    d = defaults or SamplingParams()
    if body.get("penalty_last_n") is not None and body.get("repeat_last_n") is None:
        body = dict(body, repeat_last_n=body["penalty_last_n"])  # llama.cpp's newer name
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
        seed=_seed(body, d.seed),
    )


def _seed(body: dict, default: int | None) -> int | None:
    seed = _integer(body, "seed", -1, (1 << 64) - 1, default)
    return None if seed == -1 else seed  # -1: a random seed, as in llama.cpp


def _max_tokens(body: dict, default: int | None = None) -> int | None:
    # max_completion_tokens is the newer name; when both are given it wins, as in OpenAI's API;
    # n_predict is llama.cpp's. -1 means "until the context is full" (llama.cpp's convention).
    tokens = _integer(body, "n_predict", -1, 1 << 30, default)
    tokens = _integer(body, "max_tokens", -1, 1 << 30, tokens)
    tokens = _integer(body, "max_completion_tokens", -1, 1 << 30, tokens)
    if tokens == 0:
        raise bad_param("max_tokens", "'max_tokens' must be at least 1")
    return None if tokens is None or tokens < 0 else tokens


MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024

# Fields that change the answer in ways this server does not implement: refused with a 400
# naming the field unless they hold one of their neutral values. One row per field.
REFUSED_UNLESS_NEUTRAL: dict[str, tuple] = {
    "audio": (None,),                      # OpenAI: spoken answers
    "modalities": (None, ["text"]),
    "web_search_options": (None,),
    "functions": (None, []),               # OpenAI's deprecated form of tools
    "function_call": (None, "none"),
    "suffix": (None, ""),                  # completions: fill-in-the-middle
    "best_of": (None, 1),
    "mirostat": (None, 0),                 # llama.cpp's other samplers
    "typical_p": (None, 1),
    "tfs_z": (None, 1),
    "dynatemp_range": (None, 0),
    "xtc_probability": (None, 0),
    "dry_multiplier": (None, 0),
    "top_n_sigma": (None, -1, 0),
    "samplers": (None,),
    "post_sampling_probs": (None, False),
    "n_indent": (None, 0),
    "t_max_predict_ms": (None, 0),
    "lora": (None, []),
    "image_data": (None, []),
    "multimodal_data": (None, []),
    "input_extra": (None, []),
}


def _is_neutral(value, neutral: tuple) -> bool:
    # Booleans only match booleans: in Python True == 1, but "mirostat": true is not "off".
    return any(value is v if isinstance(v, bool) or isinstance(value, bool) or v is None else value == v
               for v in neutral)


def _refuse_unsupported(body: dict) -> None:
    for name, neutral in REFUSED_UNLESS_NEUTRAL.items():
        if not _is_neutral(body.get(name), neutral):
            raise bad_param(name, f"'{name}' is not supported by this server", "unsupported_value")


def _logit_bias(body: dict) -> list[tuple[int | str, float]]:
    """OpenAI's {"token id": bias} or llama.cpp's [[token id or text, bias or false], ...];
    false bans the token (as does OpenAI's -100)."""
    value = body.get("logit_bias")
    if value in (None, {}, []):
        return []
    if isinstance(value, dict):
        pairs = []
        for key, bias in value.items():
            if not key.lstrip("-").isdigit():
                raise bad_param("logit_bias", "'logit_bias' keys must be token ids", "invalid_type")
            pairs.append((int(key), bias))
    elif isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        raise bad_param("logit_bias", "'logit_bias' must be an object of token id -> bias "
                                      "or a list of [token, bias] pairs", "invalid_type")
    if len(pairs) > MAX_LOGIT_BIAS:
        raise bad_param("logit_bias", f"'logit_bias' holds more than {MAX_LOGIT_BIAS} entries")
    out = []
    for token, bias in pairs:
        if isinstance(token, bool) or not isinstance(token, (int, str)):
            raise bad_param("logit_bias", "'logit_bias' tokens must be ids or text", "invalid_type")
        if bias is False:
            bias = -math.inf
        elif isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias):
            raise bad_param("logit_bias", "'logit_bias' biases must be numbers (or false)", "invalid_type")
        elif bias <= -100:
            bias = -math.inf  # OpenAI: -100 "should result in a ban"
        out.append((token, float(min(bias, 100.0))))
    return out


def _response_format(fmt) -> Constraint | None:
    """OpenAI's response_format: text, json_object (any JSON object; llama.cpp also reads a
    `schema` there) or json_schema {"json_schema": {"schema": ...}}."""
    param = "response_format"
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise bad_param(param, "'response_format' must be an object with a 'type'", "invalid_type")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_schema", _schema(fmt.get("schema", {"type": "object"}), param), param)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_param(param, "'response_format.json_schema' must be an object", "invalid_type")
        return Constraint("json_schema", _schema(spec.get("schema", {"type": "object"}), param), param)
    raise bad_param(param, f"response_format type '{kind}' is not supported (text, json_object, json_schema)",
                    "unsupported_value")


def _schema(value, param: str):
    if isinstance(value, bool) or not isinstance(value, dict):
        raise bad_param(param, f"'{param}': the schema must be a JSON object", "invalid_type")
    return value


def _constraint(body: dict) -> Constraint | None:
    """At most one of response_format (OpenAI), json_schema and grammar (llama.cpp)."""
    found = []
    if body.get("response_format") is not None:
        c = _response_format(body["response_format"])
        if c is not None:
            found.append(c)
    if body.get("json_schema") is not None:
        found.append(Constraint("json_schema", _schema(body["json_schema"], "json_schema"), "json_schema"))
    grammar = body.get("grammar")
    if grammar not in (None, ""):
        if not isinstance(grammar, str):
            raise bad_param("grammar", "'grammar' must be a string (GBNF)", "invalid_type")
        found.append(Constraint("grammar", grammar, "grammar"))
    if len(found) > 1:
        raise bad_param(found[1].param, "give only one of response_format, json_schema and grammar")
    return found[0] if found else None


def _top_logprobs(body: dict, chat: bool) -> int | None:
    """None: no logprobs. Chat: logprobs (bool) + top_logprobs; completions: logprobs (int);
    llama.cpp: n_probs."""
    if chat:
        wanted = boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None)
        if top is not None and not wanted:
            raise bad_param("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        return (top or 0) if wanted else None
    value = body.get("logprobs")
    if isinstance(value, bool):  # llama.cpp's clients sometimes send a boolean here
        return 0 if value else None
    top = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS, None)
    n_probs = _integer(body, "n_probs", 0, MAX_TOP_LOGPROBS, None)
    return top if top is not None else n_probs or None


def _stream_options(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise bad_param("stream_options", "'stream_options' must be an object", "invalid_type")
    if not stream:
        raise bad_param("stream_options", "'stream_options' is only allowed when 'stream' is true")
    return boolean(opts, "include_usage")


@dataclass(frozen=True)
class Defaults:
    """The server's defaults for what a request leaves out (the command line's flags)."""

    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None  # None: until the model stops or the context is full


def _common(body: Any, defaults: Defaults | None, chat: bool) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    defaults = defaults or Defaults()
    _refuse_unsupported(body)
    stream = boolean(body, "stream")
    return dict(model=_model(body), params=_sampling(body, defaults.params),
                max_tokens=_max_tokens(body, defaults.max_tokens), stop=_stop(body),
                stream=stream, include_usage=_stream_options(body, stream),
                n=_integer(body, "n", 1, MAX_CHOICES, 1), top_logprobs=_top_logprobs(body, chat),
                logit_bias=_logit_bias(body), ignore_eos=boolean(body, "ignore_eos"),
                constraint=_constraint(body))


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
        content = join_text_parts(content, f"{where}.content")
    elif not isinstance(content, str):
        raise bad_param(f"{where}.content", f"'{where}.content' must be a string or a list of parts",
                        "invalid_type")
    # Templates know "system", not OpenAI's newer "developer" role.
    out = {"role": "system" if role == "developer" else role, "content": content}
    if role == "assistant" and m.get("tool_calls"):
        from ggufile.runtime.server.tools import parse_tool_calls

        out["tool_calls"] = parse_tool_calls(f"{where}.tool_calls", m["tool_calls"])
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(m.get(key), str):
                out[key] = m[key]
    return out


def join_text_parts(parts: list, where: str) -> str:
    """Content parts as one text, joined with newlines as llama.cpp joins them (common/chat.cpp);
    only text parts mean something to a text model: images, audio and files are refused."""
    texts = []
    for p in parts:
        if isinstance(p, str):
            texts.append(p)
        elif isinstance(p, dict) and p.get("type") in ("text", "input_text") and isinstance(p.get("text"), str):
            texts.append(p["text"])
        else:
            raise bad_param(where, "only text content parts are supported", "unsupported_value")
    return "\n".join(texts)


def parse_chat_request(body: Any, defaults: Defaults | None = None) -> GenerationRequest:
    common = _common(body, defaults, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_param("messages", "'messages' must be a non-empty list", "invalid_type")
    from ggufile.runtime.server.tools import parse_tools

    return GenerationRequest(messages=[_message(i, m) for i, m in enumerate(messages)],
                             tools=parse_tools(body), **common)


def parse_completion_request(body: Any, defaults: Defaults | None = None) -> GenerationRequest:
    common = _common(body, defaults, chat=False)
    if body.get("tools") not in (None, []):
        raise bad_param("tools", "'tools' is a chat field (use /v1/chat/completions)", "unsupported_value")
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
    return GenerationRequest(prompt=prompt, echo=boolean(body, "echo"), **common)


# -- llama.cpp's /tokenize and /detokenize -------------------------------------------------------

def parse_tokenize(body: Any) -> tuple[str, bool, bool]:
    """-> (content, add_special, parse_special), llama.cpp's fields and defaults."""
    if not isinstance(body, dict) or not isinstance(body.get("content"), str):
        raise bad_param("content", "'content' must be a string", "invalid_type")
    return body["content"], boolean(body, "add_special", False), boolean(body, "parse_special", True)


def parse_detokenize(body: Any) -> list[int]:
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad_param("tokens", "'tokens' must be a list of integers", "invalid_type")
    return tokens
