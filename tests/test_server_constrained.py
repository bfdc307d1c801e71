"""Constrained output (llguidance): response_format json_object / json_schema, llama.cpp's grammar
(GBNF) and json_schema fields. The output must always parse and validate."""
from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx2")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from fake_engine import FakeEngine, running_server  # noqa: E402
from ggufile.runtime.server.app import create_app  # noqa: E402

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"enum": ["Paris", "London", "Rome"]}}}


@pytest.fixture
def client():
    with running_server(create_app(FakeEngine(reply="no way"))) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c


def test_grammar_overrides_the_fake_reply(client):
    """The fake wants to say "no way"; the grammar only allows yes/no, and "no" wins."""
    body = client.post(CHAT, json={"messages": HI, "grammar": 'root ::= "yes" | "no"'}).json()
    assert body["choices"][0]["message"]["content"] == "no" and body["choices"][0]["finish_reason"] == "stop"
    body = client.post("/completion", json={"prompt": "x", "grammar": 'root ::= "ye" [s]+ "!"', "n_predict": 6}).json()
    assert body["content"].startswith("yes")


def test_grammar_with_everything_banned_still_ends(client):
    """ignore_eos bans the end token the finished grammar insists on: the output still ends."""
    body = client.post(CHAT, json={"messages": HI, "grammar": 'root ::= "no"', "ignore_eos": True,
                                   "max_tokens": 5, "temperature": 1.0}).json()
    assert body["choices"][0]["message"]["content"] == "no"
    body = client.post(CHAT, json={"messages": HI, "grammar": 'root ::= "no"', "temperature": 1.0,
                                   "logit_bias": [["n", False]], "max_tokens": 5}).json()
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body, param", [
    ({"grammar": "root ::= ("}, "grammar"), ({"grammar": 5}, "grammar"),
    ({"json_schema": "not a schema"}, "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}, "response_format"),
    ({"grammar": 'root ::= "a"', "json_schema": {"type": "object"}}, "grammar"),
])
def test_bad_constraints_are_400(client, body, param):
    r = client.post(CHAT, json={"messages": HI, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


ASK = [{"role": "user", "content": "Describe a person as JSON with name, age and city."}]


@pytest.mark.real_model
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_real_json_schema_output_validates(api, temperature):
    out = api.chat.completions.create(
        model="gpt-4o", messages=ASK, max_tokens=60, temperature=temperature, seed=11, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    stream = api.chat.completions.create(
        model="gpt-4o", messages=ASK, max_tokens=60, temperature=temperature, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.real_model
def test_real_json_object_and_native_fields(api, real):
    out = api.chat.completions.create(model="m", messages=ASK, max_tokens=80, temperature=0,
                                      response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    url = real[0]
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3}
    body = httpx.post(url + "/completion", json={"prompt": "Three numbers:", "json_schema": schema,
                                                 "n_predict": 40, "temperature": 0}, timeout=120).json()
    jsonschema.validate(json.loads(body["content"]), schema)
    gbnf = 'root ::= "The answer is " ("yes" | "no") "."'
    body = httpx.post(url + "/completion", json={"prompt": "Is Paris in France?", "grammar": gbnf,
                                                 "n_predict": 20, "temperature": 0}, timeout=120).json()
    assert body["content"] in ("The answer is yes.", "The answer is no.") and body["stop_type"] == "eos"
