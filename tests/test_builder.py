"""The builder without PyInstaller: container format, build/extract/verify/inspect, bad input.

A fake stub (some bytes + a PyInstaller cookie) stands in for the launcher here: the container
format only relies on the cookie, which is what the real bootloader relies on too. The real
stub is exercised in test_executable.py.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from ggufile.builder import build, elf
from ggufile.builder.cli import cli
from ggufile.builder.pyz import build_pyz
from ggufile.runtime import container
from ggufile.runtime.container import ALIGNMENT, PYI_COOKIE, PYI_COOKIE_MAGIC, read_container
from ggufile.runtime.errors import GGUFileError

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="session")
def fake_stub(tmp_path_factory) -> Path:
    """[head][archive bytes][cookie][tail]: the shape of a PyInstaller one-file executable."""
    head = b"#fake bootloader\n" * 500
    archive = os.urandom(5000)
    pkg_length = len(archive) + PYI_COOKIE.size
    cookie = PYI_COOKIE.pack(PYI_COOKIE_MAGIC, pkg_length, 0, 0, 311, b"libpython3.11.so")
    path = tmp_path_factory.mktemp("stub") / "fake-stub"
    path.write_bytes(head + archive + cookie + b"\0" * 300)
    return path


@pytest.fixture(scope="session")
def built(tmp_path_factory, fake_stub, smollm2_path) -> Path:
    out = tmp_path_factory.mktemp("built") / "smol"
    build.build_executable(smollm2_path, out, fake_stub, name="Smol", default_args=["--temp", "0.2"])
    return out


def run_cli(*args) -> "click.testing.Result":
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- the layout --------------------------------------------------------------------------------
def test_layout_keeps_stub_archive_and_aligns_model(built, fake_stub, smollm2_path):
    stub = fake_stub.read_bytes()
    exe = built.read_bytes()
    pkg = container.find_pyinstaller_archive(fake_stub)
    model = read_container(built)
    assert model.offset % ALIGNMENT == 0
    assert model.offset >= pkg
    # the stub's head and archive+tail are there unchanged; the model sits in between
    assert exe[:pkg] == stub[:pkg]
    assert exe.endswith(stub[pkg:])
    assert exe[model.offset:model.offset + model.size] == smollm2_path.read_bytes()
    # and the bootloader's computation finds the archive where it now is
    assert container.find_pyinstaller_archive(built) == len(exe) - (len(stub) - pkg)


def test_trailer_records_name_args_checksum(built, smollm2_path):
    model = read_container(built)
    assert model.name == "Smol"
    assert model.default_args == ["--temp", "0.2"]
    assert model.size == smollm2_path.stat().st_size
    assert model.verify()
    assert model.meta["source"] == smollm2_path.name
    with model.open() as reader:
        assert reader.architecture == "llama"


def test_extract_is_byte_identical(built, smollm2_path, tmp_path):
    out = tmp_path / "back.gguf"
    result = run_cli("extract", built, "-o", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == smollm2_path.read_bytes()
    assert not os.access(out, os.X_OK)


def test_inspect_reports_model(built):
    result = run_cli("inspect", built, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["architecture"] == "llama"
    assert info["model name"] == "Smol"
    assert info["default args"] == "--temp 0.2"
    assert info["context length"] == "8192"
    assert "Q4_1" in info["quantization"]
    assert info["checksum"].endswith("(ok)")


def test_verify_catches_one_corrupted_byte(built, tmp_path):
    bad = tmp_path / "bad"
    shutil.copy(built, bad)
    model = read_container(bad)
    with open(bad, "r+b") as f:  # flip a byte in the last tensor's data
        f.seek(model.offset + model.size - 1000)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert run_cli("verify", built).exit_code == 0
    result = run_cli("verify", bad)
    assert result.exit_code == 1
    assert "MISMATCH" in result.output
    assert "MISMATCH" in run_cli("inspect", bad).output
    # a corrupted model is not extracted or re-stubbed either
    assert run_cli("extract", bad, "-o", tmp_path / "x.gguf").exit_code == 1
    assert not (tmp_path / "x.gguf").exists()


def test_restub_keeps_weights_and_args(built, fake_stub, tmp_path):
    new_stub = tmp_path / "stub2"
    data = bytearray(fake_stub.read_bytes())
    data[:4] = b"#NEW"
    new_stub.write_bytes(bytes(data))
    out = tmp_path / "restubbed"
    result = run_cli("restub", built, "--stub", new_stub, "-o", out)
    assert result.exit_code == 0, result.output
    old, new = read_container(built), read_container(out)
    assert out.read_bytes().startswith(b"#NEW")
    assert (new.name, new.default_args, new.sha256) == (old.name, old.default_args, old.sha256)
    assert new.verify()


def test_build_refuses_a_built_executable_as_stub(built, smollm2_path, tmp_path):
    result = run_cli("build", smollm2_path, "-o", tmp_path / "x", "--stub", built)
    assert result.exit_code == 1
    assert "already holds a model" in result.output
    assert files_in(tmp_path) == []


def test_bare_stub_has_no_model(fake_stub):
    with pytest.raises(GGUFileError, match="no model inside"):
        read_container(fake_stub)


def test_elf_section_offsets_shift(tmp_path):
    """The section-table patch on a real ELF (python itself): offsets past the cut move."""
    data = bytearray(Path(sys.executable).resolve().read_bytes())
    if not elf.is_elf64le(data):
        pytest.skip("not an ELF64 platform")
    shoff = int.from_bytes(data[0x28:0x30], "little")
    patched = bytearray(data)
    with pytest.raises(GGUFileError):  # cutting inside the loadable segments is refused
        elf.shift_after(patched, 64, 4096)
    elf.shift_after(patched, shoff, 4096)  # only the section table itself lies past the cut
    assert int.from_bytes(patched[0x28:0x30], "little") == shoff + 4096


# -- bad input ---------------------------------------------------------------------------------
def test_build_non_gguf(tmp_path, fake_stub):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"hello, this is not a model" * 100)
    result = run_cli("build", junk, "-o", tmp_path / "out", "--stub", fake_stub)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["Error: junk.gguf: not a GGUF file (bad magic)"]
    assert files_in(tmp_path) == ["junk.gguf"]


def test_build_truncated_gguf(tmp_path, fake_stub, smollm2_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        cut.write_bytes(f.read(smollm2_path.stat().st_size // 2))
    result = run_cli("build", cut, "-o", tmp_path / "out", "--stub", fake_stub)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cut.gguf: truncated or corrupt GGUF")
    assert files_in(tmp_path) == ["cut.gguf"]


def test_build_unsupported_architecture(tmp_path, fake_stub):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    import numpy as np

    w.add_tensor("x.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    result = run_cli("build", path, "-o", tmp_path / "out", "--stub", fake_stub)
    assert result.exit_code == 1
    assert "unsupported model architecture 'mamba'" in result.output
    assert files_in(tmp_path) == ["mamba.gguf"]


def test_build_into_missing_folder(tmp_path, fake_stub, smollm2_path):
    result = run_cli("build", smollm2_path, "-o", tmp_path / "nope" / "out", "--stub", fake_stub)
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: output folder {tmp_path / 'nope'} does not exist"


def test_bad_args_string(tmp_path, fake_stub, smollm2_path):
    result = run_cli("build", smollm2_path, "-o", tmp_path / "out", "--stub", fake_stub, "--args", "--x 'open")
    assert result.exit_code == 2
    assert files_in(tmp_path) == []


def test_inspect_non_container(tmp_path, smollm2_path):
    result = run_cli("inspect", smollm2_path)
    assert result.exit_code == 1
    assert "not a ggufile executable" in result.output


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("fmt", ["exe", "pyz"])
def test_full_disk_leaves_nothing(tmp_path, fake_stub, smollm2_path, fmt):
    """A write that fails half way (RLIMIT_FSIZE: EFBIG, like ENOSPC) -> one line, no file."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = [sys.executable, "-m", "ggufile.builder.cli", "build", str(smollm2_path),
           "-o", str(out_dir / "model"), "--stub", str(fake_stub), "--format", fmt]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_file_size(20 << 20))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"Error: cannot write {out_dir / 'model'}: File too large"
    assert "Traceback" not in proc.stderr
    assert files_in(out_dir) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_full_tmpfs_leaves_nothing(small_tmpfs, fake_stub, smollm2_path):
    out = small_tmpfs / "model"
    result = run_cli("build", smollm2_path, "-o", out, "--stub", fake_stub)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == f"Error: cannot write {out}: No space left on device"
    assert files_in(small_tmpfs) == []


