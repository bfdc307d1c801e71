"""`--server`: an OpenAI-compatible HTTP API and a small chat page, served by uvicorn.

    serve(engine, host="127.0.0.1", port=8080)        # blocks until Ctrl-C / SIGTERM
    app = create_app(engine)                          # the Starlette app alone (tests)

Routes: GET / (web UI), GET /health, GET /v1/models[/{id}], POST /v1/chat/completions,
POST /v1/completions (both with `stream`), POST /tokenize and /detokenize (llama.cpp's shapes);
the OpenAI routes also without the /v1 prefix, as llama-server has them. The generation
endpoints themselves live in one module per API dialect (openai_api.py, ...).

The server serves one model, so the `model` field may name anything ("gpt-4o", "any"), as in
llama-server and llamafile: the answer reports the served model's name (--alias sets it).

Generation runs on parallel slots, requests in arrival order (server/queue.py, slots.py), the
slots' tokens batched into one model step (batcher.py); GET /slots and /metrics say what they
are doing. This module is the HTTP side: validate, tokenize, queue, stream back, and stop the generation
when the client goes away. Errors always have OpenAI's shape and never carry a traceback.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import webbrowser
from collections.abc import AsyncIterator, Callable, Iterable
from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ggufile.runtime.errors import GGUFileError
from ggufile.runtime.server.schema import ApiError, Defaults, GenerationRequest, parse_detokenize
from ggufile.runtime.server.guard import LOOPBACK_HOSTS, Guard, is_loopback, log_unexpected
from ggufile.runtime.server.limits import UnencodableText, bounded_protocol, check_encodable
from ggufile.runtime.server.queue import GenerationQueue, Job
from ggufile.runtime.server.slots import DEFAULT_PARALLEL

DEFAULT_MAX_BODY = 4 << 20  # 4 MiB: far more than any context's worth of text
DEFAULT_MAX_WAITING = 8

logger = logging.getLogger("ggufile.server")


# -- the app ---------------------------------------------------------------------------------------

class ServerState:
    """What every handler needs: the engine, the generation queue and the limits."""

    def __init__(self, engine, max_body_bytes: int, max_waiting: int, defaults: Defaults | None = None,
                 embeddings: bool = False, parallel: int = DEFAULT_PARALLEL):
        self.engine = engine
        self.max_body_bytes = max_body_bytes
        self.queue = GenerationQueue(engine, max_waiting=max_waiting, parallel=parallel)
        self.defaults = defaults or Defaults()
        self.embeddings = embeddings
        self.fingerprint = fingerprint(engine)


def fingerprint(engine) -> str:
    """OpenAI's system_fingerprint: changes when what answers changes (version, model, context)."""
    import hashlib

    from ggufile.runtime import __version__

    path = getattr(getattr(engine, "reader", None), "path", None)
    key = f"{__version__}|{engine.model_name}|{path and Path(path).name}|{engine.n_ctx}"
    return "fp_ggufile_" + hashlib.sha256(key.encode()).hexdigest()[:10]


