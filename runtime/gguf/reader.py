"""GGUF reader over one read-only mmap, zero copy, safe against hostile files.

The model may live inside a larger file (the executable holds it after its own code), so the
reader takes a byte `offset` and `size` and treats that window as the whole GGUF. Tensors come
back as NumPy views on the mapping: nothing is read until a page is touched.

Every count, length and offset is checked against the bytes actually present before it is
used, so a truncated or malicious file fails with a one-line GGUFFormatError instead of a
traceback, a hang or a huge allocation.

    >>> r = GGUFReader("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> r.architecture, r.tensors["token_embd.weight"].shape
    ('llama', (576, 49152))
"""
from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ggufile.runtime.gguf.constants import (
    GGML_MAX_DIMS,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_SUPPORTED_VERSIONS,
    MAX_NESTED_ARRAY_DEPTH,
    MAX_STRING_BYTES,
    QUANT_TABLE,
    SCALAR_DTYPES,
    GGMLType,
    GGUFValueType,
    Keys,
)
from ggufile.runtime.errors import GGUFFormatError, open_regular_file, os_errors_as
from ggufile.runtime.watch import FileIdentity

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# Below this many strings the Python loop is as quick as calling a compiled scanner.
_SCAN_MIN_STRINGS = 256


class StringArray(Sequence):
    """A GGUF array of strings, decoded one element at a time on demand.

    Only the byte span of each element is recorded while parsing (one pass, no decoding), so
    opening a 262k-token vocabulary costs a fraction of a second. `starts` / `ends` are lists
    of ints or int64 arrays (from the compiled scanner).
    """

    def __init__(self, buf: memoryview, starts, ends):
        self._buf = buf
        self._starts = starts
        self._ends = ends

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.bytes_at(i).decode("utf-8", errors="replace")

    def bytes_at(self, i: int) -> bytes:
        return bytes(self._buf[int(self._starts[i]):int(self._ends[i])])

    def _spans(self) -> tuple[list[int], list[int]]:
        starts, ends = self._starts, self._ends
        if isinstance(starts, np.ndarray):
            return starts.tolist(), ends.tolist()
        return starts, ends

    def __iter__(self) -> Iterator[str]:
        buf = self._buf
        for s, e in zip(*self._spans()):
            yield bytes(buf[s:e]).decode("utf-8", errors="replace")

    def tolist(self) -> list[str]:
        """All elements decoded, as the same strings iteration gives."""
        if not len(self._starts):
            return []
        fast = self._tolist_one_decode()
        if fast is not None:
            return fast
        # One copy of the whole string block, then slices of it: ~3x faster than per-item views.
        starts, ends = self._spans()
        base = starts[0]
        block = bytes(self._buf[base:ends[-1]])
        return [block[s - base:e - base].decode("utf-8", errors="replace")
                for s, e in zip(starts, ends)]

    def _tolist_one_decode(self) -> list[str] | None:
        """The strings joined by NULs in one bytes copy, decoded once and split in C.

        Needs the GGUF layout (each string right after its 8-byte length), no NUL inside any
        string and valid UTF-8 throughout; then each piece is exactly what decoding that
        string alone gives. Otherwise None (the caller decodes one string at a time).
        """
        starts = np.asarray(self._starts, dtype=np.int64)
        ends = np.asarray(self._ends, dtype=np.int64)
        if len(starts) < 2 or not np.array_equal(starts[1:], ends[:-1] + 8):
            return None
        base = int(starts[0])
        block = np.frombuffer(self._buf, np.uint8, int(ends[-1]) - base, base).copy()
        headers = starts[1:] - (base + 8)  # relative start of each later string's length field
        block[headers + 7] = 0  # the length's last byte becomes the separator ...
        keep = np.ones(len(block), dtype=bool)
        keep[(headers[:, None] + np.arange(7)).ravel()] = False  # ... its other 7 bytes go
        joined = block[keep]
        if np.count_nonzero(joined == 0) != len(starts) - 1:
            return None  # a string holds a NUL itself
        try:
            text = joined.tobytes().decode("utf-8")
        except UnicodeDecodeError:
            return None  # replacement characters: let the per-string path place them
        return text.split("\x00")

    def __repr__(self) -> str:
        return f"StringArray(len={len(self)})"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGML order: shape[0] is the row length (fastest axis)
    ggml_type: GGMLType
    offset: int  # from the start of the GGUF window
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.n_rows


