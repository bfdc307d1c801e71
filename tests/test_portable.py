"""The prebuilt stubs of stubs/build_stub.sh: the glibc 2.31 floor, run inside Debian 11 roots.

Each test runs only when `sudo stubs/build_stub.sh PLATFORM` has cached a stub for these sources
(and its bullseye root) under $GGUFILE_CACHE; CI builds the x86-64 one, the aarch64 one takes
an hour or more under qemu-user-static and is checked where it is cached. Running inside a root
needs root (chroot); the aarch64 root runs through qemu-user-static's binfmt_misc entry.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ggufile.builder import build, glibc, platforms

pytestmark = [pytest.mark.slow, pytest.mark.real_model]
FLOOR = (2, 31)
PROMPT = "The capital of France is"
ARGS = ["-p", PROMPT, "-n", "16", "--temp", "0"]
ARCH = {"linux-x86_64": "amd64", "linux-aarch64": "arm64"}
QEMU_TIMEOUT = 1800


def root_of(platform: str) -> Path:
    return platforms.cache_root() / "roots" / f"bullseye-{ARCH[platform]}"


def stub_or_skip(platform: str) -> Path:
    stub = platforms.find_stub(platform)
    if stub is None:
        pytest.skip(f"no cached {platform} stub for these sources (sudo stubs/build_stub.sh {platform})")
    return stub


def root_or_skip(platform: str) -> Path:
    root = root_of(platform)
    if os.geteuid() != 0 or not (root / ".ggufile-root-ok").exists():
        pytest.skip(f"needs root and the bullseye root {root} (stubs/build_stub.sh {platform})")
    if platform == "linux-aarch64" and not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        pytest.skip("qemu-user-static's aarch64 binfmt_misc entry is not registered")
    return root


@contextlib.contextmanager
def mounted(root: Path):
    """/proc and /dev inside the root for the test's length (left alone if already mounted)."""
    done = []
    try:
        for name, cmd in (("proc", ["mount", "-t", "proc", "proc"]), ("dev", ["mount", "--bind", "/dev"])):
            if subprocess.run(["mountpoint", "-q", root / name]).returncode != 0:
                subprocess.run([*cmd, root / name], check=True)
                done.append(root / name)
        yield
    finally:
        for path in done:
            subprocess.run(["umount", "-l", path])


def in_root(root: Path, exe_dir: Path, *cmd, timeout=QEMU_TIMEOUT, **kwargs):
    inside = "/" + str(exe_dir.relative_to(root))
    env = {"PATH": "/usr/bin:/bin", "HOME": inside, "GGUFILE_CACHE": f"{inside}/cache", "LANG": "C.UTF-8"}
    return subprocess.run(["chroot", root, "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in env.items()],
                           *[str(c) for c in cmd]], capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture
def exe_in_root(request, tmp_path, smollm2_path):
    """(root, folder inside it, executable) built from the platform's cached stub."""
    platform = request.param
    stub = stub_or_skip(platform)
    root = root_or_skip(platform)
    folder = root / "tmp" / f"ggufile-test-{os.getpid()}-{tmp_path.name}"
    folder.mkdir(parents=True)
    exe = folder / "smol"
    build.build_executable(smollm2_path, exe, [(platform, stub)], default_args=["-c", "1024"])
    try:
        with mounted(root):
            yield root, folder, exe
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def ggufile_run_here(model: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "ggufile.builder.cli", "run", "-m", model, "-c", "1024", *ARGS],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("platform", ["linux-x86_64", "linux-aarch64"])
def test_cached_stub_needs_no_newer_glibc_than_2_31(platform):
    stub = stub_or_skip(platform)
    scan = glibc.scan_files(glibc.archive_files(stub.read_bytes()))
    floor = glibc.floor(scan)
    assert tuple(map(int, floor["glibc"].split("."))) <= FLOOR, glibc.symbol_table(scan)
    assert platforms.sidecar(stub)["glibc_floor"]["glibc"] == floor["glibc"]
    # libstdc++ (GLIBCXX_ needs) comes from bullseye too, and is bundled when anything links it
    assert floor["glibcxx"] is None or floor["libstdcxx_bundled"] or floor["glibcxx"] <= "3.4.28"


@pytest.mark.parametrize("exe_in_root", ["linux-x86_64"], indirect=True)
def test_x86_64_executable_runs_in_bullseye_and_here(exe_in_root, smollm2_path, tmp_path):
    root, folder, exe = exe_in_root
    want = ggufile_run_here(smollm2_path)
    inside = in_root(root, folder, f"/{exe.relative_to(root)}", *ARGS, timeout=600)
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout == want
    here = subprocess.run([exe, *ARGS], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, GGUFILE_CACHE=str(tmp_path / "cache")))
    assert here.returncode == 0, here.stderr
    assert here.stdout == want


@pytest.mark.parametrize("exe_in_root", ["linux-aarch64"], indirect=True)
def test_aarch64_executable_under_qemu_matches_x86_64(exe_in_root, smollm2_path):
    root, folder, exe = exe_in_root
    want = ggufile_run_here(smollm2_path)
    got = in_root(root, folder, f"/{exe.relative_to(root)}", *ARGS)
    assert got.returncode == 0, got.stderr
    assert got.stdout == want
    # aarch64 raises FE_INVALID casting float16 signalling NaNs (the fp16 tables): no NumPy warning
    assert "Warning" not in got.stderr, got.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("exe_in_root", ["linux-aarch64"], indirect=True)
def test_aarch64_server_under_qemu_answers_the_openai_client(exe_in_root):
    from openai import OpenAI

    root, folder, exe = exe_in_root
    port = _free_port()
    inside = "/" + str(folder.relative_to(root))
    proc = subprocess.Popen(["chroot", root, "/usr/bin/env", "-i", "PATH=/usr/bin:/bin", f"HOME={inside}",
                             f"GGUFILE_CACHE={inside}/cache", f"/{exe.relative_to(root)}", "--server",
                             "--port", str(port), "--nobrowser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + QEMU_TIMEOUT
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                urllib.request.urlopen(f"{base}/health", timeout=10).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(1)
        client = OpenAI(base_url=f"{base}/v1", api_key="none", timeout=QEMU_TIMEOUT)
        reply = client.chat.completions.create(model="local", max_tokens=12, temperature=0,
                                               messages=[{"role": "user", "content": "What is 2+2?"}])
        assert "4" in reply.choices[0].message.content
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
