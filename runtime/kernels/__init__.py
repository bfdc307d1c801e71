"""Quantized tensor kernels: dequantize, matmul (y = x @ W.T), get_rows, behind one fast backend.

The backend is chosen once at import: ahead-of-time compiled kernels for the best CPU variant
this machine runs (built by `python -m ggufile.runtime.kernels.src.aot_build`), else Numba JIT (if
numba is importable), else pure NumPy. GGUFILE_KERNELS forces one:
generic | x86-64-v3 | x86-64-v4 | x86-64-v4-vnni | aarch64 | jit | numpy. With an AOT build present, importing
this package neither compiles anything nor imports numba.

Weights come in the reader's form: a read-only (rows, row_bytes) uint8 view for quantized
types, (rows, k) float32/float16 for F32/F16, (rows, k) uint16 for BF16. They are never
written or copied whole.
"""
from __future__ import annotations

import importlib
import os

import numpy as np

from ggufile.runtime.kernels import reference
from ggufile.runtime.gguf.constants import GGMLType
from ggufile.runtime.errors import GGUFileError
from ggufile.runtime.kernels import cpu
from ggufile.runtime.kernels import numpy_backend as _numpy_backend

ENV_BACKEND = "GGUFILE_KERNELS"


def _load_aot(variant: str):
    from ggufile.runtime.kernels.compiled import CompiledBackend

    module = importlib.import_module(f"{__name__}.{cpu.module_name(variant)}")
    return CompiledBackend(f"aot:{variant}", module)


def _load_jit():
    from ggufile.runtime.kernels.src import jit as jit_backend
    from ggufile.runtime.kernels.compiled import CompiledBackend

    return CompiledBackend(jit_backend.NAME, jit_backend.load())


def _select():
    forced = os.environ.get(ENV_BACKEND, "").strip()
    if forced == "numpy":
        return _numpy_backend
    if forced == "jit":
        return _load_jit()
    if forced:
        if forced not in cpu.variants_for_machine():
            raise GGUFileError(f"{ENV_BACKEND}={forced}: unknown backend for {cpu.machine()}")
        return _load_aot(forced)
    for variant in cpu.runnable_variants():
        try:
            return _load_aot(variant)
        except (ImportError, AttributeError):  # not built, or stale (built before a kernel was added)
            continue
    try:
        return _load_jit()
    except ImportError:
        return _numpy_backend


_impl = _select()
backend: str = _impl.NAME if _impl is _numpy_backend else _impl.name
# scan_strings(buf uint8[::1], pos, count, starts int64[::1], ends int64[::1]) -> end pos or -1:
# the byte ranges of `count` GGUF strings from `pos` (see src/exports.scan_strings); None on the
# numpy backend, where callers use a Python loop.
scan_strings = _impl.scan_strings


def string_scanner():
    """The compiled GGUF string scanner for GGUFReader(scan_strings=...), or None. Only an AOT
    build's: a JIT backend would compile at first call, slower than the Python loop it replaces."""
    return scan_strings if backend.startswith("aot:") else None


def _as_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x.reshape(1, -1) if x.ndim == 1 else x)


def dequantize(raw: np.ndarray, qtype: GGMLType, n_elements: int) -> np.ndarray:
    """A tensor's bytes (any shape, C-contiguous) -> float32 (n_elements,)."""
    return _impl.dequantize(raw, GGMLType(qtype), n_elements)


def matmul(w: np.ndarray, qtype: GGMLType, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """y = x @ dequant(W).T for x (n_tok, k) float32 -> (n_tok, rows) float32 (written into `out` if given)."""
    x = _as_rows(x)
    if out is None:
        out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    return _impl.matmul(w, GGMLType(qtype), x, out)


def matmul_multi(pairs: list[tuple[np.ndarray, GGMLType]], x: np.ndarray) -> list[np.ndarray]:
    """Several weights applied to the same input (fused q/k/v, gate/up) in one dispatch round."""
    x = _as_rows(x)
    outs = [np.empty((x.shape[0], w.shape[0]), dtype=np.float32) for w, _ in pairs]
    pairs = [(w, GGMLType(qtype)) for w, qtype in pairs]
    if _impl is _numpy_backend:
        return [_impl.matmul(w, qtype, x, out) for (w, qtype), out in zip(pairs, outs)]
    return _impl.matmul_multi(pairs, x, outs)


def get_rows(w: np.ndarray, qtype: GGMLType, ids: np.ndarray) -> np.ndarray:
    """Embedding lookup: the dequantized rows `ids` of W -> float32 (len(ids), k)."""
    qtype = GGMLType(qtype)
    ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
    return _impl.get_rows(w, qtype, ids, reference.row_elements(w, qtype))


def compiled_backend():
    """The compiled backend (AOT or JIT: fused passes, thread pool), or None on the NumPy one."""
    return None if _impl is _numpy_backend else _impl


def step_backend():
    """The backend that runs the compiled one-token step (ggufile.runtime.model.step), or
    None: the NumPy backend has none, nor has a kernel build from before the step."""
    return _impl if getattr(_impl, "decode_token", None) is not None else None