def create_app(engine, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               max_waiting: int = DEFAULT_MAX_WAITING, allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
               allowed_origins: Iterable[str] = (), defaults: Defaults | None = None,
               embeddings: bool = False, parallel: int = DEFAULT_PARALLEL) -> Guard:
    """The ASGI app (Starlette wrapped in the Host/Origin/API-key guard).

    allowed_hosts: Host header names accepted (None: any; use when listening beyond loopback).
    allowed_origins: foreign web origins allowed to call the API (CORS); default none.
    max_waiting: requests that may wait behind the running one before new ones get 503.
    defaults: sampling and max_tokens for requests that leave them out (the command line's).
    embeddings: serve /v1/embeddings (llama-server's --embeddings).
    parallel: generation slots (requests served at once, their tokens batched)."""
    state = ServerState(engine, max_body_bytes, max_waiting, defaults, embeddings, parallel)
    routes = [
        Route("/", index, methods=["GET"]),
        Route("/index.html", index, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/health", health, methods=["GET"]),
        Route("/slots", slots, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        *api_routes(),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=_lifespan(state))
    app.state.s = state
    guard = Guard(app, api_key=api_key, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins)
    guard.server_state = state  # for make_server's shutdown hook
    return guard


def _lifespan(state: ServerState):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.queue.stop()  # the worker thread exits once its current job ends
    return lifespan


def _state(request: Request) -> ServerState:
    return request.app.state.s


# -- errors ----------------------------------------------------------------------------------------

def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def api_error(request: Request, err: ApiError) -> Response:
    return error_response(err)


async def http_error(request: Request, err: HTTPException) -> Response:
    """Starlette's own 404/405 in OpenAI's shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
    return error_response(ApiError(err.status_code, message, code=code))


async def internal_error(request: Request, err: Exception) -> Response:
    log_unexpected(f"internal error on {request.method} {request.url.path}", err)
    return error_response(ApiError(500, "internal server error", type="server_error", code="internal_error"))


# -- request bodies --------------------------------------------------------------------------------

async def read_json(request: Request):
    """The body as JSON, refusing more than max_body_bytes whether or not Content-Length says so."""
    limit = _state(request).max_body_bytes
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large",
                         headers={"connection": "close"})
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_large
    body, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        body.append(part)
    try:
        data = json.loads(b"".join(body))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    try:
        check_encodable(data)
    except UnencodableText as err:
        raise ApiError(400, str(err), code="invalid_text") from None
    return data


# -- simple routes ---------------------------------------------------------------------------------

_index_html: bytes | None = None


def index_html() -> bytes:
    """The web page, read through importlib.resources so it also works frozen (PyInstaller)."""
    global _index_html
    if _index_html is None:
        _index_html = resources.files("ggufile.runtime").joinpath("webui/index.html").read_bytes()
    return _index_html


async def index(request: Request) -> Response:
    # The page talks to this server only; forbid framing (clickjacking) and foreign scripts.
    headers = {"content-security-policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                          "style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
               "x-frame-options": "DENY", "cache-control": "no-cache"}
    return Response(index_html(), media_type="text/html; charset=utf-8", headers=headers)


async def health(request: Request) -> Response:
    s = _state(request)
    busy = s.queue.busy
    return JSONResponse({"status": "ok", "model": s.engine.model_name, "queued": s.queue.pending,
                         "slots_idle": len(s.queue.slots) - busy, "slots_processing": busy})


async def slots(request: Request) -> Response:
    s = _state(request)
    return JSONResponse([slot.describe(s.engine.n_ctx) for slot in s.queue.slots])


async def metrics(request: Request) -> Response:
    """Prometheus text, llama-server's metric names."""
    q = _state(request).queue
    m = q.metrics
    rows = [
        ("requests_total", "counter", "Requests answered.", m.requests),
        ("prompt_tokens_total", "counter", "Prompt tokens processed.", m.prompt_tokens),
        ("prompt_seconds_total", "counter", "Prompt processing time.", round(m.prompt_seconds, 6)),
        ("tokens_predicted_total", "counter", "Generated tokens.", m.predicted_tokens),
        ("tokens_predicted_seconds_total", "counter", "Generation time.", round(m.predicted_seconds, 6)),
        ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s.",
         round(m.prompt_tokens / m.prompt_seconds, 3) if m.prompt_seconds else 0),
        ("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s (per request).",
         round(m.predicted_tokens / m.predicted_seconds, 3) if m.predicted_seconds else 0),
        ("requests_processing", "gauge", "Requests on a slot.", q.busy),
        ("requests_deferred", "gauge", "Requests waiting for a slot.", q.waiting),
        ("n_decode_total", "counter", "Batched model steps.", q.batcher.steps if q.batcher else 0),
    ]
    text = "".join(f"# HELP llamacpp:{name} {help_}\n# TYPE llamacpp:{name} {kind}\nllamacpp:{name} {value}\n"
                   for name, kind, help_, value in rows)
    return Response(text, media_type="text/plain; version=0.0.4")


def _model_card(engine) -> dict:
    return {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "ggufile",
            "meta": {"n_ctx": engine.n_ctx}}


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(_state(request).engine)]})


