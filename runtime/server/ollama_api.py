"""Ollama's API, for desktop tools that speak only it: POST /api/chat, POST /api/generate,
GET /api/tags, POST /api/show, GET /api/version.

Requests are translated into the chat / completion requests they mean (Ollama's `options` are
llama.cpp's sampling fields under other names; `format` is "json" or a JSON schema) and run like
any other; answers stream as newline-delimited JSON (Ollama streams by default) with Ollama's
counters in nanoseconds.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ggufile.runtime.server import app as core
from ggufile.runtime.server import openai_api, tools
from ggufile.runtime.server.schema import ApiError, bad_param, parse_chat_request, parse_completion_request

OLLAMA_VERSION = "0.6.0"  # the API version these shapes follow
# Ollama's option -> ours (schema.py's field names); options not listed here are refused unless
# neutral (schema's table), or ignored when they only concern resources (RESOURCE_OPTIONS).
OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
           "num_predict": "max_tokens", "seed": "seed", "stop": "stop", "repeat_penalty": "repeat_penalty",
           "repeat_last_n": "repeat_last_n", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty", "typical_p": "typical_p", "mirostat": "mirostat"}
RESOURCE_OPTIONS = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock",
                    "numa", "low_vram", "num_keep", "f16_kv", "vocab_only"}


def routes():
    from starlette.routing import Route

    return [Route("/api/chat", chat, methods=["POST"]), Route("/api/generate", generate, methods=["POST"]),
            Route("/api/tags", tags, methods=["GET"]), Route("/api/show", show, methods=["POST"]),
            Route("/api/version", version, methods=["GET"])]


def _errors(handler):
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as err:  # Ollama's error shape
            return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)
    return wrapped


def _common(body) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    out = {"stream": body.get("stream", True)}
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise bad_param("options", "'options' must be an object", "invalid_type")
    for name, value in options.items():
        if name in OPTIONS:
            out[OPTIONS[name]] = value
        elif name not in RESOURCE_OPTIONS:
            raise bad_param(f"options.{name}", f"option '{name}' is not supported", "unsupported_value")
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt}}
    elif fmt not in (None, ""):
        raise bad_param("format", "'format' must be \"json\" or a JSON schema", "invalid_type")
    if body.get("think"):
        raise bad_param("think", "'think' is not supported (the model does not reason)", "unsupported_value")
    return out


def _messages(raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise bad_param("messages", "'messages' must be a non-empty list", "invalid_type")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise bad_param(f"messages[{i}]", "messages must be objects", "invalid_type")
        if m.get("images"):
            raise bad_param(f"messages[{i}].images", "images are not supported by this model", "unsupported_value")
        msg = {"role": m.get("role"), "content": m.get("content", "")}
        if m.get("tool_calls"):
            msg["tool_calls"] = [{"type": "function", "function": c.get("function", {})} for c in m["tool_calls"]]
        out.append(msg)
    return out


def _stamp() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _final(model: str, job, n_prompt: int, n_out: int, finish: str | None, started: float) -> dict:
    t = job.timings
    prompt_ns = int(max(t.first_token - t.started, 0) * 1e9) if t.first_token else 0
    eval_ns = int(max(t.finished - t.first_token, 0) * 1e9) if t.first_token else 0
    return {"model": model, "created_at": _stamp(), "done": True,
            "done_reason": "length" if finish == "length" else "stop",
            "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": 0,
            "prompt_eval_count": n_prompt, "prompt_eval_duration": prompt_ns,
            "eval_count": n_out, "eval_duration": eval_ns}


class NDJSONStream(core.EventStream):
    media_type = "application/x-ndjson"


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


# -- /api/chat and /api/generate ------------------------------------------------------------------

@_errors
async def chat(request: Request) -> Response:
    s = core._state(request)
    body = await core.read_json(request)
    chat_body = dict(_common(body), messages=_messages(body.get("messages") if isinstance(body, dict) else None))
    if isinstance(body, dict) and body.get("tools"):
        chat_body["tools"] = body["tools"]
    req = parse_chat_request(chat_body, s.defaults)
    spec = openai_api.setup_tools(s.engine, req)
    return await _run(request, s, req, spec, chat=True)


@_errors
async def generate(request: Request) -> Response:
    s = core._state(request)
    body = await core.read_json(request)
    common = _common(body)
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise bad_param("prompt", "'prompt' must be a string", "invalid_type")
    if body.get("suffix"):
        raise bad_param("suffix", "'suffix' is not supported", "unsupported_value")
    if body.get("images"):
        raise bad_param("images", "images are not supported by this model", "unsupported_value")
    if not prompt:  # Ollama's way to load a model: answer at once
        return JSONResponse({"model": s.engine.model_name, "created_at": _stamp(), "response": "", "done": True,
                             "done_reason": "load"})
    if body.get("raw"):
        req = parse_completion_request(dict(common, prompt=prompt), s.defaults)
    else:  # Ollama applies the model's chat template to a plain prompt
        messages = ([{"role": "system", "content": body["system"]}] if body.get("system") else []) + \
                   [{"role": "user", "content": prompt}]
        req = parse_chat_request(dict(common, messages=messages), s.defaults)
    return await _run(request, s, req, None, chat=False)


async def _run(request: Request, s, req, spec, chat: bool) -> Response:
    started = time.perf_counter()
    ids = await openai_api.prepare(s, req)
    plan = await openai_api.plan_for(s, req, ids)
    job = openai_api.submit(s, plan)
    model = s.engine.model_name
    if req.stream:
        return NDJSONStream(_lines(job, model, spec, chat, len(ids), started), job, on_close=s.queue.forget)
    state, text, calls = await openai_api.collect_one(request, job, plan, spec, s.queue)
    out = _final(model, job, len(ids), state.n_generated, state.finish_reason, started)
    out.update(_piece(text, calls, chat))
    return JSONResponse(out)


def _piece(text: str, calls: list, chat: bool) -> dict:
    if not chat:
        return {"response": text}
    message = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                               "arguments": json.loads(c["function"]["arguments"])}} for c in calls]
    return {"message": message}


async def _lines(job, model: str, spec, chat: bool, n_prompt: int, started: float) -> AsyncIterator[bytes]:
    splitter = tools.CallSplitter() if spec is not None else None
    state = openai_api.ChoiceState(0)
    try:
        async for text in openai_api.visible_text(job, state, splitter):
            yield _line({"model": model, "created_at": _stamp(), **_piece(text, [], chat), "done": False})
    except Exception as err:
        yield _line({"error": core._generation_error(err).message})
        return
    if job.cancelled.is_set():
        return
    rest, calls = splitter.finish(spec) if splitter else ("", [])
    if rest or calls:
        yield _line({"model": model, "created_at": _stamp(), **_piece(rest, calls, chat), "done": False})
    yield _line(dict(_final(model, job, n_prompt, state.n_generated, state.finish_reason, started), **_piece("", [], chat)))


# -- /api/tags, /api/show, /api/version -----------------------------------------------------------

def _details(engine) -> dict:
    reader = getattr(engine, "reader", None)
    arch = reader.get("general.architecture") if reader else None
    size = reader.get("general.size_label") if reader else None
    ftype = reader.get("general.file_type") if reader else None
    return {"format": "gguf", "family": arch or "", "families": [arch] if arch else [],
            "parameter_size": size or "", "quantization_level": _ftype_name(ftype)}


def _ftype_name(ftype) -> str:
    try:
        from ggufile.runtime.gguf.constants import Ftype

        return Ftype(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_") if ftype is not None else ""
    except (ImportError, ValueError):
        return ""


def _card(engine) -> dict:
    path = getattr(getattr(engine, "reader", None), "path", None)
    size = Path(path).stat().st_size if path and Path(path).exists() else 0
    digest = hashlib.sha256(f"{engine.model_name}|{path}|{size}".encode()).hexdigest()
    name = engine.model_name if ":" in engine.model_name else engine.model_name + ":latest"
    return {"name": name, "model": name, "modified_at": _stamp(), "size": size, "digest": digest,
            "details": _details(engine)}


async def tags(request: Request) -> Response:
    return JSONResponse({"models": [_card(core._state(request).engine)]})


@_errors
async def show(request: Request) -> Response:
    engine = core._state(request).engine
    template = getattr(engine, "chat_template", None)
    source = getattr(template, "source", "")
    return JSONResponse({"modelfile": "", "parameters": "", "template": source, "details": _details(engine),
                         "model_info": {"general.architecture": _details(engine)["family"],
                                        "context_length": engine.n_ctx},
                         "capabilities": ["completion"] + (["tools"] if source else [])})


async def version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_VERSION})
