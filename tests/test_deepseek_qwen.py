"""The real DeepSeek-R1-Distill-Qwen tokenizer (builder/fetch.py deepseek-r1-qwen-vocab) on a
synthetic qwen2 model: tokenization and chat-template rendering against llama.cpp, and a chat
that goes through the model's own template and stops at <｜end▁of▁sentence｜>.
"""
from __future__ import annotations

import importlib.util

import pytest

from ggufile.builder.corpus import corpus_text
from ggufile.runtime.engine import Engine
from ggufile.runtime.gguf.reader import GGUFReader
from ggufile.runtime.sampling import SamplingParams
from ggufile.runtime.tokenizer.tokenizer import Tokenizer

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "<think>easy</think>4"},
            {"role": "user", "content": "And 3+3? Ünïcödé, 中文, emoji 🙂, <｜User｜> as text."}]


@pytest.fixture(scope="module")
def engine(deepseek_qwen2_path):
    return Engine.open(deepseek_qwen2_path, n_ctx=512)


def test_vocab_file_is_the_real_tokenizer(deepseek_vocab_path):
    with GGUFReader(deepseek_vocab_path) as r:
        m = r.metadata
        assert r.tensors == {}
        assert len(m["tokenizer.ggml.tokens"]) == 152064 and len(m["tokenizer.ggml.merges"]) == 151387
        assert m["tokenizer.ggml.pre"] == "deepseek-r1-qwen" and "<｜Assistant｜>" in m["tokenizer.chat_template"]


def test_chat_goes_through_the_template_and_stops_at_end_of_sentence(engine):
    ids = engine.chat_ids(MESSAGES)
    text = engine.detokenize(ids)
    tok = engine.tokenizer
    assert ids[0] == tok.token_id(BOS) and text.count(BOS) == 1
    assert text.endswith("<｜Assistant｜>") and text.count("<｜Assistant｜>") == 2
    # the user's "<｜User｜>" is text, not the control token
    assert ids.count(tok.token_id("<｜User｜>")) == 2
    assert "easy" not in text  # its reasoning dropped, the earlier answer kept
    assert "<｜Assistant｜>4<｜end▁of▁sentence｜>" in text
    chunks = list(engine.generate(ids, SamplingParams(temperature=0.0), max_tokens=200))
    assert chunks[-1].finish_reason == "stop" and chunks[-1].token_id == tok.token_id(EOS)
    assert 1 < len(chunks) < 200  # some noise, then the end of the sentence


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python (the bench extra) is not installed")
def test_tokenization_matches_llama_cpp(deepseek_vocab_path):
    import llama_cpp

    ref = llama_cpp.Llama(model_path=str(deepseek_vocab_path), vocab_only=True, verbose=False)
    with GGUFReader(deepseek_vocab_path) as r:
        ours = Tokenizer.from_metadata(r.metadata)
    texts = [line for line in corpus_text().splitlines() if line.strip()][:300]
    texts += ["  leading spaces\n\n\ttabs", "数字 12345 and 3.14159", "don't WON'T y'all", "🙂🙃 emoji",
              "<｜User｜>hi<｜Assistant｜>", "x" * 300, "Ünïcödé naïve café"]
    bad = [t for t in texts
           if ours.encode(t) != ref.tokenize(t.encode("utf-8"), add_bos=True, special=False)]
    assert not bad, f"{len(bad)}/{len(texts)} differ, first: {bad[0]!r}"


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python (the bench extra) is not installed")
def test_chat_template_renders_as_llama_cpp_python(engine, deepseek_vocab_path):
    """llama-cpp-python's rendering of the model's own template (its Jinja2ChatFormatter, what its
    chat completion uses for this file; llama.cpp's C llama_chat_apply_template only approximates
    DeepSeek-R1's template with a built-in one, which adds a blank line after the system prompt)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    with GGUFReader(deepseek_vocab_path) as r:
        source = r.metadata["tokenizer.chat_template"]
    want = Jinja2ChatFormatter(source, eos_token=EOS, bos_token=BOS)(messages=MESSAGES).prompt
    assert engine.chat_template.render(MESSAGES) == want
    assert "easy" not in want  # the earlier answer's reasoning is dropped


# --------------------------------------------------------------------------- a built executable

CHAT_LINE = "What is 2+2?"


def _expected_answer(path) -> tuple[str, int]:
    """The greedy answer to CHAT_LINE through the Python engine: its text and token count, and
    that it ended on <｜end▁of▁sentence｜> (not on the token limit)."""
    engine = Engine.open(path, n_ctx=1024)
    chunks = list(engine.generate(engine.chat_ids([{"role": "user", "content": CHAT_LINE}]),
                                  SamplingParams(temperature=0.0), max_tokens=200))
    assert chunks[-1].finish_reason == "stop" and chunks[-1].token_id == engine.tokenizer.token_id(EOS)
    return "".join(c.text for c in chunks), len(chunks) - 1


@pytest.fixture(scope="module")
def deepseek_exe(tmp_path_factory, deepseek_qwen2_path):
    from ggufile.builder import build
    from ggufile.builder.stub import ensure_stub

    out = tmp_path_factory.mktemp("deepseek-exe") / "deepseek"
    build.build_executable(deepseek_qwen2_path, out, ensure_stub(), default_args=["-c", "1024"])
    return out


@pytest.mark.slow
def test_executable_chat_answers_through_its_template_and_stops(deepseek_exe, deepseek_qwen2_path):
    import subprocess

    answer, n_tokens = _expected_answer(deepseek_qwen2_path)
    got = subprocess.run([str(deepseek_exe), "--chat", "-n", "200", "--temp", "0"], input=CHAT_LINE + "\n",
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr
    text = answer.replace("\r\n", "\n").replace("\r", "\n").strip()  # the pipe is read in text mode
    assert text and text in got.stdout  # the whole answer, then the prompt again
    assert n_tokens < 200


@pytest.mark.slow
def test_executable_server_chat_completion_stops_at_end_of_sentence(deepseek_exe, deepseek_qwen2_path):
    import socket
    import subprocess
    import time
    import urllib.request

    from openai import OpenAI

    answer, n_tokens = _expected_answer(deepseek_qwen2_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(deepseek_exe), "--server", "--port", str(port), "--nobrowser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                urllib.request.urlopen(base + "/health", timeout=10).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        client = OpenAI(base_url=f"{base}/v1", api_key="none", timeout=300)
        reply = client.chat.completions.create(model="local", max_tokens=200, temperature=0,
                                               messages=[{"role": "user", "content": CHAT_LINE}])
        choice = reply.choices[0]
        assert choice.finish_reason == "stop"
        assert choice.message.content == answer
        # the answer's tokens, and the end-of-sentence token the server counts with them
        assert reply.usage.completion_tokens in (n_tokens, n_tokens + 1) and n_tokens < 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
