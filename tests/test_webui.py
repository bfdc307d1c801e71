"""The web page: static checks, then headless Chromium driving it against a live server.

Browser tests need Debian's /usr/bin/chromium and Playwright for Python (no downloaded browsers);
they skip with the reason when either is missing. Screenshots go to tests/artifacts/ (gitignored).
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest

from fake_engine import FakeEngine, running_server
from ggufile.runtime.server.app import create_app, index_html

CHROMIUM = os.environ.get("GGUFILE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
HOSTILE = 'Here <img src=x onerror="window.pwned=1"> **bold** and `x<y`:\n\n```python\nprint("<b>hi</b>")\n```\nDone.'


# -- static checks ---------------------------------------------------------------------------------

def test_page_is_small_self_contained_and_safe():
    html = index_html().decode("utf-8")
    assert len(html) < 32_000
    # air-gapped: no scripts, styles, fonts or images from anywhere else
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(http" not in html
    # model output never reaches the page as markup
    assert not re.search(r"\.(innerHTML|outerHTML|insertAdjacentHTML)\b", html)
    assert "document.write" not in html and "eval(" not in html


# -- in the browser --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    # bypass_csp: Playwright's wait_for_function evaluates strings, which the page's CSP forbids.
    context = browser.new_context(viewport={"width": 1000, "height": 700}, bypass_csp=True)
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda err: errors.append(str(err)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


# Records every distinct length the answer's text had, to tell streaming from one final paint.
WATCH_ANSWER = """() => {
  window.answerLengths = new Set();
  new MutationObserver(() => {
    const body = document.querySelector('.msg.assistant:last-of-type .body');
    if (body && body.textContent) window.answerLengths.add(body.textContent.length);
  }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
}"""


def streamed_lengths(page) -> int:
    return page.evaluate("window.answerLengths.size")


def chat(page, url: str, message: str, max_tokens: int | None = None, timeout_ms: int = 60_000):
    """Open the page, send `message`, wait until the answer is complete; returns its element."""
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent !== '…'", timeout=timeout_ms)
    page.evaluate(WATCH_ANSWER)
    if max_tokens:
        page.fill("#maxtok", str(max_tokens))
    page.fill("#input", message)
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant", timeout=timeout_ms)
    page.wait_for_selector("#send:not([hidden])", timeout=timeout_ms)  # the Send button is back
    return page.locator(".msg.assistant").last


@pytest.mark.slow
def test_browser_chat_streams_and_renders_safely(page):
    engine = FakeEngine(reply=HOSTILE, n_ctx=2048, token_delay=0.002)
    with running_server(create_app(engine)) as url:
        answer = chat(page, url, "Show me some code")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "webui_fake.png"))
        assert page.locator("#model").text_content() == "fake-model"
        assert page.locator(".msg.user").last.text_content().endswith("Show me some code")
        # The hostile markup is shown as text, never as an element, and never ran.
        assert answer.locator("img").count() == 0 and answer.locator("b").count() == 0
        assert '<img src=x onerror="window.pwned=1">' in answer.text_content()
        assert page.evaluate("window.pwned") is None
        assert answer.locator("pre code").text_content() == 'print("<b>hi</b>")'
        assert answer.locator("strong").text_content() == "bold"
        assert answer.locator("p code").text_content() == "x<y"
        assert re.search(r"\d+ tokens · [\d.]+ tokens/s", page.locator("#stats").text_content())
        # The request carried the temperature from the slider and the whole conversation.
        assert engine.calls[-1]["params"].temperature == pytest.approx(0.7)
        assert streamed_lengths(page) > 1


@pytest.mark.slow
def test_browser_stop_button_stops_generation(page):
    engine = FakeEngine(reply="word " * 400, n_ctx=4096, token_delay=0.01)
    with running_server(create_app(engine)) as url:
        page.goto(url + "/")
        page.fill("#input", "talk a lot")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelector('.msg.assistant .body').textContent.length > 20")
        page.click("#stop")
        page.wait_for_selector("text=(stopped)")
        done = threading.Event()
        # The server notices the aborted fetch and the engine stops early.
        for _ in range(500):
            if engine.closed_early == 1 and engine.active == 0:
                done.set()
                break
            page.wait_for_timeout(20)
        assert done.is_set()
        assert engine.tokens_generated < 2000
        # New chat clears the conversation; the next question is sent on its own.
        page.click("#newchat")
        assert page.locator(".msg").count() == 0
        engine.reply = "ok"
        engine.token_delay = 0
        page.fill("#input", "again")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant >> text=ok")
        assert engine.detokenize(engine.calls[-1]["prompt_ids"]).count("<user>") == 1


@pytest.mark.slow
def test_browser_asks_for_api_key(page):
    engine = FakeEngine(reply="authorized")
    with running_server(create_app(engine, api_key="k3y")) as url:
        page.on("dialog", lambda d: d.accept("k3y"))
        answer = chat(page, url, "hello")
        assert answer.locator(".body").text_content() == "authorized"


@pytest.mark.slow
@pytest.mark.real_model
def test_browser_chat_with_real_model(page, smollm2_path):
    from ggufile.runtime.engine import Engine

    engine = Engine.open(smollm2_path, n_ctx=1024)
    with running_server(create_app(engine)) as url:
        answer = chat(page, url, "What is the capital of France?", max_tokens=24, timeout_ms=180_000)
        assert streamed_lengths(page) > 1  # the answer grew in steps while it streamed
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "webui_smollm2.png"))
        assert answer.locator(".body").text_content().strip()
        assert page.locator("#model").text_content() == engine.model_name
        assert "tokens/s" in page.locator("#stats").text_content()


# -- conversations, settings, rendering, tools ---------------------------------------------------------

CODE_REPLY = """Here you go:

```python
def greet(name):  # say hi
    return "hi " + name * 2
```

| language | typing |
|---|---|
| Python | dynamic |
| Rust | static |

- one
- two

1. first
2. second
"""


def send_and_wait(page, message: str, n_answers: int, timeout_ms: int = 60_000):
    page.fill("#input", message)
    page.press("#input", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length === {n_answers}", timeout=timeout_ms)
    page.wait_for_selector("#send:not([hidden])", timeout=timeout_ms)
    return page.locator(".msg.assistant").last


def open_page(page, url: str):
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent !== '…'")


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


@pytest.mark.slow
def test_browser_conversations_survive_reload_and_switch(page):
    engine = FakeEngine(reply="first answer", n_ctx=2048)
    with running_server(create_app(engine)) as url:
        open_page(page, url)
        send_and_wait(page, "first question", 1)
        page.click("#newchat")
        engine.reply = "second answer"
        send_and_wait(page, "second question", 1)
        page.reload()
        page.wait_for_selector(".msg.assistant")
        titles = page.locator("#chats .chat button.open").all_text_contents()
        assert titles == ["second question", "first question"]  # newest first
        assert page.locator(".msg .body").all_text_contents() == ["second question", "second answer"]
        page.click("#chats .chat >> nth=1 >> button.open")
        assert page.locator(".msg .body").all_text_contents() == ["first question", "first answer"]
        assert "current" in page.locator("#chats .chat").nth(1).get_attribute("class")
        screenshot(page, "webui_conversations.png")
        engine.reply = "third answer"
        send_and_wait(page, "follow-up", 2)
        # the restored conversation went to the model whole
        prompt = engine.detokenize(engine.calls[-1]["prompt_ids"])
        assert prompt == "<user>first question\n<assistant>first answer\n<user>follow-up\n<assistant>"
        page.hover("#chats .chat >> nth=0")
        page.click("#chats .chat >> nth=0 >> button.del")
        assert page.locator("#chats .chat").count() == 1


@pytest.mark.slow
def test_browser_system_prompt_and_sampling_settings(page):
    engine = FakeEngine(reply="Arr.", n_ctx=2048)
    with running_server(create_app(engine)) as url:
        open_page(page, url)
        page.fill("#system", "You are a pirate.")
        settings = {"#top_p": "0.5", "#top_k": "7", "#min_p": "0.1", "#repeat_penalty": "1.3", "#maxtok": "33",
                    "#seed": "42"}
        for selector, value in settings.items():
            page.fill(selector, value)
        page.locator("#temp").evaluate("e => { e.value = '0.2'; e.dispatchEvent(new Event('input')); }")
        send_and_wait(page, "Who are you?", 1)
        call = engine.calls[-1]
        assert engine.detokenize(call["prompt_ids"]).startswith("<system>You are a pirate.\n<user>Who are you?")
        params = call["params"]
        assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repeat_penalty, params.seed) == \
            (pytest.approx(0.2), 0.5, 7, pytest.approx(0.1), pytest.approx(1.3), 42)
        assert call["max_tokens"] == 33
        # per-reply figures: tokens, speed, context use against the model's n_ctx
        meta = page.locator(".msg.assistant .meta").text_content()
        assert re.fullmatch(r"\d+ tokens( · [\d.]+ tokens/s)? · context \d+/2048", meta), meta
        page.reload()
        page.wait_for_selector(".msg.assistant")
        assert page.input_value("#system") == "You are a pirate."
        assert {s: page.input_value(s) for s in settings} == settings
        assert page.locator("#tempval").text_content() == "0.20"
        screenshot(page, "webui_settings.png")


@pytest.mark.slow
def test_browser_markdown_code_highlight_and_copy_buttons(page):
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    engine = FakeEngine(reply=CODE_REPLY, n_ctx=2048)
    with running_server(create_app(engine)) as url:
        open_page(page, url)
        answer = send_and_wait(page, "Show me code", 1)
        code = answer.locator(".codeblock pre code")
        assert code.text_content() == 'def greet(name):  # say hi\n    return "hi " + name * 2'
        assert code.locator(".tok-kw").all_text_contents() == ["def", "return"]
        assert code.locator(".tok-fn").all_text_contents() == ["greet"]
        assert code.locator(".tok-str").all_text_contents() == ['"hi "']
        assert code.locator(".tok-com").all_text_contents() == ["# say hi"]
        assert code.locator(".tok-num").all_text_contents() == ["2"]
        assert answer.locator(".codebar span").text_content() == "python"
        assert answer.locator("table th").all_text_contents() == ["language", "typing"]
        assert answer.locator("table tbody tr").count() == 2
        assert answer.locator("ul li").all_text_contents() == ["one", "two"]
        assert answer.locator("ol li").all_text_contents() == ["first", "second"]
        screenshot(page, "webui_code.png")
        answer.locator(".codebar button.copy").click()
        assert page.evaluate("navigator.clipboard.readText()") == 'def greet(name):  # say hi\n    return "hi " + name * 2'
        assert answer.locator(".codebar button.copy").text_content() == "Copied"
        answer.locator(".head button.copy").click()
        assert page.evaluate("navigator.clipboard.readText()") == CODE_REPLY


@pytest.mark.slow
def test_browser_regenerate_and_edit_and_resend(page):
    engine = FakeEngine(reply="answer one", n_ctx=2048)
    with running_server(create_app(engine)) as url:
        open_page(page, url)
        send_and_wait(page, "question", 1)
        engine.reply = "answer two"
        page.click(".msg.assistant >> text=Regenerate")
        page.wait_for_selector(".msg.assistant .body >> text=answer two")
        page.wait_for_selector("#send:not([hidden])")
        assert page.locator(".msg .body").all_text_contents() == ["question", "answer two"]
        assert engine.calls[-1]["prompt_ids"] == engine.calls[-2]["prompt_ids"]  # the same question again
        engine.reply = "answer three"
        page.click(".msg.user >> text=Edit")
        page.fill(".msg.user textarea.edit", "better question")
        page.click(".msg.user >> text=Send")
        page.wait_for_selector(".msg.assistant .body >> text=answer three")
        page.wait_for_selector("#send:not([hidden])")
        assert page.locator(".msg .body").all_text_contents() == ["better question", "answer three"]
        assert engine.detokenize(engine.calls[-1]["prompt_ids"]) == "<user>better question\n<assistant>"
        page.reload()
        page.wait_for_selector(".msg.assistant")
        assert page.locator(".msg .body").all_text_contents() == ["better question", "answer three"]
