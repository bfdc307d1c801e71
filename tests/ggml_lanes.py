"""NumPy emulation of llama.cpp's AVX2 row dot products (ggml-cpu/arch/x86/quants.c), the
oracle for runtime/kernels/lanes_source.py: written from ggml's C, not from our IR.

Per block, int32 lane j sums the products of elements 4j..4j+3 of each 32-value group (K-quants:
times the group's scale; Q6_K: less 32 * its two 16-value groups' bsums . scales); lanes are
converted to float and FMA-added with the block scale; hsum_float_8 adds them as
((0+4)+(2+6)) + ((1+5)+(3+7)). The FMA is emulated in float64 (the float32 product is exact
there) and rounded once to float32.
"""
from __future__ import annotations

import numpy as np

from ggufile.runtime import quants
from ggufile.runtime.constants import QK, QK_K, QUANT_TABLE, GGMLType

LANE_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K)


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


def _simple_values(blocks, qtype):
    """(rows, type_size) blocks -> (rows, 32) int values as ggml's AVX2 code forms them."""
    if qtype == GGMLType.Q8_0:
        return blocks[:, 2:34].view(np.int8).astype(np.int64)
    at = {GGMLType.Q4_0: 2, GGMLType.Q4_1: 4, GGMLType.Q5_0: 6}[qtype]
    qs = blocks[:, at:at + 16].astype(np.int64)
    v = np.concatenate([qs & 15, qs >> 4], axis=1)
    if qtype == GGMLType.Q4_0:
        return v - 8
    if qtype == GGMLType.Q5_0:
        qh = blocks[:, 2:6].copy().view(np.uint32).astype(np.int64)
        return v + 16 * ((qh >> np.arange(32)) & 1) - 16
    return v


def _q4_k_scales_mins(p):
    """(rows, 12) packed bytes -> scales, mins (rows, 8) (get_scale_min_k4)."""
    p = p.astype(np.int64)
    sc, m = np.empty((len(p), 8), np.int64), np.empty((len(p), 8), np.int64)
    for j in range(8):
        if j < 4:
            sc[:, j], m[:, j] = p[:, j] & 63, p[:, j + 4] & 63
        else:
            sc[:, j] = (p[:, j + 4] & 15) | ((p[:, j - 4] >> 6) << 4)
            m[:, j] = (p[:, j + 4] >> 4) | ((p[:, j] >> 6) << 4)
    return sc, m


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


def _q4_k_values(blocks):
    qs = blocks[:, 16:144].astype(np.int64)
    return np.concatenate([np.concatenate([qs[:, 32 * p:32 * p + 32] & 15, qs[:, 32 * p:32 * p + 32] >> 4], axis=1)
                           for p in range(4)], axis=1)


def matvec(w: np.ndarray, qtype: GGMLType, x: np.ndarray) -> np.ndarray:
    """x (k,) times each row of W (rows, row_bytes) as ggml's AVX2 vec_dot does it: (rows,) float32."""
    qtype = GGMLType(qtype)
    info = QUANT_TABLE[qtype]
    rows, nb = w.shape[0], w.shape[1] // info.type_size
    blocks = np.ascontiguousarray(w).reshape(rows, nb, info.type_size)
    acc = np.zeros((rows, 8), np.float32)
    if qtype in (GGMLType.Q4_K, GGMLType.Q6_K):
        q, xd, bsums = quants.quantize_q8_k(x[None, :].astype(np.float32))
        y, bsums = q[0].astype(np.int64), bsums[0].astype(np.int64)
        acc_m = np.zeros((rows, 4), np.float32)
        for i in range(nb):
            blk, yb, bs = blocks[:, i], y[QK_K * i:QK_K * (i + 1)], bsums[16 * i:16 * (i + 1)]
            if qtype == GGMLType.Q4_K:
                d = (xd[0, i] * _f16(blk[:, 0:2])).astype(np.float32)
                dmin = (-xd[0, i] * _f16(blk[:, 2:4])).astype(np.float32)
                sc, m = _q4_k_scales_mins(blk[:, 4:16])
                group = bs.reshape(8, 2).sum(axis=1)
                prod = (m * group).reshape(rows, 4, 2).sum(axis=2)
                acc_m = _fma(dmin[:, None], prod.astype(np.float32), acc_m)
                lanes = _lanes(np.repeat(sc, 32, axis=1) * _q4_k_values(blk) * yb)
            else:
                d = (xd[0, i] * _f16(blk[:, 208:210])).astype(np.float32)
                sc = blk[:, 192:208].view(np.int8).astype(np.int64)
                lanes = _lanes(np.repeat(sc, 16, axis=1) * _q6_k_values(blk) * yb)
                lanes -= 32 * (sc * bs).reshape(rows, 8, 2).sum(axis=2)
            acc = _fma(d[:, None], lanes.astype(np.float32), acc)
        out = _hsum8(acc)
        if qtype == GGMLType.Q4_K:
            out = (out + ((acc_m[:, 0] + acc_m[:, 2]).astype(np.float32)
                          + (acc_m[:, 1] + acc_m[:, 3]).astype(np.float32)).astype(np.float32)).astype(np.float32)
        return out
    q, xd, xs = quants.quantize_q8_0(x[None, :].astype(np.float32))
    y = q[0].astype(np.int64)
    summs = np.zeros(rows, np.float32)
    for i in range(nb):
        blk = blocks[:, i]
        d = (_f16(blk[:, 0:2]) * xd[0, i]).astype(np.float32)
        lanes = _lanes(_simple_values(blk, qtype) * y[QK * i:QK * (i + 1)])
        acc = _fma(d[:, None], lanes.astype(np.float32), acc)
        if qtype == GGMLType.Q4_1:
            summs = _fma(_f16(blk[:, 2:4]), xs[0, i], summs)
    return (_hsum8(acc) + summs).astype(np.float32) if qtype == GGMLType.Q4_1 else _hsum8(acc)
