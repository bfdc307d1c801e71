"""The runtime CLI as a user runs it: `ggufile run/tokenize/...` in a subprocess."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import load_reference


def ggufile(*args, stdin: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ggufile.builder", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, words: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert words in proc.stderr


@pytest.mark.real_model
@pytest.mark.parametrize("special", [False, True])
def test_tokenize_matches_llama_cpp(real_model, special):
    name, path, ref = real_model
    case = ref["tokenize_special"][0] if special else ref["tokenize"][6]
    args = ["tokenize", "-m", path, case["text"]]
    args += ["--special", "--no-bos"] if special else []
    proc = ggufile(*args)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == case["ids"]


def test_missing_model_file(tmp_path):
    assert_one_line_error(ggufile("run", "-m", tmp_path / "nope.gguf", "-p", "hi"), 1, "no such file")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_text("hello")
    assert_one_line_error(ggufile("run", "-m", bad, "-p", "hi"), 1, "not a GGUF file")


@pytest.mark.parametrize("flag,value", [("--temp", "-1"), ("--top-p", "2"), ("-c", "-5"), ("-t", "0"),
                                        ("--port", "70000"), ("-n", "-3")])
def test_out_of_range_flags(smollm2_path, flag, value):
    assert_one_line_error(ggufile("run", "-m", smollm2_path, flag, value, "-p", "hi"), 2, "Invalid value")


def test_no_model_given():
    assert_one_line_error(ggufile("run", "-p", "hi"), 1, "no model given")


def test_info(smollm2_path):
    proc = ggufile("run", "-m", smollm2_path, "--info")
    assert proc.returncode == 0 and "architecture: llama" in proc.stdout


@pytest.mark.real_model
def test_greedy_completion_streams_the_reference_start(smollm2_path):
    ref = load_reference("smollm2")["generate"][0]
    proc = ggufile("run", "-m", smollm2_path, "-p", ref["prompt"], "-n", "8", "--temp", "0", "--no-display-prompt")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == ref["greedy_text_8"]


@pytest.mark.real_model
def test_chat_two_turns_on_stdin(smollm2_path):
    proc = ggufile("run", "-m", smollm2_path, "--chat", "--temp", "0", "-n", "12",
                   stdin="Hello!\nWhat did I just say?\n")
    assert proc.returncode == 0, proc.stderr
    answers = [line for line in proc.stdout.split("\n") if line.strip()]
    assert len(answers) >= 2


@pytest.mark.real_model
def test_perplexity_flag(smollm2_path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good "
                    "fortune, must be in want of a wife. " * 4)
    proc = ggufile("run", "-m", smollm2_path, "--perplexity", "-f", text, "-c", "32")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PPL = ")


def test_perplexity_needs_a_text(smollm2_path):
    assert_one_line_error(ggufile("run", "-m", smollm2_path, "--perplexity"), 1, "needs a text")
