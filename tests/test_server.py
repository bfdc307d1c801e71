"""The HTTP server: OpenAI-compatible API, error paths, safety checks, queueing, disconnects.

Most tests drive a real uvicorn server (localhost, free port) over a FakeEngine, so they are fast
and deterministic; the `real_model` tests at the end run SmolLM2 through the official openai client.
"""
from __future__ import annotations

import json
import threading
import time

import pytest

httpx = pytest.importorskip("httpx2")  # openai's HTTP client (the `httpx` API)

from fake_engine import FakeEngine, running_server  # noqa: E402
from ggufile.runtime.server.schema import ApiError, parse_chat_request, parse_completion_request  # noqa: E402
from ggufile.runtime.server.app import create_app  # noqa: E402

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def server(engine):
    with running_server(create_app(engine)) as url:
        yield url


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=20) as c:
        yield c


def sse_events(response) -> list:
    """The parsed `data:` payloads of an SSE response ("[DONE]" kept as a string)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_openai_error(r, status: int, code: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code
    return err


# -- request validation (pure) -------------------------------------------------------------------

def test_parse_maps_sampling_fields():
    req = parse_chat_request({"messages": HI, "temperature": 0.3, "top_p": 0.5, "top_k": 7, "min_p": 0.1,
                              "repeat_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": -0.5,
                              "seed": 42, "max_tokens": 9, "max_completion_tokens": 11, "stop": "x"})
    p = req.params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repeat_penalty) == (0.3, 0.5, 7, 0.1, 1.2)
    assert (p.presence_penalty, p.frequency_penalty, p.seed) == (0.5, -0.5, 42)
    assert req.max_tokens == 11  # the newer name wins
    assert req.stop == ["x"]


@pytest.mark.parametrize("body", [
    [], {"messages": "hi"}, {"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": [{"role": "user", "content": 5}]}, {"messages": HI, "temperature": "hot"},
    {"messages": HI, "temperature": True}, {"messages": HI, "max_tokens": 1.5}, {"messages": HI, "max_tokens": 0},
    {"messages": HI, "stop": 3}, {"messages": HI, "stop": ["a", 1]}, {"messages": HI, "n": 0},
    {"messages": HI, "top_p": 2}, {"messages": HI, "stream": "yes"}, {"messages": HI, "seed": -5},
    {"messages": HI, "stream_options": {"include_usage": True}},  # only with stream
    {"messages": HI, "tools": [{"type": "function"}]}, {"messages": HI, "temperature": float("nan")},
])
def test_parse_rejects_bad_chat_bodies(body):
    with pytest.raises(ApiError) as err:
        parse_chat_request(body)
    assert err.value.status == 400


def test_parse_completion_prompt_forms():
    assert parse_completion_request({"prompt": "a"}).prompt == "a"
    assert parse_completion_request({"prompt": ["a"]}).prompt == "a"
    assert parse_completion_request({"prompt": [1, 2]}).prompt == [1, 2]
    for bad in (None, 5, ["a", "b"], [1, "a"], []):
        with pytest.raises(ApiError):
            parse_completion_request({"prompt": bad})


# -- happy paths -----------------------------------------------------------------------------------

def test_health_models_and_page(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "fake-model"
    assert client.get("/v1/models/fake-model").json()["id"] == "fake-model"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_chat_completion(client, engine):
    r = client.post(CHAT, json={"model": "fake-model", "messages": HI, "temperature": 0, "seed": 3, "top_k": 5})
    body = r.json()
    assert r.status_code == 200, body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": engine.reply, "refusal": None}
    assert choice["finish_reason"] == "stop"
    prompt_len = len(engine.chat_ids(HI))
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": len(engine.reply) + 1,
                             "total_tokens": prompt_len + len(engine.reply) + 1,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert body["system_fingerprint"].startswith("fp_ggufile_")
    call = engine.calls[-1]
    assert call["prompt_ids"] == engine.chat_ids(HI)
    assert (call["params"].temperature, call["params"].seed, call["params"].top_k) == (0, 3, 5)


def test_max_tokens_and_stop(client, engine):
    body = client.post(CHAT, json={"messages": HI, "max_tokens": 5}).json()
    assert body["choices"][0]["message"]["content"] == "Hello"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    body = client.post(CHAT, json={"messages": HI, "stop": ["fake", "zzz"]}).json()
    assert body["choices"][0]["message"]["content"] == "Hello from the "
    assert body["choices"][0]["finish_reason"] == "stop"
    assert engine.calls[-1]["stop"] == ["fake", "zzz"]


def test_max_tokens_beyond_context_is_bounded(client, engine):
    engine.reply = "x" * 1000
    body = client.post(CHAT, json={"messages": HI, "max_tokens": 100_000}).json()
    prompt_len = len(engine.chat_ids(HI))
    assert body["usage"]["completion_tokens"] == engine.n_ctx - prompt_len
    assert body["choices"][0]["finish_reason"] == "length"


def test_chat_stream_format(client, engine):
    with client.stream("POST", CHAT, json={"messages": HI, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == engine.reply
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert all("usage" not in c for c in chunks)


def test_stream_include_usage(client, engine):
    body = {"messages": HI, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 3}
    with client.stream("POST", CHAT, json=body) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
    assert all(e["usage"] is None for e in events[:-2])
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_completions(client, engine):
    body = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 4}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "Hell" and body["choices"][0]["finish_reason"] == "length"
    assert engine.calls[-1]["prompt_ids"] == engine.tokenize("Once")
    body = client.post("/v1/completions", json={"prompt": [0, 70, 71], "max_tokens": 2, "echo": False}).json()
    assert engine.calls[-1]["prompt_ids"] == [0, 70, 71]
    with client.stream("POST", "/v1/completions", json={"prompt": "Once", "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == engine.reply
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_tokenize_detokenize(client, engine):
    assert client.post("/tokenize", json={"content": "hi"}).json() == {"tokens": engine.tokenize("hi", False)}
    assert client.post("/tokenize", json={"content": "hi", "add_special": True}).json()["tokens"][0] == 0
    assert client.post("/detokenize", json={"tokens": engine.tokenize("héllo", False)}).json() == {"content": "héllo"}
    assert_openai_error(client.post("/detokenize", json={"tokens": [10**9]}), 400)
    assert_openai_error(client.post("/detokenize", json={"tokens": [-1]}), 400)
    assert_openai_error(client.post("/tokenize", json={"text": "hi"}), 400)


def test_openai_client_against_fake(server, engine):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=20)
    out = api.chat.completions.create(model="fake-model", messages=HI, max_tokens=5)
    assert out.choices[0].message.content == "Hello" and out.usage.completion_tokens == 5
    stream = api.chat.completions.create(model="default", messages=HI, stream=True,
                                         stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        parts += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(parts) == engine.reply and usage.completion_tokens == len(engine.reply) + 1
    assert [m.id for m in api.models.list()] == ["fake-model"]


# -- error paths -----------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"{bad json", b"", b"\xff\xfe", b"[" * 100_000])
def test_malformed_json(client, content):
    assert_openai_error(client.post(CHAT, content=content, headers={"content-type": "application/json"}),
                        400, "invalid_json")


@pytest.mark.parametrize("body, param", [
    ({"messages": "hi"}, "messages"), ({"messages": HI, "temperature": "warm"}, "temperature"),
    ({"messages": HI, "max_tokens": "10"}, "max_tokens"), ({"messages": HI, "stop": {"a": 1}}, "stop"),
])
def test_wrong_types(client, body, param):
    assert assert_openai_error(client.post(CHAT, json=body), 400)["param"] == param


def test_any_model_name_is_the_served_model(client):
    # The README's example and clients hard-wired to OpenAI's names (llama-server's behaviour).
    for name in ("any", "gpt-4o", "fake-model", "FAKE-MODEL", "default", ""):
        r = client.post(CHAT, json={"model": name, "messages": HI, "max_tokens": 1})
        assert r.status_code == 200 and r.json()["model"] == "fake-model"
    assert client.post(CHAT, json={"messages": HI, "max_tokens": 1}).json()["model"] == "fake-model"
    assert client.get("/v1/models/gpt-4o").json()["id"] == "fake-model"


def test_unknown_route_and_method(client):
    assert_openai_error(client.get("/v2/nothing"), 404, "not_found")
    assert_openai_error(client.get(CHAT), 405)


def test_prompt_longer_than_context(client, engine):
    long = [{"role": "user", "content": "x" * (engine.n_ctx + 10)}]
    assert_openai_error(client.post(CHAT, json={"messages": long}), 400, "context_length_exceeded")
    assert_openai_error(client.post("/v1/completions", json={"prompt": [5] * engine.n_ctx}), 400,
                        "context_length_exceeded")
    assert_openai_error(client.post("/v1/completions", json={"prompt": [10**6]}), 400)


def test_oversized_body_by_content_length(engine):
    with running_server(create_app(engine, max_body_bytes=1000)) as url, httpx.Client(base_url=url) as c:
        big = {"messages": [{"role": "user", "content": "x" * 2000}]}
        assert_openai_error(c.post(CHAT, json=big), 413, "request_too_large")
        assert c.post(CHAT, json={"messages": HI}).status_code == 200


def test_oversized_body_without_content_length(engine):
    """A chunked body that lies about nothing but is too long is cut off while it streams in."""
    sent = []

    def body():
        for _ in range(100):
            sent.append(1)
            yield b"x" * 500

    with running_server(create_app(engine, max_body_bytes=1000)) as url, httpx.Client(base_url=url) as c:
        try:
            r = c.post(CHAT, content=body(), headers={"content-type": "application/json"})
            assert_openai_error(r, 413, "request_too_large")
        except httpx.TransportError:
            pass  # the server may close before the client finishes sending: also a refusal
        assert c.post(CHAT, json={"messages": HI}).status_code == 200
    assert engine.calls and all(len(call["prompt_ids"]) < 100 for call in engine.calls)


def test_engine_failure_is_a_clean_500(client, engine):
    engine.fail_with = RuntimeError("secret internal detail")
    err = assert_openai_error(client.post(CHAT, json={"messages": HI}), 500)
    assert "secret" not in err["message"] and "Traceback" not in err["message"]
    with client.stream("POST", CHAT, json={"messages": HI, "stream": True}) as r:
        events = sse_events(r)
    assert "error" in events[-1] and "secret" not in json.dumps(events)
    engine.fail_with = None
    assert client.post(CHAT, json={"messages": HI}).status_code == 200  # still serving


# -- safety ----------------------------------------------------------------------------------------

def test_api_key(engine):
    with running_server(create_app(engine, api_key="s3cret")) as url, httpx.Client(base_url=url) as c:
        assert_openai_error(c.post(CHAT, json={"messages": HI}), 401, "invalid_api_key")
        assert_openai_error(c.post(CHAT, json={"messages": HI}, headers={"authorization": "Bearer nope"}),
                            401, "invalid_api_key")
        assert_openai_error(c.get("/v1/models", headers={"authorization": "Basic s3cret"}), 401)
        assert_openai_error(c.post("/tokenize", json={"content": "a"}), 401)
        ok = c.post(CHAT, json={"messages": HI}, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
    assert len(engine.calls) == 1  # refused requests never reached the engine


def test_cross_origin_requests_refused(client, server, engine):
    # A foreign page's fetch, even a "simple" text/plain POST, must not make the model work.
    r = client.post(CHAT, content=json.dumps({"messages": HI}),
                    headers={"origin": "http://evil.example", "content-type": "text/plain"})
    assert_openai_error(r, 403, "origin_not_allowed")
    pre = client.options(CHAT, headers={"origin": "http://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    same = client.post(CHAT, json={"messages": HI}, headers={"origin": server})
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers
    assert len(engine.calls) == 1


def test_allowed_origin_gets_cors(engine):
    app = create_app(engine, allowed_origins=["http://app.example"])
    with running_server(app) as url, httpx.Client(base_url=url) as c:
        pre = c.options(CHAT, headers={"origin": "http://app.example", "access-control-request-method": "POST"})
        assert pre.headers["access-control-allow-origin"] == "http://app.example"
        r = c.post(CHAT, json={"messages": HI}, headers={"origin": "http://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"


def test_dns_rebinding_host_refused(client):
    assert_openai_error(client.get("/v1/models", headers={"host": "evil.example:8080"}), 403, "invalid_host")
    assert client.get("/v1/models", headers={"host": "localhost:8080"}).status_code == 200


def test_exposure_warning():
    from ggufile.runtime.server.app import exposure_warning

    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("localhost", None) is None
    assert "every network interface" in exposure_warning("0.0.0.0", None)
    assert "--api-key" in exposure_warning("192.168.1.5", None)
    assert "--api-key" not in exposure_warning("0.0.0.0", "k")


def test_announce_prints_url_and_opens_browser(monkeypatch):
    from types import SimpleNamespace

    from ggufile.runtime.server import app as server_mod

    opened, said = [], []
    monkeypatch.setattr(server_mod.webbrowser, "open", opened.append)
    fake = SimpleNamespace(started=True, should_exit=False)
    server_mod._announce(fake, "http://127.0.0.1:9/", "m", True, said.append)
    server_mod._announce(fake, "http://127.0.0.1:9/", "m", False, said.append)
    assert opened == ["http://127.0.0.1:9/"]
    assert all("http://127.0.0.1:9/" in line for line in said) and len(said) == 2


# -- queueing and disconnects ----------------------------------------------------------------------

def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_disconnect_mid_stream_stops_generation():
    engine = FakeEngine(reply="y" * 400, n_ctx=1024, token_delay=0.01)
    with running_server(create_app(engine)) as url, httpx.Client(base_url=url, timeout=20) as c:
        with c.stream("POST", CHAT, json={"messages": HI, "stream": True}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(8)]
            assert any("y" in line for line in got)
        # leaving the block closed the connection mid-stream
        wait_for(lambda: engine.active == 0)
        assert engine.closed_early == 1
        assert engine.tokens_generated < 200
        engine.reply = "done"
        r = c.post(CHAT, json={"messages": HI})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "done"


def queued(url) -> int:
    return httpx.get(url + "/health").json()["queued"]


def test_disconnect_while_queued_frees_the_slot():
    engine = FakeEngine(reply="z")
    engine.gate = threading.Event()
    with running_server(create_app(engine, max_waiting=1)) as url:
        busy = threading.Thread(target=lambda: httpx.post(url + CHAT, json={"messages": HI}, timeout=30))
        busy.start()
        wait_for(lambda: engine.active == 1)
        with pytest.raises(httpx.ReadTimeout):  # waits behind `busy`, then gives up
            httpx.post(url + CHAT, json={"messages": HI}, timeout=0.3)
        wait_for(lambda: queued(url) == 1)  # only `busy` is left, though it is still running
        engine.gate.set()
        busy.join(30)
        assert len(engine.calls) == 1  # the abandoned request never ran


def test_generations_are_serialized_fifo():
    engine = FakeEngine(reply="abc")
    engine.gate = threading.Event()
    results = {}

    def ask(i):
        r = httpx.post(url + "/v1/completions", json={"prompt": f"p{i}"}, timeout=30)
        results[i] = r.status_code

    with running_server(create_app(engine, max_waiting=8)) as url:
        threads = []
        for i in range(5):
            threads.append(threading.Thread(target=ask, args=(i,)))
            threads[-1].start()
            wait_for(lambda: queued(url) == i + 1)  # each arrives after the previous one is queued
        engine.gate.set()
        for t in threads:
            t.join(30)
    assert results == {i: 200 for i in range(5)}
    assert engine.max_active == 1
    assert [engine.detokenize(c["prompt_ids"]) for c in engine.calls] == [f"p{i}" for i in range(5)]


def test_full_queue_is_refused_with_503():
    engine = FakeEngine(reply="w")
    engine.gate = threading.Event()
    statuses = []

    def ask():
        statuses.append(httpx.post(url + CHAT, json={"messages": HI}, timeout=30).status_code)

    with running_server(create_app(engine, max_waiting=1)) as url:
        threads = [threading.Thread(target=ask) for _ in range(2)]
        for i, t in enumerate(threads):  # one running, one waiting: the queue is full
            t.start()
            wait_for(lambda: queued(url) == i + 1)
        r = httpx.post(url + CHAT, json={"messages": HI}, timeout=30)
        err = assert_openai_error(r, 503, "server_busy")
        assert r.headers["retry-after"] and err["type"] == "server_error"
        engine.gate.set()
        for t in threads:
            t.join(30)
        assert httpx.post(url + CHAT, json={"messages": HI}, timeout=30).status_code == 200
    assert statuses == [200, 200]


# -- the real model through the official openai client ---------------------------------------------

class CountingEngine:
    """The real engine, counting the tokens it actually generated (to see a generation stop)."""

    def __init__(self, engine):
        self._engine = engine
        self.tokens_generated = 0
        self.closed_early = 0  # generations closed before their last chunk

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, *args, **kwargs):
        chunks = self._engine.generate(*args, **kwargs)

        def counted():
            finished = False
            try:
                for chunk in chunks:
                    self.tokens_generated += 1
                    finished = chunk.finish_reason is not None
                    yield chunk
            finally:
                self.closed_early += not finished
                chunks.close()
        return counted()


@pytest.fixture(scope="module")
def real_server(smollm2_path):
    from ggufile.runtime.engine import Engine

    engine = CountingEngine(Engine.open(smollm2_path, n_ctx=1024))
    # one slot: the wrapper's generate is what runs (slots of a real engine are views of it)
    with running_server(create_app(engine, parallel=1)) as url:
        yield url, engine


@pytest.fixture(scope="module")
def api(real_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=real_server[0] + "/v1", api_key="not-needed", max_retries=0, timeout=120)


QUESTION = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


def warm_up(api, **request):
    """Run a prompt once so the engine's KV cache holds it (the tests below then time cached
    prompts; a cold and a cached prompt give the same logits: test_real_repeat_is_deterministic)."""
    if "messages" in request:
        api.chat.completions.create(**request, max_tokens=1)
    else:
        api.completions.create(**request, max_tokens=1)


@pytest.mark.slow
@pytest.mark.real_model
def test_real_chat_stream_matches_non_stream(api, real_server):
    engine = real_server[1]
    warm_up(api, model="default", messages=QUESTION, temperature=0)
    out = api.chat.completions.create(model=engine.model_name, messages=QUESTION, max_tokens=12, temperature=0)
    text = out.choices[0].message.content
    assert text.strip() and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == len(engine.chat_ids(QUESTION))
    assert 1 <= out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    stream = api.chat.completions.create(model=engine.model_name, messages=QUESTION, max_tokens=12,
                                         temperature=0, stream=True, stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(parts) == text  # greedy: streaming changes the transport, not the answer
    assert finish == out.choices[0].finish_reason
    assert usage.completion_tokens == out.usage.completion_tokens


@pytest.mark.slow
@pytest.mark.real_model
def test_real_repeat_is_deterministic(api):
    """The same temperature-0 request three times, the first on a cold cache (the whole prompt
    prefilled), the repeats on a cached prompt (only its last token recomputed): one text."""
    question = [{"role": "user", "content": "Name three colours of the rainbow, then count to ten."}]
    texts = [api.chat.completions.create(model="default", messages=question, max_tokens=24, temperature=0)
             .choices[0].message.content for _ in range(3)]
    assert texts[0].strip() and texts == [texts[0]] * 3


@pytest.mark.slow
@pytest.mark.real_model
def test_real_completions_and_stop(api):
    warm_up(api, model="default", prompt="The capital of France is", temperature=0)
    out = api.completions.create(model="default", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert "Paris" in out.choices[0].text
    stream = api.completions.create(model="default", prompt="The capital of France is", max_tokens=6,
                                    temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == out.choices[0].text
    stopped = api.completions.create(model="default", prompt="The capital of France is", max_tokens=6,
                                     temperature=0, stop=["."])
    assert stopped.choices[0].text == out.choices[0].text.split(".")[0]
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.slow
@pytest.mark.real_model
def test_real_seed_reproduces_sampling(api):
    warm_up(api, model="default", messages=QUESTION, temperature=0)
    def ask():
        return api.chat.completions.create(model="default", messages=QUESTION, max_tokens=8, temperature=1.0,
                                           seed=1234).choices[0].message.content
    assert ask() == ask()


@pytest.mark.slow
@pytest.mark.real_model
def test_real_errors_and_disconnect(real_server):
    url, engine = real_server
    with httpx.Client(base_url=url, timeout=120) as c:
        assert c.post(CHAT, json={"model": "gpt-4o", "messages": HI, "max_tokens": 1}).status_code == 200
        assert_openai_error(c.post(CHAT, content=b"{", headers={"content-type": "application/json"}), 400)
        assert_openai_error(c.post(CHAT, json={"messages": HI, "max_tokens": "many"}), 400)
        tokens = c.post("/tokenize", json={"content": "Hello world"}).json()["tokens"]
        assert c.post("/detokenize", json={"tokens": tokens}).json()["content"] == "Hello world"
        assert_openai_error(c.post("/detokenize", json={"tokens": [-1]}), 400)
        assert_openai_error(c.post("/v1/completions", json={"prompt": [1, 10**7]}), 400)

        # Counting never ends on its own within 400 tokens, so only the hang-up can stop it early.
        before, closed = engine.tokens_generated, engine.closed_early
        body = {"prompt": "1, 2, 3, 4, 5, 6,", "stream": True, "max_tokens": 400, "temperature": 0}
        with c.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # the first token arrived; hang up
        wait_for(lambda: httpx.get(url + "/health").json()["queued"] == 0, timeout=120)
        assert engine.closed_early == closed + 1
        assert engine.tokens_generated - before < 400
        out = c.post(CHAT, json={"messages": QUESTION, "max_tokens": 4, "temperature": 0})
        assert out.status_code == 200 and out.json()["choices"][0]["message"]["content"]
