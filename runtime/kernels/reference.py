"""Pure-NumPy reference for every GGML weight format: dequantization and the 8-bit activation scheme.

This module is the test oracle for the compiled kernels and the slow fallback when none
exist. Each `_dequant_*` takes the blocks of a tensor as a (n_blocks, type_size) uint8 array
and returns (n_blocks, block_size) float32, with the same operation order as ggml's
dequantize_row_* so results are bit-exact.

The activation side mirrors llama.cpp's CPU backend: before a quantized dot product it
quantizes the float activation row per block (Q8_0, Q8_1 or Q8_K) and sums integer products,
so our logits follow the same rounding as the implementation we are compared against.
"""
from __future__ import annotations

import numpy as np

from ggufile.runtime.gguf.constants import QK, QK_K, QUANT_TABLE, GGMLType
from ggufile.runtime.kernels.types import FLOAT_TYPES, Q8_0_FAMILY, Q8_K_FAMILY
from ggufile.runtime.errors import UnsupportedModelError

_NIBBLE_SHIFTS = np.array([0, 4], dtype=np.uint8)
_CRUMB_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)
_BIT_SHIFTS8 = np.arange(8, dtype=np.uint8)
_BIT_SHIFTS32 = np.arange(32, dtype=np.uint32)


def _f16(raw: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32, the way ggml widens its fp16 scales."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """Split packed 4-bit values: each run of `group` bytes gives `group` low then `group` high nibbles."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group) >> _NIBBLE_SHIFTS.reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(n, -1)


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit j of the little-endian uint32 qh is the 5th bit of element j."""
    bits = np.ascontiguousarray(qh).view(np.uint32).reshape(-1, 1) >> _BIT_SHIFTS32
    return (bits & np.uint32(1)).astype(np.uint8)


def _dequant_q4_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], QK // 2).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def _dequant_q4_1(b: np.ndarray) -> np.ndarray:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:], QK // 2).astype(np.float32) + m


def _dequant_q5_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 6:], QK // 2) | (_high_bits_32(b[:, 2:6]) << np.uint8(4))
    return d * (q.astype(np.int8) - np.int8(16)).astype(np.float32)


def _dequant_q5_1(b: np.ndarray) -> np.ndarray:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:], QK // 2) | (_high_bits_32(b[:, 4:8]) << np.uint8(4))
    return d * q.astype(np.float32) + m


def _dequant_q8_0(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """2-bit values: each 32-byte run gives 4 x 32 values (shifts 0, 2, 4, 6)."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, 32) >> _CRUMB_SHIFTS.reshape(1, 1, 4, 1)
    return (q & np.uint8(3)).reshape(n, -1)


def _dequant_q2_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & np.uint8(0xF)).astype(np.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> np.uint8(4)).astype(np.float32)).reshape(n, 16, 1)
    q = _crumbs(qs).reshape(n, 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(n, QK_K)


def q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """Q3_K: 16 signed 6-bit scales from 12 bytes -> (n, 16) int8 (already minus 32)."""
    n = packed.shape[0]
    low = (packed[:, :8].reshape(n, 1, 8) >> _NIBBLE_SHIFTS.reshape(1, 2, 1)).reshape(n, 16)
    high = (packed[:, 8:12].reshape(n, 1, 4) >> _CRUMB_SHIFTS.reshape(1, 4, 1)).reshape(n, 16)
    sc = (low & np.uint8(0x0F)) | ((high & np.uint8(3)) << np.uint8(4))
    return sc.astype(np.int8) - np.int8(32)


def _dequant_q3_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    dl = (d * q3_k_scales(packed).astype(np.float32)).reshape(n, 16, 1)
    low = _crumbs(qs).reshape(n, 16, 16)
    high = (hmask.reshape(n, 1, 32) >> _BIT_SHIFTS8.reshape(1, 8, 1)).reshape(n, 16, 16) & np.uint8(1)
    # A clear hmask bit means "subtract 4" (ggml stores the bit inverted).
    q = low.astype(np.int8) - ((high ^ np.uint8(1)) << np.uint8(2)).astype(np.int8)
    return (dl * q.astype(np.float32)).reshape(n, QK_K)


def k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: eight 6-bit (scale, min) pairs from 12 bytes -> two (n, 8) uint8 arrays."""
    n = packed.shape[0]
    p = packed.reshape(n, 3, 4)
    d, m, md = p[:, 0], p[:, 1], p[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _dequant_q4_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = k_scale_min(b[:, 4:16])
    dl = (d * sc.astype(np.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.astype(np.float32)).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 32).reshape(n, 8, 32).astype(np.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _dequant_q5_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = k_scale_min(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:]
    dl = (d * sc.astype(np.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.astype(np.float32)).reshape(n, 8, 1)
    high = (qh.reshape(n, 1, 32) >> _BIT_SHIFTS8.reshape(1, 8, 1)) & np.uint8(1)
    q = _nibbles(qs, 32).reshape(n, 8, 32) | (high << np.uint8(4))
    return (dl * q.astype(np.float32) - ml).reshape(n, QK_K)


def _dequant_q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = _f16(b[:, 208:210])
    dl = (d * scales.view(np.int8).astype(np.float32)).reshape(n, 16, 1)
    low = _nibbles(ql, 64).reshape(n, 8, 32)
    high = _crumbs(qh).reshape(n, 8, 32)
    q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
    return (dl * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


_BLOCK_DEQUANT = {
    GGMLType.Q4_0: _dequant_q4_0,
    GGMLType.Q4_1: _dequant_q4_1,
    GGMLType.Q5_0: _dequant_q5_0,
    GGMLType.Q5_1: _dequant_q5_1,
    GGMLType.Q8_0: _dequant_q8_0,
    GGMLType.Q2_K: _dequant_q2_k,
    GGMLType.Q3_K: _dequant_q3_k,
    GGMLType.Q4_K: _dequant_q4_k,
    GGMLType.Q5_K: _dequant_q5_k,
    GGMLType.Q6_K: _dequant_q6_k,
}

def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16/uint8 bytes) -> float32: the top half of a float32."""
    bits = np.ascontiguousarray(raw).reshape(-1).view(np.uint16)
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: round to nearest even, NaNs forced quiet -> uint16."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = (bits.astype(np.uint64) + (np.uint64(0x7FFF) + ((bits >> 16) & 1))) >> np.uint64(16)
    return np.where(nan, (bits >> 16) | np.uint32(64), rounded).astype(np.uint16)


def dequantize(raw: np.ndarray, qtype: GGMLType, n_elements: int) -> np.ndarray:
    """The first n_elements of a tensor's bytes (any shape/dtype, C-contiguous) -> float32 (n_elements,)."""
    qtype = GGMLType(qtype)
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if qtype == GGMLType.F32:
        return data[: 4 * n_elements].view(np.float32).copy()
    if qtype == GGMLType.F16:
        return data[: 2 * n_elements].view(np.float16).astype(np.float32)
    if qtype == GGMLType.BF16:
        return bf16_to_f32(data[: 2 * n_elements])
    if qtype not in _BLOCK_DEQUANT:
        raise UnsupportedModelError(f"tensor type {qtype.name} is not supported")
    info = QUANT_TABLE[qtype]
    n_blocks = n_elements // info.block_size
    blocks = data[: n_blocks * info.type_size].reshape(n_blocks, info.type_size)
    return _BLOCK_DEQUANT[qtype](blocks).reshape(-1)


def dequantize_matrix(w: np.ndarray, qtype: GGMLType, k: int) -> np.ndarray:
    """A (rows, row_bytes) or (rows, k) weight as the reader gives it -> float32 (rows, k)."""
    rows = w.shape[0]
    return dequantize(w, qtype, rows * k).reshape(rows, k)


def row_elements(w: np.ndarray, qtype: GGMLType) -> int:
    """Elements per row (k) of a weight matrix in the reader's form."""
    qtype = GGMLType(qtype)
    if qtype in FLOAT_TYPES:
        return w.shape[1]
    info = QUANT_TABLE[qtype]
    return w.shape[1] // info.type_size * info.block_size


# --- the 8-bit activation scheme of llama.cpp's CPU dot products --------------------------------
# Which activation format each weight type's dot product uses: kernels/types.py (ggml's vec_dot_type).


def quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activation rows (n_tok, k) -> Q8_0/Q8_1 as ggml's x86 path makes them.

    Returns the int8 values as float32 (n_tok, k), the fp16-rounded block scales d
    (n_tok, k/32) and Q8_1's fp16-rounded d * sum(values) (n_tok, k/32).
    """
    n_tok, k = x.shape
    blocks = x.astype(np.float32).reshape(n_tok, k // QK, QK)
    amax = np.abs(blocks).max(axis=-1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(blocks * inv[..., None])  # _mm256_round_ps nearest: ties to even
    s = (d * q.sum(axis=-1, dtype=np.float32)).astype(np.float16).astype(np.float32)
    return q.reshape(n_tok, k), d.astype(np.float16).astype(np.float32), s


def quantize_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activation rows -> Q8_K (quantize_row_q8_K_ref): values, float32 scales (n_tok, k/256), sums of 16."""
    n_tok, k = x.shape
    blocks = x.astype(np.float32).reshape(n_tok, k // QK_K, QK_K)
    first_max = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(first_max != 0, np.float32(-127) / first_max, np.float32(0)).astype(np.float32)
        d = np.where(iscale != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    q = np.minimum(np.float32(127), np.rint(iscale[..., None] * blocks))
    bsums = q.reshape(n_tok, k // 16, 16).sum(axis=-1)
    return q.reshape(n_tok, k), d, bsums


def dot_activations(x: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """x (n_tok, k) as llama.cpp's CPU dot product for weights of `qtype` sees it (ggml's
    vec_dot_type): 8-bit blocks, dequantized, for the quantized types; f16-rounded for F16
    weights, bf16-rounded (GGML_FP32_TO_BF16) for BF16; unchanged otherwise.
    dequant(W) @ dot_activations(x).T is llama.cpp's product up to float rounding (and Q8_1's
    fp16-rounded d*sum term)."""
    qtype = GGMLType(qtype)
    if qtype in Q8_K_FAMILY:
        q, d, _ = quantize_q8_k(x)
        return dequantize_activations(q, d)
    if qtype in Q8_0_FAMILY:
        q, d, _ = quantize_q8_0(x)
        return dequantize_activations(q, d)
    if qtype == GGMLType.F16:
        return x.astype(np.float16).astype(np.float32)
    if qtype == GGMLType.BF16:
        return bf16_to_f32(f32_to_bf16(x)).reshape(x.shape)
    return x


def dequantize_activations(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """8-bit activation values (n_tok, k) times their per-block scales (n_tok, k/block)."""
    n_tok, k = q.shape
    return (q.reshape(n_tok, d.shape[1], -1) * d[..., None]).reshape(n_tok, k)


def reference_matvec(w: np.ndarray, qtype: GGMLType, x: np.ndarray) -> np.ndarray:
    """x @ W.T with x as llama.cpp's dot product for W's type sees it (dot_activations: 8-bit
    blocks, or fp16 / bf16-rounded for F16 / BF16 weights), summed exactly (float64).

    For Q4_1/Q5_1 the block minimum multiplies Q8_1's stored fp16 d*sum, as in ggml.
    """
    qtype = GGMLType(qtype)
    k = x.shape[1]
    wf = dequantize_matrix(w, qtype, k).astype(np.float64)
    y = dot_activations(x, qtype).astype(np.float64) @ wf.T
    if qtype in (GGMLType.Q4_1, GGMLType.Q5_1):
        q, d, s = quantize_q8_0(x)
        # ggml adds m * s where s = fp16(d * sum q); dequant(W) @ xr added m * d * sum q.
        info = QUANT_TABLE[qtype]
        blocks = np.ascontiguousarray(w).reshape(-1, info.type_size)
        m = _f16(blocks[:, 2:4]).astype(np.float64).reshape(w.shape[0], -1)
        exact = d.astype(np.float64) * q.reshape(len(x), -1, QK).sum(axis=-1)
        y += (s - exact) @ m.T
    return y
