"""Q4_0/Q4_K/Q5_0/Q6_K/Q8_0 matrices of 8k rows repacked once, at load, 8 rows interleaved (NumPy only).

A decode reads each weight once per token, so it is bound by memory only if its kernel spends
less than a byte's read time per byte. On the file's layout the 8-row tiles (src/tiles.py) first
copy 8 rows into a per-call tile: at one token that copy costs more than the memory read
(llama.cpp repacks these matrices at load for the same reason, ggml-cpu/repack.cpp). Here each
8-row group's blocks are rearranged once into the tile's vectors, still 4-bit: vector m of a
32-byte chunk holds bytes 4m..4m+3 of each of the 8 rows (row j at 4j..4j+3), whose low and high
nibbles are two of the tile's 4-value groups. The scales come first: d (and dmin) as 8 fp16,
Q4_K's 6-bit scales and mins as bytes.

PACKED_LAYOUT gives, per type, one 8-row block's bytes and where each part starts in it:
- Q4_0 (144 bytes, as 8 file blocks): d [row] fp16, then qs [m 4][row 8][4 bytes].
- Q5_0 (176 bytes, as 8 file blocks): d [row] fp16, high [row 8][4 bytes], qs as Q4_0's. Byte
  4j + b of `high` holds in bit k the fifth bit of row j's value 4k + b, so the tile's group k
  (values + 16, unsigned 5-bit) is Q4_0's nibbles ORed with that bit moved to bit 4.
- Q8_0 (272 bytes, as 8 file blocks): d [row] fp16, then qs [k 8][row 8][4 bytes] (the tile's
  group k as it is: Q8_0's values are already bytes, so its prompts skip the per-call tile copy).
- Q4_K (1184 bytes, 8 file blocks are 1152): d [row] fp16, dmin [row] fp16, scales
  [sub-block 8][row 8] u8, mins [pair 4][row 8][2] u8 (sub-blocks 2p, 2p + 1), qs
  [chunk 4][m 8][row 8][4 bytes] (chunk c: the low nibbles are sub-block 2c, the high 2c + 1).
- Q6_K (1680 bytes, as 8 file blocks): d [row] fp16, scales [pair 8][row 8][2] i8 (scales 2p,
  2p + 1), qs [quarter 8][half 2][vector 3][row 8][4 bytes]: the 6-bit values 4m..4m+3 of
  quarter q (values 32q..), m = 4 * half + n, are vector n's low 6 bits for n = 0, 1 and vector
  2's for n = 3; the 2-bit parts of m = 4 * half + 2 are the 3 vectors' top bits (low part in
  vector 0). Four value groups come out of 3 loads in about 8 vector steps (ggml's ql/qh split
  takes about 13).
A packed matrix keeps the shape (rows, packed row bytes): the group of rows 8g..8g+7 is its
rows' bytes, so a thread's rows (boundaries on multiples of 8) are its own bytes.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ggufile.runtime.gguf.constants import QUANT_TABLE, GGMLType

ROWS = 8
# where a file block's qs start (after d, and Q5_0's 4 bytes of fifth bits)
FILE_QS = {GGMLType.Q4_0: 2, GGMLType.Q5_0: 6, GGMLType.Q8_0: 2}


class PackedLayout(NamedTuple):
    block_bytes: int  # one block of 8 rows
    d: int            # 8 fp16 d (Q4_K: then 8 fp16 dmin)
    scales: int       # Q4_K only (-1: none)
    mins: int
    qs: int
    high: int = -1    # Q5_0 only: the values' fifth bits


PACKED_LAYOUT = {
    GGMLType.Q4_0: PackedLayout(block_bytes=144, d=0, scales=-1, mins=-1, qs=16),
    GGMLType.Q5_0: PackedLayout(block_bytes=176, d=0, scales=-1, mins=-1, qs=48, high=16),
    GGMLType.Q4_K: PackedLayout(block_bytes=1184, d=0, scales=32, mins=96, qs=160),
    GGMLType.Q8_0: PackedLayout(block_bytes=272, d=0, scales=-1, mins=-1, qs=16),
    GGMLType.Q6_K: PackedLayout(block_bytes=1680, d=0, scales=16, mins=-1, qs=144),
}


def packable(qtype: GGMLType, rows: int) -> bool:
    return qtype in PACKED_LAYOUT and rows % ROWS == 0


def packed_row_bytes(qtype: GGMLType, k: int) -> int:
    return k // QUANT_TABLE[qtype].block_size * PACKED_LAYOUT[qtype].block_bytes // ROWS


def _by_block(a: np.ndarray) -> np.ndarray:
    """(groups, 8 rows, nb, ...) -> (groups, nb, 8 rows, ...) flattened past nb."""
    t = np.moveaxis(a, 1, 2)
    return t.reshape(t.shape[0], t.shape[1], -1)


def _k4_scales_mins(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 packed bytes (..., 12) -> the 8 scales and the 8 mins (..., 8), ggml's get_scale_min_k4."""
    lo, hi = q[..., 0:4], q[..., 4:8]
    top = q[..., 8:12]
    scales = np.concatenate([lo & 63, (top & 15) | ((lo >> 6) << 4)], axis=-1)
    mins = np.concatenate([hi & 63, (top >> 4) | ((hi >> 6) << 4)], axis=-1)
    return scales, mins


