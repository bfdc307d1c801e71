"""Ollama's API over raw HTTP: /api/chat, /api/generate (NDJSON streams by default), /api/tags."""
from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx2")

from fake_engine import FakeEngine, running_server  # noqa: E402
from ggufile.runtime.server.app import create_app  # noqa: E402

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def engine():
    return FakeEngine(reply="Hello there.", n_ctx=4096)


@pytest.fixture
def client(engine):
    with running_server(create_app(engine)) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c


def lines(r) -> list[dict]:
    return [json.loads(line) for line in r.iter_lines() if line.strip()]


def test_chat_streams_ndjson_by_default(client, engine):
    with client.stream("POST", "/api/chat", json={"model": "llama3.2", "messages": HI}) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        got = lines(r)
    assert "".join(g["message"]["content"] for g in got) == "Hello there."
    assert all(not g["done"] for g in got[:-1]) and got[-1]["done"] and got[-1]["done_reason"] == "stop"
    assert got[-1]["eval_count"] == len("Hello there.") + 1 and got[-1]["prompt_eval_count"] > 0


def test_chat_whole_options_and_format(client, engine):
    body = client.post("/api/chat", json={"model": "x", "messages": HI, "stream": False,
                                          "options": {"num_predict": 3, "temperature": 0.2, "seed": 4,
                                                      "num_ctx": 2048}}).json()
    assert body["message"] == {"role": "assistant", "content": "Hel"} and body["done_reason"] == "length"
    p = engine.calls[-1]["params"]
    assert (p.temperature, p.seed) == (0.2, 4)
    r = client.post("/api/chat", json={"model": "x", "messages": HI, "options": {"mirostat": 2}})
    assert r.status_code == 400 and "mirostat" in r.json()["error"]


def test_chat_tool_calls(client, engine):
    engine.reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    body = client.post("/api/chat", json={"model": "x", "messages": HI, "tools": [tool], "stream": False}).json()
    assert body["message"]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]


def test_generate(client, engine):
    body = client.post("/api/generate", json={"model": "x", "prompt": "Say hi", "system": "S", "stream": False}).json()
    assert body["response"] == "Hello there." and body["done"]
    assert engine.detokenize(engine.calls[-1]["prompt_ids"]).startswith("<system>S\n<user>Say hi")
    client.post("/api/generate", json={"model": "x", "prompt": "raw text", "raw": True, "stream": False})
    assert engine.detokenize(engine.calls[-1]["prompt_ids"]) == "raw text"
    with client.stream("POST", "/api/generate", json={"model": "x", "prompt": "go"}) as r:
        got = lines(r)
    assert "".join(g.get("response", "") for g in got) == "Hello there." and got[-1]["done"]
    assert client.post("/api/generate", json={"model": "x"}).json()["done_reason"] == "load"


def test_tags_show_version(client):
    models = client.get("/api/tags").json()["models"]
    assert models[0]["name"] == "fake-model:latest" and models[0]["details"]["format"] == "gguf"
    assert client.post("/api/show", json={"model": "x"}).json()["template"]
    assert client.get("/api/version").json()["version"]


@pytest.mark.real_model
def test_real_ollama_chat(smollm2_path):
    from ggufile.runtime.engine import Engine

    with running_server(create_app(Engine.open(smollm2_path, n_ctx=512))) as url:
        body = httpx.post(url + "/api/chat", timeout=120, json={
            "model": "smollm2", "stream": False, "options": {"temperature": 0, "num_predict": 8},
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}).json()
        assert body["message"]["content"] and body["eval_count"] <= 8
        tags = httpx.get(url + "/api/tags", timeout=30).json()["models"][0]
        assert tags["details"]["family"] == "llama" and tags["size"] > 10**7
        assert tags["details"]["quantization_level"] == "Q4_1"
