"""NumPy emulation of llama.cpp's AVX2 row dot products (ggml-cpu/arch/x86/reference.c), the
oracle for runtime/kernels/src/lanes.py: written from ggml's C, not from our IR.

Per block, int32 lane j sums the products of elements 4j..4j+3 of each 32-value group (K-quants:
times the group's scale; Q6_K: less 32 * its two 16-value groups' bsums . scales); lanes are
converted to float and FMA-added with the block scale; hsum_float_8 adds them as
((0+4)+(2+6)) + ((1+5)+(3+7)). Min terms go where ggml puts them: Q4_1/Q5_1 and Q5_K into a
scalar `summs` added after the lanes, Q4_K into 4 lanes of their own (acc_m), Q2_K into the
same 8 lanes (lane k: groups 2k, 2k+1), FMA-added before the block's values. The FMA is
emulated in float64 (the float32 product is exact there) and rounded once to float32.

F16 weights: ggml_vec_dot_f16 (ggml-cpu/vec.cpp) with simd-mappings.h's __AVX__ + __F16C__ +
__FMA__ macros, on activations converted to fp16 first (see _f16_matvec). BF16 weights:
ggml_vec_dot_bf16's __AVX2__ branch, activations converted to bf16 (see _bf16_matvec).
"""
from __future__ import annotations

import numpy as np

from ggufile.runtime.kernels import reference
from ggufile.runtime.gguf.constants import QK, QK_K, QUANT_TABLE, GGMLType

LANE_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
              GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)
# Every type whose decode matvec matvec() emulates.
DECODE_TYPES = LANE_TYPES + (GGMLType.F16, GGMLType.BF16)


def _fma(a, b, c):
    return (np.float64(1) * a * b + c).astype(np.float32)


def _hsum8(acc):
    s = [(acc[:, k] + acc[:, k + 4]).astype(np.float32) for k in range(4)]
    return ((s[0] + s[2]).astype(np.float32) + (s[1] + s[3]).astype(np.float32)).astype(np.float32)


def _f16(raw):
    return raw.copy().view(np.float16).astype(np.float32)[..., 0]


def _lanes(products):
    """(rows, 32 * g) int products -> (rows, 8): lane j sums elements 4j..4j+3 of each 32-group."""
    rows = products.shape[0]
    return products.reshape(rows, -1, 8, 4).sum(axis=(1, 3))


def _bits(raw, n):
    """(rows, n/8) bytes -> (rows, n) 0/1: bit j of the little-endian bit string."""
    return np.unpackbits(raw, axis=1, bitorder="little")[:, :n].astype(np.int64)


def _simple_values(blocks, qtype):
    """(rows, type_size) blocks -> (rows, 32) int values as ggml's AVX2 code forms them."""
    if qtype == GGMLType.Q8_0:
        return blocks[:, 2:34].view(np.int8).astype(np.int64)
    at = {GGMLType.Q4_0: 2, GGMLType.Q4_1: 4, GGMLType.Q5_0: 6, GGMLType.Q5_1: 8}[qtype]
    qs = blocks[:, at:at + 16].astype(np.int64)
    v = np.concatenate([qs & 15, qs >> 4], axis=1)
    if qtype == GGMLType.Q4_0:
        return v - 8
    if qtype == GGMLType.Q5_0:  # bytes_from_bits_32, andnot 0xF0: -16 where the bit is clear
        return v + 16 * _bits(blocks[:, 2:6], 32) - 16
    if qtype == GGMLType.Q5_1:  # bytes_from_bits_32 & 0x10
        return v + 16 * _bits(blocks[:, 4:8], 32)
    return v


def _crumbs(qs):
    """(rows, 64) Q2_K/Q3_K low bits -> (rows, 256): value 128j + 32l + e is bits 2l..2l+1 of byte 32j + e."""
    qs = qs.astype(np.int64)
    return np.concatenate([(qs[:, 32 * j:32 * j + 32] >> (2 * l)) & 3 for j in range(2) for l in range(4)], axis=1)


def _q3_k_values(blocks):
    """q3l - q3h: q3h = 4 where bit 4j + l of hmask[e] is clear."""
    hmask = blocks[:, :32].astype(np.int64)
    high = np.concatenate([(hmask >> bit) & 1 for bit in range(8)], axis=1)
    return _crumbs(blocks[:, 32:96]) - 4 * (1 - high)


