"""Anthropic's Messages API: POST /v1/messages (whole or streamed) and /v1/messages/count_tokens.

A request is translated into the OpenAI chat request it means (system prompt first, tool_use
blocks as tool_calls, tool_result blocks as tool messages, tool_choice any -> required) and
validated by schema.py like any chat request; the answer is rebuilt as Anthropic's message
object or event stream. Errors have Anthropic's shape: {"type": "error", "error": {...}}.
"""
from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ggufile.runtime.server import app as core
from ggufile.runtime.server import openai_api, tools
from ggufile.runtime.server.schema import ApiError, bad_param, join_text_parts, parse_chat_request

# Anthropic fields this server cannot honour: refused unless neutral (as schema.py's table).
REFUSED = {"thinking": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "disabled"),
           "mcp_servers": lambda v: not v, "container": lambda v: v is None}
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


def routes():
    from starlette.routing import Route

    return [Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens, methods=["POST"])]


def _error(err: ApiError) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
            503: "overloaded_error"}.get(err.status, "invalid_request_error" if err.status < 500 else "api_error")
    return JSONResponse({"type": "error", "error": {"type": kind, "message": err.message}},
                        status_code=err.status, headers=err.headers)


def anthropic_errors(handler):
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as err:
            return _error(err)
    return wrapped


# -- request translation --------------------------------------------------------------------------

def to_openai(body) -> dict:
    """The OpenAI chat body an Anthropic Messages body means."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    for name, neutral in REFUSED.items():
        if not neutral(body.get(name)):
            raise bad_param(name, f"'{name}' is not supported by this server", "unsupported_value")
    if not isinstance(body.get("max_tokens"), int) or isinstance(body.get("max_tokens"), bool):
        raise bad_param("max_tokens", "'max_tokens' is required (an integer)", "invalid_type")
    messages = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": system if isinstance(system, str)
                         else join_text_parts(system, "system")})
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad_param("messages", "'messages' must be a non-empty list", "invalid_type")
    for i, m in enumerate(raw):
        messages += _message(i, m)
    out = {"messages": messages, "max_tokens": body["max_tokens"], "stream": body.get("stream", False)}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                         ("stop", "stop_sequences")):
        if body.get(theirs) is not None:
            out[ours] = body[theirs]
    if body.get("tools"):
        out.update(_tools(body))
    if body.get("output_config") is not None:
        out.update(_output_config(body["output_config"]))
    return out


def _output_config(config) -> dict:
    """Structured output: output_config.format {"type": "json_schema", "schema": ...}."""
    if not isinstance(config, dict) or set(config) - {"format"}:
        raise bad_param("output_config", "of 'output_config' only 'format' is supported", "unsupported_value")
    fmt = config.get("format")
    if fmt is None:
        return {}
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise bad_param("output_config", "'output_config.format' must be {\"type\": \"json_schema\", ...}")
    return {"response_format": {"type": "json_schema", "json_schema": {"schema": fmt.get("schema")}}}


def _message(i: int, m) -> list[dict]:
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
        raise bad_param(f"{where}.role", f"'{where}.role' must be user or assistant")
    content = m.get("content")
    if isinstance(content, str):
        return [{"role": m["role"], "content": content}]
    if not isinstance(content, list):
        raise bad_param(f"{where}.content", f"'{where}.content' must be a string or a list of blocks", "invalid_type")
    texts, calls, results = [], [], []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and m["role"] == "assistant":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": block.get("input", {})}})
        elif kind == "tool_result" and m["role"] == "user":
            result = block.get("content", "")
            if isinstance(result, list):
                result = join_text_parts(result, f"{where}.content")
            results.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")),
                            "content": ("Error: " if block.get("is_error") else "") + str(result)})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # earlier turns' reasoning: not part of what this model reads
        else:
            raise bad_param(f"{where}.content", f"content blocks of type '{kind}' are not supported",
                            "unsupported_value")
    out = results
    if texts or calls or not results:
        msg = {"role": m["role"], "content": "\n".join(texts)}
        if calls:
            msg["tool_calls"] = calls
        out = out + [msg]
    return out


def _tools(body: dict) -> dict:
    functions = []
    for t in body["tools"]:
        if not isinstance(t, dict):
            raise bad_param("tools", "'tools' entries must be objects", "invalid_type")
        fn = {"name": t.get("name"), "parameters": t.get("input_schema", {"type": "object"})}
        if isinstance(t.get("description"), str):
            fn["description"] = t["description"]
        functions.append({"type": "function", "function": fn})
    out = {"tools": functions}
    choice = body.get("tool_choice") or {"type": "auto"}
    if not isinstance(choice, dict):
        raise bad_param("tool_choice", "'tool_choice' must be an object", "invalid_type")
    kind = choice.get("type")
    if kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif kind in ("auto", "any", "none"):
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    else:
        raise bad_param("tool_choice", "'tool_choice.type' must be auto, any, tool or none")
    out["parallel_tool_calls"] = not choice.get("disable_parallel_tool_use", False)
    return out


# -- the endpoints ----------------------------------------------------------------------------------

@anthropic_errors
async def count_tokens(request: Request) -> Response:
    s = core._state(request)
    body = await core.read_json(request)
    if isinstance(body, dict) and "max_tokens" not in body:
        body = dict(body, max_tokens=1)  # not part of count_tokens' request
    req = parse_chat_request(to_openai(body), s.defaults)
    openai_api.setup_tools(s.engine, req)
    ids = await openai_api.prepare(s, req)
    return JSONResponse({"input_tokens": len(ids)})


@anthropic_errors
async def messages(request: Request) -> Response:
    s = core._state(request)
    req = parse_chat_request(to_openai(await core.read_json(request)), s.defaults)
    spec = openai_api.setup_tools(s.engine, req)
    ids = await openai_api.prepare(s, req)
    plan = await openai_api.plan_for(s, req, ids)
    job = openai_api.submit(s, plan)
    message_id = "msg_" + secrets.token_hex(12)
    if req.stream:
        return core.EventStream(_events(job, s.engine, req, spec, message_id, len(ids), plan), job,
                                on_close=s.queue.forget)
    state, text, calls = await openai_api.collect_one(request, job, plan, spec, s.queue)
    blocks = ([{"type": "text", "text": text}] if text or not calls else []) + [_tool_block(c) for c in calls]
    finish = "tool_calls" if calls else state.finish_reason or "length"
    stop_reason, stop_sequence = _stop(finish, state, req, s.engine)
    return JSONResponse({"id": message_id, "type": "message", "role": "assistant", "model": s.engine.model_name,
                         "content": blocks, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                         "usage": _usage(len(ids), state.n_generated, plan.cached_tokens)})


def _tool_block(call: dict) -> dict:
    return {"type": "tool_use", "id": "toolu_" + call["id"][len("call_"):], "name": call["function"]["name"],
            "input": json.loads(call["function"]["arguments"])}


def _usage(n_prompt: int, n_out: int, cached: int) -> dict:
    return {"input_tokens": n_prompt - cached, "output_tokens": n_out, "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0}


def _stop(finish: str, state, req, engine) -> tuple[str, str | None]:
    """Anthropic's stop_reason and the stop sequence that ended the text, if one did."""
    if finish != "stop":
        return STOP_REASONS.get(finish, finish), None
    word = state.stop_word(req.stop, engine)
    return ("stop_sequence", word) if word is not None else ("end_turn", None)


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


