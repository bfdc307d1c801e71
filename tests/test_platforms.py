"""One file, several platforms; the glibc floor of stubs; prebuilt stubs found by the sources they froze.

Multi-platform files are checked with fake runtimes (sh scripts) and a fake `uname` on PATH, so
the prologue's choice is tested for every platform on this one machine; the real aarch64 runtime
is checked under qemu by tests/test_portable.py when a cached aarch64 stub exists.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ggufile.builder import glibc, platforms
from ggufile.builder.cli import cli
from ggufile.builder.pyz import build_pyz
from ggufile.builder.stub import RUNTIME_NAME, pack_runtime
from ggufile.runtime.container import ALIGNMENT, PROLOGUE_SIZE, read_container

pytestmark = pytest.mark.real_model


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def fake_stub(folder: Path, platform: str, tree: str = "") -> Path:
    """A runtime .tar.gz + sidecar whose runtime says which platform it is."""
    src = folder / f"src-{platform}"
    src.mkdir(parents=True)
    (src / RUNTIME_NAME).write_text(f'#!/bin/sh\necho "{platform} runtime args=$*"\n')
    (src / RUNTIME_NAME).chmod(0o755)
    (src / "_internal").mkdir()
    (src / "_internal" / "lib.txt").write_text(platform * 2000)
    out = folder / f"ggufile-test-{platform}{platforms.STUB_SUFFIX}"
    pack_runtime(src, out)
    Path(f"{out}.json").write_text(json.dumps({"platform": platform, "tree": tree, "ggufile_version": "test",
                                               "glibc_floor": {"glibc": "2.31"}}))
    return out


def fake_uname_env(tmp_path: Path, uname: str) -> dict:
    """PATH with a `uname` that prints `uname` for -sm, and a runtime cache of this test's own."""
    bin_dir = tmp_path / f"bin-{uname.replace(' ', '-')}"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "uname").write_text(f'#!/bin/sh\necho "{uname}"\n')
    (bin_dir / "uname").chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", GGUFILE_CACHE=str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def two_stubs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("stubs")
    return {p: fake_stub(folder, p) for p in ("linux-x86_64", "linux-aarch64")}


@pytest.fixture(scope="module")
def two_platform_exe(tmp_path_factory, two_stubs, smollm2_path) -> Path:
    out = tmp_path_factory.mktemp("multi") / "smol"
    result = run_cli("build", smollm2_path, "-o", out, "--platform", "linux-x86_64,linux-aarch64",
                     *[a for p, s in two_stubs.items() for a in ("--stub", f"{p}={s}")])
    assert result.exit_code == 0, result.output
    assert "for linux-x86_64, linux-aarch64" in result.output
    return out


def test_two_platform_file_stores_the_model_once(two_platform_exe, two_stubs, smollm2_path, tmp_path):
    one = tmp_path / "one"
    assert run_cli("build", smollm2_path, "-o", one, "--stub", two_stubs["linux-x86_64"]).exit_code == 0
    model, data = read_container(two_platform_exe), two_platform_exe.read_bytes()
    assert model.offset % ALIGNMENT == 0
    assert data[model.offset:model.offset + model.size] == smollm2_path.read_bytes()
    runtimes = model.meta["launcher"]["runtimes"]
    assert [rt["platform"] for rt in runtimes] == ["linux-x86_64", "linux-aarch64"]
    assert runtimes[0]["offset"] == PROLOGUE_SIZE
    for rt, stub in zip(runtimes, two_stubs.values()):
        assert data[rt["offset"]:rt["offset"] + rt["size"]] == stub.read_bytes()
    # the second platform adds its runtime (and at most the alignment pad), not a second model
    extra = two_platform_exe.stat().st_size - one.stat().st_size
    assert extra <= two_stubs["linux-aarch64"].stat().st_size + ALIGNMENT + 4096
    assert extra < model.size / 10


@pytest.mark.parametrize("uname, platform", [("Linux x86_64", "linux-x86_64"), ("Linux aarch64", "linux-aarch64"),
                                             ("Linux arm64", "linux-aarch64")])
