"""Small things a user trips over: pipes, buffered lines, a too-large -c, the no-template hint."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ggufile.builder.pyz import build_pyz


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path, smollm2_path):
    pyz = tmp_path / "smol.pyz"
    build_pyz(smollm2_path, pyz)
    proc = subprocess.run(f"{sys.executable} -m ggufile.builder inspect --no-verify {pyz} | head -1",
                          shell=True, capture_output=True, text=True, timeout=300)
    assert proc.stdout.startswith("file:")
    assert proc.stderr == ""


def test_server_url_line_reaches_a_pipe_at_once(smollm2_path):
    proc = subprocess.Popen([sys.executable, "-m", "ggufile.runtime", "-m", smollm2_path, "--server",
                             "--port", "0", "--nobrowser"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()  # blocks until flushed: while the server runs, not at exit
        assert line.startswith("serving ") and "http://127.0.0.1:" in line
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)


def test_ctx_past_training_context_warns(smollm2_path):
    proc = subprocess.run([sys.executable, "-m", "ggufile.runtime", "-m", smollm2_path, "-c", "20000",
                           "-p", "Hi", "-n", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert "warning: -c 20000 is past the model's training context (8192 tokens); using 8192" in proc.stderr


@pytest.mark.real_model
def test_chat_on_a_base_model_hints_why(gemma3_path):
    proc = subprocess.run([sys.executable, "-m", "ggufile.runtime", "-m", gemma3_path, "--chat", "-n", "2",
                           "--temp", "0"], input="Hello\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    hints = [line for line in proc.stderr.splitlines() if "no chat template" in line]
    assert len(hints) == 1 and "base model" in hints[0]
