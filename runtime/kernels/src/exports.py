"""Kernel source: plain functions over arrays, compiled by Numba (JIT) or numba.pycc (AOT).

Kernels are plain (undecorated) functions; the JIT backend wraps them in numba.njit and
aot_build exports them with the signatures in SIGNATURES. The few helpers they share are
inlined at Numba-IR level (inline="always"), so each AOT variant compiles them for its own
target CPU. The shipped runtime never imports this module (nor numba): it loads the AOT build.

Conventions shared by all kernels:
- `w` is a weight matrix as the GGUF reader gives it: (rows, row_bytes) uint8 for quantized
  types, and kernels handle rows r0 <= r < r1 only (the thread pool splits rows).
- `tab` maps fp16 bit patterns to float32 (65536 entries): one load per block scale.
- Block geometry (qk, qk_k) comes in as arguments: it is defined once in constants.py, and a
  loop whose trip count is a run-time value is one LLVM vectorizes along the elements (with
  constant 32-trip loops it unrolls them and vectorizes across blocks with gathers instead).
- Decode kernels (`mv_*`) follow llama.cpp's CPU backend: the activation rows are quantized to
  8 bits per block first (`quantize_q8_*`), kept as integer-valued float32, and each block dot
  product is a sum of integer products (exact in float32), scaled by the two block scales.
  F16 (BF16) weights take the activations rounded to fp16 (bf16) instead, as ggml's vec_dot_type.
- Dequantization kernels (`dq_*`) repeat kernels/reference.py's operation order, so they are bit-exact
  with it (compiled without FMA contraction for that reason).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ggufile.runtime.gguf.constants import QK_K, QUANT_TABLE, GGMLType
from ggufile.runtime.kernels.packing import FILE_QS, PACKED_LAYOUT
from ggufile.runtime.kernels.types import BLOCK_TYPES, LANE_TYPES, WITH_SUMS  # by name: numba has `types`
from ggufile.runtime.kernels.src import lanes, tiles

# reassoc lets LLVM vectorize the reductions; no "contract", so no FMA changes a rounding of
# the bit-exact kernels (dequantization, activation quantization).
FASTMATH = frozenset({"reassoc", "nsz"})
# The float decode dot product (mv_f32) is a sum in any order anyway: FMAs there are free speed
# (1.25x on the former float Q8_0 kernel).
DECODE_FASTMATH = FASTMATH | {"contract"}


# Kernels built on lanes.py: no fast-math at all, which would let LLVM reorder ggml's lane sums.
LANE_KERNELS = frozenset([*(f"mv_{t.name.lower()}" for t in LANE_TYPES),
                          *(f"mv_{t.name.lower()}_packed" for t in PACKED_LAYOUT)])


def fastmath_for(name: str) -> frozenset:
    """The fast-math flags kernel `name` is compiled with (JIT and AOT alike)."""
    if name in LANE_KERNELS:
        return frozenset()
    return DECODE_FASTMATH if name.startswith("mv_") else FASTMATH


# --- activation quantization -----------------------------------------------------------------
# Each block's scale is rounded to fp16 exactly as ggml stores it (_round_f16: integer bit
# operations, immune to fast-math).


def quantize_q8_0(x, xq, xd, xs, qk):
    """Rows of x (n_tok, k) -> Q8_0/Q8_1 blocks: int values xq, fp16 scales xd, fp16 d*sum xs."""
    n_tok, k = x.shape
    nb = k // qk
    for t in range(n_tok):
        for b in range(nb):
            amax = np.float32(0.0)
            for j in range(qk):
                amax = max(amax, abs(x[t, b * qk + j]))
            d = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
            total = np.float32(0.0)
            for j in range(qk):
                q = np.rint(x[t, b * qk + j] * inv)
                xq[t, b * qk + j] = q
                total += q
            xd[t, b] = _round_f16(d)
            xs[t, b] = _round_f16(d * total)


def quantize_q8_k(x, xq, xd, xbs, qk_k):
    """Rows of x -> Q8_K super-blocks: int values xq, float32 scale xd, sums of 16 values xbs."""
    n_tok, k = x.shape
    nb = k // qk_k
    for t in range(n_tok):
        for b in range(nb):
            o = b * qk_k
            amax, vmax = _q8_k_max(x, t, o, qk_k)
            if amax == 0:
                xd[t, b] = 0
                for j in range(qk_k):
                    xq[t, o + j] = 0
            else:
                iscale = np.float32(-127.0) / vmax
                for j in range(qk_k):
                    xq[t, o + j] = min(np.float32(127.0), np.rint(iscale * x[t, o + j]))
                xd[t, b] = np.float32(1.0) / iscale
            for g in range(qk_k // 16):
                s = np.float32(0.0)
                for j in range(16):
                    s += xq[t, o + 16 * g + j]
                xbs[t, b * (qk_k // 16) + g] = s


# --- matrix-vector (decode): out[t, r] = dot(W[r], x[t]) on quantized blocks --------------------
# By far the most decode time is spent in these kernels. Every quantized type, F16 and BF16 call
# lanes.py: llama.cpp's own AVX2 dot products, emitted as LLVM vector IR, so the results are
# llama.cpp's bit for bit and 2-18x faster than the float loops they replaced.


# The lane kernels' types, as plain ints: Numba sees module globals as constants, so each
# kernel's call below compiles its own dot_tile IR.
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = (int(t) for t in (
    GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
    GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K))
# llama.cpp repacks Q4_0/Q4_K matrices of 8k rows and sums their rows in another order (lanes.REPACKED)
_Q4_0_REPACKED, _Q4_K_REPACKED = lanes.Q4_0_REPACKED, lanes.Q4_K_REPACKED


# A tile of rows (ROW_TILE_BYTES of weights, in L1) meets a tile of tokens (COL_TILE_BYTES of
# their 8-bit values, in L2) before the next rows are read: many tokens (a prompt) read each
# weight once per token tile instead of once per token.
ROW_TILE_BYTES = 16 * 1024
COL_TILE_BYTES = 256 * 1024


@njit(inline="always")
def _tile_rows(qtype, nrows, ncols, w, a, b, x8, xd, xs, tab, nb, t, out):
    """Rows a..b-1 times tokens t..t+ncols-1, nrows rows per lanes.dot_tile (then one by one)."""
    r = a
    while r + nrows <= b:
        lanes.dot_tile(qtype, nrows, ncols, w, r, x8, xd, xs, tab, nb, t, out)
        r += nrows
    while r < b:
        lanes.dot_tile(qtype, 1, ncols, w, r, x8, xd, xs, tab, nb, t, out)
        r += 1


@njit(inline="always")
def _tile_tokens(qtype, ncols, w, a, b, x8, xd, xs, tab, nb, t, out):
    """Rows a..b-1 times ncols tokens, 2 rows a tile; Q2_K/Q3_K/Q6_K one: they keep a
    super-block's 8 unpacked quarters in registers, which a second row would spill (slower)."""
    if qtype == _Q2_K or qtype == _Q3_K or qtype == _Q6_K:
        _tile_rows(qtype, 1, ncols, w, a, b, x8, xd, xs, tab, nb, t, out)
    else:
        _tile_rows(qtype, 2, ncols, w, a, b, x8, xd, xs, tab, nb, t, out)