def test_the_prologue_picks_the_runtime_by_uname(two_platform_exe, tmp_path, uname, platform):
    proc = subprocess.run([two_platform_exe, "-p", "hi"], env=fake_uname_env(tmp_path, uname),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{platform} runtime args=-p hi"


def test_no_runtime_for_this_machine_names_the_platforms_held(two_platform_exe, tmp_path):
    proc = subprocess.run([two_platform_exe, "--chat"], env=fake_uname_env(tmp_path, "Linux riscv64"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "linux-x86_64, linux-aarch64" in lines[0] and "Linux riscv64" in lines[0]
    assert not (tmp_path / "cache" / "runtime").exists() or not any((tmp_path / "cache" / "runtime").iterdir())


def test_inspect_lists_every_platform_and_its_glibc_floor(two_platform_exe):
    info = json.loads(run_cli("inspect", two_platform_exe, "--json", "--no-verify").output)
    assert info["stub platform"] == "linux-x86_64, linux-aarch64"
    assert info["stub glibc floor"] == "2.31, 2.31"


def test_extract_and_verify_a_two_platform_file(two_platform_exe, smollm2_path, tmp_path):
    out = tmp_path / "back.gguf"
    assert run_cli("extract", two_platform_exe, "-o", out).exit_code == 0
    assert out.read_bytes() == smollm2_path.read_bytes()
    assert run_cli("verify", two_platform_exe).exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["--platform", "linux-riscv64"], "unknown platform 'linux-riscv64'"),
    (["--platform", "windows-x86_64"], "onefile launcher"),
    (["--platform", "linux-x86_64,linux-x86_64"], "named twice"),
    (["--platform", "linux-aarch64"], "stubs/build_stub.sh linux-aarch64"),
    (["--platform", "linux-x86_64", "--format", "pyz"], "cached-launcher"),
])
def test_platform_mistakes_are_one_line_errors(smollm2_path, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("GGUFILE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(platforms, "PACKAGE_ROOT", tmp_path)  # no shipped stubs either
    monkeypatch.setattr(platforms, "tree_hash", lambda root=None: "0123456789ab")
    result = run_cli("build", smollm2_path, "-o", tmp_path / "x", *args)
    assert result.exit_code != 0
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "x").exists()


def test_prebuilt_stubs_are_found_only_for_these_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("GGUFILE_CACHE", str(tmp_path))
    folder = tmp_path / "stubs" / "linux-aarch64"
    stale = fake_stub(folder, "linux-aarch64", tree="000000000000")
    assert platforms.find_stub("linux-aarch64", tree="abcdefabcdef") is None
    good = fake_stub(folder / "new", "linux-aarch64", tree="abcdefabcdef")
    shutil.move(good, folder / good.name)
    shutil.move(f"{good}.json", folder / f"{good.name}.json")
    assert platforms.find_stub("linux-aarch64", tree="abcdefabcdef") == folder / good.name
    assert platforms.find_stub("linux-x86_64", tree="abcdefabcdef") is None
    assert stale.exists()


def test_tree_hash_ignores_compiled_and_cached_files(tmp_path):
    for rel in ("runtime/a.py", "stubs/b.spec"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    before = platforms.tree_hash(tmp_path)
    for rel in ("runtime/_aot_x.so", "runtime/__pycache__/a.pyc", "stubs/cache/s.tar.gz",
                "stubs/prebuilt/linux-x86_64/s.tar.gz", "stubs/build_stub.sh"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert platforms.tree_hash(tmp_path) == before
    (tmp_path / "runtime" / "a.py").write_text("changed")
    assert platforms.tree_hash(tmp_path) != before


# -- the glibc floor ---------------------------------------------------------------------------
def host_elf_files() -> list[Path]:
    files = [Path(sys.executable).resolve(), Path("/bin/ls")]
    files += sorted(Path(__file__).parents[1].glob("runtime/kernels/_aot_*.so"))[:1]
    files += [p for p in (Path("/usr/lib/x86_64-linux-gnu/libstdc++.so.6"),
                          Path("/usr/lib/aarch64-linux-gnu/libstdc++.so.6")) if p.exists()]
    return [p for p in files if p.exists()]


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
@pytest.mark.parametrize("path", host_elf_files(), ids=lambda p: p.name)
def test_needed_versions_are_what_objdump_shows(path):
    dump = subprocess.run(["objdump", "-T", path], capture_output=True, text=True, check=True).stdout
    undefined = set(re.findall(r"\*UND\*\s+\S+\s+\(?([A-Z][A-Z_]*_[0-9.]+)\)?\s", dump))
    ours = {v for vs in glibc.needed_versions(path.read_bytes()).values() for v in vs}
    assert ours == undefined


def test_floor_of_a_runtime_archive(tmp_path):
    folder = tmp_path / "rt"
    (folder / "_internal").mkdir(parents=True)
    shutil.copy("/bin/ls", folder / RUNTIME_NAME)
    (folder / "_internal" / "notes.txt").write_text("not an ELF")
    archive = tmp_path / f"x{platforms.STUB_SUFFIX}"
    pack_runtime(folder, archive)
    names = {v for vs in glibc.needed_versions(Path("/bin/ls").read_bytes()).values() for v in vs}
    floor = glibc.floor(glibc.scan_files(glibc.archive_files(archive.read_bytes())))
    assert floor["glibc"] == glibc.newest(names, "GLIBC") and floor["elf_files"] == 1
    assert floor["glibc_needed_by"] == [RUNTIME_NAME]
    result = run_cli("inspect", archive, "--glibc")
    assert result.exit_code == 0 and f"glibc {floor['glibc']}" in result.output
    assert f"{RUNTIME_NAME}: GLIBC_" in result.output


def test_newest_compares_versions_as_numbers():
    assert glibc.newest({"GLIBC_2.9", "GLIBC_2.14", "GLIBC_2.2.5", "GLIBCXX_3.4.30"}, "GLIBC") == "2.14"
    assert glibc.newest({"GLIBCXX_3.4.9", "GLIBCXX_3.4.29", "CXXABI_1.3"}, "GLIBCXX") == "3.4.29"
    assert glibc.newest(set(), "GLIBC") is None


# -- the .pyz without NumPy --------------------------------------------------------------------
def test_pyz_without_numpy_says_so_in_one_line(smollm2_path, tmp_path):
    out = tmp_path / "smol.pyz"
    build_pyz(smollm2_path, out)
    # -S -I: no site-packages at all, so no NumPy (the zip vendors everything else)
    proc = subprocess.run([sys.executable, "-S", "-I", out, "-p", "hi"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "needs NumPy" in proc.stderr, proc.stderr


def test_restub_refuses_to_drop_platforms(two_platform_exe, two_stubs, tmp_path):
    result = run_cli("restub", two_platform_exe, "--stub", two_stubs["linux-x86_64"], "-o", tmp_path / "one")
    assert result.exit_code == 1 and "linux-x86_64, linux-aarch64" in result.output
    assert not (tmp_path / "one").exists()
