"""The chat REPL's logic without a terminal: FakeEngine, piped stdin, captured output."""
from __future__ import annotations

import io
import json

import pytest

from fake_engine import FakeEngine
from ggufile.runtime.chat_repl import ChatRepl, Conversation
from ggufile.runtime.sampling import SamplingParams


def run_repl(engine, text: str, **kwargs) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    ChatRepl(engine, SamplingParams(temperature=0), stdin=io.StringIO(text), stdout=out, stderr=err,
             interactive=False, **kwargs).run()
    return out.getvalue(), err.getvalue()


def test_commands_are_never_sent_and_multiline_blocks_are_one_turn():
    engine = FakeEngine(reply="ok", n_ctx=4096)
    out, err = run_repl(engine, '/help\n/nope\n"""\nline 1\nline 2\n"""\n//etc is a folder\n/exit\nnot read\n')
    assert out == "ok\nok\n"
    assert "unknown command /nope" in err and "/undo" in err
    prompts = [engine.detokenize(c["prompt_ids"]) for c in engine.calls]
    assert prompts[0] == "<user>line 1\nline 2\n<assistant>"
    assert prompts[1].endswith("<user>/etc is a folder\n<assistant>")


def test_a_full_context_drops_the_oldest_turns_and_keeps_the_system_prompt():
    engine = FakeEngine(reply="x" * 20, n_ctx=200)
    out, err = run_repl(engine, "".join(f"question number {i}\n" for i in range(12)), system="SYS", n_predict=20)
    assert out.count("x" * 20) == 12  # every question answered
    assert "dropped the" in err and "the system prompt is kept" in err
    for call in engine.calls:
        prompt = engine.detokenize(call["prompt_ids"])
        assert prompt.startswith("<system>SYS\n") and len(call["prompt_ids"]) + 20 <= 200
    assert engine.detokenize(engine.calls[-1]["prompt_ids"]).endswith("<user>question number 11\n<assistant>")


def test_a_message_longer_than_the_context_is_refused_not_fatal():
    engine = FakeEngine(reply="fine", n_ctx=64)
    out, err = run_repl(engine, "y" * 500 + "\nshort\n")
    assert "this message is too long" in err
    assert out == "fine\n" and len(engine.calls) == 1


def test_conversation_undo_and_json_round_trip():
    c = Conversation("S")
    c.turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
               {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    back = Conversation.from_json(c.to_json("m"))
    assert back.messages() == c.messages()
    assert c.undo() == 2 and [m["content"] for m in c.turns] == ["a", "b"]
    assert c.drop_oldest() == 2 and c.turns == [] and c.undo() == 0
    for bad in ('{"messages": [{"role": "tool", "content": "x"}]}', "[1]", '{"messages": 3}'):
        with pytest.raises(ValueError):
            Conversation.from_json(bad)
    assert Conversation.from_json(json.dumps([{"role": "user", "content": "hi"}])).turns == [
        {"role": "user", "content": "hi"}]
