"""Quantize float32 rows into GGML blocks: llama.cpp's reference (`quantize_row_*_ref`) algorithms.

Pure compute, NumPy vectorized over blocks. `quantize(rows, qtype)` takes (n_rows, k) float32
and returns (n_rows, row_bytes) uint8 in exactly the layout `kernels.reference.dequantize` reads.

Fidelity to ggml-quants.c:
- Legacy types (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0) reproduce the reference bit for bit: same float32
  operations in the same order, truncation/rounding as the C casts do it.
- K-quants port the reference search (make_qkx2_quants, make_q3_quants, make_qx_quants) with
  float32 arithmetic, left-to-right sums and round-half-to-even `nearest_int`, so they match the
  C reference as long as it is compiled without fused multiply-adds (ggml-base is generic x86-64).
All of this is on purpose: float64 or another summation order would change which candidate
scale wins a near tie.
"""
from __future__ import annotations

import numpy as np

from ggufile.runtime.gguf.constants import QK, QK_K, QUANT_TABLE, GGMLType
from ggufile.runtime.kernels.types import FLOAT_TYPES, QUANTIZABLE_TYPES
from ggufile.runtime.errors import UnsupportedModelError
from ggufile.runtime.kernels.reference import f32_to_bf16, k_scale_min, q3_k_scales

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
# Elements quantized per NumPy pass: bounds scratch memory (the K-quant searches keep ~10
# float32 arrays of this size alive).
CHUNK_ELEMENTS = 1 << 18


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 (n,) -> (n, 2) uint8 fp16, round-to-nearest-even as GGML_FP32_TO_FP16."""
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _f16_round(v: np.ndarray) -> np.ndarray:
    """What GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)) gives back."""
    return v.astype(np.float16).astype(F32)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: the FPU's round-half-to-even (the 1.5*2^23 trick), as int32."""
    return np.rint(v).astype(np.int32)


def _safe_inv(d: np.ndarray) -> np.ndarray:
    """C's `d ? 1.0f/d : 0.0f`."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, F32(0), F32(1) / np.where(d == 0, F32(1), d)).astype(F32)


def _pack_nibbles(q: np.ndarray, group: int) -> np.ndarray:
    """Inverse of reference._nibbles: each run of 2*group values -> group bytes (low, then high)."""
    n = q.shape[0]
    q = q.reshape(n, -1, 2, group).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << np.uint8(4))).reshape(n, -1)


def _pack_crumbs(q: np.ndarray) -> np.ndarray:
    """2-bit values, each 128-run -> 32 bytes holding shifts 0, 2, 4, 6 (Q2_K/Q3_K qs)."""
    n = q.shape[0]
    q = q.reshape(n, -1, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, -1)


def _signed_max(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude along the last axis (first one on ties, as the C loop)."""
    i = np.abs(x).argmax(axis=-1)[..., None]
    v = np.take_along_axis(x, i, axis=-1)[..., 0]
    return np.where(v == 0, F32(0), v)  # the C loop keeps its initial +0.0 for an all-zero group


# -- legacy 32-element blocks ----------------------------------------------------------------
def _q4_0(x: np.ndarray) -> np.ndarray:
    d = _signed_max(x) / F32(-8)
    q = np.minimum(np.trunc(x * _safe_inv(d)[:, None] + F32(8.5)), 15).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q, QK // 2)], axis=1)