def _q6_k_values(blocks):
    ql, qh = blocks[:, :128].astype(np.int64), blocks[:, 128:192].astype(np.int64)
    out = np.empty((len(blocks), 256), np.int64)
    for half in range(2):
        a, b, h = ql[:, 64 * half:64 * half + 32], ql[:, 64 * half + 32:64 * half + 64], qh[:, 32 * half:32 * half + 32]
        n = 128 * half
        out[:, n:n + 32] = (a & 15) | ((h & 3) << 4)
        out[:, n + 32:n + 64] = (b & 15) | (((h >> 2) & 3) << 4)
        out[:, n + 64:n + 96] = (a >> 4) | (((h >> 4) & 3) << 4)
        out[:, n + 96:n + 128] = (b >> 4) | (((h >> 6) & 3) << 4)
    return out


def _k4_values(qs, qh=None):
    """Q4_K/Q5_K: value 64j + e is the low nibble of qs[32j + e], 64j + 32 + e its high one
    (Q5_K: plus 16 * bit 2j, 2j + 1 of qh[e])."""
    qs = qs.astype(np.int64)
    parts = []
    for j in range(4):
        for k, nib in enumerate((qs[:, 32 * j:32 * j + 32] & 15, qs[:, 32 * j:32 * j + 32] >> 4)):
            high = 0 if qh is None else ((qh.astype(np.int64) >> (2 * j + k)) & 1) << 4
            parts.append(nib + high)
    return np.concatenate(parts, axis=1)


# --- one super-block of each K-quant: (acc, extra) -> (acc, extra); extra is Q4_K's acc_m or
# Q5_K's summs. blk (rows, type_size), y its 256 activations, bs their 16 sums, dx their scale.

def _step_q2_k(blk, y, bs, dx, acc, extra):
    d = (dx * _f16(blk[:, 80:82])).astype(np.float32)
    dmin = (-dx * _f16(blk[:, 82:84])).astype(np.float32)
    sc, m = blk[:, :16].astype(np.int64) & 15, blk[:, :16].astype(np.int64) >> 4
    acc = _fma(dmin[:, None], (m * bs).reshape(len(blk), 8, 2).sum(axis=2).astype(np.float32), acc)
    lanes = _lanes(np.repeat(sc, 16, axis=1) * _crumbs(blk[:, 16:80]) * y)
    return _fma(d[:, None], lanes.astype(np.float32), acc), extra


def _step_q3_k(blk, y, bs, dx, acc, extra):
    d = (dx * _f16(blk[:, 108:110])).astype(np.float32)
    lanes = _lanes(np.repeat(reference.q3_k_scales(blk[:, 96:108]).astype(np.int64), 16, axis=1) * _q3_k_values(blk) * y)
    return _fma(d[:, None], lanes.astype(np.float32), acc), extra


def _step_q4_k(blk, y, bs, dx, acc, acc_m):
    d = (dx * _f16(blk[:, 0:2])).astype(np.float32)
    dmin = (-dx * _f16(blk[:, 2:4])).astype(np.float32)
    sc, m = (v.astype(np.int64) for v in reference.k_scale_min(blk[:, 4:16]))
    prod = (m * bs.reshape(8, 2).sum(axis=1)).reshape(len(blk), 4, 2).sum(axis=2)
    acc_m = _fma(dmin[:, None], prod.astype(np.float32), acc_m)
    lanes = _lanes(np.repeat(sc, 32, axis=1) * _k4_values(blk[:, 16:144]) * y)
    return _fma(d[:, None], lanes.astype(np.float32), acc), acc_m


def _step_q5_k(blk, y, bs, dx, acc, summs):
    d = (dx * _f16(blk[:, 0:2])).astype(np.float32)
    dmin = (-dx * _f16(blk[:, 2:4])).astype(np.float32)
    sc, m = (v.astype(np.int64) for v in reference.k_scale_min(blk[:, 4:16]))
    total = (m * bs.reshape(8, 2).sum(axis=1)).sum(axis=1)  # hadd_epi16, madd, hadd_epi32 twice
    summs = _fma(dmin, total.astype(np.float32), summs)
    lanes = _lanes(np.repeat(sc, 32, axis=1) * _k4_values(blk[:, 48:176], blk[:, 16:48]) * y)
    return _fma(d[:, None], lanes.astype(np.float32), acc), summs


def _step_q6_k(blk, y, bs, dx, acc, extra):
    d = (dx * _f16(blk[:, 208:210])).astype(np.float32)
    sc = blk[:, 192:208].view(np.int8).astype(np.int64)
    lanes = _lanes(np.repeat(sc, 16, axis=1) * _q6_k_values(blk) * y)
    lanes -= 32 * (sc * bs).reshape(len(blk), 8, 2).sum(axis=2)
    return _fma(d[:, None], lanes.astype(np.float32), acc), extra


