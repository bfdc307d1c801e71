"""OpenAI's Responses API: POST /v1/responses (whole or streamed), stateless.

The request is translated into the chat request it means (instructions as the system prompt;
input items: messages, function_call, function_call_output; text.format as response_format;
tools flattened) and validated by schema.py; the answer is rebuilt as a `response` object with
message and function_call output items, or as its typed event stream. Nothing is stored, so
previous_response_id is refused (send the whole conversation in `input`).
"""
from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ggufile.runtime.server import app as core
from ggufile.runtime.server import openai_api, tools
from ggufile.runtime.server.schema import ApiError, bad_param, join_text_parts, parse_chat_request

# Fields this server cannot honour: refused unless neutral.
REFUSED = {"previous_response_id": (None,), "reasoning": (None, {}), "background": (None, False),
           "conversation": (None,), "prompt": (None,), "include": (None, [])}


def routes():
    from starlette.routing import Route

    return [Route("/v1/responses", responses, methods=["POST"]), Route("/responses", responses, methods=["POST"])]


def to_chat(body) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    for name, neutral in REFUSED.items():
        if body.get(name) not in neutral:
            raise bad_param(name, f"'{name}' is not supported by this server (it keeps no state)"
                            if name == "previous_response_id" else f"'{name}' is not supported", "unsupported_value")
    messages = []
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad_param("input", "'input' must be a string or a non-empty list of items", "invalid_type")
    for i, item in enumerate(items):
        _add_item(messages, i, item)
    out = {"messages": messages, "stream": body.get("stream", False)}
    for ours, theirs in (("max_tokens", "max_output_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("parallel_tool_calls", "parallel_tool_calls"), ("seed", "seed")):
        if body.get(theirs) is not None:
            out[ours] = body[theirs]
    if body.get("tools"):
        out["tools"] = [_tool(t) for t in body["tools"]]
        choice = body.get("tool_choice")
        if isinstance(choice, dict) and choice.get("type") == "function":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        if choice is not None:
            out["tool_choice"] = choice
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if fmt is not None:
        out["response_format"] = _format(fmt)
    return out


def _add_item(messages: list, i: int, item) -> None:
    where = f"input[{i}]"
    if not isinstance(item, dict):
        raise bad_param(where, f"'{where}' must be an object", "invalid_type")
    kind = item.get("type", "message")
    if kind == "message":
        content = item.get("content")
        if isinstance(content, list):
            content = join_text_parts([dict(p, type="text") if isinstance(p, dict) and p.get("type") in
                                       ("input_text", "output_text") else p for p in content], f"{where}.content")
        messages.append({"role": item.get("role"), "content": content})
    elif kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
        if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
            messages[-1]["tool_calls"].append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        messages.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")),
                         "content": output if isinstance(output, str) else json.dumps(output)})
    elif kind == "reasoning":
        pass  # earlier turns' reasoning: not part of what this model reads
    else:
        raise bad_param(where, f"input items of type '{kind}' are not supported", "unsupported_value")


def _tool(t) -> dict:
    if not isinstance(t, dict) or t.get("type") != "function":
        raise bad_param("tools", "only function tools are supported (no built-in tools)", "unsupported_value")
    fn = {k: t[k] for k in ("name", "description", "parameters") if k in t}
    return {"type": "function", "function": fn}


def _format(fmt) -> dict:
    if not isinstance(fmt, dict):
        raise bad_param("text", "'text.format' must be an object", "invalid_type")
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema")}}
    return {"type": fmt.get("type")}


# -- the endpoint ---------------------------------------------------------------------------------