def _q4_1(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = (hi - lo) / F32(15)
    q = np.minimum(np.trunc((x - lo[:, None]) * _safe_inv(d)[:, None] + F32(0.5)), 15).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q, QK // 2)], axis=1)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 values -> little-endian uint32 qh (4 bytes)."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def _q5_0(x: np.ndarray) -> np.ndarray:
    d = _signed_max(x) / F32(-16)
    q = np.minimum(np.trunc(x * _safe_inv(d)[:, None] + F32(16.5)), 31).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _high_bits(q), _pack_nibbles(q & 15, QK // 2)], axis=1)


def _q5_1(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = (hi - lo) / F32(31)
    q = np.minimum(np.trunc((x - lo[:, None]) * _safe_inv(d)[:, None] + F32(0.5)), 31).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _high_bits(q), _pack_nibbles(q & 15, QK // 2)],
                          axis=1)


def _round_away(v: np.ndarray) -> np.ndarray:
    """C roundf: halves away from zero."""
    return np.copysign(np.floor(np.abs(v) + F32(0.5)), v)


def _q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=1) / F32(127)
    q = _round_away(x * _safe_inv(d)[:, None]).astype(np.int8)
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis left to right, as the C loops accumulate (NumPy's pairwise order
    rounds differently, which can flip which candidate scale wins a near tie)."""
    s = a[..., 0].copy()
    for i in range(1, a.shape[-1]):
        s += a[..., i]
    return s


# -- K-quant helpers (make_*_quants), vectorized over groups: x is (G, n) ---------------------
def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
               use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric scale+min search (Q2_K/Q4_K/Q5_K). Returns (scale, -min, L uint8)."""
    lo = np.minimum(x.min(axis=1), F32(0))
    hi = x.max(axis=1)
    flat = hi == lo
    span = np.where(flat, F32(1), hi - lo)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)

    def levels(iscale, mn):
        return np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(F32)

    def error(scale, mn, lv):
        diff = scale[:, None] * lv + mn[:, None] - x
        return _seq_sum(w * (np.abs(diff) if use_mad else diff * diff))

    iscale = F32(nmax) / span
    scale = F32(1) / iscale
    L = levels(iscale, lo)
    best = error(scale, lo, L)
    mn = lo
    for step in range(nstep + 1):
        # As in C, each trial is relative to the best min found so far (`min` is updated).
        with np.errstate(divide="ignore"):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / np.where(flat, F32(1), hi - mn)
        lv = levels(iscale, mn)
        sum_l = _seq_sum(w * lv)
        sum_l2 = _seq_sum(w * lv * lv)
        sum_xl = _seq_sum(w * lv * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        clamp = this_min > 0
        this_min = np.where(clamp, F32(0), this_min)
        this_scale = np.where(clamp, sum_xl / np.where(sum_l2 == 0, F32(1), sum_l2), this_scale)
        cur = error(this_scale, this_min, lv)
        take = ok & (cur < best)
        L = np.where(take[:, None], lv, L)
        best = np.where(take, cur, best)
        scale = np.where(take, this_scale, scale)
        mn = np.where(take, this_min, mn)
    scale = np.where(flat, F32(0), scale)
    mn = np.where(flat, lo, mn)
    L = np.where(flat[:, None], F32(0), L)
    return scale.astype(F32), (-mn).astype(F32), L.astype(np.uint8)


def _make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search with weights x^2 (make_qx_quants, rmse_type 1; Q6_K).
    Returns (scale, L uint8 in [0, 2*nmax))."""
    mx = _signed_max(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    mxs = np.where(zero, F32(1), mx)
    w = x * x

    def trial(iscale):
        lv = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)
        return lv, _seq_sum(w * x * lv), _seq_sum(w * lv * lv)

    lv, sumlx, suml2 = trial(F32(-nmax) / mxs)
    L = lv
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 == 0, F32(1), suml2), F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / mxs)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(take[:, None], lv, L)
        scale = np.where(take, sumlx / np.where(suml2 > 0, suml2, F32(1)), scale)
        best = np.where(take, scale * sumlx, best)
    scale = np.where(zero, F32(0), scale)
    L = np.where(zero[:, None], F32(0), L + F32(nmax))
    return scale.astype(F32), L.astype(np.uint8)


def _make_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(do_rmse=true): start from the max-based levels, then up to 5 rounds of
    coordinate descent, one element at a time in order (each move updates the sums the next
    element sees, so this loop is over elements, vectorized over groups)."""
    mx = _signed_max(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    iscale = F32(-nmax) / np.where(zero, F32(1), mx)
    L = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)
    w = x * x
    wx = w * x
    sumlx = _seq_sum(wx * L)
    suml2 = _seq_sum(w * L * L)
    active = np.ones(x.shape[0], dtype=bool)
    for _ in range(5):
        changed = np.zeros(x.shape[0], dtype=bool)
        for i in range(x.shape[1]):
            wi, xi, wxi, li = w[:, i], x[:, i], wx[:, i], L[:, i]
            slx = sumlx - wxi * li
            pos = slx > 0
            sl2 = suml2 - wi * li * li
            with np.errstate(divide="ignore", invalid="ignore"):
                new_l = np.clip(_nearest_int(np.where(pos, xi * sl2 / np.where(pos, slx, F32(1)), F32(0))),
                                -nmax, nmax - 1).astype(F32)
            slx = slx + wxi * new_l
            sl2 = sl2 + wi * new_l * new_l
            take = active & pos & (new_l != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[:, i] = np.where(take, new_l, li)
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
            changed |= take
        active &= changed
        if not active.any():
            break
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    scale = np.where(zero, F32(0), scale)
    L = np.where(zero[:, None], F32(0), L + F32(nmax))
    return scale.astype(F32), L.astype(np.uint8)


def _requant(x: np.ndarray, L: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int) -> np.ndarray:
    """Recompute levels against the stored (fp16-rounded, 6-bit) scales, as every K reference
    does; groups whose effective scale is 0 keep their search levels (`if (!d) continue`)."""
    live = d != 0
    ds = np.where(live, d, F32(1))[..., None]
    v = x + dm[..., None] if dm is not None else x
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.clip(_nearest_int(v / ds), lo, hi) - lo
    return np.where(live[..., None], q, L.astype(np.int32)).astype(np.uint8)


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit (scale, min) pairs -> 12 bytes (inverse of get_scale_min_k4)."""
    s = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    s[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    s[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    s[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return s


def _to_u8_min63(v: np.ndarray) -> np.ndarray:
    """C: uint8_t l = nearest_int(v); l = MIN(63, l)  (the uint8 store wraps negatives)."""
    return np.minimum(_nearest_int(v) & 0xFF, 63).astype(np.uint8)


def _qkx_superblock(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Shared body of Q4_K/Q5_K: per-32 scale/min search, 6-bit scales, requantized levels."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    av_x = np.sqrt(_seq_sum(sub * sub) / F32(32))
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, L = _make_qkx2(sub, weights, nmax, rmin, rdelta, nstep, False)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0))
    inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0))
    ls = _to_u8_min63(inv_scale[:, None] * scales)
    lm = _to_u8_min63(inv_min[:, None] * mins)
    packed = _pack_scale_min_k4(ls, lm)
    d_raw, dmin_raw = max_scale / F32(63), max_min / F32(63)
    sc, mn = k_scale_min(packed)
    d = _f16_round(d_raw)[:, None] * sc.astype(F32)
    dm = _f16_round(dmin_raw)[:, None] * mn.astype(F32)
    q = _requant(x.reshape(n, 8, 32), L.reshape(n, 8, 32), d, dm, 0, nmax)
    head = np.concatenate([_f16_bytes(d_raw), _f16_bytes(dmin_raw), packed], axis=1)
    return head, q.reshape(n, QK_K)


def _q4_k(x: np.ndarray) -> np.ndarray:
    head, q = _qkx_superblock(x, 15, -1.0, 0.1, 20)
    return np.concatenate([head, _pack_nibbles(q, 32)], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    head, q = _qkx_superblock(x, 31, -0.5, 0.1, 15)
    n = q.shape[0]
    # qh bit 2i / 2i+1 of byte j = 5th bit of element 64i+j / 64i+32+j.
    high = ((q >> 4) & 1).reshape(n, 8, 32)
    qh = np.zeros((n, 32), dtype=np.uint8)
    for b in range(8):
        qh |= high[:, b] << np.uint8(b)
    return np.concatenate([head, qh, _pack_nibbles(q & 15, 32)], axis=1)


def _q2_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    scales, mins, L = _make_qkx2(sub, np.abs(sub), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    q4 = F32(15)
    has_s, has_m = max_scale > 0, max_min > 0
    iscale = np.where(has_s, q4 / np.where(has_s, max_scale, F32(1)), F32(0))
    imin = np.where(has_m, q4 / np.where(has_m, max_min, F32(1)), F32(0))
    ls = np.where(has_s[:, None], _nearest_int(iscale[:, None] * scales), 0)
    lm = np.where(has_m[:, None], _nearest_int(imin[:, None] * mins), 0)
    sc = ((ls & 0xFF) | (lm << 4)).astype(np.int64) & 0xFF
    sc = sc.astype(np.uint8)
    d_raw = np.where(has_s, max_scale / q4, F32(0)).astype(F32)
    m_raw = np.where(has_m, max_min / q4, F32(0)).astype(F32)
    d = _f16_round(d_raw)[:, None] * (sc & 0xF).astype(F32)
    dm = _f16_round(m_raw)[:, None] * (sc >> 4).astype(F32)
    q = _requant(x.reshape(n, 16, 16), L.reshape(n, 16, 16), d, dm, 0, 3).reshape(n, QK_K)
    return np.concatenate([sc, _pack_crumbs(q), _f16_bytes(d_raw), _f16_bytes(m_raw)], axis=1)


def _pack_q3_scales(l6: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit values -> 12 bytes (inverse of reference.q3_k_scales)."""
    n = l6.shape[0]
    s = np.zeros((n, 12), dtype=np.uint8)
    s[:, :8] = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    high = (l6 >> 4).reshape(n, 4, 4)  # [j // 4, j % 4]
    for g in range(4):
        s[:, 8:12] |= high[:, g, :] << np.uint8(2 * g)
    return s


def _q3_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    scales, L = _make_q3(x.reshape(n * 16, 16), 4)
    scales = scales.reshape(n, 16)
    max_scale = _signed_max(scales)
    live = max_scale != 0
    iscale = np.where(live, F32(-32) / np.where(live, max_scale, F32(1)), F32(0))
    l8 = ((_nearest_int(iscale[:, None] * scales) + 128) & 0xFF) - 128  # int8_t store
    l6 = np.where(live[:, None], np.clip(l8, -32, 31) + 32, 0).astype(np.uint8)
    packed = _pack_q3_scales(l6)
    d_raw = np.where(live, F32(1) / np.where(live, iscale, F32(1)), F32(0)).astype(F32)
    d = _f16_round(d_raw)[:, None] * q3_k_scales(packed).astype(F32)
    q = _requant(x.reshape(n, 16, 16), L.reshape(n, 16, 16), d, None, -4, 3).reshape(n, QK_K)
    # High bit of element j goes to hmask[j % 32] bit j // 32.
    high = (q >> 2).reshape(n, 8, 32)
    hmask = np.zeros((n, 32), dtype=np.uint8)
    for b in range(8):
        hmask |= (high[:, b] & 1) << np.uint8(b)
    return np.concatenate([hmask, _pack_crumbs(q & 3), packed, _f16_bytes(d_raw)], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    scales, L = _make_qx(x.reshape(n * 16, 16), 32)
    scales = scales.reshape(n, 16)
    max_scale = _signed_max(scales)
    live = np.abs(max_scale) >= GROUP_MAX_EPS
    iscale = np.where(live, F32(-128) / np.where(live, max_scale, F32(1)), F32(0))
    d_raw = np.where(live, F32(1) / np.where(live, iscale, F32(1)), F32(0)).astype(F32)
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127)
    sc = np.where(live[:, None], sc, 0).astype(np.int8)
    d = _f16_round(d_raw)[:, None] * sc.astype(F32)
    q = _requant(x.reshape(n, 16, 16), L.reshape(n, 16, 16), d, None, -32, 31).reshape(n, QK_K)
    q = np.where(live[:, None], q, 0).astype(np.uint8)  # the reference zeroes dead blocks
    low = _pack_nibbles(q.reshape(n, 2, 4, 32)[:, :, [0, 2, 1, 3]].reshape(n, QK_K) & 15, 32)
    qh = _pack_crumbs(q >> 4)
    return np.concatenate([low, qh, sc.view(np.uint8), _f16_bytes(d_raw)], axis=1)


_BLOCK_QUANT = {
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
}

# Every quantizable block type (kernels/types.py) has its quantizer here.
assert frozenset(_BLOCK_QUANT) == QUANTIZABLE_TYPES - FLOAT_TYPES


def quantize_blocks(blocks: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """(n_blocks, block_size) float32 -> (n_blocks, type_size) uint8."""
    return _BLOCK_QUANT[GGMLType(qtype)](np.ascontiguousarray(blocks, dtype=F32))


def quantize(rows: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """(n_rows, k) float32 -> (n_rows, row_bytes) uint8 (float types: their own dtype's bytes)."""
    qtype = GGMLType(qtype)
    rows = np.asarray(rows, dtype=F32)
    rows = rows.reshape(1, -1) if rows.ndim == 1 else rows
    n_rows, k = rows.shape
    if qtype not in QUANTIZABLE_TYPES:
        raise UnsupportedModelError(f"cannot quantize to {qtype.name}")
    if qtype == GGMLType.F32:
        return np.ascontiguousarray(rows).view(np.uint8)
    if qtype == GGMLType.F16:
        return rows.astype(np.float16).view(np.uint8)
    if qtype == GGMLType.BF16:
        return f32_to_bf16(rows).view(np.uint8)
    info = QUANT_TABLE[qtype]
    if k % info.block_size:
        raise UnsupportedModelError(f"row of {k} is not a multiple of the {qtype.name} block size "
                                    f"{info.block_size}")
    blocks = rows.reshape(-1, info.block_size)
    out = np.empty((blocks.shape[0], info.type_size), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // info.block_size)
    for b0 in range(0, blocks.shape[0], step):
        out[b0:b0 + step] = _BLOCK_QUANT[qtype](np.ascontiguousarray(blocks[b0:b0 + step]))
    return out.reshape(n_rows, -1)