_K_STEPS = {GGMLType.Q2_K: _step_q2_k, GGMLType.Q3_K: _step_q3_k, GGMLType.Q4_K: _step_q4_k,
            GGMLType.Q5_K: _step_q5_k, GGMLType.Q6_K: _step_q6_k}


def _k_matvec(blocks, qtype, x):
    rows, nb = blocks.shape[:2]
    q, xd, bsums = reference.quantize_q8_k(x[None, :].astype(np.float32))
    y, bsums = q[0].astype(np.int64), bsums[0].astype(np.int64)
    acc = np.zeros((rows, 8), np.float32)
    extra = np.zeros((rows, 4) if qtype == GGMLType.Q4_K else rows, np.float32)
    for i in range(nb):
        acc, extra = _K_STEPS[qtype](blocks[:, i], y[QK_K * i:QK_K * (i + 1)], bsums[16 * i:16 * (i + 1)],
                                     xd[0, i], acc, extra)
    out = _hsum8(acc)
    if qtype == GGMLType.Q4_K:  # acc_m: movehl + movehdup
        extra = ((extra[:, 0] + extra[:, 2]).astype(np.float32) + (extra[:, 1] + extra[:, 3]).astype(np.float32))
    if qtype in (GGMLType.Q4_K, GGMLType.Q5_K):
        out = out + extra.astype(np.float32)
    return out.astype(np.float32)


def _half_matvec(wf, y, pairs):
    """The loop ggml_vec_dot_f16 and _bf16 share on AVX2, for float32 weights wf (rows, k) and
    activations y (k,), both already 16-bit values: 4 accumulators of 8 float lanes, acc[j]
    taking elements i + 8j .. i + 8j + 7 of each 32-step i by an FMA (the product is exact in
    float64; float32 would round it only below FLT_MIN); acc0 + acc2 and acc1 + acc3,
    those two added; the low 4 lanes plus the high 4 (t); pairs[0] of t added, pairs[1]
    added, and those two sums added: that float becomes sumf, a ggml_float (double). The n % 32
    leftovers: sumf += (double)(float x * float y), in order. *s = sumf stores it as float."""
    rows, k = wf.shape
    np_ = k - k % 32
    acc = np.zeros((rows, 4, 8), np.float32)
    for i in range(0, np_, 32):
        acc = _fma(wf[:, i:i + 32].reshape(rows, 4, 8), y[i:i + 32].reshape(4, 8), acc)
    v = (acc[:, 0] + acc[:, 2]) + (acc[:, 1] + acc[:, 3])
    t = v[:, :4] + v[:, 4:]
    (a, b), (c, d) = pairs
    sumf = ((t[:, a] + t[:, b]) + (t[:, c] + t[:, d])).astype(np.float64)
    for i in range(np_, k):
        sumf = sumf + (wf[:, i] * y[i]).astype(np.float64)
    return sumf.astype(np.float32)


def _f16_matvec(w, x):
    """ggml_vec_dot_f16 of each row of W (rows, k) fp16 with x (k,), as an AVX2 build runs it.

    x goes through from_float = ggml_cpu_fp32_to_fp16 (_mm256_cvtps_ph, round to nearest even).
    GGML_F16_STEP 32, GGML_F16_EPR 8, GGML_F32x8_FMA steps; GGML_F32x8_REDUCE: sum0 += sum2,
    sum1 += sum3, sum0 += sum1; t0 = low half + high half; _mm_hadd_ps twice gives
    (t0[0] + t0[1]) + (t0[2] + t0[3]).
    """
    wf = np.ascontiguousarray(w).view(np.float16).astype(np.float32)
    return _half_matvec(wf, x.astype(np.float16).astype(np.float32), ((0, 1), (2, 3)))


