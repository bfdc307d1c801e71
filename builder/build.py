"""Write, re-stub, extract and verify ggufile executables (layout: ggufile.runtime.container).

Two launchers (ggufile.builder.stub): `onefile` inserts the model into a PyInstaller one-file
stub; `cached` writes [sh prologue][runtime .tar.gz][pad][GGUF][trailer], where the prologue
(PROLOGUE below, POSIX sh + tail/head/tar/gzip, present on any Linux or macOS) unpacks the
one-dir runtime once into $GGUFILE_CACHE/runtime/<hash>/ (default ~/.cache/ggufile) and execs it:
- the folder is unpacked into a temporary sibling, marked complete (a marker file holding the
  hash, written last), then renamed into place; a folder without the right marker, or without
  the runtime executable, is moved aside and replaced; concurrent first starts each unpack and
  the first rename wins (the loser drops its copy and uses the winner's);
- if the cache is not writable, the runtime is unpacked into a temp dir for that run only;
- GGUFILE_LAUNCHER_DEBUG=1 reports "unpacked DIR" or "reused DIR" on stderr.
The model is never unpacked: the runtime mmaps it from this file (GGUFILE_CONTAINER names it).

Every output is written to a temporary file in the destination folder and renamed into place
only when complete, so an interrupted or failed build (bad model, full disk, Ctrl-C) leaves
nothing behind and never clobbers an existing file with half of a new one.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ggufile.runtime import __version__
from ggufile.runtime.container import (
    CONTAINER_ENV,
    FORMAT_VERSION,
    PROLOGUE_SIZE,
    EmbeddedModel,
    align_up,
    find_pyinstaller_archive,
    pack_trailer,
    read_container,
    read_exe,
)
from ggufile.runtime.errors import GGUFileError, GGUFFormatError, open_regular_file
from ggufile.runtime.gguf.reader import GGUFReader
from ggufile.runtime.gguf.info import describe_gguf

from ggufile.builder import elf
from ggufile.builder.platforms import select_script
from ggufile.builder.stub import GZIP_MAGIC, RUNTIME_NAME, stub_info, stub_kind

Progress = Callable[[int], None] | None
CHUNK = 4 << 20


def validate_model(path: Path) -> dict:
    """Open the GGUF the way the runtime will, so a broken or unsupported model fails here,
    before anything is written. Returns describe_gguf() facts."""
    with GGUFReader(path) as reader:
        from ggufile.runtime.model.transformer import load_model  # weights stay mmap views: cheap

        load_model(reader)
        return describe_gguf(reader)


def default_name(path: Path, facts: dict) -> str:
    return facts.get("model") or Path(path).stem


# -- output ------------------------------------------------------------------------------------
def check_output(dest: Path, inputs=()) -> Path:
    """`dest` can be written, and is none of `inputs` (building M.gguf -o M.gguf would replace
    the model with the executable)."""
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise GGUFileError(f"output folder {parent} does not exist")
    if dest.is_dir():
        raise GGUFileError(f"{dest} is a directory")
    for src in inputs:
        if src is not None and _same_file(dest, Path(src)):
            raise GGUFileError(f"the output {dest} is the input {src}; choose another output path")
    return dest


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


@contextmanager
def atomic_output(dest: Path, executable: bool) -> Iterator:
    """Yield a binary file in dest's folder; rename it to dest on success, delete it otherwise."""
    dest = check_output(dest)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as err:
        raise GGUFileError(f"cannot write to {dest.parent}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if executable else 0o666) & ~umask)
        os.replace(tmp, dest)
    except OSError as err:
        _unlink(tmp)
        raise GGUFileError(f"cannot write {dest}: {err.strerror or err}") from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def copy_window(src: Path, offset: int, size: int, out, progress: Progress = None) -> str:
    """Copy src[offset:offset+size] to `out`, returning the sha256 of the bytes copied."""
    h = hashlib.sha256()
    with open_regular_file(src) as f:
        f.seek(offset)
        left = size
        while left:
            block = f.read(min(left, CHUNK))
            if not block:
                raise GGUFFormatError(f"{src}: truncated, the model ends early")
            h.update(block)
            out.write(block)
            left -= len(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


# -- executables -----------------------------------------------------------------------------
def check_stub(stub: Path) -> int:
    """The archive offset of a bare stub (error if it is not one)."""
    stub = Path(stub)
    if not stub.is_file():
        raise GGUFileError(f"stub {stub}: no such file")
    pkg = find_pyinstaller_archive(stub)
    if pkg is None:
        raise GGUFileError(f"{stub} is not a ggufile stub (no PyInstaller archive)")
    try:
        read_exe(stub)
    except GGUFileError:
        return pkg
    raise GGUFileError(f"{stub} already holds a model; pass a bare stub")


LAUNCHER_DEBUG_ENV = "GGUFILE_LAUNCHER_DEBUG"
MARKER = ".ggufile-runtime-ok"
PROLOGUE = r"""#!/bin/sh
# A ggufile executable (cached launcher): this sh prologue, the runtime (.tar.gz), the model (GGUF).
# The runtime is unpacked once into $GGUFILE_CACHE/runtime/<hash> (default ~/.cache/ggufile).
# `ggufile inspect THIS` describes the model; `ggufile extract THIS -o MODEL.gguf` gets it back.
@SELECT@
case $0 in /*) f=$0 ;; *) f=$PWD/$0 ;; esac
c=${GGUFILE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/nonexistent}/.cache}/ggufile}/runtime
d=$c/$h
say() { if [ -n "$@DEBUG@" ]; then echo "ggufile-launcher: $*" >&2; fi; }
q() { if [ -n "$@DEBUG@" ]; then "$@"; else "$@" 2>/dev/null; fi; }
ok() { [ -x "$1/@RUNTIME@" ] && [ -f "$1/@MARKER@" ] && read -r m <"$1/@MARKER@" && [ "$m" = "$h" ]; }
unpack() { mkdir -p "$1" && tail -c +$((o + 1)) "$f" | head -c "$n" | tar -xzf - -C "$1" && echo "$h" >"$1/@MARKER@"; }
if ok "$d"; then
  say "reused $d"
else
  t=$c/.tmp-$h-$$
  if q mkdir -p "$c" && rm -rf "$t" && q unpack "$t"; then
    if ! ok "$d"; then
      if [ -e "$d" ] || [ -L "$d" ]; then q mv "$d" "$c/.old-$h-$$"; rm -rf "$c/.old-$h-$$"; fi
      q mv "$t" "$d"
    fi
  fi
  rm -rf "$t" "$d/.tmp-$h-$$"
  if ok "$d"; then
    say "unpacked $d"
  else
    t=$(q mktemp -d "${TMPDIR:-/tmp}/ggufile.XXXXXX") && q unpack "$t" || {
      echo "Error: cannot unpack the ggufile runtime into $c or ${TMPDIR:-/tmp} (full or read-only?)" >&2
      [ -z "$t" ] || rm -rf "$t"; exit 1; }
    say "unpacked $t (temporary: $c is not writable)"
    trap 'rm -rf "$t"' EXIT; trap 'exit 130' INT; trap 'exit 143' TERM
    @ENV@=$f "$t/@RUNTIME@" "$@"
    exit $?
  fi
fi
@ENV@=$f
export @ENV@
exec "$d/@RUNTIME@" "$@"
"""


def cached_prologue(runtimes: list[dict]) -> bytes:
    """The sh prologue choosing among runtime archives ({platform, sha256, offset, size}, see
    platforms.select_script), padded to PROLOGUE_SIZE."""
    text = PROLOGUE
    for key, value in {"@SELECT@": select_script(runtimes), "@DEBUG@": LAUNCHER_DEBUG_ENV,
                       "@RUNTIME@": RUNTIME_NAME, "@MARKER@": MARKER, "@ENV@": CONTAINER_ENV}.items():
        text = text.replace(key, value)
    data = text.encode()
    if len(data) > PROLOGUE_SIZE:
        raise GGUFileError("internal error: the launcher prologue outgrew PROLOGUE_SIZE")
    return data + b"\n" * (PROLOGUE_SIZE - len(data))


def check_runtime_archive(stub: Path) -> None:
    stub = Path(stub)
    if not stub.is_file():
        raise GGUFileError(f"stub {stub}: no such file")
    with open(stub, "rb") as f:
        if f.read(2) != GZIP_MAGIC:
            raise GGUFileError(f"{stub} is not a ggufile runtime archive (.tar.gz)")


def write_executable(out: Path, stub: Path | list[tuple[str, Path]], src: Path, offset: int, size: int,
                     meta: dict, progress: Progress = None, expect_sha256: str | None = None) -> str:
    """Write an executable with the model src[offset:offset+size]; returns its sha256.
    The stub's kind picks the launcher: a runtime .tar.gz (cached) or a one-file stub; a list of
    (platform, runtime .tar.gz) gives one cached executable for several platforms."""
    meta = {k: v for k, v in meta.items() if k not in ("stub", "format_version", "launcher")}
    if isinstance(stub, list):
        return _write_cached(out, stub, src, offset, size, meta, progress, expect_sha256)
    if stub_kind(Path(stub)) == "cached":
        return _write_cached(out, [(None, Path(stub))], src, offset, size, meta, progress, expect_sha256)
    return _write_onefile(out, stub, src, offset, size, meta, progress, expect_sha256)


def _write_cached(out: Path, stubs: list[tuple[str | None, Path]], src: Path, offset: int, size: int,
                  meta: dict, progress: Progress, expect_sha256: str | None) -> str:
    """[sh prologue][runtime .tar.gz per platform][pad][GGUF = src window][trailer] -> out."""
    runtimes, archives, at = [], [], PROLOGUE_SIZE
    for platform, stub in stubs:
        check_runtime_archive(stub)
        archive = Path(stub).read_bytes()
        info = stub_info(Path(stub))
        runtimes.append({"platform": platform or info.get("platform", "unknown"), "offset": at,
                         "size": len(archive), "sha256": hashlib.sha256(archive).hexdigest(), "stub": info})
        archives.append(archive)
        at += len(archive)
    gguf_offset = align_up(at)
    first = runtimes[0]
    meta = dict(meta, format_version=FORMAT_VERSION, stub=first["stub"],
                launcher={"kind": "cached", "runtime_offset": first["offset"], "runtime_size": first["size"],
                          "runtime_sha256": first["sha256"], "runtimes": runtimes})
    with atomic_output(out, executable=True) as f:
        f.write(cached_prologue(runtimes))
        for archive in archives:
            f.write(archive)
        f.write(bytes(gguf_offset - at))
        digest = copy_window(src, offset, size, f, progress)
        if expect_sha256 and digest != expect_sha256:
            raise GGUFileError(f"{src}: the model's checksum does not match its record "
                               f"(corrupted); nothing written")
        f.write(pack_trailer(gguf_offset, size, digest, meta))
    return digest


def _write_onefile(out: Path, stub: Path, src: Path, offset: int, size: int, meta: dict,
                   progress: Progress, expect_sha256: str | None) -> str:
    """[stub head][pad][GGUF = src window][trailer][stub archive+tail] -> out."""
    pkg = check_stub(stub)
    data = bytearray(Path(stub).read_bytes())
    gguf_offset = align_up(pkg)
    meta = dict(meta, format_version=FORMAT_VERSION, stub=stub_info(Path(stub)), launcher={"kind": "onefile"})
    trailer_len = len(pack_trailer(gguf_offset, size, "00" * 32, meta))
    elf.shift_after(data, pkg, gguf_offset - pkg + size + trailer_len)
    with atomic_output(out, executable=True) as f:
        f.write(data[:pkg])
        f.write(bytes(gguf_offset - pkg))
        digest = copy_window(src, offset, size, f, progress)
        if expect_sha256 and digest != expect_sha256:
            raise GGUFileError(f"{src}: the model's checksum does not match its record "
                               f"(corrupted); nothing written")
        f.write(pack_trailer(gguf_offset, size, digest, meta))
        f.write(data[pkg:])
    return digest


def build_executable(model: Path, out: Path, stub: Path | list[tuple[str, Path]], name: str | None = None,
                     default_args: list[str] | None = None, progress: Progress = None) -> EmbeddedModel:
    stubs = [path for _, path in stub] if isinstance(stub, list) else [stub]
    check_output(out, (model, *stubs))
    facts = validate_model(model)
    meta = {"name": name or default_name(model, facts), "default_args": list(default_args or []),
            "source": Path(model).name, "built_by": __version__}
    write_executable(out, stub, Path(model), 0, Path(model).stat().st_size, meta, progress)
    return read_exe(out)


def restub(path: Path, stub: Path, out: Path | None = None, progress: Progress = None) -> EmbeddedModel:
    """Swap the launcher of a built executable, keeping its model, name and default args."""
    old = read_exe(path)
    check_output(out or path, (stub,))
    write_executable(out or path, stub, old.path, old.offset, old.size, old.meta, progress,
                     expect_sha256=old.sha256)
    return read_exe(out or path)


# -- any container -----------------------------------------------------------------------------
def extract(path: Path, out: Path, progress: Progress = None) -> EmbeddedModel:
    """Write the embedded GGUF, byte-identical, to `out` (checked against its sha256)."""
    model = read_container(path)
    check_output(out, (path,))
    with atomic_output(out, executable=False) as f:
        digest = copy_window(model.path, model.offset, model.size, f, progress)
        if digest != model.sha256:
            raise GGUFileError(f"{path}: the embedded model fails its checksum (corrupted); "
                               f"nothing extracted")
    return model


def verify(path: Path, progress: Progress = None) -> tuple[EmbeddedModel, bool]:
    model = read_container(path)
    return model, model.verify(progress)
