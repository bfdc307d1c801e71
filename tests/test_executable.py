"""Real executables: the PyInstaller stubs (built once per session into the stub cache) + SmolLM2.

`exe` uses the onefile launcher, `cached_exe` the cached one (default on Linux/macOS), whose
runtime cache ($GGUFILE_CACHE/runtime) each test points at its own temp folder.

Each executable runs as a subprocess and must behave exactly like `ggufile run` from Python.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ggufile.builder import build
from ggufile.builder.pyz import build_pyz
from ggufile.runtime.container import ALIGNMENT, find_pyinstaller_archive, read_container

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

PROMPT = "The capital of France is"
CHAT_INPUT = "What is the capital of France?\nAnd of Italy?\n"
TIMEOUT = 600


@pytest.fixture(scope="session")
def stub() -> Path:
    from ggufile.builder.stub import ensure_stub

    return ensure_stub()


@pytest.fixture(scope="session")
def exe(tmp_path_factory, stub, smollm2_path) -> Path:
    out = tmp_path_factory.mktemp("exe") / "smol"
    build.build_executable(smollm2_path, out, stub, default_args=["-c", "1024"])
    return out


@pytest.fixture(scope="session")
def cached_exe(tmp_path_factory, smollm2_path) -> Path:
    from ggufile.builder.stub import ensure_stub

    out = tmp_path_factory.mktemp("cached-exe") / "smol"
    build.build_executable(smollm2_path, out, ensure_stub(launcher="cached"), default_args=["-c", "1024"])
    return out


def run(cmd: list, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], input=stdin or "", capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)


def cache_env(cache: Path) -> dict:
    return dict(os.environ, GGUFILE_CACHE=str(cache), GGUFILE_LAUNCHER_DEBUG="1")


def ggufile_run(model: Path, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The reference: the runtime CLI from this Python, no executable involved."""
    return run([sys.executable, "-m", "ggufile.builder.cli", "run", "-m", model, *args], stdin)


def test_greedy_prompt_matches_ggufile_run(exe, smollm2_path):
    args = ["-p", PROMPT, "-n", "8", "--temp", "0"]
    got = run([exe, *args])
    want = ggufile_run(smollm2_path, "-c", "1024", *args)
    assert want.returncode == 0, want.stderr
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout
    assert got.stdout.startswith(PROMPT) and len(got.stdout) > len(PROMPT) + 5


def test_chat_two_turns_on_stdin(exe, smollm2_path):
    args = ["--chat", "-n", "24", "--temp", "0"]
    got = run([exe, *args], stdin=CHAT_INPUT)
    want = ggufile_run(smollm2_path, "-c", "1024", *args, stdin=CHAT_INPUT)
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout
    assert len(got.stdout.strip().splitlines()) >= 2  # one answer per turn, each ends a line


def test_no_args_prints_short_help_with_model_name(exe):
    got = run([exe])
    assert got.returncode == 0, got.stderr
    assert "Smollm2 135M" in got.stdout and "--chat" in got.stdout and "--server" in got.stdout


def test_info_describes_the_embedded_model(exe):
    got = run([exe, "--info"])
    assert got.returncode == 0, got.stderr
    assert "llama" in got.stdout and "8192" in got.stdout and "-c 1024" in got.stdout


def test_bad_flag_is_one_line_error(exe):
    got = run([exe, "--temp", "nope", "-p", "x"])
    assert got.returncode == 2
    assert "Traceback" not in got.stderr


def test_bare_stub_says_no_model(stub):
    got = run([stub, "-p", "x"])
    assert got.returncode == 1
    assert got.stderr.strip() == f"Error: {stub}: no model inside (this is a bare ggufile stub)"


def test_layout_on_the_real_bootloader(exe, stub):
    """GGUF between bootloader and archive, 64 KiB aligned; the ELF section table stays valid."""
    model = read_container(exe)
    pkg = find_pyinstaller_archive(exe)
    assert model.offset % ALIGNMENT == 0
    assert find_pyinstaller_archive(stub) <= model.offset < model.offset + model.size < pkg
    if shutil.which("readelf"):
        sections = run(["readelf", "-S", "-W", exe])
        assert sections.returncode == 0 and "Warning" not in sections.stderr
        line = next(ln for ln in sections.stdout.splitlines() if " pydata " in ln)
        assert int(line.split()[4], 16) == pkg  # pydata now starts where the archive moved to


