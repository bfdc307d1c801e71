"""The API's fields and dialects beyond the basics (test_server.py): every field a client may send
either changes the answer as specified or gets a 400 naming it.

FakeEngine tests pin the server's side of each field; the `real_model` tests run SmolLM2 behind
the official openai client.
"""
from __future__ import annotations

import json
import math

import pytest

httpx = pytest.importorskip("httpx2")

from fake_engine import OFFSET, FakeEngine, running_server  # noqa: E402
from ggufile.runtime.server.app import create_app  # noqa: E402
from ggufile.runtime.server.schema import REFUSED_UNLESS_NEUTRAL  # noqa: E402

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def client(engine):
    with running_server(create_app(engine)) as url, httpx.Client(base_url=url, timeout=20) as c:
        yield c


def sse_events(response) -> list:
    return [line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])
            for line in response.iter_lines() if line.startswith("data: ")]


def content(body) -> str:
    return body["choices"][0]["message"]["content"]


def tok(ch: str) -> int:
    return ord(ch) + OFFSET


# -- bugs first: names, defaults, ignored fields, content parts, routes ---------------------------

def test_cli_flags_become_request_defaults(monkeypatch):
    """--temp/--seed/-n/top-k/top-p/min-p/repeat penalty and --alias reach the server."""
    from click.testing import CliRunner

    from ggufile.runtime import cli
    from ggufile.runtime.server import app

    seen = {}
    engine = FakeEngine()
    monkeypatch.setattr(cli, "_open_engine", lambda *a: engine)
    monkeypatch.setattr(app, "serve", lambda engine, **kw: seen.update(kw, engine=engine))
    args = ["-m", "x.gguf", "--server", "--temp", "0.3", "--seed", "5", "-n", "7", "--top-k", "3",
            "--top-p", "0.5", "--min-p", "0.2", "--repeat-penalty", "1.3", "--repeat-last-n", "9",
            "--alias", "my-model"]
    result = CliRunner().invoke(cli.run_command, args)
    assert result.exit_code == 0, result.output
    d = seen["defaults"]
    assert d.max_tokens == 7
    assert (d.params.temperature, d.params.seed, d.params.top_k, d.params.top_p, d.params.min_p,
            d.params.repeat_penalty, d.params.repeat_last_n) == (0.3, 5, 3, 0.5, 0.2, 1.3, 9)
    assert seen["engine"].model_name == "my-model"

    with running_server(create_app(engine, defaults=d)) as url, httpx.Client(base_url=url) as c:
        body = c.post(CHAT, json={"model": "gpt-4o", "messages": HI}).json()
        assert body["model"] == "my-model" and body["usage"]["completion_tokens"] == 7
        assert c.get("/v1/models").json()["data"][0]["id"] == "my-model"
        p = engine.calls[-1]["params"]
        assert (p.temperature, p.seed, p.top_k, p.repeat_penalty) == (0.3, 5, 3, 1.3)
        c.post(CHAT, json={"messages": HI, "temperature": 0.9, "seed": 1, "max_tokens": 2})
        p = engine.calls[-1]["params"]
        assert (p.temperature, p.seed, p.top_k) == (0.9, 1, 3)  # the request's own values win
        assert engine.calls[-1]["max_tokens"] == 2


def test_logit_bias_changes_the_answer(client):
    body = client.post(CHAT, json={"messages": HI, "max_tokens": 3, "logit_bias": {str(tok("X")): 20}}).json()
    assert content(body) == "XXX"
    # llama.cpp's form: [text or id, bias]; false (or OpenAI's -100) bans a token.
    body = client.post(CHAT, json={"messages": HI, "max_tokens": 3, "logit_bias": [["Y", 20]]}).json()
    assert content(body) == "YYY"
    body = client.post(CHAT, json={"messages": HI, "max_tokens": 2, "logit_bias": {str(tok("H")): -100}}).json()
    assert not content(body).startswith("H")
    body = client.post(CHAT, json={"messages": HI, "max_tokens": 2, "logit_bias": [[tok("H"), False]]}).json()
    assert not content(body).startswith("H")