def _fp32_to_bf16(x):
    """ggml_compute_fp32_to_bf16 (ggml-impl.h): NaN -> (u >> 16) | 64; else
    (u + (0x7fff + ((u >> 16) & 1))) >> 16, as uint32 arithmetic."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    h = np.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 64, ((u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFFFFFF) >> 16)
    return h.astype(np.uint16)


def _bf16_to_fp32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _bf16_matvec(w, x):
    """ggml_vec_dot_bf16 (vec.cpp), its __AVX2__ branch, of each row of W (rows, k) bf16 bits
    with x (k,): x through from_float = ggml_cpu_fp32_to_bf16 (GGML_FP32_TO_BF16). c1..c4 =
    _mm256_add_ps(_mm256_mul_ps(LOAD(x + i + 8j), LOAD(y + i + 8j)), cj), which GCC's
    -march=haswell build emits as one vfmadd231ps (it contracts in GNU mode); c1 = (c1 + c3) +
    (c2 + c4); g = high half + low half; g += movehl(g, g) gives g0 + g2, g1 + g3;
    add_ss(g, movehdup(g)) adds those two; sumf += (ggml_float) g; then the leftover loop."""
    wf = _bf16_to_fp32(np.ascontiguousarray(w))
    return _half_matvec(wf, _bf16_to_fp32(_fp32_to_bf16(x)), ((0, 2), (1, 3)))


# Q4_0/Q4_K matrices whose row count is a multiple of 8: llama.cpp repacks them on AVX2 (8 rows
# interleaved, repack.cpp) and its gemv/gemm keep one float lane per row: per block the exact
# integer sum, then acc = fma(float(isum), d_w * d_x, acc) (Q4_K: and accm = fma(float(imin),
# dmin_w * d_x, accm), the row's result acc - accm).
REPACKED = (GGMLType.Q4_0, GGMLType.Q4_K)


def _repacked_matvec(blocks, qtype, x):
    rows, nb = blocks.shape[:2]
    acc, accm = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
    if qtype == GGMLType.Q4_0:
        q, xd, _ = reference.quantize_q8_0(x[None, :].astype(np.float32))
        y = q[0].astype(np.int64)
        for i in range(nb):
            blk = blocks[:, i]
            isum = (_simple_values(blk, qtype) * y[QK * i:QK * (i + 1)]).sum(axis=1)
            acc = _fma(isum.astype(np.float32), (_f16(blk[:, 0:2]) * xd[0, i]).astype(np.float32), acc)
        return acc
    q, xd, bsums = reference.quantize_q8_k(x[None, :].astype(np.float32))
    y, bsums = q[0].astype(np.int64), bsums[0].astype(np.int64)
    for i in range(nb):
        blk = blocks[:, i]
        sc, m = (v.astype(np.int64) for v in reference.k_scale_min(blk[:, 4:16]))
        isum = (np.repeat(sc, 32, axis=1) * _k4_values(blk[:, 16:144]) * y[QK_K * i:QK_K * (i + 1)]).sum(axis=1)
        imin = (m * bsums[16 * i:16 * (i + 1)].reshape(8, 2).sum(axis=1)).sum(axis=1)
        acc = _fma(isum.astype(np.float32), (_f16(blk[:, 0:2]) * xd[0, i]).astype(np.float32), acc)
        accm = _fma(imin.astype(np.float32), (_f16(blk[:, 2:4]) * xd[0, i]).astype(np.float32), accm)
    return (acc - accm).astype(np.float32)


def matvec(w: np.ndarray, qtype: GGMLType, x: np.ndarray) -> np.ndarray:
    """x (k,) times each row of W (rows, row_bytes) as llama.cpp computes it on AVX2 (vec_dot,
    or the repacked gemv for REPACKED types with 8k rows): (rows,) float32."""
    qtype = GGMLType(qtype)
    if qtype == GGMLType.F16:
        return _f16_matvec(w, x)
    if qtype == GGMLType.BF16:
        return _bf16_matvec(w, x)
    info = QUANT_TABLE[qtype]
    rows, nb = w.shape[0], w.shape[1] // info.type_size
    blocks = np.ascontiguousarray(w).reshape(rows, nb, info.type_size)
    if qtype in REPACKED and rows % 8 == 0:
        return _repacked_matvec(blocks, qtype, x)
    if qtype in _K_STEPS:
        return _k_matvec(blocks, qtype, x)
    q, xd, xs = reference.quantize_q8_0(x[None, :].astype(np.float32))
    y = q[0].astype(np.int64)
    acc = np.zeros((rows, 8), np.float32)
    summs = np.zeros(rows, np.float32)
    for i in range(nb):
        blk = blocks[:, i]
        d = (_f16(blk[:, 0:2]) * xd[0, i]).astype(np.float32)
        lanes = _lanes(_simple_values(blk, qtype) * y[QK * i:QK * (i + 1)])
        acc = _fma(d[:, None], lanes.astype(np.float32), acc)
        if qtype in (GGMLType.Q4_1, GGMLType.Q5_1):
            summs = _fma(_f16(blk[:, 2:4]), xs[0, i], summs)
    return (_hsum8(acc) + summs).astype(np.float32) if qtype in (GGMLType.Q4_1, GGMLType.Q5_1) else _hsum8(acc)
