"""The builder under hostile conditions (issue 19): killed half way, told to overwrite its input,
a full disk; and built executables whose file changes under them."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_builder import fake_stub, files_in, run_cli, small_tmpfs  # noqa: F401 (fixtures)

pytestmark = pytest.mark.real_model

# Runs the builder CLI with its writing slowed down at a known point, announced on stdout.
SLOW_CLI = r"""
import sys, time
import ggufile.builder.build as build, ggufile.builder.pyz as pyz, ggufile.builder.gguf_writer as gw

def slow_copy(src, offset, size, out, progress=None):
    out.write(b"x" * 4096)
    out.flush()
    print("WRITING", flush=True)
    time.sleep(120)

real_bytes = gw._tensor_bytes
def slow_tensor(spec, calls=[0]):
    calls[0] += 1
    if calls[0] == 3:
        print("WRITING", flush=True)
        time.sleep(120)
    return real_bytes(spec)

build.copy_window = pyz.copy_window = slow_copy
gw._tensor_bytes = slow_tensor
from ggufile.builder.cli import cli
cli(sys.argv[1:])
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("how", ["exe", "pyz", "quantize", "build-quantize"])
def test_signal_during_build_leaves_nothing(tmp_path, fake_stub, smollm2_path, sig, how):  # noqa: F811
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model"
    args = {"exe": ["build", smollm2_path, "-o", out, "--stub", fake_stub],
            "pyz": ["build", smollm2_path, "-o", out, "--format", "pyz"],
            "quantize": ["quantize", smollm2_path, out, "-t", "Q8_0"],
            "build-quantize": ["build", smollm2_path, "-o", out, "--stub", fake_stub, "--quantize", "Q8_0"]}[how]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        assert files_in(out_dir), "the writer should have a partial file by now"
        proc.send_signal(sig)
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig
    assert "Traceback" not in proc.stderr.read()
    assert files_in(out_dir) == []


@pytest.mark.parametrize("how", ["exe", "pyz", "quantize", "build-quantize", "extract"])
def test_output_equal_to_input_is_refused(tmp_path, fake_stub, smollm2_path, how):  # noqa: F811
    model = tmp_path / "m.gguf"
    model.write_bytes(smollm2_path.read_bytes())
    if how == "extract":
        exe = tmp_path / "m"
        assert run_cli("build", model, "-o", exe, "--stub", fake_stub).exit_code == 0
        model = exe
    before = model.read_bytes()
    same = tmp_path / "." / model.name  # another spelling of the same path
    args = {"exe": ["build", model, "-o", same, "--stub", fake_stub],
            "pyz": ["build", model, "-o", same, "--format", "pyz"],
            "quantize": ["quantize", model, same, "-t", "Q8_0"],
            "build-quantize": ["build", model, "-o", same, "--stub", fake_stub, "--quantize", "Q8_0"],
            "extract": ["extract", model, "-o", same]}[how]
    result = run_cli(*args)
    assert result.exit_code == 1
    assert "input" in result.output.strip().splitlines()[-1]
    assert model.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_build_onto_its_stub_is_refused(tmp_path, fake_stub, smollm2_path):  # noqa: F811
    stub = tmp_path / "stub"
    stub.write_bytes(fake_stub.read_bytes())
    result = run_cli("build", smollm2_path, "-o", stub, "--stub", stub)
    assert result.exit_code == 1 and stub.read_bytes() == fake_stub.read_bytes()


def test_quantize_into_a_full_disk_is_one_line(small_tmpfs, fake_stub, smollm2_path):  # noqa: F811
    for args in (["build", smollm2_path, "-o", small_tmpfs / "model", "--stub", fake_stub, "--quantize", "F32"],
                 ["quantize", smollm2_path, small_tmpfs / "m.gguf", "-t", "F32"]):
        result = run_cli(*args)
        assert result.exit_code == 1
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("Error: cannot write") and last.endswith("No space left on device"), last
        assert "internal error" not in result.output
        assert files_in(small_tmpfs) == []


TRUNCATE_AND_READ = r"""
import mmap, os, sys
from pathlib import Path
from ggufile.runtime.watch import run_watched

path = Path(sys.argv[1])

def main():
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    os.truncate(path, 0)  # what `cp other THIS` does first
    return m[len(m) - 1]  # the page is gone: SIGBUS

sys.exit(run_watched(main, path))
"""


def test_sigbus_from_a_truncated_mapping_is_one_line(tmp_path):
    victim = tmp_path / "exe"
    victim.write_bytes(b"x" * (1 << 20))
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_AND_READ, str(victim)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGBUS
    assert proc.stderr.strip() == f"Error: {victim} changed while it was running (overwritten or truncated); start it again"


def test_executable_overwritten_while_generating_says_so(tmp_path, smollm2_path):
    from ggufile.builder.pyz import build_pyz

    exe = tmp_path / "smol.pyz"
    build_pyz(smollm2_path, exe)
    proc = subprocess.Popen([sys.executable, str(exe), "-p", "Once upon a time", "-n", "2000", "--temp", "0",
                             "--no-display-prompt"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(1)  # generating
        with open(exe, "r+b") as f:  # cp over it: truncate, then write other bytes
            f.truncate(0)
            f.write(b"#!/bin/sh\necho another program\n")
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = err.decode().strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1 and "changed while it was running" in lines[0], lines