async def get_model(request: Request) -> Response:
    # Any name means the served model (see the module's docstring).
    return JSONResponse(_model_card(_state(request).engine))


def api_routes() -> list[Route]:
    """The API dialects' routes (imported here: their modules import this one)."""
    from ggufile.runtime.server import (anthropic_api, embeddings, llamacpp_api, ollama_api, openai_api,
                                        responses_api)

    post = [("/chat/completions", openai_api.chat_completions), ("/completions", openai_api.completions)]
    routes = [Route("/v1/models", list_models, methods=["GET"]), Route("/models", list_models, methods=["GET"]),
              Route("/v1/models/{model_id:path}", get_model, methods=["GET"]), *llamacpp_api.routes(),
              *anthropic_api.routes(), *embeddings.routes(), *responses_api.routes(), *ollama_api.routes()]
    for path, handler in post:
        routes += [Route("/v1" + path, handler, methods=["POST"]), Route(path, handler, methods=["POST"])]
    return routes


def vocab_size(engine) -> int | None:
    """The engine's vocabulary size, if it tells (token ids from clients are checked against it)."""
    return getattr(engine, "n_vocab", None) or getattr(getattr(engine, "tokenizer", None), "vocab_size", None)


def _check_token_ids(engine, ids: list[int], param: str) -> None:
    # Negative ids would silently index from the end of Python lists; large ones crash deep inside.
    n = vocab_size(engine)
    if ids and (min(ids) < 0 or (n and max(ids) >= n)):
        raise ApiError(400, f"'{param}' holds token ids outside the vocabulary", param=param, code="invalid_value")


async def detokenize(request: Request) -> Response:
    ids = parse_detokenize(await read_json(request))
    engine = _state(request).engine
    _check_token_ids(engine, ids, "tokens")
    try:
        text = await run_in_threadpool(engine.detokenize, ids)
    except (IndexError, KeyError, ValueError, OverflowError):
        raise ApiError(400, "'tokens' holds ids outside the vocabulary", param="tokens", code="invalid_value") from None
    return JSONResponse({"content": text})


# -- generation helpers (shared by the API dialects) -----------------------------------------

def _prompt_ids(engine, req: GenerationRequest) -> list[int]:
    """Tokenize (runs on a thread pool: the tokenizer is read-only, so no engine lock needed)."""
    try:
        if req.messages is not None:
            if req.template_tools:
                return engine.chat_ids(req.messages, tools=req.template_tools)
            return engine.chat_ids(req.messages)
        if isinstance(req.prompt, list):
            return list(req.prompt)
        # A raw prompt is the caller's whole prompt, markup included, as in llama.cpp.
        return engine.tokenize(req.prompt, add_special=True, parse_special=True)
    except GGUFileError as err:  # e.g. the chat template refused the messages
        raise ApiError(400, str(err), param="messages" if req.messages is not None else "prompt") from None


def _check_prompt(engine, ids: list[int], req: GenerationRequest) -> None:
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt" if req.messages is None else "messages")
    if len(ids) >= engine.n_ctx:
        raise ApiError(400, f"the prompt has {len(ids)} tokens but the context holds {engine.n_ctx} "
                            "(one more is needed for the answer)",
                       param="messages" if req.messages is not None else "prompt", code="context_length_exceeded")
    if isinstance(req.prompt, list):
        _check_token_ids(engine, ids, "prompt")


