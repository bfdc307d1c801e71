"""The terminal chat as a user meets it: tmux runs `ggufile run --chat` on a real terminal,
the test types (and pastes) into it and reads the screen. Real model: SmolLM2, greedy."""
from __future__ import annotations

import json
import re
import sys

import pytest

from tmux_driver import Terminal

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

PROMPT = r"^> "


def chat_terminal(model, *args) -> Terminal:
    t = Terminal([sys.executable, "-m", "ggufile.runtime", "-m", model, "--chat", "--temp", "0", *args])
    t.wait_for(PROMPT, 120)
    return t


def send(t: Terminal, text: str, timeout: float = 240) -> str:
    """Type `text` + Enter, wait for the next prompt; returns what appeared in between."""
    before = t.screen()
    n = len(re.findall(PROMPT, before, re.M))
    t.type(text)
    t.wait_for(PROMPT, timeout, count=n + 1)
    return screen_since(t, n)


def screen_since(t: Terminal, n_prompts: int) -> str:
    """The screen from the n-th prompt on (the typed line and what answered it)."""
    text = t.screen().rstrip()
    starts = [m.start() for m in re.finditer(PROMPT, text, re.M)]
    return text[starts[n_prompts - 1]:starts[-1]] if len(starts) > n_prompts else text[starts[-1]:]


def last_reply_tokens(t: Terminal) -> tuple[int, int, int]:
    """(reply tokens, prompt tokens, reused tokens) from /stats."""
    out = send(t, "/stats")
    m = re.search(r"last reply: (\d+) tokens .* prompt (\d+) tokens \((\d+) reused", out)
    assert m, out
    return int(m[1]), int(m[2]), int(m[3])


def test_two_turn_chat_keeps_the_conversation(smollm2_path):
    with chat_terminal(smollm2_path, "-n", "24") as t:
        assert "/help lists the commands" in t.screen()
        first = send(t, "What is 2+2?")
        assert "4" in first  # llama.cpp's own answer, word for word: "The answer to this classic math problem is 4."
        _, prompt1, _ = last_reply_tokens(t)
        second = send(t, "What did I just ask you about?")
        assert second.strip().count("\n") >= 1  # an answer under the question
        _, prompt2, reused = last_reply_tokens(t)
        # The second turn's prompt holds the first exchange, and its keys/values came from the cache.
        assert prompt2 > prompt1 and reused >= prompt1 - 1
        context = send(t, "/context")
        assert "by 4 messages" in context or "by 5 messages" in context  # (+ a template's default system)


def test_undo_drops_the_exchange_and_its_cache_tail(smollm2_path):
    with chat_terminal(smollm2_path, "-n", "16") as t:
        send(t, "Name a color.")
        first_answer = send(t, "Name a fruit.").split("\n", 1)[1]
        _, prompt_before, _ = last_reply_tokens(t)
        assert "removed the last exchange: 2 messages" in send(t, "/undo")
        again = send(t, "Name a fruit.").split("\n", 1)[1]
        assert again == first_answer  # greedy: the same context gives the same answer
        _, prompt_after, reused = last_reply_tokens(t)
        # the undone reply's tokens were cut from the cache: reuse stops where the undo cut
        assert prompt_after == prompt_before and reused < prompt_before - 2
        assert "nothing to undo" not in send(t, "/undo")
        assert "by 2 messages" in send(t, "/context") or "by 3 messages" in t.screen()


def test_help_and_unknown_commands_are_not_sent(smollm2_path, tmp_path):
    with chat_terminal(smollm2_path, "-n", "8") as t:
        out = send(t, "/help")
        for command in ("/undo", "/reset", "/system TEXT", "/stats", "/context", "/save FILE", "/load FILE", "/exit"):
            assert command in out
        assert "unknown command /frobnicate" in send(t, "/frobnicate now")
        assert "(no system prompt" in send(t, "/system") or "system prompt:" in t.screen()
        assert "system prompt set" in send(t, "/system You answer in French.")
        assert "by 1 message" in send(t, "/context")  # commands never became user turns
        t.type("/exit")
        assert t.wait_exit(30) == 0


def test_pasted_multi_line_message_is_one_turn(smollm2_path, tmp_path):
    saved = tmp_path / "chat.json"
    with chat_terminal(smollm2_path, "-n", "12") as t:
        n = len(re.findall(PROMPT, t.screen(), re.M))
        t.paste("Here is a list:\napples\npears")  # bracketed paste: newlines stay in the line
        t.key("Enter")
        t.wait_for(PROMPT, 240, count=n + 1)
        # and a block typed between """ lines
        t.type('"""')
        t.type("Second message,")
        t.type("on two lines.")
        t.type('"""')
        t.wait_for(PROMPT, 240, count=n + 2)
        assert "saved" in send(t, f"/save {saved}")
    messages = json.loads(saved.read_text())["messages"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert users == ["Here is a list:\napples\npears", "Second message,\non two lines."]
    assert [m["role"] for m in messages if m["role"] != "system"] == ["user", "assistant"] * 2


def test_conversation_longer_than_the_context_keeps_going(smollm2_path, tmp_path):
    saved = tmp_path / "long.json"
    with chat_terminal(smollm2_path, "-c", "256", "-n", "40", "--system", "Be brief.") as t:
        for i in range(8):
            send(t, f"Tell me one fact about the number {i + 2}.")
        screen = t.screen()
        assert "dropped the" in screen and "the system prompt is kept" in screen
        assert "Traceback" not in screen and t.exit_status() is None
        tokens, prompt, reused = last_reply_tokens(t)
        assert tokens > 0 and prompt + tokens <= 256
        send(t, f"/save {saved}")
    messages = json.loads(saved.read_text())["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[-2]["content"] == "Tell me one fact about the number 9."
    assert len(messages) < 1 + 2 * 8  # the oldest turns went


def test_load_restores_a_saved_conversation(smollm2_path, tmp_path):
    saved = tmp_path / "in.json"
    saved.write_text(json.dumps({"messages": [{"role": "system", "content": "S"},
                                              {"role": "user", "content": "hello"},
                                              {"role": "assistant", "content": "hi there"}]}))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with chat_terminal(smollm2_path, "-n", "8") as t:
        assert "loaded 3 messages" in send(t, f"/load {saved}")
        assert "hi there" in send(t, "/context")
        assert "is not a saved conversation" in send(t, f"/load {bad}")
        assert "cannot read" in send(t, f"/load {tmp_path / 'missing.json'}")
