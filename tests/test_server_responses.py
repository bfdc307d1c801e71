"""OpenAI's Responses API through the official openai client: text, streaming, function calls,
structured output, refusals."""
from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")

from fake_engine import FakeEngine, running_server  # noqa: E402
from ggufile.runtime.server.app import create_app  # noqa: E402

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}


@pytest.fixture
def engine():
    return FakeEngine(reply="Hello there.", n_ctx=4096)


@pytest.fixture
def api(engine):
    with running_server(create_app(engine)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)


def test_responses_text(api, engine):
    r = api.responses.create(model="gpt-4.1", input="hi", instructions="Be brief.")
    assert r.status == "completed" and r.output_text == "Hello there." and r.model == "fake-model"
    assert r.usage.output_tokens == len("Hello there.") + 1
    assert engine.detokenize(engine.calls[-1]["prompt_ids"]).startswith("<system>Be brief.\n<user>hi")
    short = api.responses.create(model="x", input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
                                 max_output_tokens=16)
    assert short.status == "completed"
    cut = api.responses.create(model="x", input="hi", extra_body={"max_output_tokens": 3})
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


def test_responses_stream(api):
    stream = api.responses.create(model="x", input="hi", stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello there."
    assert events[-1].response.output_text == "Hello there."


def test_responses_function_call_round_trip(api, engine):
    engine.reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    r = api.responses.create(model="x", input="Weather in Paris?", tools=[WEATHER])
    call = r.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    events = list(api.responses.create(model="x", input="Weather in Paris?", tools=[WEATHER], stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Paris"}
    engine.reply = "Sunny."
    follow = api.responses.create(model="x", tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "24 C"}])
    assert follow.output_text == "Sunny."
    assert "<tool_response>\n24 C\n</tool_response>" in engine.detokenize(engine.calls[-1]["prompt_ids"])


def test_responses_refusals(api):
    for kw in ({"previous_response_id": "resp_1"}, {"reasoning": {"effort": "high"}},
               {"tools": [{"type": "web_search"}]}):
        with pytest.raises(openai.BadRequestError):
            api.responses.create(model="x", input="hi", **kw)


@pytest.mark.real_model
def test_real_responses_structured(smollm2_path):
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    from ggufile.runtime.engine import Engine

    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"], "additionalProperties": False}
    with running_server(create_app(Engine.open(smollm2_path, n_ctx=512))) as url:
        api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = api.responses.create(model="gpt-4.1", input="What is the capital of France? Answer in JSON.",
                                 temperature=0, max_output_tokens=30,
                                 text={"format": {"type": "json_schema", "name": "answer", "schema": schema}})
        jsonschema.validate(json.loads(r.output_text), schema)