def _generation_error(err: BaseException) -> ApiError:
    if isinstance(err, GGUFileError):
        return ApiError(400, str(err))
    log_unexpected("generation failed", err)
    return ApiError(500, "generation failed (internal error)", type="server_error", code="internal_error")


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _cancel_on_disconnect(receive, job: Job) -> asyncio.Task:
    """A task that cancels `job` if the client hangs up; cancel the task when done."""
    def done(task: asyncio.Task) -> None:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it; a receive error counts as gone
            job.cancel()
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    watcher.add_done_callback(done)
    return watcher


class EventStream(Response):
    """Server-sent events that cancel their job the moment the client disconnects.

    Uvicorn silently drops writes to a closed connection, so disconnects are detected by
    listening on `receive` alongside the writing, not by a failed send."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], job: Job, on_close: Callable[[Job], None]):
        self.events = events
        self.job = job
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        watcher = _cancel_on_disconnect(receive, self.job)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # Uvicorn cancels responses still running at the end of a graceful shutdown; the
            # job is cancelled below and there is nobody left to tell, so end quietly.
            pass
        finally:
            watcher.cancel()
            self.job.cancel()
            self.on_close(self.job)
            await self.events.aclose()


# -- serving ---------------------------------------------------------------------------------------

def bind_socket(host: str, port: int) -> socket.socket:
    """Listen before uvicorn starts, so a taken port is a clear error (uvicorn would sys.exit)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise GGUFileError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def make_server(app, sock: socket.socket):
    """A quiet uvicorn server for `app`: pure-Python h11 and asyncio, no reload, no access log.
    On shutdown, running and queued generations end at once instead of running to completion."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            state = getattr(app, "server_state", None)
            if state is not None:
                state.queue.cancel_all()
            await super().shutdown(sockets=sockets)

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, http=bounded_protocol(), loop="asyncio", ws="none",
                            lifespan="on", log_level="warning", access_log=False, server_header=False,
                            timeout_graceful_shutdown=3, timeout_keep_alive=30)
    return Server(config)


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to tell the user when the server is reachable from other machines."""
    if is_loopback(host):
        return None
    where = "every network interface" if host in ("0.0.0.0", "::", "") else host
    return (f"warning: listening on {where}: the model is shared with every machine that can reach this one"
            + ("" if api_key else "; anyone there can use it (set --api-key to require a key)"))


def serve(engine, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          open_browser: bool = True, max_body_bytes: int = DEFAULT_MAX_BODY,
          log: Callable[[str], None] = print, allowed_origins: Iterable[str] = (),
          max_waiting: int = DEFAULT_MAX_WAITING, defaults: Defaults | None = None,
          embeddings: bool = False, parallel: int = DEFAULT_PARALLEL) -> None:
    """Serve `engine` until Ctrl-C or SIGTERM. Prints the URL; opens a browser unless told not to."""
    loopback = is_loopback(host)
    app = create_app(engine, api_key=api_key, max_body_bytes=max_body_bytes, max_waiting=max_waiting,
                     allowed_hosts=LOOPBACK_HOSTS if loopback else None, allowed_origins=allowed_origins,
                     defaults=defaults, embeddings=embeddings, parallel=parallel)
    sock = bind_socket(host, port)
    server = make_server(app, sock)
    url = _url(host, sock.getsockname()[1])
    warning = exposure_warning(host, api_key)
    if warning:
        log(warning)
    threading.Thread(target=_announce, args=(server, url, engine.model_name, open_browser, log),
                     daemon=True).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled gracefully
        pass
    finally:
        sock.close()
        log("server stopped")


def _announce(server, url: str, model: str, open_browser: bool, log) -> None:
    """Print the URL (and open the browser) once uvicorn is actually accepting connections."""
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    log(f"serving {model} at {url}  (OpenAI API: {url}v1, Ctrl-C to stop)")
    if open_browser:
        try:
            webbrowser.open(url)
        except Exception:  # no browser is not an error: the URL is printed
            pass