# -- pyz -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pyz(tmp_path_factory, smollm2_path) -> Path:
    out = tmp_path_factory.mktemp("pyz") / "smol.pyz"
    build_pyz(smollm2_path, out, default_args=["-c", "2048"])
    return out


def test_pyz_model_is_stored_and_aligned(pyz, smollm2_path, tmp_path):
    model = read_container(pyz)
    assert model.kind == "pyz"
    assert model.offset % ALIGNMENT == 0
    assert model.default_args == ["-c", "2048"]
    with zipfile.ZipFile(pyz) as zf:
        assert zf.getinfo("model.gguf").compress_type == zipfile.ZIP_STORED
        names = set(zf.namelist())
        assert zf.testzip() is None  # CRCs are right: any unzip tool accepts it
    assert {"__main__.py", "ggufile/runtime/cli.py", "click/__init__.py", "uvicorn/__init__.py"} <= names
    assert model.verify()
    assert run_cli("extract", pyz, "-o", tmp_path / "m.gguf").exit_code == 0
    assert (tmp_path / "m.gguf").read_bytes() == smollm2_path.read_bytes()


def test_build_quantizes_on_the_way_in(tmp_path, fake_stub, smollm2_path):
    out = tmp_path / "q8"
    result = run_cli("build", str(smollm2_path), "-o", str(out), "--stub", str(fake_stub), "--quantize", "Q8_0")
    assert result.exit_code == 0, result.output
    from ggufile.runtime.container import read_container
    from ggufile.runtime.gguf.reader import GGUFReader

    embedded = read_container(out)
    reader = GGUFReader(out, embedded.offset, embedded.size)
    assert {t.ggml_type.name for t in reader.tensors.values()} == {"Q8_0", "F32"}
    assert files_in(tmp_path) == ["q8"]  # the intermediate GGUF is gone