@pytest.mark.parametrize("bias", [{"x": 1}, {"5": "high"}, [[1, 2, 3]], "strong", {str(10**9): 1}])
def test_bad_logit_bias_is_400(client, bias):
    r = client.post(CHAT, json={"messages": HI, "logit_bias": bias})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


def test_n_predict(client, engine):
    body = client.post("/v1/completions", json={"prompt": "a", "n_predict": 4}).json()
    assert body["choices"][0]["text"] == engine.reply[:4] and body["usage"]["completion_tokens"] == 4
    body = client.post(CHAT, json={"messages": HI, "n_predict": 2}).json()
    assert content(body) == engine.reply[:2]


def test_ignore_eos(client, engine):
    engine.reply = "ab"
    body = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 5, "ignore_eos": True}).json()
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"
    assert any(math.isinf(v) for h in engine.calls[-1]["hooks"] for v in getattr(h, "values", []))


def test_content_parts_joined_with_newlines(client, engine):
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "the best book"}]
    client.post(CHAT, json={"messages": [{"role": "user", "content": parts}], "max_tokens": 1})
    assert "What is\nthe best book" in engine.detokenize(engine.calls[-1]["prompt_ids"])
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    assert r.status_code == 400


def test_routes_without_v1(client, engine):
    assert content(client.post("/chat/completions", json={"messages": HI}).json()) == engine.reply
    assert client.post("/completions", json={"prompt": "a", "max_tokens": 2}).json()["choices"][0]["text"] == "He"
    assert client.get("/models").json()["data"][0]["id"] == "fake-model"
    assert client.get("/v1/health").json()["status"] == "ok"


NOT_NEUTRAL = {"audio": {"voice": "alloy"}, "modalities": ["text", "audio"], "web_search_options": {},
               "functions": [{"name": "f"}], "function_call": "auto", "suffix": "end", "best_of": 2,
               "mirostat": 2, "typical_p": 0.5, "tfs_z": 0.5, "dynatemp_range": 0.5, "xtc_probability": 0.5,
               "dry_multiplier": 0.8, "top_n_sigma": 1.0, "samplers": ["top_k"], "post_sampling_probs": True,
               "n_indent": 2, "t_max_predict_ms": 100, "lora": [{"id": 0, "scale": 1}],
               "image_data": [{"data": "x"}], "multimodal_data": ["x"], "input_extra": [{"text": "x"}]}


