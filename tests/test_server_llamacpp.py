"""llama.cpp's native endpoints over raw HTTP: /completion, /props, /apply-template, /tokenize."""
from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx2")

from fake_engine import OFFSET, FakeEngine, running_server  # noqa: E402
from ggufile.runtime.server.app import create_app  # noqa: E402


def events(response) -> list:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


@pytest.fixture
def engine():
    return FakeEngine(reply="Hi there")


@pytest.fixture
def client(engine):
    with running_server(create_app(engine)) as url, httpx.Client(base_url=url, timeout=20) as c:
        yield c


def test_completion_whole(client, engine):
    body = client.post("/completion", json={"prompt": "Say", "n_predict": 2, "return_tokens": True}).json()
    assert body["content"] == "Hi" and body["stop"] is True and body["stop_type"] == "limit"
    assert body["tokens"] == [ord("H") + OFFSET, ord("i") + OFFSET]
    assert body["tokens_predicted"] == 2 and body["tokens_evaluated"] == len(engine.tokenize("Say"))
    assert body["generation_settings"]["n_predict"] == 2 and body["model"] == "fake-model"
    assert body["prompt"] == "Say" and "timings" in body and "completion_probabilities" not in body
    body = client.post("/completion", json={"prompt": "Say"}).json()
    assert body["content"] == "Hi there" and body["stop_type"] == "eos" and body["tokens"] == []
    body = client.post("/completion", json={"prompt": "Say", "stop": ["the"]}).json()
    assert body["content"] == "Hi " and body["stop_type"] == "word" and body["stopping_word"] == "the"


def test_completion_n_probs_ignore_eos_logit_bias(client, engine):
    body = client.post("/completion", json={"prompt": "Say", "n_predict": 3, "n_probs": 2}).json()
    probs = body["completion_probabilities"]
    assert [p["token"] for p in probs] == ["H", "i", " "]
    assert all(len(p["top_logprobs"]) == 2 and p["top_logprobs"][0]["id"] == p["id"] for p in probs)
    body = client.post("/completion", json={"prompt": "Say", "n_predict": 12, "ignore_eos": True}).json()
    assert body["tokens_predicted"] == 12 and body["stop_type"] == "limit"
    body = client.post("/completion", json={"prompt": "Say", "n_predict": 2,
                                            "logit_bias": [["Z", 30]]}).json()
    assert body["content"] == "ZZ"


def test_completion_cache_prompt(client, engine):
    client.post("/completion", json={"prompt": "Say", "n_predict": 1})
    client.post("/completion", json={"prompt": "Say", "n_predict": 1})
    assert engine.cached_prompt_tokens > 0
    client.post("/completion", json={"prompt": "Say", "n_predict": 1, "cache_prompt": False})
    assert engine.cached_prompt_tokens == 0


def test_completion_stream(client, engine):
    with client.stream("POST", "/completion", json={"prompt": "Say", "stream": True, "n_probs": 1,
                                                    "return_tokens": True}) as r:
        evs = events(r)
    parts = evs[:-1]
    assert "".join(e["content"] for e in parts) == "Hi there" and not any(e["stop"] for e in parts)
    assert all(len(e["tokens"]) == 1 and len(e["completion_probabilities"]) == 1 for e in parts)
    assert evs[-1]["stop"] is True and evs[-1]["stop_type"] == "eos" and evs[-1]["content"] == ""


def test_completion_errors(client):
    assert client.post("/completion", json={"prompt": 5}).status_code == 400
    assert client.post("/completion", json={"prompt": "a", "mirostat": 2}).json()["error"]["param"] == "mirostat"
    assert client.post("/completion", json={"prompt": "a", "cache_prompt": "yes"}).status_code == 400


def test_props_apply_template_tokenize(client, engine):
    props = client.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == engine.n_ctx
    assert props["model_alias"] == "fake-model" and props["total_slots"] == 1
    assert props["chat_template"] == engine.chat_template.source
    msgs = [{"role": "user", "content": "hello"}]
    assert client.post("/apply-template", json={"messages": msgs}).json() == \
        {"prompt": engine.chat_template.render(msgs)}
    r = client.post("/tokenize", json={"content": "hé", "with_pieces": True}).json()
    assert r["tokens"][0] == {"id": ord("h") + OFFSET, "piece": "h"}
    assert r["tokens"][1]["piece"] == [0xC3]  # half a character: bytes, as llama-server gives them
    assert client.post("/tokenize", json={"content": "hi"}).json()["tokens"] == engine.tokenize("hi", False)


@pytest.fixture(scope="module")
def real(smollm2_path):
    from ggufile.runtime.engine import Engine

    engine = Engine.open(smollm2_path, n_ctx=512)
    with running_server(create_app(engine)) as url, httpx.Client(base_url=url, timeout=120) as c:
        yield c, engine


@pytest.mark.real_model
def test_real_native_endpoints(real):
    c, engine = real
    body = c.post("/completion", json={"prompt": "The capital of France is", "n_predict": 3, "temperature": 0,
                                       "n_probs": 3, "return_tokens": True}).json()
    assert body["content"].startswith(" Paris")
    assert engine.detokenize(body["tokens"]) == body["content"]
    assert [p["top_logprobs"][0]["id"] for p in body["completion_probabilities"]] == body["tokens"]
    props = c.get("/props").json()
    assert "im_start" in props["chat_template"] and props["default_generation_settings"]["n_ctx"] == 512
    prompt = c.post("/apply-template", json={"messages": [{"role": "user", "content": "Hi"}]}).json()["prompt"]
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in prompt
    pieces = c.post("/tokenize", json={"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hello world"
