"""POST /v1/embeddings (and /embeddings): pooled, L2-normalised hidden states, as llama-server
computes them with --embeddings.

The hidden state is the model's final-norm output (llama.cpp's `result_norm`), obtained by running
the unchanged forward pass of a twin Model whose output matrix is the identity: its "logits" are
exactly the normed hidden states. Pooling follows the GGUF's `<arch>.pooling_type` (1 mean, 2 cls,
3 last); a generative model has none and gets mean pooling, as in llama-server. Each input runs
in its own small KV cache, on the generation worker (one at a time with generations).
"""
from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ggufile.runtime.sampling import SamplingParams
from ggufile.runtime.server import app as core
from ggufile.runtime.server.queue import QueueFull
from ggufile.runtime.server.schema import ApiError, bad_param

MAX_INPUTS = 256
POOLING = {1: "mean", 2: "cls", 3: "last"}  # GGUF pooling_type -> ours; others: mean


def routes():
    from starlette.routing import Route

    return [Route("/v1/embeddings", embeddings, methods=["POST"]), Route("/embeddings", embeddings, methods=["POST"])]


@dataclass(frozen=True)
class Embeddings:
    """The worker's answer: one vector per input (the queue counts items with token_id)."""

    vectors: list[np.ndarray]
    token_id: None = None


class Embedder:
    """The hidden-state twin of the engine's model, built on first use."""

    def __init__(self, engine):
        from ggufile.runtime.gguf.constants import GGMLType
        from ggufile.runtime.model.transformer import QW, Model

        model = engine.model
        eye = QW(np.eye(model.config.n_embd, dtype=np.float32), GGMLType.F32)
        self.model = Model(model.config, dataclasses.replace(model.weights, output=eye))
        self.pooling = pooling_of(engine)

    def embed(self, ids: list[int]) -> np.ndarray:
        hidden = self.model.forward(np.asarray(ids, dtype=np.int32), self.model.new_cache(len(ids)),
                                    all_logits=True)  # (n, n_embd); all_logits skips the compiled step
        pooled = {"mean": lambda h: h.mean(axis=0), "cls": lambda h: h[0], "last": lambda h: h[-1]}[self.pooling](
            hidden.astype(np.float64))
        norm = np.linalg.norm(pooled)
        return (pooled / norm if norm > 0 else pooled).astype(np.float32)


def pooling_of(engine) -> str:
    reader = engine.reader
    arch = reader.get("general.architecture")
    return POOLING.get(reader.get(f"{arch}.pooling_type"), "mean")


_embedders: dict[int, Embedder] = {}


def embedder(engine) -> Embedder:
    key = id(engine)
    if key not in _embedders:
        _embedders[key] = Embedder(engine)
    return _embedders[key]


def parse_inputs(body) -> tuple[list, str]:
    """-> (inputs: each a string or a list of token ids, encoding_format)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    value = body.get("input", body.get("content"))  # llama.cpp's /embeddings also reads `content`
    is_ids = lambda v: isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
    if isinstance(value, str) or is_ids(value):
        inputs = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) or is_ids(v) for v in value):
        inputs = value
    else:
        raise bad_param("input", "'input' must be a string, a list of strings or token id lists", "invalid_type")
    if len(inputs) > MAX_INPUTS:
        raise bad_param("input", f"at most {MAX_INPUTS} inputs per request")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad_param("encoding_format", "'encoding_format' must be float or base64")
    if body.get("dimensions") is not None:
        raise bad_param("dimensions", "'dimensions' is not supported (the model's size is fixed)", "unsupported_value")
    return inputs, fmt


async def embeddings(request: Request) -> Response:
    s = core._state(request)
    if not s.embeddings:
        raise ApiError(501, "this server does not compute embeddings; start it with --embeddings",
                       type="not_supported_error", code="not_supported")
    inputs, fmt = parse_inputs(await core.read_json(request))
    engine = s.engine

    def tokenize_all() -> list[list[int]]:
        return [engine.tokenize(v, add_special=True, parse_special=True) if isinstance(v, str) else list(v)
                for v in inputs]
    batches = await run_in_threadpool(tokenize_all)
    for i, ids in enumerate(batches):
        core._check_token_ids(engine, ids, "input")
        if not ids or len(ids) > engine.n_ctx:
            raise bad_param("input", f"input {i} has {len(ids)} tokens; 1 to {engine.n_ctx} fit")

    def work(eng, cancelled=None) -> Iterator[Embeddings]:
        e = embedder(eng)
        yield Embeddings([e.embed(ids) for ids in batches])
    try:
        job = s.queue.submit([], SamplingParams(), None, [], work=work)
    except QueueFull:
        raise ApiError(503, "the server is busy; retry shortly", type="server_error", code="server_busy",
                       headers={"retry-after": "2"}) from None
    vectors = []
    try:
        async for item in job.chunks():
            vectors = item.vectors
    except Exception as err:
        raise core._generation_error(err) from None
    finally:
        job.cancel()
        s.queue.forget(job)
    n_tokens = sum(len(ids) for ids in batches)
    return JSONResponse({"object": "list", "model": engine.model_name,
                         "data": [{"object": "embedding", "index": i, "embedding": _encode(v, fmt)}
                                  for i, v in enumerate(vectors)],
                         "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


def _encode(vector: np.ndarray, fmt: str):
    if fmt == "base64":  # what the openai client asks for by default: little-endian float32
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