def test_build_unknown_quant_type_writes_nothing(tmp_path, fake_stub, smollm2_path):
    result = run_cli("build", str(smollm2_path), "-o", str(tmp_path / "x"), "--stub", str(fake_stub),
                     "--quantize", "Q9_9")
    assert result.exit_code == 1 and "unknown quantization type" in result.output
    assert files_in(tmp_path) == []


# -- the cached launcher (its sh prologue, with a fake runtime standing in for PyInstaller's) ----
FAKE_RUNTIME = """#!/bin/sh
echo "ran $0 container=$GGUFILE_CONTAINER args=$*"
"""


@pytest.fixture(scope="session")
def fake_runtime(tmp_path_factory) -> Path:
    """A runtime .tar.gz whose `ggufile-runtime` reports where it runs from and what it got."""
    from ggufile.builder.stub import RUNTIME_NAME, pack_runtime

    folder = tmp_path_factory.mktemp("runtime")
    (folder / RUNTIME_NAME).write_text(FAKE_RUNTIME)
    (folder / RUNTIME_NAME).chmod(0o755)
    (folder / "_internal").mkdir()
    (folder / "_internal" / "lib.txt").write_text("x" * 10000)
    out = tmp_path_factory.mktemp("runtime-archive") / "runtime.tar.gz"
    pack_runtime(folder, out)
    return out


@pytest.fixture(scope="session")
def built_cached(tmp_path_factory, fake_runtime, smollm2_path) -> Path:
    out = tmp_path_factory.mktemp("built-cached") / "smol"
    build.build_executable(smollm2_path, out, fake_runtime, name="Smol", default_args=["--temp", "0.2"])
    return out


def launch(exe: Path, cache: Path, *args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, GGUFILE_CACHE=str(cache), GGUFILE_LAUNCHER_DEBUG="1")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=60, cwd=cwd)


def test_cached_layout_extract_inspect(built_cached, smollm2_path, fake_runtime, tmp_path):
    data = built_cached.read_bytes()
    model = read_container(built_cached)
    assert data.startswith(b"#!/bin/sh\n") and os.access(built_cached, os.X_OK)
    runtime = fake_runtime.read_bytes()
    assert data[container.PROLOGUE_SIZE:container.PROLOGUE_SIZE + len(runtime)] == runtime
    assert model.offset % ALIGNMENT == 0
    assert data[model.offset:model.offset + model.size] == smollm2_path.read_bytes()
    assert (model.name, model.default_args, model.meta["launcher"]["kind"]) == ("Smol", ["--temp", "0.2"], "cached")
    assert json.loads(run_cli("inspect", built_cached, "--json").output)["launcher"] == "cached"
    out = tmp_path / "back.gguf"
    assert run_cli("extract", built_cached, "-o", out).exit_code == 0
    assert out.read_bytes() == smollm2_path.read_bytes()
    assert run_cli("verify", built_cached).exit_code == 0