def q6_k_values(b: np.ndarray) -> np.ndarray:
    """Q6_K blocks (..., 210) -> their 256 unsigned 6-bit values (..., 256), ggml's order."""
    ql, qh = b[..., 0:128].reshape(*b.shape[:-1], 2, 64), b[..., 128:192].reshape(*b.shape[:-1], 2, 32)
    lo = np.stack([ql[..., 0:32] & 15, ql[..., 32:64] & 15, ql[..., 0:32] >> 4, ql[..., 32:64] >> 4], axis=-2)
    hi = np.stack([(qh >> (2 * k)) & 3 for k in range(4)], axis=-2)
    return (lo | (hi << 4)).reshape(*b.shape[:-1], 256)


def _pack_q6_k(a: np.ndarray, out: np.ndarray, lay: PackedLayout) -> None:
    groups, _, nb, _ = a.shape
    out.view(np.uint16)[:, :, 0:8] = _by_block(a.view(np.uint16)[..., 104:105])
    pairs = a[..., 192:208].view(np.uint16).reshape(groups, ROWS, nb, 8)
    out.view(np.uint16)[:, :, lay.scales // 2:lay.qs // 2] = pairs.transpose(0, 2, 3, 1).reshape(groups, nb, -1)
    v = q6_k_values(a).reshape(groups, ROWS, nb, 8, 2, 4, 4)  # (quarter, half, n, 4 values)
    split = v[..., 2, :]
    vectors = np.stack([v[..., 0, :] | ((split & 3) << 6), v[..., 1, :] | (((split >> 2) & 3) << 6),
                        v[..., 3, :] | ((split >> 4) << 6)], axis=-2)  # (quarter, half, vector, 4)
    out[:, :, lay.qs:] = vectors.transpose(0, 2, 3, 4, 5, 1, 6).reshape(groups, nb, -1)


def _q5_0_high(a: np.ndarray) -> np.ndarray:
    """Q5_0 blocks (..., 22) -> their fifth bits as the layout's `high` (..., 4): byte b's bit k
    is value 4k + b's."""
    bits = np.unpackbits(a[..., 2:6], axis=-1, bitorder="little").reshape(*a.shape[:-1], 8, 4)  # (k, b)
    return (bits << np.arange(8, dtype=np.uint8).reshape(8, 1)).sum(axis=-2, dtype=np.uint8)


def pack(qtype: GGMLType, w: np.ndarray) -> np.ndarray:
    """The packed copy of w (rows, row bytes) uint8, rows a multiple of 8 (PACKED_LAYOUT)."""
    rows, rb = w.shape
    block = QUANT_TABLE[qtype].type_size
    nb, groups, lay = rb // block, rows // ROWS, PACKED_LAYOUT[qtype]
    a = w.reshape(groups, ROWS, nb, block)
    out = np.empty((groups, nb, lay.block_bytes), dtype=np.uint8)
    # the byte moves as wide as the layouts allow (2-byte units for Q4_0's 18-byte blocks, 4 for
    # Q4_K's 144), which NumPy copies several times faster than single bytes
    if qtype == GGMLType.Q6_K:
        _pack_q6_k(a, out, lay)
    elif qtype in (GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0):
        a16, out16 = a.view(np.uint16), out.view(np.uint16)
        out16[:, :, lay.d // 2:lay.d // 2 + ROWS] = _by_block(a16[..., 0:1])
        first = FILE_QS[qtype] // 2
        qs = a16[..., first:].reshape(groups, ROWS, nb, (block - 2 * first) // 4, 2)  # (m, 2-byte half)
        out16[:, :, lay.qs // 2:] = qs.transpose(0, 2, 3, 1, 4).reshape(groups, nb, -1)
        if qtype == GGMLType.Q5_0:
            out[:, :, lay.high:lay.qs] = _by_block(_q5_0_high(a))
    else:
        a16, out16 = a.view(np.uint16), out.view(np.uint16)
        out16[:, :, lay.d // 2:lay.scales // 2] = np.concatenate([_by_block(a16[..., 0:1]), _by_block(a16[..., 1:2])],
                                                               axis=-1)
        scales, mins = _k4_scales_mins(a[..., 4:16])  # (groups, row, nb, sub-block)
        out[:, :, lay.scales:lay.mins] = scales.transpose(0, 2, 3, 1).reshape(groups, nb, -1)
        pairs = mins.view(np.uint16).reshape(groups, ROWS, nb, 4)  # (pair): sub-blocks 2p, 2p + 1
        out16[:, :, lay.mins // 2:lay.qs // 2] = pairs.transpose(0, 2, 3, 1).reshape(groups, nb, -1)
        qs = a.view(np.uint32)[..., 4:].reshape(groups, ROWS, nb, 4, 8)  # (chunk, m)
        out.view(np.uint32)[:, :, lay.qs // 4:] = qs.transpose(0, 2, 3, 4, 1).reshape(groups, nb, -1)
    return out.reshape(rows, -1)