def test_extract_and_verify_real_executable(exe, smollm2_path, tmp_path):
    out = tmp_path / "back.gguf"
    build.extract(exe, out)
    assert out.read_bytes() == smollm2_path.read_bytes()
    bad = tmp_path / "bad"
    shutil.copy(exe, bad)
    model = read_container(bad)
    with open(bad, "r+b") as f:
        f.seek(model.offset + model.size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    got = run([sys.executable, "-m", "ggufile.builder.cli", "verify", bad])
    assert got.returncode == 1
    assert "MISMATCH" in got.stderr


def test_restub_then_run(exe, stub, tmp_path):
    out = tmp_path / "restubbed"
    build.restub(exe, stub, out)
    got = run([out, "-p", PROMPT, "-n", "4", "--temp", "0"])
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith(PROMPT)


def test_pyz_runs_like_ggufile_run(tmp_path, smollm2_path):
    pyz = tmp_path / "smol.pyz"
    build_pyz(smollm2_path, pyz)
    args = ["-p", PROMPT, "-n", "8", "--temp", "0"]
    got = run([sys.executable, pyz, *args])
    want = ggufile_run(smollm2_path, *args)
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout


# -- the cached launcher ------------------------------------------------------------------------
def test_cached_greedy_matches_ggufile_run_from_a_copy_and_reuses(cached_exe, smollm2_path, tmp_path):
    """From a copy in another folder: first start unpacks, the second reuses the same folder."""
    copy = tmp_path / "elsewhere" / "model"
    copy.parent.mkdir()
    shutil.copy(cached_exe, copy)
    env = cache_env(tmp_path / "cache")
    args = ["-p", PROMPT, "-n", "8", "--temp", "0"]
    want = ggufile_run(smollm2_path, "-c", "1024", *args)
    first = run([copy, *args], env=env)
    assert want.returncode == 0, want.stderr
    assert first.returncode == 0, first.stderr
    assert first.stdout == want.stdout
    assert "ggufile-launcher: unpacked" in first.stderr
    (folder,) = (tmp_path / "cache" / "runtime").iterdir()
    marker = (folder / ".ggufile-runtime-ok").stat()
    second = run([copy, *args], env=env)
    assert second.returncode == 0 and second.stdout == want.stdout
    assert f"ggufile-launcher: reused {folder}" in second.stderr and "unpacked" not in second.stderr
    now = (folder / ".ggufile-runtime-ok").stat()
    assert (now.st_ino, now.st_mtime_ns) == (marker.st_ino, marker.st_mtime_ns)


def test_cached_info_and_corrupt_runtime_dir_replaced(cached_exe, tmp_path):
    env = cache_env(tmp_path / "cache")
    assert run([cached_exe, "--info"], env=env).returncode == 0
    (folder,) = (tmp_path / "cache" / "runtime").iterdir()
    lib = next(p for p in (folder / "_internal").iterdir() if p.name.startswith("libpython"))
    lib.write_bytes(b"")  # a damaged folder without its completion marker
    (folder / ".ggufile-runtime-ok").unlink()
    got = run([cached_exe, "--info"], env=env)
    assert got.returncode == 0, got.stderr
    assert "ggufile-launcher: unpacked" in got.stderr
    assert "launcher: cached" in got.stdout and "-c 1024" in got.stdout
    assert lib.stat().st_size > 0


def test_cached_two_concurrent_first_starts(cached_exe, tmp_path):
    env = cache_env(tmp_path / "cache")
    procs = [subprocess.Popen([str(cached_exe), "-p", PROMPT, "-n", "2", "--temp", "0"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0] and outs[0][0].startswith(PROMPT)
    (folder,) = (tmp_path / "cache" / "runtime").iterdir()  # one folder; the loser's copy is gone
    assert (folder / ".ggufile-runtime-ok").is_file()


def test_cached_extract_is_byte_identical(cached_exe, smollm2_path, tmp_path):
    out = tmp_path / "back.gguf"
    build.extract(cached_exe, out)
    assert out.read_bytes() == smollm2_path.read_bytes()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cached_executable_serves_the_openai_api(cached_exe, tmp_path):
    """`./model --server`: the frozen runtime carries starlette/uvicorn and the web page."""
    import time
    import urllib.request

    from openai import OpenAI

    port = _free_port()
    proc = subprocess.Popen([str(cached_exe), "--server", "--port", str(port), "--nobrowser"],
                            env=cache_env(tmp_path / "cache"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    get = lambda path: urllib.request.urlopen(base + path, timeout=10).read().decode()
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                get("/health")
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert "<html" in get("/").lower()
        client = OpenAI(base_url=f"{base}/v1", api_key="none", timeout=120)
        reply = client.chat.completions.create(model="local", max_tokens=12, temperature=0,
                                               messages=[{"role": "user", "content": "What is 2+2?"}])
        assert "4" in reply.choices[0].message.content
        # The grammar engine (llguidance) is frozen in too: constrained output works.
        schema = {"type": "object", "properties": {"answer": {"enum": [3, 4, 5]}}, "required": ["answer"],
                  "additionalProperties": False}
        shaped = client.chat.completions.create(
            model="any", max_tokens=40, temperature=0, messages=[{"role": "user", "content": "What is 2+2?"}],
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
        assert json.loads(shaped.choices[0].message.content)["answer"] in (3, 4, 5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