def test_cached_restub_switches_launcher_both_ways(built_cached, fake_stub, fake_runtime, tmp_path):
    onefile, back = tmp_path / "onefile", tmp_path / "back"
    assert run_cli("restub", built_cached, "--stub", fake_stub, "-o", onefile).exit_code == 0
    assert run_cli("restub", onefile, "--stub", fake_runtime, "-o", back).exit_code == 0
    old, mid, new = read_container(built_cached), read_container(onefile), read_container(back)
    assert mid.meta["launcher"]["kind"] == "onefile" and new.meta["launcher"]["kind"] == "cached"
    assert (new.name, new.default_args, new.sha256) == (old.name, old.default_args, old.sha256)
    assert back.read_bytes() == built_cached.read_bytes()  # the same inputs give the same file


def test_cached_unpacks_once_then_reuses(built_cached, tmp_path):
    cache = tmp_path / "cache"
    first = launch(built_cached, cache, "-p", "a b")
    assert first.returncode == 0, first.stderr
    assert "unpacked" in first.stderr and f"container={built_cached} args=-p a b" in first.stdout
    (folder,) = (cache / "runtime").iterdir()
    assert sorted(p.name for p in (cache / "runtime").iterdir() if p.name.startswith(".")) == []
    marker = folder / build.MARKER
    stat = marker.stat()
    second = launch(built_cached, cache, "x")
    assert second.returncode == 0 and "reused" in second.stderr and "unpacked" not in second.stderr
    assert f"ran {folder}/ggufile-runtime" in second.stdout
    assert (marker.stat().st_ino, marker.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


@pytest.mark.parametrize("damage", ["no marker", "wrong marker", "no runtime", "junk file"])
def test_cached_replaces_a_broken_runtime_dir(built_cached, tmp_path, damage):
    cache = tmp_path / "cache"
    assert launch(built_cached, cache).returncode == 0
    (folder,) = (cache / "runtime").iterdir()
    if damage == "no marker":
        (folder / build.MARKER).unlink()
    elif damage == "wrong marker":
        (folder / build.MARKER).write_text("0123\n")
    elif damage == "no runtime":
        (folder / "ggufile-runtime").unlink()
    else:  # a half-unpacked folder left by a killed first start, before any rename
        shutil.rmtree(folder)
        folder.mkdir()
        (folder / "partial").write_text("x")
    got = launch(built_cached, cache, "y")
    assert got.returncode == 0, got.stderr
    assert "unpacked" in got.stderr and "args=y" in got.stdout
    assert (folder / build.MARKER).is_file() and not (folder / "partial").exists()
    assert [p.name for p in (cache / "runtime").iterdir()] == [folder.name]


def test_cached_concurrent_first_starts(built_cached, tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, GGUFILE_CACHE=str(cache))
    procs = [subprocess.Popen([str(built_cached), str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(6)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, outs
    assert all(f"args={i}" in out for i, (out, _) in enumerate(outs))
    (folder,) = (cache / "runtime").iterdir()  # one folder, no leftovers of the losers
    assert sorted(p.name for p in folder.iterdir()) == sorted([build.MARKER, "_internal", "ggufile-runtime"])


def test_cached_unwritable_cache_runs_from_a_temp_dir(built_cached, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # the cache would live under a regular file: not creatable, even by root
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, GGUFILE_CACHE=str(blocker / "cache"), GGUFILE_LAUNCHER_DEBUG="1", TMPDIR=str(tmp))
    got = subprocess.run([str(built_cached), "z"], env=env, capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert "temporary" in got.stderr and "args=z" in got.stdout
    assert list(tmp.iterdir()) == []  # removed after the run
    env["TMPDIR"] = str(blocker)  # nowhere to unpack: one line, exit 1
    del env["GGUFILE_LAUNCHER_DEBUG"]  # (which would show the tools' own messages too)
    got = subprocess.run([str(built_cached)], env=env, capture_output=True, text=True, timeout=60)
    assert got.returncode == 1 and "Error: cannot unpack the ggufile runtime" in got.stderr
    assert len(got.stderr.strip().splitlines()) == 1, got.stderr


def test_cached_runs_from_a_copy_by_relative_path_and_symlink(built_cached, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    copy = other / "m"
    shutil.copy(built_cached, copy)
    (tmp_path / "link").symlink_to(copy)
    got = launch("./m", tmp_path / "cache", "q", cwd=other)
    assert got.returncode == 0 and f"container={other}/./m args=q" in got.stdout
    got = launch(tmp_path / "link", tmp_path / "cache", "r")
    assert got.returncode == 0 and "reused" in got.stderr and "args=r" in got.stdout