@njit(inline="always")
def _int8(xq):
    """Integer-valued float32 activations -> the int8 the lanes read."""
    n_tok, k = xq.shape
    x8 = np.empty((n_tok, k), np.int8)
    for t in range(n_tok):
        for j in range(k):
            x8[t, j] = np.int8(xq[t, j])
    return x8


@njit(inline="always")
def _mv_lanes(qtype, w, xq, xd, xs, out, r0, r1, tab, block):
    """Rows r0..r1-1 of W times each token's 8-bit activations, in tiles of rows x tokens
    (lanes.dot_tile), each output the same bits whatever the number of tokens, so a
    token's outputs do not depend on its batch; qtype is a constant (each kernel below passes
    its own), which picks the dot's IR."""
    n_tok, k = xq.shape
    x8 = _int8(xq)
    nb = k // block
    if tiles.covers(qtype, n_tok):
        r0 = tiles.matmul(qtype, w, x8, xd, xs, out, r0, r1, tab, nb)  # then the rows past the last 8
    rows_per_tile = max(1, ROW_TILE_BYTES // w.shape[1])
    tokens_per_tile = max(1, COL_TILE_BYTES // k)
    for c0 in range(0, n_tok, tokens_per_tile):
        c1 = min(n_tok, c0 + tokens_per_tile)
        for a in range(r0, r1, rows_per_tile):
            b = min(r1, a + rows_per_tile)
            t = c0
            while t + 4 <= c1:
                _tile_tokens(qtype, 4, w, a, b, x8, xd, xs, tab, nb, t, out)
                t += 4
            if t + 2 <= c1:
                _tile_tokens(qtype, 2, w, a, b, x8, xd, xs, tab, nb, t, out)
                t += 2
            if t < c1:  # one token (a decode): row by row; 4-row tiles halved the step's decode speed
                _tile_rows(qtype, 1, 1, w, a, b, x8, xd, xs, tab, nb, t, out)


def mv_q4_0(w, xq, xd, out, r0, r1, tab, qk):
    if w.shape[0] % 8 == 0:
        _mv_lanes(_Q4_0_REPACKED, w, xq, xd, xd, out, r0, r1, tab, qk)
    else:
        _mv_lanes(_Q4_0, w, xq, xd, xd, out, r0, r1, tab, qk)


def mv_q4_0_packed(w, xq, xd, out, r0, r1, tab, qk):
    """mv_q4_0 of a matrix packed at load (kernels/packing.py), r0 and r1 multiples of 8."""
    tiles.matmul_packed(_Q4_0_REPACKED, w, _int8(xq), xd, xd, out, r0, r1, tab, xq.shape[1] // qk)


def mv_q5_0_packed(w, xq, xd, out, r0, r1, tab, qk):
    """mv_q5_0 of a matrix packed at load, r0 and r1 multiples of 8."""
    tiles.matmul_packed(_Q5_0, w, _int8(xq), xd, xd, out, r0, r1, tab, xq.shape[1] // qk)


def mv_q8_0_packed(w, xq, xd, out, r0, r1, tab, qk):
    """mv_q8_0 of a matrix packed at load, r0 and r1 multiples of 8."""
    tiles.matmul_packed(_Q8_0, w, _int8(xq), xd, xd, out, r0, r1, tab, xq.shape[1] // qk)


def mv_q4_k_packed(w, xq, xd, xbs, out, r0, r1, tab, qk_k):
    """mv_q4_k of a matrix packed at load, r0 and r1 multiples of 8."""
    tiles.matmul_packed(_Q4_K_REPACKED, w, _int8(xq), xd, xbs, out, r0, r1, tab, xq.shape[1] // qk_k)


def mv_q6_k_packed(w, xq, xd, xbs, out, r0, r1, tab, qk_k):
    """mv_q6_k of a matrix packed at load, r0 and r1 multiples of 8."""
    tiles.matmul_packed(_Q6_K, w, _int8(xq), xd, xbs, out, r0, r1, tab, xq.shape[1] // qk_k)


# --- packing at load (kernels/packing.py is the NumPy oracle; these are its fast copies) ------
# Row groups g0..g1-1 of w (rows, row bytes) into out (rows, packed row bytes), so the pool
# threads can split a matrix.

_LAYOUT_Q4_0, _LAYOUT_Q4_K = PACKED_LAYOUT[GGMLType.Q4_0], PACKED_LAYOUT[GGMLType.Q4_K]
_P4_0_BLOCK, _P4_0_QS = _LAYOUT_Q4_0.block_bytes, _LAYOUT_Q4_0.qs
_P8_0_BLOCK, _P8_0_QS = PACKED_LAYOUT[GGMLType.Q8_0].block_bytes, PACKED_LAYOUT[GGMLType.Q8_0].qs
_LAYOUT_Q5_0 = PACKED_LAYOUT[GGMLType.Q5_0]
_P5_0_BLOCK, _P5_0_QS, _P5_0_HIGH = _LAYOUT_Q5_0.block_bytes, _LAYOUT_Q5_0.qs, _LAYOUT_Q5_0.high
_FILE_QS_Q4_0, _FILE_QS_Q5_0, _FILE_QS_Q8_0 = (FILE_QS[t] for t in (GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0))
_P4_K_BLOCK, _P4_K_SCALES, _P4_K_MINS, _P4_K_QS = (
    _LAYOUT_Q4_K.block_bytes, _LAYOUT_Q4_K.scales, _LAYOUT_Q4_K.mins, _LAYOUT_Q4_K.qs)
_Q4_0_BYTES, _Q5_0_BYTES, _Q8_0_BYTES, _Q4_K_BYTES, _Q6_K_BYTES = (QUANT_TABLE[t].type_size for t in (
    GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K))
_LAYOUT_Q6_K = PACKED_LAYOUT[GGMLType.Q6_K]
_P6_K_BLOCK, _P6_K_SCALES, _P6_K_QS = _LAYOUT_Q6_K.block_bytes, _LAYOUT_Q6_K.scales, _LAYOUT_Q6_K.qs


@njit(inline="always")
def _pack_d_qs(w, out, g0, g1, block, packed_block, qs, file_qs):
    """Q4_0/Q5_0/Q8_0 (a 2-byte d, the qs from byte file_qs): per 8 rows and block, the 8 d,
    then vector m of the 8 rows' qs bytes 4m.."""
    nb, units = w.shape[1] // block, (block - file_qs) // 4
    w16, o16 = w.view(np.uint16), out.reshape(-1).view(np.uint16)
    for g in range(g0, g1):
        for i in range(nb):
            base = (g * nb + i) * (packed_block // 2)
            for j in range(8):
                row = 8 * g + j
                o16[base + j] = w16[row, i * (block // 2)]
                for m in range(units):
                    for h in range(2):
                        o16[base + qs // 2 + (m * 8 + j) * 2 + h] = w16[row, i * (block // 2) + file_qs // 2 + m * 2 + h]


def pack_q4_0(w, out, g0, g1):
    _pack_d_qs(w, out, g0, g1, _Q4_0_BYTES, _P4_0_BLOCK, _P4_0_QS, _FILE_QS_Q4_0)


def pack_q5_0(w, out, g0, g1):
    _pack_d_qs(w, out, g0, g1, _Q5_0_BYTES, _P5_0_BLOCK, _P5_0_QS, _FILE_QS_Q5_0)
    nb, o8 = w.shape[1] // _Q5_0_BYTES, out.reshape(-1)
    for g in range(g0, g1):
        for i in range(nb):
            for j in range(8):
                o = i * _Q5_0_BYTES + 2
                qh = 0
                for n in range(4):
                    qh |= int(w[8 * g + j, o + n]) << (8 * n)
                for b in range(4):  # byte b's bit k: value 4k + b's fifth bit
                    byte = 0
                    for k in range(8):
                        byte |= ((qh >> (4 * k + b)) & 1) << k
                    o8[(g * nb + i) * _P5_0_BLOCK + _P5_0_HIGH + 4 * j + b] = byte


def pack_q8_0(w, out, g0, g1):
    _pack_d_qs(w, out, g0, g1, _Q8_0_BYTES, _P8_0_BLOCK, _P8_0_QS, _FILE_QS_Q8_0)


def pack_q4_k(w, out, g0, g1):
    nb = w.shape[1] // _Q4_K_BYTES
    w16, w32 = w.view(np.uint16), w.view(np.uint32)
    o8 = out.reshape(-1)
    o16, o32 = o8.view(np.uint16), o8.view(np.uint32)
    for g in range(g0, g1):
        for i in range(nb):
            base = (g * nb + i) * _P4_K_BLOCK
            for j in range(8):
                row = 8 * g + j
                o16[base // 2 + j] = w16[row, i * (_Q4_K_BYTES // 2)]
                o16[base // 2 + 8 + j] = w16[row, i * (_Q4_K_BYTES // 2) + 1]
                for sb in range(8):
                    sc, mn = _k_scale_min(w[row, i * _Q4_K_BYTES + 4:i * _Q4_K_BYTES + 16], sb)
                    o8[base + _P4_K_SCALES + sb * 8 + j] = sc
                    o8[base + _P4_K_MINS + (sb // 2) * 16 + j * 2 + sb % 2] = mn
                for cm in range(32):  # chunk c = cm // 8, vector m = cm % 8
                    o32[base // 4 + _P4_K_QS // 4 + cm * 8 + j] = w32[row, i * (_Q4_K_BYTES // 4) + 4 + cm]


@njit(inline="always")
def _q6_k_values(w, row, o, v):
    """Row `row`'s Q6_K block at byte o -> its 256 unsigned 6-bit values in v (dequantize_row_q6_K's order)."""
    for n in range(2):
        for lane in range(32):
            a, b = w[row, o + 64 * n + lane], w[row, o + 64 * n + 32 + lane]
            h = w[row, o + 128 + 32 * n + lane]
            v[128 * n + lane] = (a & 15) | ((h & 3) << 4)
            v[128 * n + 32 + lane] = (b & 15) | (((h >> 2) & 3) << 4)
            v[128 * n + 64 + lane] = (a >> 4) | (((h >> 4) & 3) << 4)
            v[128 * n + 96 + lane] = (b >> 4) | ((h >> 6) << 4)


def pack_q6_k(w, out, g0, g1):
    nb = w.shape[1] // _Q6_K_BYTES
    w16, o8 = w.view(np.uint16), out.reshape(-1)
    o16 = o8.view(np.uint16)
    v = np.empty(QK_K, np.uint8)
    for g in range(g0, g1):
        for i in range(nb):
            base = (g * nb + i) * _P6_K_BLOCK
            for j in range(8):
                row, o = 8 * g + j, i * _Q6_K_BYTES
                o16[base // 2 + j] = w16[row, (o + 208) // 2]
                for sc in range(16):
                    o8[base + _P6_K_SCALES + (sc // 2) * 16 + 2 * j + sc % 2] = w[row, o + 192 + sc]
                _q6_k_values(w, row, o, v)
                for qh in range(16):  # quarter qh // 2, half qh % 2: its values from 16 * qh
                    at = base + _P6_K_QS + 96 * qh + 4 * j
                    for t in range(4):
                        split = v[16 * qh + 8 + t]
                        o8[at + t] = v[16 * qh + t] | ((split & 3) << 6)
                        o8[at + 32 + t] = v[16 * qh + 4 + t] | (((split >> 2) & 3) << 6)
                        o8[at + 64 + t] = v[16 * qh + 12 + t] | ((split >> 4) << 6)


def mv_q4_1(w, xq, xd, xs, out, r0, r1, tab, qk):
    _mv_lanes(_Q4_1, w, xq, xd, xs, out, r0, r1, tab, qk)


def mv_q5_0(w, xq, xd, out, r0, r1, tab, qk):
    _mv_lanes(_Q5_0, w, xq, xd, xd, out, r0, r1, tab, qk)


def mv_q5_1(w, xq, xd, xs, out, r0, r1, tab, qk):
    _mv_lanes(_Q5_1, w, xq, xd, xs, out, r0, r1, tab, qk)


def mv_q8_0(w, xq, xd, out, r0, r1, tab, qk):
    _mv_lanes(_Q8_0, w, xq, xd, xd, out, r0, r1, tab, qk)


def mv_q2_k(w, xq, xd, xbs, out, r0, r1, tab, qk_k):
    _mv_lanes(_Q2_K, w, xq, xd, xbs, out, r0, r1, tab, qk_k)


def mv_q3_k(w, xq, xd, xbs, out, r0, r1, tab, qk_k):
    _mv_lanes(_Q3_K, w, xq, xd, xbs, out, r0, r1, tab, qk_k)


def mv_q4_k(w, xq, xd, xbs, out, r0, r1, tab, qk_k):
    if w.shape[0] % 8 == 0:
        _mv_lanes(_Q4_K_REPACKED, w, xq, xd, xbs, out, r0, r1, tab, qk_k)
    else:
        _mv_lanes(_Q4_K, w, xq, xd, xbs, out, r0, r1, tab, qk_k)


def mv_q5_k(w, xq, xd, xbs, out, r0, r1, tab, qk_k):
    _mv_lanes(_Q5_K, w, xq, xd, xbs, out, r0, r1, tab, qk_k)


def mv_q6_k(w, xq, xd, xbs, out, r0, r1, tab, qk_k):
    _mv_lanes(_Q6_K, w, xq, xd, xbs, out, r0, r1, tab, qk_k)


def mv_f32(w, x, out, r0, r1):
    n_tok, k = x.shape
    for r in range(r0, r1):
        row = w[r]
        for t in range(n_tok):
            s = np.float32(0.0)
            for j in range(k):
                s += row[j] * x[t, j]
            out[t, r] = s


@njit(inline="always")
def _mv_16bit(bf16, w, x, out, r0, r1, tab):
    """Rows r0..r1-1 of W (rows, k) of 16-bit float bit patterns times each token's x, rounded
    first to the weights' vec_dot_type as ggml converts it: bf16 (GGML_FP32_TO_BF16) or fp16
    (ties to even, as F16C's vcvtps2ph). bf16 is a constant: each kernel below compiles one dot."""
    n_tok, k = x.shape
    x16 = np.empty(k, np.uint16)
    for t in range(n_tok):
        for j in range(k):
            x16[j] = np.uint16(_bf16_bits(x[t, j]) if bf16 else _f16_bits(x[t, j]))
        for r in range(r0, r1):
            out[t, r] = lanes.dot_bf16(w[r], x16, k) if bf16 else lanes.dot_f16(w[r], x16, tab, k)


def mv_f16(w, x, out, r0, r1, tab):
    """w: (rows, k) uint16 bit patterns of fp16; every row one lanes.py.dot_f16."""
    _mv_16bit(False, w, x, out, r0, r1, tab)


def mv_bf16(w, x, out, r0, r1, tab):
    """w: (rows, k) uint16 bit patterns of bf16; every row one lanes.py.dot_bf16 (tab unused:
    the F16 kernel's signature, so both are called alike)."""
    _mv_16bit(True, w, x, out, r0, r1, tab)


# --- dequantization: out[i] = dequant(W[ids[i]]), bit-exact with kernels/reference.py ----------------------


def dq_q4_0(w, ids, out, tab, qk):
    nb = out.shape[1] // qk
    ts = w.shape[1] // nb
    half = qk // 2
    for i in range(ids.shape[0]):
        row = w[ids[i]]
        for b in range(nb):
            o = b * ts
            d = tab[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]
            y = out[i, b * qk:b * qk + qk]
            for j in range(half):
                v = row[o + 2 + j]
                y[j] = d * np.float32(np.int32(v & np.uint8(15)) - 8)
                y[j + half] = d * np.float32(np.int32(v >> np.uint8(4)) - 8)


def dq_q4_1(w, ids, out, tab, qk):
    nb = out.shape[1] // qk
    ts = w.shape[1] // nb
    half = qk // 2
    for i in range(ids.shape[0]):
        row = w[ids[i]]
        for b in range(nb):
            o = b * ts
            d = tab[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]
            m = tab[np.int64(row[o + 2]) | (np.int64(row[o + 3]) << 8)]
            y = out[i, b * qk:b * qk + qk]
            for j in range(half):
                v = row[o + 4 + j]
                y[j] = d * np.float32(v & np.uint8(15)) + m
                y[j + half] = d * np.float32(v >> np.uint8(4)) + m


def dq_q5_0(w, ids, out, tab, qk):
    nb = out.shape[1] // qk
    ts = w.shape[1] // nb
    half = qk // 2
    for i in range(ids.shape[0]):
        row = w[ids[i]]
        for b in range(nb):
            o = b * ts
            d = tab[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]
            qh = (np.uint32(row[o + 2]) | (np.uint32(row[o + 3]) << np.uint32(8))
                  | (np.uint32(row[o + 4]) << np.uint32(16)) | (np.uint32(row[o + 5]) << np.uint32(24)))
            y = out[i, b * qk:b * qk + qk]
            for j in range(half):
                v = row[o + 6 + j]
                h0 = ((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4)
                h1 = ((qh >> np.uint32(j + half)) & np.uint32(1)) << np.uint32(4)
                y[j] = d * np.float32(np.int32(np.uint32(v & np.uint8(15)) | h0) - 16)
                y[j + half] = d * np.float32(np.int32(np.uint32(v >> np.uint8(4)) | h1) - 16)


def dq_q5_1(w, ids, out, tab, qk):
    nb = out.shape[1] // qk
    ts = w.shape[1] // nb
    half = qk // 2
    for i in range(ids.shape[0]):
        row = w[ids[i]]
        for b in range(nb):
            o = b * ts
            d = tab[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]
            m = tab[np.int64(row[o + 2]) | (np.int64(row[o + 3]) << 8)]
            qh = (np.uint32(row[o + 4]) | (np.uint32(row[o + 5]) << np.uint32(8))
                  | (np.uint32(row[o + 6]) << np.uint32(16)) | (np.uint32(row[o + 7]) << np.uint32(24)))
            y = out[i, b * qk:b * qk + qk]
            for j in range(half):
                v = row[o + 8 + j]
                h0 = ((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4)
                h1 = ((qh >> np.uint32(j + half)) & np.uint32(1)) << np.uint32(4)
                y[j] = d * np.float32(np.uint32(v & np.uint8(15)) | h0) + m
                y[j + half] = d * np.float32(np.uint32(v >> np.uint8(4)) | h1) + m


def dq_q8_0(w, ids, out, tab, qk):
    nb = out.shape[1] // qk
    ts = w.shape[1] // nb
    wi = w.view(np.int8)
    for i in range(ids.shape[0]):
        row = w[ids[i]]
        rowi = wi[ids[i]]
        for b in range(nb):
            o = b * ts
            d = tab[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]
            y = out[i, b * qk:b * qk + qk]
            for j in range(qk):
                y[j] = d * np.float32(rowi[o + 2 + j])


def dq_q2_k(w, ids, out, tab, qk_k):
    nb = out.shape[1] // qk_k
    ts = w.shape[1] // nb
    for i in range(ids.shape[0]):
        row = w[ids[i]]
        for b in range(nb):
            o = b * ts
            d = tab[np.int64(row[o + 80]) | (np.int64(row[o + 81]) << 8)]
            dmin = tab[np.int64(row[o + 82]) | (np.int64(row[o + 83]) << 8)]
            for h in range(2):
                for shift in range(4):
                    for half in range(2):
                        g = 8 * h + 2 * shift + half
                        dl = d * np.float32(row[o + g] & np.uint8(15))
                        ml = dmin * np.float32(row[o + g] >> np.uint8(4))
                        y = out[i, b * qk_k + 16 * g:b * qk_k + 16 * g + 16]
                        q = row[o + 16 + 32 * h + 16 * half:o + 16 + 32 * h + 16 * half + 16]
                        for j in range(16):
                            y[j] = dl * np.float32((q[j] >> np.uint8(2 * shift)) & np.uint8(3)) - ml


def dq_q3_k(w, ids, out, tab, qk_k):
    nb = out.shape[1] // qk_k
    ts = w.shape[1] // nb
    for i in range(ids.shape[0]):
        row = w[ids[i]]
        for b in range(nb):
            o = b * ts
            p = row[o + 96:o + 108]
            d = tab[np.int64(row[o + 108]) | (np.int64(row[o + 109]) << 8)]
            for h in range(2):
                for shift in range(4):
                    bit = np.uint8(4 * h + shift)
                    for half in range(2):
                        g = 8 * h + 2 * shift + half
                        dl = d * np.float32(_q3_scale(p, g))
                        y = out[i, b * qk_k + 16 * g:b * qk_k + 16 * g + 16]
                        q = row[o + 32 + 32 * h + 16 * half:o + 32 + 32 * h + 16 * half + 16]
                        hm = row[o + 16 * half:o + 16 * half + 16]
                        for j in range(16):
                            v = np.int32((q[j] >> np.uint8(2 * shift)) & np.uint8(3)) - 4 * np.int32(1 - ((hm[j] >> bit) & np.uint8(1)))
                            y[j] = dl * np.float32(v)


def dq_q4_k(w, ids, out, tab, qk_k):
    nb = out.shape[1] // qk_k
    ts = w.shape[1] // nb
    for i in range(ids.shape[0]):
        row = w[ids[i]]
        for b in range(nb):
            o = b * ts
            d = tab[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]
            dmin = tab[np.int64(row[o + 2]) | (np.int64(row[o + 3]) << 8)]
            p = row[o + 4:o + 16]
            for pair in range(4):
                sc0, m0 = _k_scale_min(p, 2 * pair)
                sc1, m1 = _k_scale_min(p, 2 * pair + 1)
                d0 = d * np.float32(sc0)
                d1 = d * np.float32(sc1)
                mm0 = dmin * np.float32(m0)
                mm1 = dmin * np.float32(m1)
                q = row[o + 16 + 32 * pair:o + 16 + 32 * pair + 32]
                y = out[i, b * qk_k + 64 * pair:b * qk_k + 64 * pair + 64]
                for j in range(32):
                    y[j] = d0 * np.float32(q[j] & np.uint8(15)) - mm0
                    y[j + 32] = d1 * np.float32(q[j] >> np.uint8(4)) - mm1


def dq_q5_k(w, ids, out, tab, qk_k):
    nb = out.shape[1] // qk_k
    ts = w.shape[1] // nb
    for i in range(ids.shape[0]):
        row = w[ids[i]]
        for b in range(nb):
            o = b * ts
            d = tab[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]
            dmin = tab[np.int64(row[o + 2]) | (np.int64(row[o + 3]) << 8)]
            p = row[o + 4:o + 16]
            qh = row[o + 16:o + 48]
            for pair in range(4):
                sc0, m0 = _k_scale_min(p, 2 * pair)
                sc1, m1 = _k_scale_min(p, 2 * pair + 1)
                d0 = d * np.float32(sc0)
                d1 = d * np.float32(sc1)
                mm0 = dmin * np.float32(m0)
                mm1 = dmin * np.float32(m1)
                b0 = np.uint8(2 * pair)
                b1 = np.uint8(2 * pair + 1)
                q = row[o + 48 + 32 * pair:o + 48 + 32 * pair + 32]
                y = out[i, b * qk_k + 64 * pair:b * qk_k + 64 * pair + 64]
                for j in range(32):
                    lo = (q[j] & np.uint8(15)) | (((qh[j] >> b0) & np.uint8(1)) << np.uint8(4))
                    hi = (q[j] >> np.uint8(4)) | (((qh[j] >> b1) & np.uint8(1)) << np.uint8(4))
                    y[j] = d0 * np.float32(lo) - mm0
                    y[j + 32] = d1 * np.float32(hi) - mm1


def dq_q6_k(w, ids, out, tab, qk_k):
    nb = out.shape[1] // qk_k
    ts = w.shape[1] // nb
    wi = w.view(np.int8)
    for i in range(ids.shape[0]):
        row = w[ids[i]]
        rowi = wi[ids[i]]
        for b in range(nb):
            o = b * ts
            d = tab[np.int64(row[o + 208]) | (np.int64(row[o + 209]) << 8)]
            for h in range(2):
                ql = row[o + 64 * h:o + 64 * h + 64]
                qh = row[o + 128 + 32 * h:o + 128 + 32 * h + 32]
                y = out[i, b * qk_k + 128 * h:b * qk_k + 128 * h + 128]
                for c in range(2):
                    sc = o + 192 + 8 * h + c
                    d1 = d * np.float32(rowi[sc])
                    d2 = d * np.float32(rowi[sc + 2])
                    d3 = d * np.float32(rowi[sc + 4])
                    d4 = d * np.float32(rowi[sc + 6])
                    for j in range(16 * c, 16 * c + 16):
                        a = ql[j]
                        a2 = ql[j + 32]
                        hh = qh[j]
                        y[j] = d1 * np.float32(np.int32((a & np.uint8(15)) | ((hh & np.uint8(3)) << np.uint8(4))) - 32)
                        y[j + 32] = d2 * np.float32(np.int32((a2 & np.uint8(15)) | (((hh >> np.uint8(2)) & np.uint8(3)) << np.uint8(4))) - 32)
                        y[j + 64] = d3 * np.float32(np.int32((a >> np.uint8(4)) | (((hh >> np.uint8(4)) & np.uint8(3)) << np.uint8(4))) - 32)
                        y[j + 96] = d4 * np.float32(np.int32((a2 >> np.uint8(4)) | ((hh >> np.uint8(6)) << np.uint8(4))) - 32)


def dq_f16(w, ids, out, tab):
    """w: (rows, k) uint16 bit patterns of fp16."""
    for i in range(ids.shape[0]):
        row = w[ids[i]]
        for j in range(out.shape[1]):
            out[i, j] = tab[np.int64(row[j])]


def dq_bf16(w, ids, out):
    """w: (rows, k) uint16 bit patterns of bf16 (each the upper half of a float32)."""
    for i in range(ids.shape[0]):
        row = w[ids[i]]
        for j in range(out.shape[1]):
            out[i, j] = _bits_f32(np.uint32(row[j]) << np.uint32(16))


# --- GGUF metadata ---------------------------------------------------------------------------


def scan_strings(buf, pos, count, starts, ends):
    """Walk `count` GGUF strings (u64 little-endian length, then bytes) from byte `pos` of buf.

    Fills starts/ends with each string's absolute byte range and returns the position after
    the last one, or -1 if a string runs past the buffer (or starts/ends are too short): the
    kernel has no bounds checks, so it checks every length before trusting it.
    """
    n = buf.shape[0]
    if pos < 0 or count > starts.shape[0] or count > ends.shape[0]:
        return -1
    for i in range(count):
        if pos > n - 8:
            return -1
        length = np.uint64(0)
        for b in range(8):
            length |= np.uint64(buf[pos + b]) << np.uint64(8 * b)
        pos += 8
        if length > np.uint64(n - pos):
            return -1
        starts[i] = pos
        pos += np.int64(length)
        ends[i] = pos
    return pos


# --- helpers (inlined into the kernels) -------------------------------------------------------


@njit(inline="always")
def _k_scale_min(p, j):
    """Q4_K/Q5_K: the j-th 6-bit (scale, min) pair of the 12 packed bytes p."""
    if j < 4:
        return p[j] & np.uint8(63), p[j + 4] & np.uint8(63)
    sc = (p[j + 4] & np.uint8(15)) | ((p[j - 4] >> np.uint8(6)) << np.uint8(4))
    m = (p[j + 4] >> np.uint8(4)) | ((p[j] >> np.uint8(6)) << np.uint8(4))
    return sc, m


@njit(inline="always")
def _q3_scale(p, j):
    """Q3_K: the j-th signed 6-bit scale (minus 32) of the 12 packed bytes p."""
    low = (p[j % 8] >> np.uint8(4 * (j // 8))) & np.uint8(15)
    high = (p[8 + j % 4] >> np.uint8(2 * (j // 4))) & np.uint8(3)
    return np.int32(low | (high << np.uint8(4))) - 32


# --- prefill: fused element-wise passes --------------------------------------------------------
# NumPy's float32 <-> float16 casts cost ~5 ns per value, and ~75 ns on values that are fp16
# subnormals (small attention probabilities, GELU inputs near 0): these kernels round to fp16
# with integer bit operations instead, and fuse each pass's neighbours. Each takes a row range
# so the thread pool can split the rows; a row's result never depends on the split.


@intrinsic
def _f32_bits(typingctx, v):
    """The bit pattern of float32 v (a register bitcast)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, u):
    """The float32 whose bit pattern is uint32 u."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _fmuladd(typingctx, a, b, c):
    """a * b + c for float32s: one FMA where the target has one (x86-64-v3/v4, aarch64; as
    ggml's _mm256_fmadd_ps and vfmaq_f32), two roundings elsewhere (lanes.py's rule)."""
    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType()] * 3)
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fmuladd.f32")
        return builder.call(fn, args)
    return types.float32(types.float32, types.float32, types.float32), codegen


# ggml_v_expf's constants (vec.h), as hex floats there.
_EXP_SHIFT, _LOG2E, _LN2_HI, _LN2_LO = (np.float32(float.fromhex(h)) for h in (
    "0x1.8p23", "0x1.715476p+0", "0x1.62e4p-1", "0x1.7f7d1cp-20"))
_EXP_C1, _EXP_C2, _EXP_C3, _EXP_C4, _EXP_C5 = (np.float32(float.fromhex(h)) for h in (
    "0x1.ffffecp-1", "0x1.fffdb6p-2", "0x1.555e66p-3", "0x1.573e2ep-5", "0x1.0e4020p-7"))


@njit(inline="always")
def v_expf(x):
    """ggml_v_expf, one lane: the exp ggml's vector SiLU and softmax use (vec.h; its AVX2,
    AVX-512 and NEON versions are the same operations, FMAs included), where libm's expf
    differs in the last bit on about a quarter of the values. Call it from code compiled
    without fast-math, which would reorder the polynomial."""
    z = _fmuladd(x, _LOG2E, _EXP_SHIFT)
    n = z - _EXP_SHIFT
    b = _fmuladd(-n, _LN2_LO, _fmuladd(-n, _LN2_HI, x))
    e = _f32_bits(z) << np.uint32(23)
    k = _bits_f32(e + np.uint32(0x3F800000))  # + the bits of 1.0f
    u = b * b
    j = _fmuladd(_fmuladd(_fmuladd(_EXP_C5, b, _EXP_C4), u, _fmuladd(_EXP_C3, b, _EXP_C2)), u, _EXP_C1 * b)
    if not abs(n) > np.float32(126.0):
        return _fmuladd(k, j, k)
    g = np.uint32(0x82000000) if n <= np.float32(0.0) else np.uint32(0)
    s1 = _bits_f32(g + np.uint32(0x7F000000))
    if abs(n) > np.float32(192.0):
        return s1 * s1
    s2 = _bits_f32(e - g)
    return _fmuladd(s2, j, s2) * s1


@njit(inline="always")
def _q8_k_max(x, t, o, qk_k):
    """Largest |value| of the Q8_K super-block at x[t, o:o + qk_k], and that value (its sign
    sets the scale's, as in ggml: the first of equal magnitudes wins)."""
    amax = np.float32(0.0)
    vmax = np.float32(0.0)
    for j in range(qk_k):
        a = abs(x[t, o + j])
        if a > amax:
            amax = a
            vmax = x[t, o + j]
    return amax, vmax


@njit(inline="always")
def _round_f16(v):
    """Float32 v rounded to the nearest fp16 value (ties to even), kept as float32: below fp16's
    normal range to its fixed 2**-24 step, above by rounding away the low 13 mantissa bits, and
    past fp16's largest value to +-inf, as a float16 store would."""
    a = abs(v)
    if a < np.float32(6.103515625e-05):
        return np.rint(v * np.float32(16777216.0)) * np.float32(5.9604644775390625e-08)
    if a >= np.float32(65520.0):
        return np.float32(np.inf) if v > 0 else np.float32(-np.inf)
    u = _f32_bits(v)
    return _bits_f32((u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000))


@njit(inline="always")
def _f16_bits(v):
    """The fp16 bit pattern nearest float32 v (ties to even; inf past fp16's range, NaN not kept)."""
    u = _f32_bits(v)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a < np.uint32(0x38800000):  # below 2**-14: subnormal steps of 2**-24 (1024 is the first normal)
        h = np.uint32(np.rint(abs(v) * np.float32(16777216.0)))
    else:  # rebias the exponent (127 -> 15), round the 13 dropped mantissa bits (a carry bumps the exponent)
        h = (a - np.uint32(0x38000000) + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
        h = min(h, np.uint32(0x7C00))
    return sign | h


@njit(inline="always")
def _bf16_bits(v):
    """ggml_compute_fp32_to_bf16: the upper half of float32 v rounded to nearest even, NaNs
    kept NaN (forced quiet). Integer operations, immune to fast-math."""
    u = _f32_bits(v)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return (u >> np.uint32(16)) | np.uint32(64)
    return (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


def round_f16(x, out, r0, r1):
    """out[r] = x[r] rounded to fp16 precision (as float32), rows r0 <= r < r1."""
    n = x.shape[1]
    for r in range(r0, r1):
        for j in range(n):
            out[r, j] = _round_f16(x[r, j])


def geglu_f16(g, u, tab, r0, r1):
    """g[r] = gelu(g[r]) * u[r] in place, rows r0 <= r < r1, GELU as ggml's GGML_GELU_FP16 build
    computes it: the input rounded to fp16 indexes a table of results (tab, float32 by fp16 bit
    pattern), x <= -10 gives 0 and x >= 10 gives x."""
    n = g.shape[1]
    for r in range(r0, r1):
        for j in range(n):
            g[r, j] = gelu_f16(g[r, j], tab) * u[r, j]


@njit(inline="always")
def gelu_f16(x, tab):
    """GELU of one value the GGML_GELU_FP16 way (see geglu_f16); shared with the decode step."""
    if x <= np.float32(-10.0):
        return np.float32(0.0)
    if x >= np.float32(10.0):
        return x
    return tab[_f16_bits(x)]


def softmax_f16(s, q0, group, k0, window):
    """Masked softmax of attention scores in place, probabilities rounded to fp16 (as ggml's
    float16 V cache product sees them). s (n_kv, rows, n_keys): row r is the query at position
    q0 + r // group, column j the key at position k0 + j; a query sees keys at or before its own
    position and, if window > 0, after position - window. Sums in float64 and scales by the
    reciprocal, as ggml_soft_max does."""
    n_kv, rows, nk = s.shape
    for h in range(n_kv):
        for r in range(rows):
            qp = q0 + r // group
            hi = min(nk, qp - k0 + 1)
            lo = max(0, qp - window + 1 - k0) if window > 0 else 0
            m = np.float32(-np.inf)
            for j in range(lo, hi):
                m = max(m, s[h, r, j])
            total = 0.0
            for j in range(lo, hi):
                e = np.exp(s[h, r, j] - m)
                s[h, r, j] = e
                total += e
            inv = np.float32(1.0 / total)
            for j in range(lo):
                s[h, r, j] = 0
            for j in range(lo, hi):
                s[h, r, j] = _round_f16(s[h, r, j] * inv)
            for j in range(hi, nk):
                s[h, r, j] = 0


def q8_0_roundtrip(x, out, qk, r0, r1):
    """out[r] = dequant(Q8_0(x[r])), rows r0 <= r < r1: quantize_q8_0's values times its
    fp16-rounded scales, bit for bit, without storing the blocks (prefill's BLAS input)."""
    nb = x.shape[1] // qk
    for t in range(r0, r1):
        for b in range(nb):
            o = b * qk
            amax = np.float32(0.0)
            for j in range(qk):
                amax = max(amax, abs(x[t, o + j]))
            d = _round_f16(amax / np.float32(127.0))
            inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
            for j in range(qk):
                out[t, o + j] = np.rint(x[t, o + j] * inv) * d


def q8_k_roundtrip(x, out, qk_k, r0, r1):
    """out[r] = dequant(Q8_K(x[r])), rows r0 <= r < r1, bit for bit as quantize_q8_k's values
    times its scales."""
    nb = x.shape[1] // qk_k
    for t in range(r0, r1):
        for b in range(nb):
            o = b * qk_k
            amax, vmax = _q8_k_max(x, t, o, qk_k)
            if amax == 0:
                for j in range(qk_k):
                    out[t, o + j] = 0
                continue
            iscale = np.float32(-127.0) / vmax
            # max() with -FLT_MAX changes no finite d, but hides the division from reassociation,
            # which would otherwise fold q * (1 / iscale) into q / iscale (a different rounding).
            d = max(np.float32(1.0) / iscale, np.float32(-3.4028235e38))
            for j in range(qk_k):
                out[t, o + j] = min(np.float32(127.0), np.rint(iscale * x[t, o + j])) * d


# --- exported signatures (AOT) -----------------------------------------------------------------

def _signatures() -> dict:
    from numba import types as nt

    w_q = nt.Array(nt.uint8, 2, "C", readonly=True)  # weights are read-only mmap views
    w_f32 = nt.Array(nt.float32, 2, "C", readonly=True)
    w_u16 = nt.Array(nt.uint16, 2, "C", readonly=True)
    f32_2d = nt.float32[:, ::1]
    tab = nt.Array(nt.float32, 1, "C", readonly=True)
    ids = nt.int64[::1]
    i64 = nt.int64
    sigs = {
        "quantize_q8_0": nt.void(f32_2d, f32_2d, f32_2d, f32_2d, i64),
        "quantize_q8_k": nt.void(f32_2d, f32_2d, f32_2d, f32_2d, i64),
        "mv_f32": nt.void(w_f32, f32_2d, f32_2d, i64, i64),
        "mv_f16": nt.void(w_u16, f32_2d, f32_2d, i64, i64, tab),
        "dq_f16": nt.void(w_u16, ids, f32_2d, tab),
        "mv_bf16": nt.void(w_u16, f32_2d, f32_2d, i64, i64, tab),
        "dq_bf16": nt.void(w_u16, ids, f32_2d),
        # buf may be a read-only mmap of the file
        "scan_strings": i64(nt.Array(nt.uint8, 1, "C", readonly=True), i64, i64, ids, ids),
    }
    for qtype in sorted(BLOCK_TYPES):
        name = qtype.name.lower()
        sums = (f32_2d,) if qtype in WITH_SUMS else ()  # xs: Q8_1 d*sum / Q8_K bsums
        sigs[f"mv_{name}"] = nt.void(w_q, f32_2d, f32_2d, *sums, f32_2d, i64, i64, tab, i64)
        sigs[f"dq_{name}"] = nt.void(w_q, ids, f32_2d, tab, i64)
    for qtype in PACKED_LAYOUT:
        name = qtype.name.lower()
        sigs[f"mv_{name}_packed"] = sigs[f"mv_{name}"]
        sigs[f"pack_{name}"] = nt.void(w_q, nt.uint8[:, ::1], i64, i64)
    f32_3d = nt.float32[:, :, ::1]
    sigs["round_f16"] = nt.void(f32_2d, f32_2d, i64, i64)
    sigs["geglu_f16"] = nt.void(f32_2d, f32_2d, tab, i64, i64)
    sigs["softmax_f16"] = nt.void(f32_3d, i64, i64, i64, i64)
    sigs["q8_0_roundtrip"] = nt.void(f32_2d, f32_2d, i64, i64, i64)
    sigs["q8_k_roundtrip"] = nt.void(f32_2d, f32_2d, i64, i64, i64)
    return sigs


SIGNATURES = _signatures()
KERNEL_NAMES = tuple(SIGNATURES)
