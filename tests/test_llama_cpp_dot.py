"""Decode dot products against llama.cpp's own: ggml's `ggml_vec_dot_*` called from the
libggml-cpu that llama-cpp-python ships (a dev-only install, built for this CPU; skipped
without it). On an AVX2 machine those are the AVX2 branches the lane kernels follow, so every
row must agree bit for bit — ours and the NumPy emulation the other tests use as oracle.
"""
from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import ggml_lanes
import numpy as np
import pytest
from test_kernels import _backend_ids, _has_fma, load_backend, random_weight

from ggufile.runtime.kernels import reference, types
from ggufile.runtime.gguf.constants import QK, QK_K, GGMLType
from ggufile.runtime.kernels import cpu

pytestmark = pytest.mark.skipif(
    not importlib.util.find_spec("llama_cpp") or not {"avx2", "fma"} <= cpu.cpu_flags(),
    reason="needs llama-cpp-python (dev extra) on an AVX2/FMA machine")

ROWS = 37


@pytest.fixture(scope="module")
def libggml_cpu():
    lib_dir = Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib"
    found = sorted(lib_dir.glob("libggml-cpu.so*")) + sorted(lib_dir.glob("libggml-cpu.dylib"))
    if not found:
        pytest.skip(f"no libggml-cpu in {lib_dir}")
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_cpu_init()  # fills ggml's fp16 tables
    return lib


def _activation_bytes(qtype: GGMLType, x: np.ndarray) -> bytes:
    """x as ggml's block_q8_0 / block_q8_1 / block_q8_K structs."""
    out = bytearray()
    if qtype in types.Q8_K_FAMILY:
        q, d, bsums = reference.quantize_q8_k(x[None])
        for i in range(len(x) // QK_K):
            out += np.float32(d[0, i]).tobytes() + q[0, QK_K * i:QK_K * (i + 1)].astype(np.int8).tobytes()
            out += bsums[0, 16 * i:16 * (i + 1)].astype(np.int16).tobytes()
        return bytes(out)
    q, d, s = reference.quantize_q8_0(x[None])
    for i in range(len(x) // QK):
        out += np.float16(d[0, i]).tobytes()
        if qtype in (GGMLType.Q4_1, GGMLType.Q5_1):  # block_q8_1 also holds fp16(d * sum)
            out += np.float16(s[0, i]).tobytes()
        out += q[0, QK * i:QK * (i + 1)].astype(np.int8).tobytes()
    return bytes(out)


def _ggml_matvec(lib, qtype: GGMLType, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    activation = "q8_K" if qtype in types.Q8_K_FAMILY else ("q8_1" if qtype in (GGMLType.Q4_1, GGMLType.Q5_1) else "q8_0")
    vec_dot = getattr(lib, f"ggml_vec_dot_{qtype.name.lower().replace('_k', '_K')}_{activation}")
    vec_dot.restype = None
    y = _activation_bytes(qtype, x)
    out = np.empty(w.shape[0], np.float32)
    for r in range(w.shape[0]):
        row = np.ascontiguousarray(w[r])
        s = ctypes.c_float()
        vec_dot(len(x), ctypes.byref(s), 0, row.ctypes.data_as(ctypes.c_void_p), 0, y, 0, 1)
        out[r] = s.value
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("qtype", ggml_lanes.LANE_TYPES, ids=lambda t: t.name)
def test_lane_kernels_equal_llama_cpp_vec_dot(libggml_cpu, qtype, seed):
    k = 4 * QK_K if qtype in types.Q8_K_FAMILY else 24 * QK
    w = random_weight(qtype, ROWS, k, seed=seed + 11)
    x = np.random.default_rng(seed).standard_normal(k).astype(np.float32)
    want = _ggml_matvec(libggml_cpu, qtype, w, x)
    np.testing.assert_array_equal(ggml_lanes.matvec(w, qtype, x), want, err_msg="emulation")
    for name in _backend_ids()[1:]:
        got = load_backend(name).matmul(w, qtype, x[None], np.empty((1, ROWS), np.float32))[0]
        if _has_fma(name):
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:  # compiled without FMA: to float rounding
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
