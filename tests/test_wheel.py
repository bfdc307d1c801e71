"""`python -m build` makes a platform wheel that carries the AOT kernels and this platform's launcher
stub: installed into a fresh venv (no PyInstaller, no Numba, no compiler used), `ggufile build`
makes an executable that runs.

The stub shipped is the prebuilt one for these sources (stubs/build_stub.sh: glibc 2.31) when it
is cached, else the one PyInstaller builds here (its floor is then this machine's glibc, and the
wheel's manylinux tag says so).
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ggufile.builder import platforms

pytestmark = [pytest.mark.slow, pytest.mark.real_model]
REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 1200


def sh(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not list((REPO / "runtime" / "kernels").glob("_aot_*.so")):
        pytest.skip("no AOT kernels built (python -m ggufile.runtime.kernels.src.aot_build)")
    stub = platforms.default_cached_stub()
    out = tmp_path_factory.mktemp("dist")
    # `python -m build`: the sdist, then the wheel built from it (as pip and PyPI would)
    sh([sys.executable, "-m", "build", "--outdir", out, REPO],
       env=dict(os.environ, GGUFILE_WHEEL_STUB=str(stub)))
    wheels = list(out.glob("ggufile-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    return wheels[0]


def test_wheel_is_platform_specific_and_carries_kernels_and_stub(wheel):
    tag = wheel.name.split("-", 2)[2]
    assert tag.startswith(f"cp{sys.version_info.major}{sys.version_info.minor}-") and "manylinux_" in tag
    names = zipfile.ZipFile(wheel).namelist()
    platform = platforms.host_platform()
    assert any(n.startswith("ggufile/runtime/kernels/_aot_") and n.endswith(".so") for n in names)
    shipped = [n for n in names if n.startswith(f"ggufile/stubs/prebuilt/{platform}/")]
    assert any(n.endswith(platforms.STUB_SUFFIX) for n in shipped)
    assert any(n.endswith(f"{platforms.STUB_SUFFIX}.json") for n in shipped)
    assert not any("/kernels/src/" in n and n.endswith(".so") for n in names)


def test_fresh_venv_builds_and_runs_an_executable(wheel, smollm2_path, tmp_path):
    venv = tmp_path / "venv"
    sh([sys.executable, "-m", "venv", venv])  # no system site-packages: only what the wheel pulls in
    sh([venv / "bin" / "python", "-m", "pip", "install", "-q", wheel])
    missing = sh([venv / "bin" / "python", "-c",
                  "import importlib.util as u; print([m for m in ('PyInstaller', 'numba') if u.find_spec(m)])"])
    assert missing.stdout.strip() == "[]"
    env = dict(os.environ, GGUFILE_CACHE=str(tmp_path / "cache"), PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    exe = tmp_path / "smol"
    built = sh([venv / "bin" / "ggufile", "build", smollm2_path, "-o", exe, "--args", "-c 1024"], env=env,
               cwd=tmp_path)
    assert "PyInstaller" not in built.stderr  # the shipped stub, nothing built here
    info = sh([venv / "bin" / "ggufile", "inspect", exe, "--no-verify"], env=env, cwd=tmp_path).stdout
    assert "stub glibc floor:" in info and "unknown" not in info.split("stub glibc floor:")[1].splitlines()[0]
    run = sh([exe, "-p", "The capital of France is", "-n", "6", "--temp", "0"], env=env, cwd=tmp_path)
    assert run.stdout.startswith("The capital of France is") and len(run.stdout) > 30
