"""Anthropic's Messages API through the official `anthropic` client: messages, streaming,
count_tokens, tools, errors."""
from __future__ import annotations

import json

import pytest

anthropic = pytest.importorskip("anthropic")

from fake_engine import FakeEngine, running_server  # noqa: E402
from ggufile.runtime.server.app import create_app  # noqa: E402

HI = [{"role": "user", "content": "hi"}]
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                            "required": ["city"], "additionalProperties": False}}


@pytest.fixture
def engine():
    return FakeEngine(reply="Hello there.", n_ctx=4096)


@pytest.fixture
def client(engine):
    with running_server(create_app(engine, api_key="k")) as url:
        yield anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, timeout=30)


def test_messages(client, engine):
    msg = client.messages.create(model="claude-sonnet-4-5", max_tokens=50, system="Be brief.", messages=HI)
    assert msg.role == "assistant" and msg.model == "fake-model" and msg.stop_reason == "end_turn"
    assert msg.content[0].type == "text" and msg.content[0].text == "Hello there."
    assert msg.usage.output_tokens == len("Hello there.") + 1
    prompt = engine.detokenize(engine.calls[-1]["prompt_ids"])
    assert prompt.startswith("<system>Be brief.\n<user>hi")
    short = client.messages.create(model="x", max_tokens=3, messages=HI)
    assert short.stop_reason == "max_tokens" and short.content[0].text == "Hel"
    stopped = client.messages.create(model="x", max_tokens=30, messages=HI, stop_sequences=["there"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "there"
    assert stopped.content[0].text == "Hello "


def test_messages_stream(client):
    with client.messages.stream(model="x", max_tokens=50, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello there." and final.stop_reason == "end_turn" and final.content[0].text == text


def test_count_tokens(client, engine):
    n = client.messages.count_tokens(model="x", messages=HI).input_tokens
    assert n == len(engine.chat_ids(HI))


def test_tool_use_round_trip_on_the_fake(client, engine):
    engine.reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    msg = client.messages.create(model="x", max_tokens=200, messages=HI, tools=[WEATHER])
    assert msg.stop_reason == "tool_use"
    use = msg.content[0]
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris"}
    with client.messages.stream(model="x", max_tokens=200, messages=HI, tools=[WEATHER]) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "tool_use" and final.content[0].input == {"city": "Paris"}
    engine.reply = "It is sunny."
    follow = client.messages.create(model="x", max_tokens=50, tools=[WEATHER], messages=HI + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "24 C"}]}])
    assert follow.content[0].text == "It is sunny."
    assert "<tool_response>\n24 C\n</tool_response>" in engine.detokenize(engine.calls[-1]["prompt_ids"])


def test_errors_have_anthropic_shape(client):
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="x", max_tokens=10, messages=HI, thinking={"type": "enabled", "budget_tokens": 1024})
    assert err.value.body["type"] == "error" and "thinking" in err.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="x", max_tokens=10, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                       "data": "AAAA"}}]}])
    bad = anthropic.Anthropic(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="x", max_tokens=10, messages=HI)


@pytest.fixture(scope="module")
def real(smollm2_path):
    from ggufile.runtime.engine import Engine

    engine = Engine.open(smollm2_path, n_ctx=1024)
    with running_server(create_app(engine)) as url:
        yield anthropic.Anthropic(base_url=url, api_key="none", max_retries=0, timeout=120), engine


@pytest.mark.real_model
def test_real_messages_and_stream(real):
    client, engine = real
    question = [{"role": "user", "content": "What is the capital of France?"}]
    greedy = {"temperature": 0}  # older Messages API field, no longer in the client's signature
    # The first run fills the KV cache; compare runs that start from the same cache state (the
    # engine's cold prefill and its cached one-token step differ slightly, see test_server.warm_up).
    client.messages.create(model="claude-sonnet-4-5", max_tokens=1, extra_body=greedy, messages=question)
    msg = client.messages.create(model="claude-sonnet-4-5", max_tokens=8, extra_body=greedy, messages=question)
    assert msg.content[0].text and msg.usage.cache_read_input_tokens > 0
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=8, extra_body=greedy, messages=question) as s:
        streamed = "".join(s.text_stream)
    assert streamed == msg.content[0].text  # greedy, same cache state: the same answer
    forced = client.messages.create(model="x", max_tokens=40, extra_body=greedy, messages=question, tools=[WEATHER],
                                    tool_choice={"type": "tool", "name": "get_weather",
                                                 "disable_parallel_tool_use": True})
    assert forced.stop_reason == "tool_use" and isinstance(forced.content[-1].input["city"], str)
    schema = {"type": "object", "properties": {"capital": {"enum": ["Paris", "Lyon"]}}, "required": ["capital"],
              "additionalProperties": False}
    shaped = client.messages.create(model="x", max_tokens=30, extra_body=greedy, messages=question,
                                    output_config={"format": {"type": "json_schema", "schema": schema}})
    assert json.loads(shaped.content[0].text)["capital"] in ("Paris", "Lyon")