class Reply:
    """The response object being built (ids fixed up front: stream events repeat them)."""

    def __init__(self, s, body: dict, req):
        self.id = "resp_" + secrets.token_hex(12)
        self.message_id = "msg_" + secrets.token_hex(12)
        self.created = int(time.time())
        self.s, self.body, self.req = s, body, req

    def obj(self, status: str, output: list, usage: dict | None = None, incomplete: str | None = None) -> dict:
        body = self.body
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.s.engine.model_name, "output": output, "error": None,
                "incomplete_details": {"reason": incomplete} if incomplete else None,
                "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                "temperature": self.req.params.temperature, "top_p": self.req.params.top_p,
                "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto",
                "parallel_tool_calls": body.get("parallel_tool_calls", True),
                "text": body.get("text") or {"format": {"type": "text"}}, "previous_response_id": None,
                "reasoning": None, "store": False, "truncation": "disabled", "metadata": body.get("metadata") or {},
                "usage": usage}

    def message(self, text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [_text_part(text)] if status == "completed" else []}

    @staticmethod
    def function_call(call: dict) -> dict:
        return {"type": "function_call", "id": "fc_" + call["id"][len("call_"):], "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}

    def usage(self, n_prompt: int, n_out: int, cached: int) -> dict:
        return {"input_tokens": n_prompt, "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": n_prompt + n_out}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


async def responses(request: Request) -> Response:
    s = core._state(request)
    body = await core.read_json(request)
    req = parse_chat_request(to_chat(body), s.defaults)
    spec = openai_api.setup_tools(s.engine, req)
    ids = await openai_api.prepare(s, req)
    plan = await openai_api.plan_for(s, req, ids)
    job = openai_api.submit(s, plan)
    reply = Reply(s, body, req)
    if req.stream:
        return core.EventStream(_events(job, reply, spec, len(ids), plan), job, on_close=s.queue.forget)
    state, text, calls = await openai_api.collect_one(request, job, plan, spec, s.queue)
    output = ([reply.message(text)] if text or not calls else []) + [reply.function_call(c) for c in calls]
    incomplete = "max_output_tokens" if state.finish_reason == "length" and not calls else None
    return JSONResponse(reply.obj("incomplete" if incomplete else "completed", output,
                                  reply.usage(len(ids), state.n_generated, plan.cached_tokens), incomplete))


async def _events(job, reply: Reply, spec, n_prompt: int, plan) -> AsyncIterator[bytes]:
    seq = 0

    def event(kind: str, **data) -> bytes:
        nonlocal seq
        payload = {"type": kind, "sequence_number": seq, **data}
        seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    yield event("response.created", response=reply.obj("in_progress", []))
    yield event("response.in_progress", response=reply.obj("in_progress", []))
    splitter = tools.CallSplitter() if spec is not None else None
    state = openai_api.ChoiceState(0)
    text_parts, opened = [], False
    where = {"item_id": reply.message_id, "output_index": 0, "content_index": 0}

    def delta(text: str) -> bytes:
        nonlocal opened
        out = b""
        if not opened:
            out += event("response.output_item.added", output_index=0, item=reply.message("", "in_progress"))
            out += event("response.content_part.added", part=_text_part(""), **where)
            opened = True
        text_parts.append(text)
        return out + event("response.output_text.delta", delta=text, logprobs=[], **where)
    try:
        async for text in openai_api.visible_text(job, state, splitter):
            yield delta(text)
    except Exception as err:
        yield event("error", code="server_error", message=core._generation_error(err).message, param=None)
        return
    if job.cancelled.is_set():
        return
    calls = []
    if splitter is not None:
        rest, calls = splitter.finish(spec)
        if rest:
            yield delta(rest)
    output = []
    if opened or not calls:
        if not opened:
            yield delta("")
        text = "".join(text_parts)
        yield event("response.output_text.done", text=text, logprobs=[], **where)
        yield event("response.content_part.done", part=_text_part(text), **where)
        output.append(reply.message(text))
        yield event("response.output_item.done", output_index=0, item=output[-1])
    for call in calls:
        item, index = reply.function_call(call), len(output)
        yield event("response.output_item.added", output_index=index, item=dict(item, arguments="", status="in_progress"))
        yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                    delta=item["arguments"])
        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                    arguments=item["arguments"])
        output.append(item)
        yield event("response.output_item.done", output_index=index, item=item)
    incomplete = "max_output_tokens" if state.finish_reason == "length" and not calls else None
    final = reply.obj("incomplete" if incomplete else "completed", output,
                      reply.usage(n_prompt, state.n_generated, plan.cached_tokens), incomplete)
    yield event("response.incomplete" if incomplete else "response.completed", response=final)