async def _events(job, engine, req, spec, message_id: str, n_prompt: int, plan) -> AsyncIterator[bytes]:
    """message_start, a text block's deltas, tool_use blocks, message_delta, message_stop."""
    yield _event("message_start", {"type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": engine.model_name, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": _usage(n_prompt, 0, 0)}})
    splitter = tools.CallSplitter() if spec is not None else None
    state = openai_api.ChoiceState(0)
    index, text_open = 0, False

    def text_delta(text: str):
        nonlocal text_open
        out = b""
        if not text_open:
            out += _event("content_block_start", {"type": "content_block_start", "index": index,
                                                  "content_block": {"type": "text", "text": ""}})
            text_open = True
        return out + _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                    "delta": {"type": "text_delta", "text": text}})
    try:
        async for text in openai_api.visible_text(job, state, splitter):
            yield text_delta(text)
    except Exception as err:
        yield _event("error", {"type": "error", "error": {"type": "api_error",
                                                          "message": core._generation_error(err).message}})
        return
    if job.cancelled.is_set():
        return
    calls = []
    if splitter is not None:
        rest, calls = splitter.finish(spec)
        if rest:
            yield text_delta(rest)
    if text_open or not calls:
        if not text_open:
            yield text_delta("")
        yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1
    for call in calls:
        block = _tool_block(call)
        yield _event("content_block_start", {"type": "content_block_start", "index": index,
                                             "content_block": dict(block, input={})})
        yield _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
            "type": "input_json_delta", "partial_json": call["function"]["arguments"]}})
        yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1
    finish = "tool_calls" if calls else state.finish_reason or "length"
    stop_reason, stop_sequence = _stop(finish, state, req, engine)
    yield _event("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                   "usage": {"output_tokens": state.n_generated}})
    yield _event("message_stop", {"type": "message_stop"})