@pytest.mark.parametrize("name", sorted(REFUSED_UNLESS_NEUTRAL))
def test_unsupported_field_is_400_naming_it(client, name):
    r = client.post(CHAT, json={"messages": HI, name: NOT_NEUTRAL[name]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == name and name in err["message"] and err["code"] == "unsupported_value"
    neutral = REFUSED_UNLESS_NEUTRAL[name][-1]
    assert client.post(CHAT, json={"messages": HI, "max_tokens": 1, name: neutral}).status_code == 200


def test_every_refused_field_has_a_test_value():
    assert set(NOT_NEUTRAL) == set(REFUSED_UNLESS_NEUTRAL)


# -- logprobs, n, usage details -----------------------------------------------------------------

LP_HIT = 10.0 - math.log(math.exp(10.0) + 258)  # the fake's drawn token among 259 tokens


def test_chat_logprobs(client, engine):
    engine.reply = "Hi!"
    body = client.post(CHAT, json={"messages": HI, "logprobs": True, "top_logprobs": 2}).json()
    entries = body["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in entries] == ["H", "i", "!"]  # the end token is not part of the text
    assert all(e["logprob"] == pytest.approx(LP_HIT) and e["bytes"] == list(e["token"].encode()) for e in entries)
    assert [len(e["top_logprobs"]) for e in entries] == [2, 2, 2]
    assert entries[0]["top_logprobs"][0]["token"] == "H"
    body = client.post(CHAT, json={"messages": HI, "logprobs": True}).json()
    assert body["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    assert client.post(CHAT, json={"messages": HI}).json()["choices"][0]["logprobs"] is None
    assert client.post(CHAT, json={"messages": HI, "top_logprobs": 2}).status_code == 400
    assert client.post(CHAT, json={"messages": HI, "logprobs": True, "top_logprobs": 21}).status_code == 400


def test_chat_logprobs_streamed(client, engine):
    engine.reply = "Hi!"
    with client.stream("POST", CHAT, json={"messages": HI, "logprobs": True, "top_logprobs": 1,
                                           "stream": True}) as r:
        events = sse_events(r)
    tokens = [e["token"] for ev in events[:-1] for c in ev["choices"] if c["logprobs"]
              for e in c["logprobs"]["content"]]
    assert tokens == ["H", "i", "!"]


def test_completion_logprobs(client, engine):
    engine.reply = "abc"
    body = client.post("/v1/completions", json={"prompt": "x", "logprobs": 2, "echo": True}).json()
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b", "c"] and lp["text_offset"] == [1, 2, 3]
    assert lp["token_logprobs"] == pytest.approx([LP_HIT] * 3)
    assert list(lp["top_logprobs"][0])[0] == "a" and len(lp["top_logprobs"][0]) == 2
    with client.stream("POST", "/v1/completions", json={"prompt": "x", "logprobs": 0, "stream": True}) as r:
        events = sse_events(r)
    assert [t for ev in events[:-1] for c in ev["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]] \
        == ["a", "b", "c"]


def test_n_choices_share_the_prompt(client, engine):
    body = client.post(CHAT, json={"messages": HI, "n": 3, "max_tokens": 4, "seed": 7}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == "Hell" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 12
    seeds = [call["params"].seed for call in engine.calls[-3:]]
    assert seeds == [7, 8, 9]  # distinct yet reproducible
    with client.stream("POST", CHAT, json={"messages": HI, "n": 2, "max_tokens": 2, "stream": True}) as r:
        events = sse_events(r)
    by_index = {}
    for ev in events[:-1]:
        for c in ev["choices"]:
            by_index.setdefault(c["index"], []).append(c)
    assert sorted(by_index) == [0, 1]
    for chunks in by_index.values():
        assert chunks[0]["delta"]["role"] == "assistant" and chunks[-1]["finish_reason"] == "length"
        assert "".join(c["delta"].get("content", "") for c in chunks) == "He"


def test_cached_tokens_and_fingerprint(client, engine):
    first = client.post(CHAT, json={"messages": HI, "max_tokens": 1}).json()
    second = client.post(CHAT, json={"messages": HI, "max_tokens": 1}).json()
    n_prompt = second["usage"]["prompt_tokens"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt - 1
    assert first["system_fingerprint"] == second["system_fingerprint"] and first["system_fingerprint"]
    body = {"messages": HI, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 1}
    with client.stream("POST", CHAT, json=body) as r:
        events = sse_events(r)
    assert events[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt - 1
    assert all(e["system_fingerprint"] == first["system_fingerprint"] for e in events[:-1])


# -- the real model through the official openai client --------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.real_model
def test_real_logprobs_and_n(api, real):
    import numpy as np

    out = api.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=4, temperature=0,
                                      logprobs=True, top_logprobs=3)
    assert out.model == real[1].model_name
    entries = out.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == out.choices[0].message.content
    for e in entries:  # greedy: the drawn token is the likeliest one
        assert e.top_logprobs[0].token == e.token and e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        assert e.logprob <= 0 and sum(np.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-6
    two = api.chat.completions.create(model="any", messages=QUESTION, max_tokens=6, temperature=1.0, n=2, seed=3)
    assert len(two.choices) == 2 and all(c.message.content for c in two.choices)
    assert two.usage.prompt_tokens_details.cached_tokens > 0  # the prompt was processed before
    text = api.completions.create(model="any", prompt="The capital of France is", max_tokens=3,
                                  temperature=0, logprobs=2)
    assert len(text.choices[0].logprobs.tokens) == 3


@pytest.mark.real_model
def test_real_logit_bias(api, real):
    engine = real[1]
    paris = engine.tokenize(" Paris", add_special=False)
    assert len(paris) == 1
    base = api.completions.create(model="m", prompt="The capital of France is", max_tokens=1, temperature=0)
    assert base.choices[0].text == " Paris"
    banned = api.completions.create(model="m", prompt="The capital of France is", max_tokens=1, temperature=0,
                                    logit_bias={str(paris[0]): -100})
    assert banned.choices[0].text != " Paris"
