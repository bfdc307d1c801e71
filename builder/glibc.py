"""The glibc floor of a launcher stub: the newest GLIBC_/GLIBCXX_ symbol version its ELF files need.

Read from each file's version-needs table (.gnu.version_r: for every shared library it links, the
version names it needs), the table `objdump -T` shows as `(GLIBC_2.29)` beside each symbol. No
binutils needed, and it reads the ELF files of any architecture we build (x86-64, aarch64).
libc itself is never bundled, so the floor is the newest GLIBC_ version any bundled file needs;
GLIBCXX_ (libstdc++) matters only when libstdc++ is not bundled, so both are reported.
"""
from __future__ import annotations

import io
import re
import struct
import tarfile
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
SHT_GNU_VERNEED = 0x6FFFFFFE
_VERNEED = struct.Struct("<HHIII")  # vn_version, vn_cnt, vn_file, vn_aux, vn_next
_VERNAUX = struct.Struct("<IHHII")  # vna_hash, vna_flags, vna_other, vna_name, vna_next
_SHDR = struct.Struct("<IIQQQQIIQQ")  # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, ...
VERSION_NAME = re.compile(r"^(GLIBC|GLIBCXX|CXXABI)_(\d+(?:\.\d+)*)$")
FLOOR_FAMILIES = ("GLIBC", "GLIBCXX")


def needed_versions(data: bytes) -> dict[str, set[str]]:
    """{library: {version names}} an ELF64 little-endian file needs; {} for anything else."""
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1 or len(data) < 64:
        return {}
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    if not shoff or shoff + shnum * shentsize > len(data):
        return {}
    sections = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    needs: dict[str, set[str]] = {}
    for sec in sections:
        if sec[1] != SHT_GNU_VERNEED or sec[6] >= len(sections):
            continue
        strtab = sections[sec[6]][4]
        at = sec[4]
        while True:
            _, count, file_name, aux, next_need = _VERNEED.unpack_from(data, at)
            names = needs.setdefault(_cstring(data, strtab + file_name), set())
            aux_at = at + aux
            for _ in range(count):
                _, _, _, name, next_aux = _VERNAUX.unpack_from(data, aux_at)
                names.add(_cstring(data, strtab + name))
                if not next_aux:
                    break
                aux_at += next_aux
            if not next_need:
                break
            at += next_need
    return needs


def _cstring(data: bytes, at: int) -> str:
    return data[at:data.index(b"\0", at)].decode("ascii", "replace")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def newest(names, family: str) -> str | None:
    """The newest version of `family` (e.g. "GLIBC") among version names, e.g. "2.31"."""
    found = [m.group(2) for m in map(VERSION_NAME.match, names) if m and m.group(1) == family]
    return max(found, key=_version_key) if found else None


def scan_files(files) -> dict[str, dict[str, set[str]]]:
    """{name: {library: versions}} for the ELF files among (name, bytes) pairs."""
    return {name: needs for name, data in files if (needs := needed_versions(data))}


def folder_files(folder: Path):
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                if f.read(4) != ELF_MAGIC:
                    continue
            yield path.relative_to(folder).as_posix(), path.read_bytes()


def archive_files(archive: bytes):
    """(name, bytes) of the ELF files in a runtime .tar.gz."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar:
            if member.isfile():
                data = tar.extractfile(member).read()
                if data[:4] == ELF_MAGIC:
                    yield member.name, data


def floor(scan: dict[str, dict[str, set[str]]]) -> dict:
    """What a stub's sidecar records: the newest GLIBC_/GLIBCXX_ versions needed, and by what."""
    names = {v for needs in scan.values() for versions in needs.values() for v in versions}
    result = {"glibc": newest(names, "GLIBC"), "glibcxx": newest(names, "GLIBCXX"),
              "elf_files": len(scan)}
    for family, key in (("GLIBC", "glibc"), ("GLIBCXX", "glibcxx")):
        if result[key]:
            wanted = f"{family}_{result[key]}"
            result[f"{key}_needed_by"] = sorted(name for name, needs in scan.items()
                                                if any(wanted in v for v in needs.values()))
    result["libstdcxx_bundled"] = any(Path(name).name.startswith("libstdc++.so") for name in scan)
    return result


def describe(info: dict) -> str:
    """One line for `inspect`: "glibc 2.31 (libstdc++ bundled)", or "unknown"."""
    if not info.get("glibc"):
        return "unknown"
    extra = "libstdc++ bundled" if info.get("libstdcxx_bundled") else (
        f"needs libstdc++ GLIBCXX_{info['glibcxx']}" if info.get("glibcxx") else "no libstdc++")
    return f"glibc {info['glibc']} ({extra})"


def symbol_table(scan: dict[str, dict[str, set[str]]]) -> list[str]:
    """Every versioned glibc/libstdc++ name each ELF file needs, one line per file."""
    lines = []
    for name, needs in sorted(scan.items()):
        versions = sorted({v for vs in needs.values() for v in vs if VERSION_NAME.match(v)},
                          key=lambda v: (v.split("_")[0], _version_key(v.split("_", 1)[1])))
        lines.append(f"{name}: {' '.join(versions) or '-'}")
    return lines


def runtime_archives(path: Path) -> list[tuple[str, bytes]]:
    """(platform, runtime .tar.gz bytes) of a bare `cached` stub or of each runtime a
    cached-launcher executable carries."""
    from ggufile.runtime.container import read_exe
    from ggufile.runtime.errors import GGUFileError

    from ggufile.builder.platforms import sidecar

    path = Path(path)
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            return [(sidecar(path).get("platform", "unknown"), path.read_bytes())]
    launcher = read_exe(path).meta.get("launcher") or {}
    runtimes = launcher.get("runtimes") or ([{"platform": "unknown", "offset": launcher["runtime_offset"],
                                              "size": launcher["runtime_size"]}]
                                            if "runtime_offset" in launcher else [])
    if not runtimes:
        raise GGUFileError(f"{path}: a onefile executable; its libraries are packed inside PyInstaller's "
                           f"archive (inspect the cached-launcher build instead)")
    out = []
    with open(path, "rb") as f:
        for rt in runtimes:
            f.seek(rt["offset"])
            out.append((rt.get("platform", "unknown"), f.read(rt["size"])))
    return out
