"""The kernels API equals the NumPy reference (quants.py) for every weight type."""
from __future__ import annotations

import numpy as np
import pytest
from test_quants import random_blocks

from ggufile.runtime import kernels, quants
from ggufile.runtime.constants import QUANT_TABLE, SUPPORTED_WEIGHT_TYPES, GGMLType

ALL_TYPES = sorted(SUPPORTED_WEIGHT_TYPES)


def random_weight(qtype: GGMLType, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """A weight matrix in the reader's form (read-only, like an mmap view)."""
    rng = np.random.default_rng(seed)
    if qtype == GGMLType.F32:
        w = rng.standard_normal((rows, k)).astype(np.float32) * 0.05
    elif qtype == GGMLType.F16:
        w = (rng.standard_normal((rows, k)) * 0.05).astype(np.float16)
    elif qtype == GGMLType.BF16:
        w = (rng.standard_normal((rows, k)).astype(np.float32) * 0.05).view(np.uint32) >> 16
        w = w.astype(np.uint16)
    else:
        info = QUANT_TABLE[qtype]
        w = random_blocks(qtype, rows * k // info.block_size, seed).reshape(rows, -1)
    w.flags.writeable = False
    return w


def reference_matmul(w, qtype, x):
    return x.astype(np.float64) @ quants.dequantize_matrix(w, qtype, x.shape[1]).astype(np.float64).T


def assert_close_to_float_product(y, ref):
    # Activations may be quantized to 8 bits per block (as llama.cpp does): allow ~1% of the scale.
    scale = np.abs(ref).max() + 1e-6
    np.testing.assert_allclose(y, ref, atol=2e-2 * scale, rtol=0)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_reference(qtype):
    w = random_weight(qtype, 4, 512, seed=3)
    got = kernels.dequantize(w, qtype, 4 * 512)
    np.testing.assert_array_equal(got, quants.dequantize(w, qtype, 4 * 512))


@pytest.mark.parametrize("n_tok", [1, 7])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matmul_close_to_float_product(qtype, n_tok):
    rows, k = 70, 512
    w = random_weight(qtype, rows, k, seed=5)
    x = np.random.default_rng(6).standard_normal((n_tok, k)).astype(np.float32)
    y = kernels.matmul(w, qtype, x)
    assert y.shape == (n_tok, rows) and y.dtype == np.float32
    assert_close_to_float_product(y, reference_matmul(w, qtype, x))


def test_matmul_writes_into_out():
    w = random_weight(GGMLType.Q8_0, 16, 64)
    x = np.ones((2, 64), np.float32)
    out = np.empty((2, 16), np.float32)
    assert kernels.matmul(w, GGMLType.Q8_0, x, out=out) is out


def test_matmul_multi_equals_separate_calls():
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    pairs = [(random_weight(t, r, 256, seed=r), t) for t, r in
             [(GGMLType.Q4_K, 40), (GGMLType.Q6_K, 24), (GGMLType.F32, 8)]]
    for y, (w, t) in zip(kernels.matmul_multi(pairs, x), pairs):
        np.testing.assert_array_equal(y, kernels.matmul(w, t, x))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_get_rows_matches_reference(qtype):
    w = random_weight(qtype, 20, 256, seed=9)
    ids = np.array([3, 0, 19, 3])
    full = quants.dequantize_matrix(w, qtype, 256)
    np.testing.assert_array_equal(kernels.get_rows(w, qtype, ids), full[ids])


def test_backend_is_named():
    assert isinstance(kernels.backend, str) and kernels.backend
