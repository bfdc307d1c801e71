"""An offline, public-domain evaluation text: Jane Austen's novels from a Debian package.

Debian's `r-cran-janeaustenr` (the CRAN package janeaustenr: "Jane Austen's complete novels",
texts from Project Gutenberg, published 1811-1818, public domain) ships each novel as an R
character vector, one element per line, in a lazy-load database (data/Rdata.rdb: a run of
zlib streams, each an XDR-serialized object). We fetch the .deb with `apt-get download` (the
ordinary Debian client), check its hash, and decode the strings ourselves: no R needed, nothing
from the web.

    >>> text = corpus_text("prideprejudice")   # ~700 kB, "PRIDE AND PREJUDICE\\n\\nBy Jane Austen..."
"""
from __future__ import annotations

import hashlib
import io
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

from ggufile.builder.fetch import cache_dir
from ggufile.runtime.errors import GGUFileError

DEB_PACKAGE = "r-cran-janeaustenr"
DEB_FILE = "r-cran-janeaustenr_1.0.0-1_all.deb"
DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
RDB_MEMBER = "./usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
# The objects in Rdata.rdb, in the order they are stored (alphabetical, as R writes them).
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
DEFAULT_NOVEL = "prideprejudice"

_STRSXP, _CHARSXP = 16, 9


def _corpus_dir() -> Path:
    d = cache_dir() / "corpus"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _download_deb(dest: Path) -> Path:
    deb = dest / DEB_FILE
    if not deb.exists():
        res = subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=dest, capture_output=True, text=True)
        if res.returncode != 0 or not deb.exists():
            last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise GGUFileError(f"apt-get download {DEB_PACKAGE} failed ({last[0]}); "
                               f"run `apt-get update` first, or place {DEB_FILE} in {dest}")
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    if digest != DEB_SHA256:
        raise GGUFileError(f"{deb}: sha256 {digest} is not the expected {DEB_SHA256}")
    return deb


def _ar_member(archive: bytes, prefix: str) -> bytes:
    """A member of a Debian `ar` archive whose name starts with `prefix`."""
    if archive[:8] != b"!<arch>\n":
        raise GGUFileError("not a Debian package (bad ar magic)")
    pos = 8
    while pos + 60 <= len(archive):
        head = archive[pos:pos + 60]
        name, size = head[:16].decode().strip().rstrip("/"), int(head[48:58])
        pos += 60
        if name.startswith(prefix):
            return archive[pos:pos + size]
        pos += size + (size & 1)
    raise GGUFileError(f"no {prefix}* in the Debian package")


def _rdb_objects(rdb: bytes) -> list[bytes]:
    """The serialized objects of an R lazy-load database: (u32 BE length, zlib stream) each."""
    objs, pos = [], 0
    while pos + 4 <= len(rdb):
        d = zlib.decompressobj()
        objs.append(d.decompress(rdb[pos + 4:]))
        pos = len(rdb) - len(d.unused_data)
    return objs


def decode_r_strings(raw: bytes) -> list[str]:
    """An XDR-serialized R character vector (format version 3) -> its strings (NA -> "")."""
    if raw[:2] != b"X\n":
        raise GGUFileError("unsupported R serialization (expected XDR 'X')")
    (version,) = struct.unpack_from(">i", raw, 2)
    pos = 14
    if version == 3:  # native encoding name follows the version triple
        (n,) = struct.unpack_from(">i", raw, pos)
        pos += 4 + n
    flags, length = struct.unpack_from(">ii", raw, pos)
    if flags & 0xFF != _STRSXP:
        raise GGUFileError("R object is not a character vector")
    pos += 8
    out = []
    for _ in range(length):
        flags, n = struct.unpack_from(">ii", raw, pos)
        pos += 8
        if flags & 0xFF != _CHARSXP:
            raise GGUFileError("malformed R character vector")
        if n < 0:
            out.append("")
            continue
        out.append(raw[pos:pos + n].decode("utf-8", errors="replace"))
        pos += n
    return out


def corpus_text(novel: str = DEFAULT_NOVEL) -> str:
    """The novel's text (lines joined by newlines), fetched and cached on first use."""
    if novel not in NOVELS:
        raise GGUFileError(f"unknown novel {novel!r}; choose one of {', '.join(NOVELS)}")
    cached = _corpus_dir() / f"{novel}.txt"
    if cached.exists():
        return cached.read_text(encoding="utf-8")
    archive = _download_deb(_corpus_dir()).read_bytes()
    data = tarfile.open(fileobj=io.BytesIO(_ar_member(archive, "data.tar")))
    member = data.extractfile(RDB_MEMBER)
    if member is None:
        raise GGUFileError(f"{DEB_FILE} has no {RDB_MEMBER}")
    objs = _rdb_objects(member.read())
    if len(objs) != len(NOVELS):
        raise GGUFileError(f"{DEB_FILE}: expected {len(NOVELS)} novels, found {len(objs)}")
    for name, raw in zip(NOVELS, objs):
        (_corpus_dir() / f"{name}.txt").write_text("\n".join(decode_r_strings(raw)) + "\n", encoding="utf-8")
    return cached.read_text(encoding="utf-8")


def corpus_path(novel: str = DEFAULT_NOVEL) -> Path:
    corpus_text(novel)
    return _corpus_dir() / f"{novel}.txt"
