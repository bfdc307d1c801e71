"""A small GGUF (v3) writer: metadata of every value type, tensor infos, aligned data.

Tensors are declared up front (name, GGML-order shape, type) and their bytes are produced
one at a time while writing, so a whole quantized model never has to sit in memory. The
file is written to a temporary name next to the target and renamed only when complete:
an interrupted run never leaves a half-written model behind.

    >>> write_gguf("out.gguf", {"general.architecture": "llama"},
    ...            [TensorSpec("w", (32, 4), GGMLType.Q8_0, lambda: blocks)])

Metadata values are given either plain (the type is inferred: bool, int -> UINT32/INT32/
(U)INT64, float -> FLOAT32, str, NumPy arrays by dtype, sequences of str) or as a
`Typed(vtype, value)` when the exact GGUF type matters (llama.cpp checks key types), which is
how `metadata_with_types` copies a reader's metadata unchanged.
"""
from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ggufile.runtime.gguf.constants import (
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    QUANT_TABLE,
    SCALAR_DTYPES,
    GGMLType,
    GGUFValueType,
    Keys,
    tensor_nbytes,
)
from ggufile.runtime.errors import GGUFileError
from ggufile.runtime.gguf.reader import GGUFReader, StringArray

GGUF_WRITE_VERSION = 3

_DTYPE_TO_VTYPE = {np.dtype(d): t for t, d in SCALAR_DTYPES.items() if t != GGUFValueType.BOOL}
_DTYPE_TO_VTYPE[np.dtype(bool)] = GGUFValueType.BOOL


@dataclass(frozen=True)
class Typed:
    """A metadata value with its exact GGUF type (for arrays: the element type)."""

    vtype: GGUFValueType
    value: object


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # GGML order: shape[0] is the row length
    ggml_type: GGMLType
    data: np.ndarray | bytes | Callable[[], np.ndarray | bytes]  # or a producer, called once

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return tensor_nbytes(self.ggml_type, n)


# -- value encoding --------------------------------------------------------------------------
def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def _infer_scalar_type(value) -> GGUFValueType:
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if 0 <= v < 1 << 32:
            return GGUFValueType.UINT32
        if -(1 << 31) <= v < 0:
            return GGUFValueType.INT32
        return GGUFValueType.UINT64 if v > 0 else GGUFValueType.INT64
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(value, (str, bytes)):
        return GGUFValueType.STRING
    if isinstance(value, np.ndarray) or isinstance(value, (StringArray, list, tuple)):
        return GGUFValueType.ARRAY
    raise GGUFileError(f"cannot store a {type(value).__name__} in GGUF metadata")


def _array_element_type(value) -> GGUFValueType:
    if isinstance(value, np.ndarray):
        if value.dtype not in _DTYPE_TO_VTYPE:
            raise GGUFileError(f"cannot store a {value.dtype} array in GGUF metadata")
        return _DTYPE_TO_VTYPE[value.dtype]
    if isinstance(value, StringArray) or (len(value) and isinstance(value[0], (str, bytes))):
        return GGUFValueType.STRING
    if not len(value):
        return GGUFValueType.UINT32
    first = value[0]
    if isinstance(first, (list, tuple, np.ndarray, StringArray)):
        return GGUFValueType.ARRAY
    return _infer_scalar_type(first)


def _scalar(vtype: GGUFValueType, value) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _string(value)
    try:
        return np.array(value, dtype=SCALAR_DTYPES[vtype]).tobytes()
    except (OverflowError, ValueError, TypeError):
        raise GGUFileError(f"metadata value {value!r} does not fit GGUF type {vtype.name}") from None


def _array(etype: GGUFValueType, value) -> bytes:
    head = struct.pack("<IQ", etype, len(value))
    if etype == GGUFValueType.STRING:
        items = (value.bytes_at(i) for i in range(len(value))) if isinstance(value, StringArray) else value
        return head + b"".join(_string(s) for s in items)
    if etype == GGUFValueType.ARRAY:
        # Nested arrays are untagged: each is its own (element type, count, values).
        return head + b"".join(_array(_array_element_type(v), v) for v in value)
    return head + np.asarray(value).astype(SCALAR_DTYPES[etype], copy=False).tobytes()