class _Cursor:
    """Bounds-checked sequential reads from the GGUF header."""

    def __init__(self, buf: memoryview, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFFormatError(
                f"truncated or corrupt GGUF: {what} needs {n} bytes at offset {self.pos}, "
                f"file has {self.size}")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string_span(self, what: str) -> tuple[int, int]:
        n = self.u64(f"{what} length")
        if n > MAX_STRING_BYTES:
            raise GGUFFormatError(f"corrupt GGUF: {what} claims {n} bytes")
        self.need(n, what)
        start = self.pos
        self.pos += n
        return start, self.pos

    def string(self, what: str) -> str:
        s, e = self.string_span(what)
        try:
            return bytes(self.buf[s:e]).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"corrupt GGUF: {what} is not valid UTF-8") from None

    def value_type(self, what: str) -> GGUFValueType:
        t = self.u32(f"{what} type")
        try:
            return GGUFValueType(t)
        except ValueError:
            raise GGUFFormatError(f"corrupt GGUF: {what} has unknown value type {t}") from None


class GGUFReader:
    """Parse the GGUF at [offset, offset+size) of `path` through a single read-only mmap."""

    def __init__(self, path: str | os.PathLike, offset: int = 0, size: int | None = None, *,
                 scan_strings=None):
        # scan_strings(buf, pos, count, starts, ends) -> end or -1: a compiled scanner of big
        # string arrays (kernels.string_scanner()), passed in so the format layer needs no kernels.
        self._scan_strings = scan_strings
        self.path = Path(path)
        self._mmap, self._identity = _map_file(self.path)
        file_size = len(self._mmap)
        if size is None:
            size = file_size - offset
        if offset < 0 or size < 0 or offset + size > file_size:
            self.close()
            raise GGUFFormatError(f"{self.path}: GGUF window {offset}+{size} lies outside the file")
        self.offset = offset
        self.size = size
        self.buffer = np.frombuffer(self._mmap, dtype=np.uint8, count=size, offset=offset)
        try:
            self._parse(memoryview(self.buffer))
        except GGUFFormatError as err:
            self.close()
            raise GGUFFormatError(f"{self.path.name}: {err}") from None

    # -- parsing ---------------------------------------------------------------------------
    def _parse(self, buf: memoryview) -> None:
        cur = _Cursor(buf, self.size)
        cur.need(4, "magic")
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise GGUFFormatError("not a GGUF file (bad magic)")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in GGUF_SUPPORTED_VERSIONS:
            raise GGUFFormatError(f"unsupported GGUF version {self.version} "
                                  f"(supported: {', '.join(map(str, GGUF_SUPPORTED_VERSIONS))})")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # Each KV takes at least 8+1+4+1 bytes, each tensor info at least 8+1+4+8+4+8.
        if n_kv * 14 > self.size or n_tensors * 33 > self.size:
            raise GGUFFormatError(f"corrupt GGUF: {n_kv} metadata entries / {n_tensors} tensors "
                                  f"cannot fit in {self.size} bytes")
        self.metadata: dict = {}
        # How each key was stored: copying metadata exactly needs it (llama.cpp rejects e.g. an
        # INT32 where it expects a UINT32).
        self.value_types: dict[str, GGUFValueType] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in self.metadata:
                raise GGUFFormatError(f"corrupt GGUF: duplicate metadata key {key!r}")
            self.value_types[key] = cur.value_type(key)
            self.metadata[key] = self._read_value(cur, self.value_types[key], key, 0)
        self.alignment = self._alignment()
        infos = [self._read_tensor_info(cur, i) for i in range(n_tensors)]
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors = self._place_tensors(infos)

    def _read_value(self, cur: _Cursor, vtype: GGUFValueType, what: str, depth: int):
        if vtype == GGUFValueType.STRING:
            return cur.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self._read_array(cur, what, depth + 1)
        dtype = np.dtype(SCALAR_DTYPES[vtype])
        cur.need(dtype.itemsize, what)
        value = np.frombuffer(cur.buf, dtype, 1, cur.pos)[0].item()
        cur.pos += dtype.itemsize
        return bool(value) if vtype == GGUFValueType.BOOL else value

    def _read_array(self, cur: _Cursor, what: str, depth: int):
        if depth > MAX_NESTED_ARRAY_DEPTH:
            raise GGUFFormatError(f"corrupt GGUF: {what} nests arrays deeper than {MAX_NESTED_ARRAY_DEPTH}")
        etype = cur.value_type(f"{what} element")
        count = cur.u64(f"{what} count")
        if etype == GGUFValueType.STRING:
            cur.need(count * 8, f"{what} ({count} strings)")
            return self._read_string_array(cur, count, what)
        if etype == GGUFValueType.ARRAY:
            cur.need(count * 12, f"{what} ({count} arrays)")
            return [self._read_array(cur, what, depth + 1) for _ in range(count)]
        dtype = np.dtype(SCALAR_DTYPES[etype])
        cur.need(count * dtype.itemsize, f"{what} ({count} values)")
        arr = np.frombuffer(cur.buf, dtype, count, cur.pos)  # zero-copy, read-only
        cur.pos += count * dtype.itemsize
        return arr.astype(bool) if etype == GGUFValueType.BOOL else arr

    def _read_string_array(self, cur: _Cursor, count: int, what: str) -> StringArray:
        if count >= _SCAN_MIN_STRINGS and (scan := self._scan_strings) is not None:
            starts = np.empty(count, dtype=np.int64)
            ends = np.empty(count, dtype=np.int64)
            end = scan(self.buffer, cur.pos, count, starts, ends)
            if end >= 0:
                cur.pos = int(end)
                return StringArray(cur.buf, starts, ends)
            # A length runs past the buffer: the Python loop finds which one and says so.
        return self._read_string_array_py(cur, count, what)

    @staticmethod
    def _read_string_array_py(cur: _Cursor, count: int, what: str) -> StringArray:
        # The hot loop of opening a big vocabulary: record spans only, decode on demand.
        buf, size, unpack = cur.buf, cur.size, _U64.unpack_from
        pos = cur.pos
        starts = [0] * count
        ends = [0] * count
        for i in range(count):
            if pos + 8 > size:
                raise GGUFFormatError(f"truncated or corrupt GGUF: {what}[{i}] length at offset {pos}")
            (n,) = unpack(buf, pos)
            pos += 8
            end = pos + n
            if end > size:
                raise GGUFFormatError(f"truncated or corrupt GGUF: {what}[{i}] claims {n} bytes at offset {pos}")
            starts[i] = pos
            ends[i] = end
            pos = end
        cur.pos = pos
        return StringArray(buf, starts, ends)

    def _alignment(self) -> int:
        align = self.metadata.get(Keys.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1) or align > 1 << 20:
            raise GGUFFormatError(f"corrupt GGUF: general.alignment {align!r} is not a power of two")
        return align

    def _read_tensor_info(self, cur: _Cursor, i: int) -> tuple[str, tuple[int, ...], GGMLType, int]:
        name = cur.string(f"tensor #{i} name")
        n_dims = cur.u32(f"tensor {name!r} dimension count")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise GGUFFormatError(f"corrupt GGUF: tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cur.u64(f"tensor {name!r} shape") for _ in range(n_dims))
        raw_type = cur.u32(f"tensor {name!r} type")
        try:
            ggml_type = GGMLType(raw_type)
        except ValueError:
            raise GGUFFormatError(f"tensor {name!r} has unknown type {raw_type}") from None
        offset = cur.u64(f"tensor {name!r} offset")
        return name, shape, ggml_type, offset

    def _place_tensors(self, infos) -> dict[str, TensorInfo]:
        data_size = self.size - self.data_offset
        tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, rel_offset in infos:
            if name in tensors:
                raise GGUFFormatError(f"corrupt GGUF: duplicate tensor {name!r}")
            n_elements = 1
            for d in shape:
                if d == 0 or d > data_size * 8:  # no type packs more than 8 elements per byte
                    raise GGUFFormatError(f"corrupt GGUF: tensor {name!r} has dimension {d}")
                n_elements *= d
            block = QUANT_TABLE[ggml_type].block_size
            if shape[0] % block:
                raise GGUFFormatError(f"corrupt GGUF: tensor {name!r} row of {shape[0]} is not a "
                                      f"multiple of the {ggml_type.name} block size {block}")
            nbytes = n_elements // block * QUANT_TABLE[ggml_type].type_size
            if rel_offset % self.alignment or rel_offset + nbytes > data_size:
                raise GGUFFormatError(
                    f"truncated or corrupt GGUF: tensor {name!r} ({nbytes} bytes at data offset "
                    f"{rel_offset}) lies outside the {data_size}-byte data section")
            tensors[name] = TensorInfo(name, shape, ggml_type, self.data_offset + rel_offset, nbytes)
        return tensors

    # -- access ----------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get(Keys.ARCHITECTURE)
        if not isinstance(arch, str):
            raise GGUFFormatError(f"{self.path.name}: no {Keys.ARCHITECTURE} in metadata")
        return arch

    def get(self, key: str, default=None):
        """Metadata value; `{arch}` in the key is replaced by the architecture."""
        if "{arch}" in key:
            key = key.format(arch=self.architecture)
        return self.metadata.get(key, default)

    def get_str(self, key: str, default: str | None = None) -> str | None:
        """A metadata string; `default` when the key is absent or holds anything else."""
        value = self.get(key)
        return value if isinstance(value, str) else default

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The tensor's raw bytes: a read-only uint8 view on the mapping."""
        info = self.tensors[name]
        return self.buffer[info.offset:info.offset + info.nbytes]

    def tensor_matrix(self, name: str) -> np.ndarray:
        """The tensor as rows: uint8 (rows, row_bytes) for quantized types; float32/float16
        (rows, k) for F32/F16; uint16 (rows, k) for BF16. 1-D tensors come back 1-D."""
        info = self.tensors[name]
        raw = self.tensor_bytes(name)
        dtype = {GGMLType.F32: np.float32, GGMLType.F16: np.float16, GGMLType.BF16: np.uint16}.get(info.ggml_type)
        if dtype is not None:
            arr = raw.view(dtype)
            return arr if len(info.shape) == 1 else arr.reshape(info.n_rows, info.shape[0])
        return raw.reshape(info.n_rows, info.row_bytes)

    def check_unchanged(self) -> None:
        """GGUFileError if the file was rewritten since it was mapped (reading it now could SIGBUS)."""
        if self._identity is not None:
            self._identity.check()

    def close(self) -> None:
        # Views into the map may outlive us (NumPy keeps the mmap alive); closing is best effort.
        identity, self._identity = getattr(self, "_identity", None), None
        if identity is not None:
            identity.close()
        self.buffer = None
        mm, self._mmap = getattr(self, "_mmap", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _map_file(path: Path) -> tuple[mmap.mmap, FileIdentity]:
    with open_regular_file(path, GGUFFormatError) as f, os_errors_as(GGUFFormatError, path, "map"):
        if os.fstat(f.fileno()).st_size == 0:
            raise GGUFFormatError(f"{path}: empty file, not a GGUF model")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), FileIdentity(f.fileno(), path)
