"""A built executable started the way people start it: double-clicked / bare on a terminal
(tmux), piped, with its own flags, and damaged. Cached launcher, baked args with llamafile's `...`."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request

import pytest

from ggufile.builder import build
from ggufile.runtime.container import read_container
from tmux_driver import Terminal

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

BAKED = ["--temp", "0", "...", "-n", "6", "-c", "512"]
PROMPT = "The capital of France is"
NAME = "smol-chat"


@pytest.fixture(scope="module")
def bare_exe(tmp_path_factory, smollm2_path):
    from ggufile.builder.stub import ensure_stub

    out = tmp_path_factory.mktemp("bare") / NAME
    build.build_executable(smollm2_path, out, ensure_stub(launcher="cached"), default_args=BAKED)
    return out


def env_for(tmp_path) -> dict:
    import os

    return dict(os.environ, GGUFILE_CACHE=str(tmp_path / "cache"))


def run(cmd, tmp_path, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], input=stdin, capture_output=True, text=True, timeout=600,
                          env=env_for(tmp_path))


def test_bare_start_on_a_terminal_chats_with_the_server_behind(bare_exe, tmp_path):
    with Terminal([bare_exe], env=env_for(tmp_path)) as t:
        url = t.wait_for(r"Web UI and OpenAI API: (http://127\.0\.0\.1:\d+/)", 300)[1]
        t.wait_for(r"^> ", 60)
        # the server runs beside the chat, on the same engine
        health = json.loads(urllib.request.urlopen(url + "health", timeout=30).read())
        assert health["status"] == "ok"
        t.type("What is the capital of France?")
        t.wait_for(r"^> ", 240, count=2)
        t.type("/stats")
        stats = t.wait_for(r"last reply: (\d+) tokens", 30)
        assert int(stats[1]) == 6  # -n 6, baked after `...`, applies to a bare start
        assert "context: " in t.screen() and "of 512 tokens" in t.screen()  # baked -c 512
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}).encode()
        request = urllib.request.Request(url + "v1/chat/completions", body, {"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
        assert reply["choices"][0]["message"]["content"]
        t.type("/exit")
        assert t.wait_exit(60) == 0
        assert "ggufile-runtime" not in t.screen()


def test_bare_start_without_a_terminal_prints_usage_named_after_the_file(bare_exe, tmp_path):
    got = run([bare_exe], tmp_path)
    assert got.returncode == 0, got.stderr
    assert f"./{NAME} --chat" in got.stdout and f"./{NAME} --server" in got.stdout
    assert "ggufile-runtime" not in got.stdout + got.stderr


def test_user_flags_override_baked_args(bare_exe, smollm2_path, tmp_path):
    got = run([bare_exe, "-p", PROMPT, "-n", "3"], tmp_path)  # -n 3 beats the baked -n 6 after `...`
    want = subprocess.run([sys.executable, "-m", "ggufile.runtime", "-m", smollm2_path, "-c", "512",
                           "--temp", "0", "-n", "3", "-p", PROMPT], capture_output=True, text=True, timeout=600)
    assert got.returncode == 0 and want.returncode == 0, got.stderr + want.stderr
    assert got.stdout == want.stdout


def test_help_and_errors_name_the_executable(bare_exe, tmp_path):
    got = run([bare_exe, "--help"], tmp_path)
    assert got.returncode == 0 and got.stdout.startswith(f"Usage: {NAME} ")
    bad = run([bare_exe, "--temp", "nope", "-p", "x"], tmp_path)
    assert bad.returncode == 2 and f"Try '{NAME} --help' for help" in bad.stderr
    assert "ggufile-runtime" not in got.stdout + bad.stderr and "Traceback" not in bad.stderr
    assert "past the model's training context" in run([bare_exe, "-c", "100000", "-p", "x", "-n", "1"],
                                                      tmp_path).stderr


def test_damaged_copies_are_caught(bare_exe, tmp_path):
    model = read_container(bare_exe)
    flipped = tmp_path / "flipped"
    shutil.copy(bare_exe, flipped)
    with open(flipped, "r+b") as f:
        f.seek(model.offset + model.size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    got = run([flipped, "--verify"], tmp_path)
    assert got.returncode == 1 and "checksum MISMATCH" in got.stderr and "Traceback" not in got.stderr
    ok = run([bare_exe, "--verify", "-p", PROMPT, "-n", "1"], tmp_path)
    assert ok.returncode == 0 and "OK (sha256" in ok.stderr and ok.stdout.startswith(PROMPT)
    # truncated: the quick check at every start says so in one line
    cut = tmp_path / "cut"
    cut.write_bytes(bare_exe.read_bytes()[:model.offset + model.size // 2])
    cut.chmod(0o755)
    got = run([cut, "-p", "x"], tmp_path)
    assert got.returncode == 1 and re.search(r"damaged.*get a fresh copy", got.stderr), got.stderr
    assert "Traceback" not in got.stderr