def _value_body(vtype: GGUFValueType, value) -> bytes:
    """Encoded type tag + value for a top-level value; arrays carry their element type."""
    if isinstance(value, Typed):
        vtype, value = value.vtype, value.value
        if isinstance(value, (np.ndarray, StringArray, list, tuple)):
            return struct.pack("<I", GGUFValueType.ARRAY) + _array(vtype, value)
    if vtype == GGUFValueType.ARRAY:
        return struct.pack("<I", GGUFValueType.ARRAY) + _array(_array_element_type(value), value)
    return struct.pack("<I", vtype) + _scalar(vtype, value)


def encode_kv(key: str, value) -> bytes:
    vtype = value.vtype if isinstance(value, Typed) else _infer_scalar_type(value)
    return _string(key) + _value_body(vtype, value)


# -- metadata copying ------------------------------------------------------------------------
def metadata_with_types(reader: GGUFReader) -> dict[str, object]:
    """The reader's metadata as {key: Typed(...)} for scalars and arrays, exactly as stored."""
    types = reader.value_types
    out: dict[str, object] = {}
    for key, value in reader.metadata.items():
        vtype = types.get(key)
        if vtype is None or vtype == GGUFValueType.ARRAY:
            out[key] = value if vtype is None else Typed(_array_element_type(value), value)
        else:
            out[key] = Typed(vtype, value)
    return out


# -- file layout -----------------------------------------------------------------------------
def _pad(n: int, alignment: int) -> int:
    return -n % alignment


def _tensor_info(spec: TensorSpec, offset: int) -> bytes:
    dims = struct.pack(f"<{len(spec.shape)}Q", *map(int, spec.shape))
    return (_string(spec.name) + struct.pack("<I", len(spec.shape)) + dims
            + struct.pack("<IQ", int(spec.ggml_type), offset))


def _header(metadata: Mapping[str, object], tensors: Sequence[TensorSpec], alignment: int) -> bytes:
    parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_WRITE_VERSION, len(tensors), len(metadata))]
    parts += [encode_kv(k, v) for k, v in metadata.items()]
    offset = 0
    for spec in tensors:
        parts.append(_tensor_info(spec, offset))
        offset += spec.nbytes + _pad(spec.nbytes, alignment)
    return b"".join(parts)


def _alignment(metadata: Mapping[str, object]) -> int:
    align = metadata.get(Keys.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
    align = align.value if isinstance(align, Typed) else align
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise GGUFileError(f"general.alignment {align!r} is not a power of two")
    return align


def _validate(tensors: Sequence[TensorSpec]) -> None:
    seen = set()
    for spec in tensors:
        if spec.name in seen:
            raise GGUFileError(f"duplicate tensor name {spec.name!r}")
        seen.add(spec.name)
        if spec.shape[0] % QUANT_TABLE[spec.ggml_type].block_size:
            raise GGUFileError(f"tensor {spec.name!r}: row of {spec.shape[0]} is not a multiple of "
                               f"the {spec.ggml_type.name} block size")


def _tensor_bytes(spec: TensorSpec) -> memoryview:
    data = spec.data() if callable(spec.data) else spec.data
    view = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")
    if view.nbytes != spec.nbytes:
        raise GGUFileError(f"tensor {spec.name!r}: got {view.nbytes} bytes, its shape and "
                           f"{spec.ggml_type.name} need {spec.nbytes}")
    return view


def write_gguf(path: str | os.PathLike, metadata: Mapping[str, object], tensors: Iterable[TensorSpec],
               on_tensor: Callable[[TensorSpec], None] | None = None) -> Path:
    """Write a GGUF file atomically; `on_tensor(spec)` is called after each tensor's data is written."""
    path = Path(path)
    tensors = list(tensors)
    _validate(tensors)
    alignment = _alignment(metadata)
    header = _header(metadata, tensors, alignment)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as err:
        raise GGUFileError(f"cannot write to {path.parent}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(b"\0" * _pad(len(header), alignment))
            for spec in tensors:
                view = _tensor_bytes(spec)
                f.write(view)
                f.write(b"\0" * _pad(view.nbytes, alignment))
                if on_tensor is not None:
                    on_tensor(spec)
        os.replace(tmp, path)
    except OSError as err:  # ENOSPC, EFBIG, EIO: one line, and nothing half-written stays
        Path(tmp).unlink(missing_ok=True)
        raise GGUFileError(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
