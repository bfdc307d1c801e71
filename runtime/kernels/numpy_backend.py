"""The slowest backend: NumPy only (no compiled kernels). Dequantizes W in row tiles and uses BLAS.

Activations are rounded the way llama.cpp's dot products see them (reference.dot_activations), so
this backend generates what the compiled ones do.
"""
from __future__ import annotations

import numpy as np

from ggufile.runtime.kernels import reference
from ggufile.runtime.gguf.constants import GGMLType

NAME = "numpy"
# Rows dequantized at once: bounds the float32 scratch to ~TILE_ROWS * k * 4 bytes.
TILE_ROWS = 1024
# No compiled string scanner: callers walk GGUF strings with a Python loop.
scan_strings = None


def dequantize(raw: np.ndarray, qtype: GGMLType, n_elements: int) -> np.ndarray:
    return reference.dequantize(raw, qtype, n_elements)


def matmul(w: np.ndarray, qtype: GGMLType, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    k = x.shape[1]
    x = reference.dot_activations(x, qtype)
    for r0 in range(0, w.shape[0], TILE_ROWS):
        tile = reference.dequantize_matrix(w[r0:r0 + TILE_ROWS], qtype, k)
        np.matmul(x, tile.T, out=out[:, r0:r0 + tile.shape[0]])
    return out


def get_rows(w: np.ndarray, qtype: GGMLType, ids: np.ndarray, k: int) -> np.ndarray:
    return reference.dequantize_matrix(np.ascontiguousarray(w[ids]), qtype, k)
