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
