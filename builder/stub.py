"""Launcher stubs: the runtime frozen by PyInstaller, with no model inside, cached.

Two kinds (`ggufile build --launcher`):
- "cached" (default on Linux/macOS): a PyInstaller one-dir build packed as a .tar.gz; the builder
  puts it behind a sh prologue that unpacks it once per machine into a cache (see build.py).
- "onefile" (default on Windows): a PyInstaller one-file executable, which unpacks its runtime
  to a fresh temp dir at every start.

A stub is keyed by ggufile version + platform + Python + a hash of everything frozen into it
(the runtime sources, web UI, AOT kernels and the recipe in stubs/), so a code change builds a
new stub while an unchanged tree reuses the cached one. Each stub has a `.json` sidecar that
`build` copies into the executable's trailer (what `inspect` reports as runtime/platform/glibc
floor: the newest GLIBC_ version the one-dir runtime's ELF files need, see builder/glibc.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import ggufile.runtime
import ggufile.stubs
from ggufile.runtime import __version__
from ggufile.runtime.errors import GGUFileError

from ggufile.builder import glibc
from ggufile.builder.platforms import tree_hash

RECIPE_DIR = Path(ggufile.stubs.__file__).parent
SPEC = RECIPE_DIR / "ggufile-stub.spec"
RUNTIME_DIR = Path(ggufile.runtime.__file__).parent
STUB_NAME = "ggufile-stub"  # the spec's one-file EXE name
RUNTIME_NAME = "ggufile-runtime"  # the spec's one-dir EXE (and folder) name
LAUNCHERS = ("cached", "onefile")
GZIP_MAGIC = b"\x1f\x8b"


def default_launcher() -> str:
    return "onefile" if sys.platform == "win32" else "cached"


def stub_kind(stub: Path) -> str:
    """"cached" for a runtime .tar.gz, else "onefile" (a PyInstaller one-file executable)."""
    try:
        with open(stub, "rb") as f:
            return "cached" if f.read(2) == GZIP_MAGIC else "onefile"
    except OSError:
        return "onefile"


def stub_platform() -> str:
    return f"{sys.platform}-{platform.machine().lower()}"


def python_tag() -> str:
    return f"py{sys.version_info.major}.{sys.version_info.minor}"


def cache_dir() -> Path:
    """$GGUFILE_CACHE/stubs if set, else stubs/cache next to the recipe (gitignored)."""
    if os.environ.get("GGUFILE_CACHE"):
        return Path(os.environ["GGUFILE_CACHE"]) / "stubs"
    return RECIPE_DIR / "cache"


def _frozen_files() -> list[tuple[str, Path]]:
    cache = RECIPE_DIR / "cache"
    files = [(f"runtime/{p.relative_to(RUNTIME_DIR)}", p) for p in RUNTIME_DIR.rglob("*")]
    files += [(f"stubs/{p.relative_to(RECIPE_DIR)}", p) for p in RECIPE_DIR.rglob("*")
              if not p.is_relative_to(cache)]
    return sorted((rel, p) for rel, p in files
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def source_hash() -> str:
    """Hash of what a stub freezes: runtime files, recipe, and the NumPy it bundles."""
    import numpy

    h = hashlib.sha256(f"numpy {numpy.__version__}\n".encode())
    for rel, path in _frozen_files():
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def stub_key() -> str:
    return f"ggufile-{__version__}-{stub_platform()}-{python_tag()}-{source_hash()}"


def stub_info(stub: Path) -> dict:
    """The sidecar of a stub (what it bundles); minimal facts if the sidecar is missing."""
    sidecar = stub.with_name(stub.name + ".json")
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return {"ggufile_version": "unknown", "platform": "unknown", "python": "unknown"}


def stub_path(launcher: str = "onefile") -> Path:
    key = stub_key()
    return cache_dir() / (key if launcher == "onefile" else f"{key}.runtime.tar.gz")


def cached_stub(launcher: str = "onefile") -> Path | None:
    path = stub_path(launcher)
    ok = path.is_file() and (launcher != "onefile" or os.access(path, os.X_OK))
    return path if ok else None


def ensure_stub(echo=print, launcher: str = "onefile") -> Path:
    """The cached stub for this tree, building it first if needed."""
    return cached_stub(launcher) or build_stub(echo=echo, launcher=launcher)


def build_stub(echo=print, force: bool = False, launcher: str = "onefile") -> Path:
    """Freeze the runtime with PyInstaller into the cache; returns the stub's path."""
    if launcher not in LAUNCHERS:
        raise GGUFileError(f"unknown launcher {launcher!r} (choose from {', '.join(LAUNCHERS)})")
    dest = stub_path(launcher)
    if dest.is_file() and not force:
        return dest
    _check_pyinstaller()
    dest.parent.mkdir(parents=True, exist_ok=True)
    echo(f"Building the {launcher} launcher stub for {stub_platform()} {python_tag()} with PyInstaller "
         f"(once per runtime version, takes a minute or two)...")
    with tempfile.TemporaryDirectory(prefix="ggufile-stub-") as tmp:
        tmp = Path(tmp)
        _stage_runtime(tmp / "src")
        cmd = [sys.executable, "-m", "PyInstaller", str(SPEC), "--noconfirm", "--log-level", "WARN",
               "--distpath", str(tmp / "dist"), "--workpath", str(tmp / "work")]
        env = dict(os.environ, GGUFILE_STUB_SRC=str(tmp / "src"),
                   GGUFILE_STUB_MODE="onefile" if launcher == "onefile" else "onedir")
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        built = tmp / "dist" / (STUB_NAME if launcher == "onefile" else RUNTIME_NAME)
        if proc.returncode != 0 or not built.exists():
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise GGUFileError(f"PyInstaller failed building the stub: {last[0]}")
        floor = glibc.floor(glibc.scan_files(glibc.folder_files(built))) if built.is_dir() else None
        part = dest.with_name(dest.name + ".part")
        if launcher == "onefile":
            shutil.copy2(built, part)
        else:
            pack_runtime(built, part)
        os.replace(part, dest)
    info = {"ggufile_version": __version__, "platform": stub_platform(), "python": platform.python_version(),
            "key": dest.name, "size": dest.stat().st_size, "launcher": launcher,
            "tree": tree_hash(), "glibc_floor": floor}
    dest.with_name(dest.name + ".json").write_text(json.dumps(info, indent=1))
    echo(f"Stub ready: {dest} ({dest.stat().st_size / 1e6:.1f} MB)")
    return dest


def _check_pyinstaller() -> None:
    try:
        import PyInstaller  # noqa: F401
    except ImportError:
        raise GGUFileError("building a stub needs PyInstaller: pip install 'ggufile[build]'") from None


def _stage_runtime(src: Path) -> None:
    """Copy the runtime as a plain `ggufile.runtime` package, so PyInstaller sees exactly the
    sources we hashed (independent of editable-install import hooks)."""
    pkg = src / "ggufile"
    shutil.copytree(RUNTIME_DIR, pkg / "runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (pkg / "__init__.py").write_text('"""ggufile (frozen runtime only)."""\n')


def pack_runtime(folder: Path, out: Path) -> None:
    """The one-dir runtime as a reproducible .tar.gz (sorted, no owners, fixed times)."""
    import gzip
    import tarfile

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 315532800  # 1980-01-01
        return info

    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in [folder / RUNTIME_NAME] + sorted(p for p in folder.rglob("*") if p.name != RUNTIME_NAME
                                                      or p.parent != folder):
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False, filter=clean)
