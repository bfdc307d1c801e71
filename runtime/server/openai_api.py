"""OpenAI's /v1/chat/completions and /v1/completions: from a parsed request to the answer,
whole or streamed, with n choices, logprobs, logit_bias and constrained output.

The HTTP plumbing (body limits, the queue, disconnects, error shapes) is app.py's; this module
turns a GenerationRequest into a generation Plan and the Plan's steps into OpenAI's objects.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ggufile.runtime.server import app as core
from ggufile.runtime.server.format import (DONE_EVENT, Choice, Completion, chat_logprobs, completion_logprobs,
                                           sse, timings)
from ggufile.runtime.server.generation import Plan, end_tokens, token_bytes
from ggufile.runtime.server.logits import LogitBias, ban
from ggufile.runtime.server.queue import Job, QueueFull
from ggufile.runtime.server.schema import (ApiError, GenerationRequest, bad_param, parse_chat_request,
                                           parse_completion_request)
from ggufile.runtime.server import tools


async def chat_completions(request: Request) -> Response:
    s = core._state(request)
    return await respond(request, parse_chat_request(await core.read_json(request), s.defaults), chat=True)


async def completions(request: Request) -> Response:
    s = core._state(request)
    return await respond(request, parse_completion_request(await core.read_json(request), s.defaults), chat=False)


# -- request -> plan -------------------------------------------------------------------------------

def resolve_logit_bias(engine, pairs) -> dict[int, float]:
    """Token ids for the bias entries; a text entry biases every token of its tokenization
    (llama.cpp's rule for [["text", bias]])."""
    bias: dict[int, float] = {}
    for token, value in pairs:
        ids = [token] if isinstance(token, int) else engine.tokenize(token, add_special=False)
        core._check_token_ids(engine, ids, "logit_bias")
        for i in ids:
            bias[i] = value
    return bias


def hook_factory(engine, req: GenerationRequest, extra_hooks=None):
    """A function making each choice's hooks, or None when the request needs none."""
    fixed = []
    if req.logit_bias:
        fixed.append(LogitBias(resolve_logit_bias(engine, req.logit_bias)))
    if req.ignore_eos:
        fixed.append(ban(end_tokens(engine)))
    if not fixed and extra_hooks is None:
        return None
    return lambda: fixed + (extra_hooks() if extra_hooks else [])


def make_plan(engine, req: GenerationRequest, ids: list[int], extra_hooks=None) -> Plan:
    return Plan(ids, req.params, req.max_tokens, req.stop, n=req.n, top_logprobs=req.top_logprobs,
                make_hooks=hook_factory(engine, req, extra_hooks))


def submit(s, plan: Plan) -> Job:
    try:
        return s.queue.submit(plan.prompt_ids, plan.params, plan.max_tokens, plan.stop, work=plan.run)
    except QueueFull:
        raise ApiError(503, "the server is busy: too many requests are waiting; retry shortly",
                       type="server_error", code="server_busy", headers={"retry-after": "2"}) from None


async def prepare(s, req: GenerationRequest) -> list[int]:
    ids = await run_in_threadpool(core._prompt_ids, s.engine, req)
    core._check_prompt(s.engine, ids, req)
    return ids


async def plan_for(s, req: GenerationRequest, ids: list[int]) -> Plan:
    """The request's plan, made on the thread pool: a grammar compiles there (the first one
    builds the grammar engine's view of the vocabulary, about a second), and logit_bias texts
    are tokenized there."""
    grammar = None
    if req.constraint is not None:
        from ggufile.runtime.server.constrained import compile_constraint

        grammar = await run_in_threadpool(compile_constraint, s.engine, req.constraint)
    return await run_in_threadpool(make_plan, s.engine, req, ids, grammar)


def setup_tools(engine, req: GenerationRequest):
    """Render the conversation's tool calls and results the way the template can take them, and
    turn a forced tool_choice into a grammar. Returns the ToolSpec whose calls to parse back."""
    source = getattr(engine.chat_template, "source", "")
    native = tools.template_knows_tools(source)
    spec = req.tools
    req.messages = tools.messages_for_template(req.messages, spec, native)
    if spec is None or spec.choice == "none":
        return None
    if native:
        req.template_tools = spec.openai_tools() if spec.choice != "named" else \
            [t for t in spec.openai_tools() if t["function"]["name"] == spec.named]
    grammar = tools.call_grammar(spec, tools.syntax_of(source) if native else "hermes")
    if grammar is not None:
        if req.constraint is not None:
            raise bad_param(req.constraint.param, "a forced tool_choice cannot be combined with another constraint")
        req.constraint = grammar
    return spec


async def respond(request: Request, req: GenerationRequest, chat: bool) -> Response:
    s = core._state(request)
    spec = setup_tools(s.engine, req) if chat else None
    ids = await prepare(s, req)
    plan = await plan_for(s, req, ids)
    job = submit(s, plan)
    completion = Completion(model=s.engine.model_name, chat=chat, system_fingerprint=s.fingerprint)
    echo = req.prompt if req.echo and isinstance(req.prompt, str) else ""
    if req.stream:
        events = stream_events(job, plan, completion, s.engine, len(ids), req.include_usage, echo, spec)
        return core.EventStream(events, job, on_close=s.queue.forget)
    try:
        return JSONResponse(await whole_response(request, job, plan, completion, s.engine, len(ids), echo, spec))
    finally:
        job.cancel()  # no-op when answered; stops the worker if this task was cancelled
        s.queue.forget(job)


# -- plan steps -> OpenAI objects ------------------------------------------------------------------

@dataclass
class ChoiceState:
    """What a choice has produced so far."""

    index: int
    text: list[str] = field(default_factory=list)
    records: list = field(default_factory=list)  # TokenLogprob, in order
    tokens: list[int] = field(default_factory=list)  # drawn, the end token excepted
    finish_reason: str | None = None
    ended_by_token: bool = False  # the model's end token (not a stop string) ended it
    n_generated: int = 0  # tokens drawn, the end token included (what usage reports)

    def feed(self, step) -> None:
        self.text.append(step.text)
        self.n_generated += step.token_id is not None
        if step.token_id is not None and not step.end_of_generation:
            self.tokens.append(step.token_id)
        self.ended_by_token = self.ended_by_token or step.end_of_generation
        self.finish_reason = step.finish_reason or self.finish_reason
        if step.logprob is not None:
            self.records.append(step.logprob)

    def stop_word(self, stops: list[str], engine) -> str | None:
        """The stop string that ended the text, if one did (the earliest in the drawn tokens' text:
        the engine cut the text there)."""
        if self.ended_by_token or self.finish_reason != "stop" or not stops:
            return None
        full = engine.detokenize(self.tokens)
        hits = [(full.find(w), w) for w in stops if w in full]
        return min(hits)[1] if hits else stops[0]


def logprobs_object(completion: Completion, engine, records, text_offset: int = 0) -> dict:
    piece = lambda t: token_bytes(engine, t)
    if completion.chat:
        return chat_logprobs(records, piece)
    return completion_logprobs(records, piece, text_offset)


async def collect(request: Request, job: Job, plan: Plan) -> tuple[list[ChoiceState], int]:
    """Run the job to its end: each choice's text, records and finish reason; tokens generated."""
    # Even without streaming, a client that hangs up frees its place in the queue.
    watcher = core._cancel_on_disconnect(request.receive, job)
    choices = [ChoiceState(i) for i in range(plan.n)]
    n_tokens = 0
    try:
        async for step in job.chunks():
            choices[step.choice].feed(step)
            n_tokens += step.token_id is not None
    except Exception as err:
        raise core._generation_error(err) from None
    finally:
        watcher.cancel()
    return choices, n_tokens


async def visible_text(job: Job, state: ChoiceState, splitter) -> AsyncIterator[str]:
    """A one-choice job's text as a streaming client may see it: every step fed to `state`,
    tool-call markup held back by `splitter` (None: no tools)."""
    async for step in job.chunks():
        state.feed(step)
        text = splitter.feed(step.text) if splitter else step.text
        if text:
            yield text


async def collect_one(request: Request, job: Job, plan: Plan, spec, queue) -> tuple[ChoiceState, str, list]:
    """A one-choice job run to its end and handed back to the queue: (its state, its text and the
    tool calls parsed out of it) -- what every non-streamed dialect answers from."""
    try:
        states, _ = await collect(request, job, plan)
    finally:
        job.cancel()
        queue.forget(job)
    text, calls = "".join(states[0].text), []
    if spec is not None:
        text, calls = tools.parse_output(text, spec)
    return states[0], text, calls


async def whole_response(request: Request, job: Job, plan: Plan, completion: Completion, engine,
                         n_prompt: int, echo: str, spec=None) -> dict:
    states, n_tokens = await collect(request, job, plan)
    choices = []
    for c in states:
        logprobs = None
        if plan.top_logprobs is not None:
            logprobs = logprobs_object(completion, engine, c.records, len(echo))
        text, calls, finish = echo + "".join(c.text), None, c.finish_reason or "length"
        if spec is not None:
            text, calls = tools.parse_output(text, spec)
            finish = "tool_calls" if calls else finish
        choices.append(Choice(c.index, text, finish, logprobs, calls or None))
    return completion.response(choices, n_prompt, n_tokens, timings(job.timings, n_prompt), plan.cached_tokens)


async def stream_events(job: Job, plan: Plan, completion: Completion, engine, n_prompt: int,
                        include_usage: bool, echo: str, spec=None) -> AsyncIterator[bytes]:
    """The SSE stream: per choice a role chunk, content chunks and a finish chunk; then
    [usage] and [DONE]. Logprobs ride on the chunk whose text their tokens completed. With
    tools, text from the first sign of a call on is held and sent as tool_calls deltas."""
    chunk = completion.chunk
    want_logprobs = plan.top_logprobs is not None
    n_tokens, current, pending, offset, splitter = 0, None, [], 0, None

    def start(index: int) -> bytes:
        if completion.chat:
            return sse(chunk(role=True, include_usage=include_usage, index=index))
        return sse(chunk(echo, include_usage=include_usage, index=index)) if echo else b""

    def lp() -> dict | None:
        return logprobs_object(completion, engine, pending, offset) if want_logprobs and pending else None

    try:
        async for step in job.chunks():
            if step.choice != current:
                current, pending, offset = step.choice, [], len(echo)
                splitter = tools.CallSplitter() if spec is not None else None
                if data := start(current):
                    yield data
            n_tokens += step.token_id is not None
            if step.logprob is not None:
                pending.append(step.logprob)
            text = splitter.feed(step.text) if splitter else step.text
            if text:
                yield sse(chunk(text, include_usage=include_usage, index=current, logprobs=lp()))
                offset += len(text)
                pending = []
            if step.finish_reason:
                finish = step.finish_reason
                if splitter is not None:
                    rest, calls = splitter.finish(spec)
                    if rest:
                        yield sse(chunk(rest, include_usage=include_usage, index=current))
                    if calls:
                        deltas = [dict(call, index=k) for k, call in enumerate(calls)]
                        yield sse(chunk(include_usage=include_usage, index=current, tool_calls=deltas))
                        finish = "tool_calls"
                last = step.choice == plan.n - 1
                timing = timings(job.timings, n_prompt) if last and not include_usage else None
                yield sse(chunk(finish_reason=finish, include_usage=include_usage, index=current,
                                logprobs=lp(), timing=timing))
                pending = []
    except Exception as err:
        yield sse(core._generation_error(err).body())  # headers are sent: the error goes in-band
        return
    if job.cancelled.is_set():
        return  # the client is gone; nobody reads a tail
    if include_usage:
        yield sse(completion.usage_chunk(n_prompt, n_tokens, timings(job.timings, n_prompt), plan.cached_tokens))
    yield DONE_EVENT
