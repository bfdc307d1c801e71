"""llama.cpp's own endpoints, in llama-server's shapes: POST /completion, GET /props,
POST /apply-template, POST /tokenize (with_pieces).

/completion takes the same sampling fields as the OpenAI endpoints (schema.py) plus llama.cpp's
n_probs, cache_prompt, return_tokens; it answers llama-server's object (content, tokens,
stop_type, completion_probabilities, ...) and streams it as `data:` events without [DONE].
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ggufile.runtime.errors import GGUFileError
from ggufile.runtime.server import app as core
from ggufile.runtime.server import openai_api
from ggufile.runtime.server.format import sse, timings
from ggufile.runtime.server.generation import Plan, token_bytes
from ggufile.runtime.server.schema import (ApiError, boolean, bad_param, parse_chat_request,
                                           parse_completion_request, parse_tokenize)
from ggufile.runtime.server.queue import Job

BUILD_INFO = "ggufile"


def routes():
    from starlette.routing import Route

    return [Route("/completion", completion, methods=["POST"]), Route("/props", props, methods=["GET"]),
            Route("/apply-template", apply_template, methods=["POST"]),
            Route("/tokenize", tokenize, methods=["POST"])]


def params_json(params, max_tokens: int | None, **extra) -> dict:
    """llama-server's `generation_settings` / `params` object for our sampling parameters."""
    return {"n_predict": -1 if max_tokens is None else max_tokens, "seed": -1 if params.seed is None else params.seed,
            "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
            "min_p": params.min_p, "repeat_last_n": params.repeat_last_n, "repeat_penalty": params.repeat_penalty,
            "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty, **extra}


# -- POST /completion -----------------------------------------------------------------------------

async def completion(request: Request) -> Response:
    s = core._state(request)
    body = await core.read_json(request)
    req = parse_completion_request(body, s.defaults)
    if req.n != 1:
        raise bad_param("n", "/completion makes one completion; use /v1/completions for n > 1")
    cache_prompt = boolean(body, "cache_prompt", True)
    return_tokens = boolean(body, "return_tokens")
    ids = await openai_api.prepare(s, req)
    plan = await openai_api.plan_for(s, req, ids)
    plan.reset_cache = not cache_prompt
    job = openai_api.submit(s, plan)
    final = Final(s, req, plan, ids, return_tokens)
    if req.stream:
        return core.EventStream(_stream(job, final), job, on_close=s.queue.forget)
    try:
        return JSONResponse(await _whole(request, job, final))
    finally:
        job.cancel()
        s.queue.forget(job)


class Final:
    """Builds llama-server's completion objects as the steps come in."""

    def __init__(self, s, req, plan: Plan, prompt_ids: list[int], return_tokens: bool):
        self.engine, self.req, self.plan, self.prompt_ids = s.engine, req, plan, prompt_ids
        self.return_tokens = return_tokens
        self.state = openai_api.ChoiceState(0)
        self.feed = self.state.feed

    @property
    def tokens(self) -> list[int]:
        return self.state.tokens

    @property
    def stop_type(self) -> str:
        if self.state.finish_reason != "stop":
            return "limit"
        return "eos" if self.state.ended_by_token else "word"

    def probs(self, records) -> list[dict]:
        piece = lambda t: token_bytes(self.engine, t)

        def entry(token, logprob):
            raw = piece(token)
            return {"id": token, "token": raw.decode("utf-8", "replace"), "bytes": list(raw), "logprob": logprob}
        return [dict(entry(r.token, r.logprob), top_logprobs=[entry(t, lp) for t, lp in r.top]) for r in records]


    def partial(self, step, new_tokens: list[int], records: list) -> dict:
        out = {"index": 0, "content": step.text, "tokens": new_tokens if self.return_tokens else [],
               "stop": False, "id_slot": 0, "tokens_predicted": len(self.tokens),
               "tokens_evaluated": len(self.prompt_ids)}
        if records:
            out["completion_probabilities"] = self.probs(records)
        return out

    def whole(self, job: Job, streamed: bool) -> dict:
        text = "".join(self.state.text)
        req, n_prompt = self.req, len(self.prompt_ids)
        out = {"index": 0, "content": "" if streamed else text,
               "tokens": [] if streamed or not self.return_tokens else self.tokens,
               "id_slot": 0, "stop": True, "model": self.engine.model_name,
               "tokens_predicted": len(self.tokens), "tokens_evaluated": n_prompt,
               "generation_settings": params_json(req.params, req.max_tokens, stop=req.stop, stream=req.stream,
                                                  ignore_eos=req.ignore_eos, n_probs=req.top_logprobs or 0),
               "prompt": req.prompt if isinstance(req.prompt, str) else self.engine.detokenize(req.prompt),
               "has_new_line": "\n" in text, "truncated": False, "stop_type": self.stop_type,
               "stopping_word": self.state.stop_word(req.stop, self.engine) or "",
               "tokens_cached": n_prompt + len(self.tokens),
               "timings": timings(job.timings, n_prompt)}
        if not streamed and self.plan.top_logprobs is not None:
            out["completion_probabilities"] = self.probs(self.state.records)
        return out


async def _whole(request: Request, job: Job, final: Final) -> dict:
    watcher = core._cancel_on_disconnect(request.receive, job)
    try:
        async for step in job.chunks():
            final.feed(step)
    except Exception as err:
        raise core._generation_error(err) from None
    finally:
        watcher.cancel()
    return final.whole(job, streamed=False)


async def _stream(job: Job, final: Final) -> AsyncIterator[bytes]:
    tokens, records = [], []
    try:
        async for step in job.chunks():
            final.feed(step)
            if step.token_id is not None and not step.end_of_generation:
                tokens.append(step.token_id)
            if step.logprob is not None:
                records.append(step.logprob)
            if step.text:
                yield sse(final.partial(step, tokens, records))
                tokens, records = [], []
    except Exception as err:
        yield sse(core._generation_error(err).body())
        return
    if not job.cancelled.is_set():
        yield sse(final.whole(job, streamed=True))


# -- GET /props, POST /apply-template, POST /tokenize ---------------------------------------------

async def props(request: Request) -> Response:
    s = core._state(request)
    engine = s.engine
    template = _template(engine)
    path = getattr(getattr(engine, "reader", None), "path", None)
    return JSONResponse({
        "default_generation_settings": {"params": params_json(s.defaults.params, s.defaults.max_tokens),
                                        "n_ctx": engine.n_ctx},
        "total_slots": len(s.queue.slots), "model_alias": engine.model_name, "model_path": str(path and Path(path).name or ""),
        "modalities": {"vision": False, "video": False, "audio": False},
        "chat_template": getattr(template, "source", ""),
        "bos_token": getattr(template, "bos_token", ""), "eos_token": getattr(template, "eos_token", ""),
        "build_info": f"{BUILD_INFO} {_version()}", "is_sleeping": False,
    })


def _version() -> str:
    from ggufile.runtime import __version__

    return __version__


def _template(engine):
    try:
        return engine.chat_template
    except GGUFileError:
        return None


async def apply_template(request: Request) -> Response:
    """The prompt the chat endpoint would give the model for these messages, as text."""
    s = core._state(request)
    req = parse_chat_request(await core.read_json(request), s.defaults)
    try:
        prompt = await run_in_threadpool(s.engine.chat_template.render, req.messages, True)
    except GGUFileError as err:
        raise ApiError(400, str(err), param="messages") from None
    return JSONResponse({"prompt": prompt})


async def tokenize(request: Request) -> Response:
    body = await core.read_json(request)
    content, add_special, parse_special = parse_tokenize(body)
    with_pieces = boolean(body, "with_pieces")
    engine = core._state(request).engine
    ids = await run_in_threadpool(engine.tokenize, content, add_special, parse_special)
    if not with_pieces:
        return JSONResponse({"tokens": ids})
    return JSONResponse({"tokens": [{"id": i, "piece": _piece_json(token_bytes(engine, i))} for i in ids]})


def _piece_json(raw: bytes):
    """The piece as text, or as its bytes when it is not valid UTF-8 alone (llama-server's rule)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)
