"""Where the model lives inside a ggufile executable or .pyz: the one table of the container format.

Executable, `cached` launcher (default on Linux/macOS):

    [#!/bin/sh prologue, PROLOGUE_SIZE bytes][runtime .tar.gz, one per platform][zero pad to 64 KiB][GGUF][trailer]

The prologue (written by ggufile.builder.build) picks the runtime archive -- a PyInstaller
one-*dir* build -- for `uname -sm` (the trailer's launcher.runtimes lists them), unpacks it
once into $GGUFILE_CACHE/runtime/<hash>/ (default ~/.cache/ggufile) and execs it with
CONTAINER_ENV naming this file; the trailer ends the file.

Executable, `onefile` launcher (a PyInstaller one-file stub with the model inserted before the
stub's archive; unpacks the runtime to a fresh temp dir at every start):

    [bootloader ELF][zero pad to 64 KiB][GGUF][trailer][PyInstaller archive ... cookie][ELF section headers]

The bootloader finds its archive by scanning backwards from the end of the file for the
cookie and computes the archive start from it (pkg_offset = cookie_pos + 88 - pkg_length);
every archive entry is relative to pkg_offset. So bytes inserted *before* the archive are
never scanned and never read at start-up, while bytes appended after it would be scanned
byte by byte at every start. The trailer ends exactly where the archive begins, so the
runtime finds it the way the bootloader finds the archive: from the cookie.

Trailer = [JSON metadata, UTF-8][footer]; the footer is a fixed struct (FOOTER below). A reader
looks for the footer at the end of the file first (cached), then just before the archive (onefile).

Python zipapp (.pyz): the GGUF is the ZIP_STORED member MODEL_MEMBER whose data starts on a
64 KiB boundary (the local header carries a padding extra field), the metadata is META_MEMBER.

Either way the runtime mmaps the GGUF window in place: nothing is extracted or copied.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ggufile.runtime.errors import GGUFileError, GGUFFormatError, open_regular_file, os_errors_as, printable_line
from ggufile.runtime.gguf.constants import GGUF_MAGIC

FORMAT_VERSION = 1
ALIGNMENT = 64 * 1024  # GGUF start: page aligned for every page size in use (4K..64K)

# footer: magic, format version, metadata length, GGUF offset, GGUF size, sha256 of the GGUF
TRAILER_MAGIC = b"GGUFILE\0"
FOOTER = struct.Struct("<8sIIQQ32s")
MAX_META_BYTES = 1 << 20

# `cached` launcher: the sh prologue execs the unpacked runtime with this variable set to the
# executable's path (the runtime's own sys.executable is then the copy in the cache).
CONTAINER_ENV = "GGUFILE_CONTAINER"
PROLOGUE_SIZE = 4096

# PyInstaller's CArchive cookie (PyInstaller/archive/writers.py: '!8sIIII64s'). The magic is
# assembled at run time, as the bootloader does, so this module's own bytes never match it.
PYI_COOKIE = struct.Struct("!8sIIII64s")
PYI_COOKIE_MAGIC = b"MEI" + bytes([0o14, 0o13, 0o12, 0o13, 0o16])
PYI_TAIL_SCAN = 1 << 20  # the cookie is followed only by the ELF section headers (a few KiB)

# .pyz members
MODEL_MEMBER = "model.gguf"
META_MEMBER = "ggufile.json"
ZIP_ALIGN_EXTRA_ID = 0xD935  # the id Android's zipalign uses for its padding extra field
ZIP_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zipfile.structFileHeader


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF window inside a bigger file, plus what the builder recorded about it."""

    path: Path  # the executable or .pyz
    offset: int  # of the GGUF inside `path`
    size: int
    sha256: str = ""
    name: str = ""
    default_args: list[str] = field(default_factory=list)
    kind: str = "exe"  # "exe" | "pyz"
    meta: dict = field(default_factory=dict)  # everything else the builder recorded (stub, source)

    # -- use -------------------------------------------------------------------------------
    def open(self):
        """A GGUFReader on the window (one mmap of the whole file, zero copy)."""
        from ggufile.runtime import kernels
        from ggufile.runtime.gguf.reader import GGUFReader

        return GGUFReader(self.path, self.offset, self.size, scan_strings=kernels.string_scanner())

    def compute_sha256(self, progress=None) -> str:
        """sha256 of the GGUF bytes; `progress(n)` is called with each chunk's length."""
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            left = self.size
            while left:
                block = f.read(min(left, 1 << 22))
                if not block:
                    raise GGUFFormatError(f"{self.path}: truncated, the model ends early")
                h.update(block)
                left -= len(block)
                if progress:
                    progress(len(block))
        return h.hexdigest()

    def verify(self, progress=None) -> bool:
        return self.compute_sha256(progress) == self.sha256

    def quick_check(self) -> None:
        """What every start checks in microseconds (the full sha256 is `--verify`): the file is as
        long as the trailer says and the GGUF starts where it says. Catches truncated and
        misassembled copies; a flipped bit inside the weights needs the checksum."""
        damaged = f"{self.path}: damaged (%s); get a fresh copy, or run it with --verify for details"
        with os_errors_as(GGUFileError, self.path), open(self.path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            if self.offset + self.size > end:
                raise GGUFFormatError(damaged % f"the model needs {self.offset + self.size} bytes, the file has {end}")
            f.seek(self.offset)
            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise GGUFFormatError(damaged % f"no GGUF model at offset {self.offset}")

    def describe(self, verify: bool | None = None) -> dict:
        """What `--info` and `ggufile inspect` print. verify=True checks the sha256 (reads it all)."""
        # a .pyz carries the runtime that built it; an executable, the runtime of its stub
        stub = self.meta.get("stub") or {"ggufile_version": self.meta.get("built_by", "unknown"),
                                         "platform": "any (python zipapp)", "python": "python3 + NumPy"}
        # a cached-launcher executable may hold one runtime per platform
        stubs = [dict(rt.get("stub") or {}, platform=rt.get("platform", "unknown"))
                 for rt in (self.meta.get("launcher") or {}).get("runtimes", [])] or [stub]
        info = {
            "file": str(self.path),
            "format": f"ggufile {self.kind} v{self.meta.get('format_version', FORMAT_VERSION)}",
            "runtime version": stub.get("ggufile_version", "unknown"),
            "stub platform": ", ".join(s.get("platform", "unknown") for s in stubs),
            "stub glibc floor": ", ".join(_glibc_floor(s) for s in stubs),
            "stub python": stub.get("python", "unknown"),
            "launcher": (self.meta.get("launcher") or {}).get("kind", "-"),
            "model name": self.name or "(unnamed)",
            "model offset": self.offset,
            "model size": self.size,
        }
        from ggufile.runtime.gguf.info import describe_gguf

        with self.open() as reader:
            info.update(describe_gguf(reader))
        info["default args"] = " ".join(self.default_args) or "(none)"
        state = "not checked" if not verify else ("ok" if self.verify() else "MISMATCH (corrupted)")
        info["checksum"] = f"sha256 {self.sha256} ({state})"
        # Values quote the file (its trailer and the model): printable and bounded.
        return {k: printable_line(v, 200) if isinstance(v, str) else v for k, v in info.items()}


def _glibc_floor(stub: dict) -> str:
    """"2.31" (the newest GLIBC_ version the stub's ELF files need, recorded when it was built)."""
    floor = (stub.get("glibc_floor") or {}).get("glibc")
    if floor:
        return floor
    return "-" if "zipapp" in str(stub.get("platform")) else "unknown"


# -- the trailer (executables) -------------------------------------------------------------
def pack_trailer(gguf_offset: int, gguf_size: int, sha256_hex: str, meta: dict) -> bytes:
    blob = json.dumps(meta, sort_keys=True).encode("utf-8")
    footer = FOOTER.pack(TRAILER_MAGIC, FORMAT_VERSION, len(blob), gguf_offset, gguf_size,
                         bytes.fromhex(sha256_hex))
    return blob + footer


def find_pyinstaller_archive(path: Path) -> int | None:
    """Start offset of the PyInstaller archive in `path` (as the bootloader computes it), or None."""
    with open_regular_file(path) as f:
        end = f.seek(0, os.SEEK_END)
        start = max(0, end - PYI_TAIL_SCAN)
        f.seek(start)
        tail = f.read()
    pos = tail.rfind(PYI_COOKIE_MAGIC)
    if pos < 0 or pos + PYI_COOKIE.size > len(tail):
        return None
    _, pkg_length, *_ = PYI_COOKIE.unpack_from(tail, pos)
    pkg_offset = start + pos + PYI_COOKIE.size - pkg_length
    return pkg_offset if pkg_offset >= 0 else None


def read_exe(path: Path) -> EmbeddedModel:
    """The EmbeddedModel of a ggufile executable; GGUFileError if it holds none."""
    path = Path(path)
    with open_regular_file(path) as f, os_errors_as(GGUFileError, path):
        end = f.seek(0, os.SEEK_END)
        if end >= FOOTER.size:
            f.seek(end - FOOTER.size)
            if f.read(FOOTER.size)[:len(TRAILER_MAGIC)] == TRAILER_MAGIC:
                return _read_trailer(f, path, end, "cached")
    if _is_cached_launcher(path):
        raise GGUFFormatError(f"{path}: damaged, its end is missing (truncated copy?); get a fresh copy")
    pkg_offset = _archive_offset(path)
    with open(path, "rb") as f:
        if pkg_offset < FOOTER.size:
            raise GGUFileError(f"{path}: no model inside (this is a bare ggufile stub)")
        f.seek(pkg_offset - FOOTER.size)
        if f.read(FOOTER.size)[:len(TRAILER_MAGIC)] != TRAILER_MAGIC:
            raise GGUFileError(f"{path}: no model inside (this is a bare ggufile stub)")
        return _read_trailer(f, path, pkg_offset, "onefile")


def _is_cached_launcher(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(40).startswith(b"#!/bin/sh\n# A ggufile executable")


def _read_trailer(f, path: Path, trailer_end: int, launcher: str) -> EmbeddedModel:
    f.seek(trailer_end - FOOTER.size)
    magic, version, meta_len, offset, size, digest = FOOTER.unpack(f.read(FOOTER.size))
    if version > FORMAT_VERSION:
        raise GGUFileError(f"{path}: container format v{version} is newer than this ggufile "
                           f"(v{FORMAT_VERSION}); upgrade ggufile")
    meta_start = trailer_end - FOOTER.size - meta_len
    if meta_len > MAX_META_BYTES or meta_start < 0 or offset + size > meta_start:
        raise GGUFFormatError(f"{path}: corrupt ggufile trailer")
    f.seek(meta_start)
    meta = _parse_meta(f.read(meta_len), path)
    meta.setdefault("launcher", {"kind": launcher})
    return _model(path, offset, size, digest.hex(), meta, "exe")


def _archive_offset(path: Path) -> int:
    with os_errors_as(GGUFileError, path):
        pkg_offset = find_pyinstaller_archive(path)
    if pkg_offset is None:
        raise GGUFileError(f"{path}: not a ggufile executable (no launcher archive found)")
    return pkg_offset


def _parse_meta(blob: bytes, path: Path) -> dict:
    try:
        meta = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise GGUFFormatError(f"{path}: corrupt ggufile metadata") from None
    if not isinstance(meta, dict):
        raise GGUFFormatError(f"{path}: corrupt ggufile metadata")
    return meta


def _model(path: Path, offset: int, size: int, digest: str, meta: dict, kind: str) -> EmbeddedModel:
    args = meta.get("default_args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise GGUFFormatError(f"{path}: corrupt ggufile metadata (default_args)")
    return EmbeddedModel(path=path, offset=offset, size=size, sha256=digest,
                         name=str(meta.get("name", "")), default_args=args, kind=kind, meta=meta)


# -- .pyz ------------------------------------------------------------------------------------
def zip_data_offset(fp, info: zipfile.ZipInfo) -> int:
    """Absolute offset of a member's data (zipfile's header_offset already includes any prefix)."""
    fp.seek(info.header_offset)
    header = fp.read(ZIP_LOCAL_HEADER.size)
    if len(header) != ZIP_LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise GGUFFormatError("corrupt zip member header")
    fields = ZIP_LOCAL_HEADER.unpack(header)
    name_len, extra_len = fields[-2], fields[-1]
    return info.header_offset + ZIP_LOCAL_HEADER.size + name_len + extra_len


def read_pyz(path: Path) -> EmbeddedModel:
    path = Path(path)
    try:
        with open(path, "rb") as fp, zipfile.ZipFile(fp) as zf:
            info = zf.getinfo(MODEL_MEMBER)
            meta = _parse_meta(zf.read(META_MEMBER), path)
            if info.compress_type != zipfile.ZIP_STORED:
                raise GGUFFormatError(f"{path}: the model member is compressed; it cannot be mapped")
            offset = zip_data_offset(fp, info)
    except KeyError:
        raise GGUFileError(f"{path}: no model inside this zip") from None
    except zipfile.BadZipFile:
        raise GGUFileError(f"{path}: not a ggufile .pyz (bad zip)") from None
    except OSError as err:
        raise GGUFileError(f"{path}: cannot read: {err.strerror or err}") from None
    return _model(path, offset, info.file_size, str(meta.get("sha256", "")), meta, "pyz")


def read_container(path: str | os.PathLike) -> EmbeddedModel:
    """The model inside a ggufile executable or .pyz."""
    path = Path(path)
    with open_regular_file(path) as f:  # refuses FIFOs and devices before reading a byte
        try:
            is_zip = zipfile.is_zipfile(f)
        except OSError:
            is_zip = False
    return read_pyz(path) if is_zip else read_exe(path)
