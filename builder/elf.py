"""Keep an ELF stub's section table truthful after bytes are inserted before its `pydata` section.

PyInstaller (Linux) stores its archive in an ELF section named `pydata` (objcopy --add-section),
which lands after all loadable segments, followed by the section header table. The kernel and
the bootloader ignore section headers (the bootloader finds its archive from the cookie), but
readelf, strip and objcopy read them; shifting the offsets that lie past the insertion point
keeps the executable a well-formed ELF. Program headers must all end before the insertion point,
or the inserted bytes would move code: that is checked, never patched.
"""
from __future__ import annotations

import struct

from ggufile.runtime.errors import GGUFileError

ELF_MAGIC = b"\x7fELF"
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # ELF64 little-endian file header
_PHDR = struct.Struct("<IIQQQQQQ")  # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
_SHDR = struct.Struct("<IIQQQQIIQQ")  # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, ...
SHT_NOBITS = 8


def is_elf64le(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC and data[4] == 2 and data[5] == 1


def shift_after(data: bytearray, insert_at: int, delta: int) -> None:
    """Patch `data` (the whole stub) in place as if `delta` bytes were inserted at `insert_at`."""
    if not is_elf64le(data):
        return  # not an ELF64 LE file: nothing of ours refers to absolute offsets
    (_, _, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _) = _EHDR.unpack_from(data, 0)
    for i in range(phnum):
        _, _, p_offset, _, _, p_filesz, _, _ = _PHDR.unpack_from(data, phoff + i * phentsize)
        if p_filesz and p_offset + p_filesz > insert_at:
            raise GGUFileError("stub layout not supported: a loadable segment lies past the launcher archive")
    for i in range(shnum):
        at = shoff + i * shentsize
        fields = list(_SHDR.unpack_from(data, at))
        if fields[1] != SHT_NOBITS and fields[4] >= insert_at:
            fields[4] += delta
            _SHDR.pack_into(data, at, *fields)
    if shoff >= insert_at:
        struct.pack_into("<Q", data, 0x28, shoff + delta)  # e_shoff
