"""Matmuls of several tokens on weight rows interleaved 8 at a time (prompts).

llama.cpp repacks Q4_0/Q4_K matrices of 8k rows and sums each row as exact integer block sums,
each FMA-added with d_w * d_x into one float per row (lanes._repacked_row). An integer sum is
the same whatever order builds it, so any kernel that keeps those float steps gives llama.cpp's
bits. Here a thread first copies 8 rows into a tile (`interleave`) where, for each 4 values k of
a 32-value group, one 32-byte vector holds the 8 rows' 4 unsigned 4-bit values (row j at bytes
4j..4j+3). `gemm` then multiplies it by a token's 4 bytes broadcast (vpmaddubsw): the 8 rows'
partial sums come out as the 8 lanes of one vector, so there is no per-row horizontal sum, and
each block's float steps are 3 vector operations for 8 rows. The copy is made once per call and
serves all its tokens (up to model/step.py's CHUNK). Sums stay 16-bit inside a 32-value group:
8 x 2 x 15 x 128 = 30720 < 2^15, so nothing saturates. With AVX512-VNNI (the x86-64-v4-vnni
variant) one vpdpbusd gives a group's int32 lanes straight away: Q4_0 sums a block in int32,
Q4_K multiplies each sub-block's int32 sum by its scale, Q5_0 and Q8_0 (its values taken as
w ^ 0x80 = w + 128, unsigned) start each lane's sum at yc = -offset x the token's 4 values: the
same integers in fewer instructions.

Tile layout (one per thread and call; nb blocks, Q4_0 32 values, Q4_K 256):
- `tq` uint8: Q4_0 block i, group k at (8i + k) * 32; Q4_K super-block i, sub-block s, group k
  at (64i + 8s + k) * 32.
- `tsm` int16 (Q4_K): at (12i + s) * 16 sub-block s's scales, each row's twice (element 2j and
  2j + 1: pmaddwd multiplies a row's two 16-bit sums by it); at (12i + 8 + p) * 16 the mins of
  sub-blocks 2p and 2p + 1 (elements 2j, 2j + 1).
- `td` float32: at 16i + j row j's d, at 16i + 8 + j its dmin.
Token side (`column_sums`, `yc` int32): Q4_0 per block 8 * (sum of the 32 values), the offset
the unsigned nibbles leave (value - 8); Q4_K per sub-block pair p the two 32-value sums as a
pair of int16 (from Q8_K's group sums).

Q4_1/Q5_0/Q5_1/Q8_0 (`LANE_TYPES`) are not repacked by llama.cpp: their vec_dot keeps 8 float
lanes per row, lane k the products of values 4k..4k+3 of each block, each block FMA-added into
its lane, hsum_float_8 at the end. Their tile has the same layout as Q4_0's (group k of block i:
the 8 rows' values 4k..4k+3, the block's values as vec_dot sees them: signed for Q5_0/Q8_0,
unsigned for Q4_1/Q5_1), so one dot of group k against the token's 4 bytes gives lane k of all 8
rows, and the 8 lanes' float accumulators are 8 vectors: vec_dot's FMAs and hsum_float_8 run
vertically, 8 rows at once, the same bits. td: at 16i + j row j's d, at 16i + 8 + j its m.

Q6_K (not repacked by llama.cpp on x86 either) keeps vec_dot's 8 lanes too: its quarter q
(values 32q..32q+31, unsigned 6-bit) takes Q4_K's sub-block place in tq; lane m of a row is
the sum over quarters of scale(q, m // 4) * (its values 4m..4m+3 . y) less 32 * (the row's
scales 2m, 2m + 1 . the token's group sums 2m, 2m + 1), FMA-added per super-block
(`_interleave_q6_k`, `_gemm_q6_k`). Packed at load (kernels/packing.py), a decode reads its
groups straight from the packed rows, 3 loads and a few bit steps per 4 groups (no per-row
scale shuffles, 8 rows a vector: 2x the one-row kernel), and a prompt from 16 tokens unpacks
each 8 rows once into the tile (`unpack_packed`) for all its tokens.

Q5_0 packed at load keeps Q4_0's nibble vectors and one vector of the 8 rows' fifth bits per
block (packing.py): a group is its nibbles ORed with its bit moved to 16, the tile's values + 16
straight from the packed rows (gemma-3-270m's 640-wide matrices are Q5_0 in its Q4_K_M file).

With AVX512-VNNI (the x86-64-v4-vnni variant), packed Q4_0/Q4_K/Q5_0/Q8_0 matrices go 16 rows at a
time: one 512-bit vector holds two 8-row groups' vectors side by side (`_Packed16`), so every
integer and float step covers 16 rows in one instruction, each row's lanes and float order its
own (the same bits). Q6_K prompts unpack 16 rows into a tile whose vectors each hold both
groups' (`_Tile` of 2 groups), one 512-bit load apiece. One thread, 2048 x 2048, 64 tokens:
Q4_K 186 -> 261-288 GOP/s, Q4_0 213 -> 305-312, Q8_0 113 -> 148, Q6_K 104-112 -> 132-178.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from ggufile.runtime.gguf.constants import QK, QK_K, QUANT_TABLE, GGMLType
from ggufile.runtime.kernels.packing import PACKED_LAYOUT
from ggufile.runtime.kernels.src import lanes
from ggufile.runtime.kernels.src.lanes import F32, I8, I16, I32, I64, Emit, _splat, _vec

ROWS = 8
_Q4_0, _Q4_K = lanes.Q4_0_REPACKED, lanes.Q4_K_REPACKED
_Q4_1, _Q5_0, _Q5_1, _Q8_0 = (int(t) for t in (GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0))
_Q6_K = int(GGMLType.Q6_K)


class _LaneType(NamedTuple):
    values: Callable  # lanes.*_values(e, row, o): the block's 32 values as vec_dot sees them
    signed: bool      # dot_i8 (abs/sign steps) or dot_u8
    with_min: bool    # Q4_1/Q5_1: m_w * s_x summed per row, added after the lanes
    # Q5_0's values + 16 are unsigned (0..31, so maddubs cannot saturate): the tile keeps them so,
    # one dot_u8 less abs and sign, and each lane takes off 16 * its 4 token values (column_sums)
    offset: int = 0


LANE_TYPES = {
    _Q4_1: _LaneType(lanes.q4_1_values, signed=False, with_min=True),
    _Q5_0: _LaneType(lanes.q5_0_values, signed=False, with_min=False, offset=16),
    _Q5_1: _LaneType(lanes.q5_1_values, signed=False, with_min=True),
    _Q8_0: _LaneType(lanes.q8_0_values, signed=True, with_min=False),
}
_Q5_0_OFFSET, _Q8_0_VNNI_OFFSET = LANE_TYPES[_Q5_0].offset, 128
# tq bytes per block: 32 bytes for each 4-value group of the block (plain ints: matmul reads them)
_QK_TILE_BYTES, _Q4_K_TILE_BYTES = (QK // 4) * 32, (QK_K // 4) * 32
_BLOCK_BYTES = {q: QUANT_TABLE[GGMLType(q % lanes.REPACKED)].type_size for q in (_Q4_0, _Q4_K, _Q6_K, *LANE_TYPES)}
# tsm int16 per block: Q4_K 8 scale + 4 min vectors of 16; Q6_K 16 scale + 8 scale-pair vectors
TSM_PER_BLOCK, TSM_Q6_K_PER_BLOCK, TD_PER_BLOCK = 12 * 16, 24 * 16, 16
_PACKED_LAYOUT = {q: PACKED_LAYOUT[GGMLType(q % lanes.REPACKED)] for q in (_Q4_0, _Q4_K, _Q5_0, _Q6_K, _Q8_0)}
# How far ahead a packed matrix's block loop asks for its cache lines (0: not at all). A decode
# streams the rows from memory; for Q4_0, whose loop is short, the hardware prefetcher alone
# left a sixth of the bandwidth unused (1.2 GB, 2 threads: 20.6 -> 25.6 GB/s, a STREAM-like read
# 30); Q4_K's longer loop lost speed with any distance tried (23.1 -> 15-21 GB/s).
PREFETCH_BYTES = {_Q4_0: 1024, _Q4_K: 0, _Q5_0: 1024, _Q6_K: 0, _Q8_0: 1024}
# From this many tokens a matmul goes through the tiles; below, the copy costs more than it
# saves. Q4_0 gains even for one token: its vec_dot order needs a horizontal sum per block and
# row, which the tile does 8 rows at a time (2048 x 2048, one thread: 1.6x at 1 token, 7x at 64).
# Q6_K's tile (16 i32 and float accumulators a token) beats its one-row kernel from 16 tokens
# (2048 x 2048, one thread, another job running: 16 tokens 76 -> 92 GOP/s, 64: 72 -> 103; at 4,
# 77 -> 57).
MIN_TOKENS = {_Q4_0: 1, _Q4_K: 3, _Q6_K: 16, **{q: 4 for q in LANE_TYPES}}
_Q4_0_MIN, _Q4_K_MIN, _Q6_K_MIN, _LANES_MIN = MIN_TOKENS[_Q4_0], MIN_TOKENS[_Q4_K], MIN_TOKENS[_Q6_K], MIN_TOKENS[_Q8_0]
# From this many tokens a packed matrix goes 16 rows a pass under AVX512-VNNI (Q6_K prompts: from
# MIN_TOKENS). Fewer tokens stream the weights from memory, and two 8-row streams read at once
# left much of the bandwidth unused (Zen 5, 57344 x 4096 Q4_K, one token, one thread: 8 rows
# 38-42 GB/s, 16 rows 27; 8B Q4_K_M decode 10-11 -> 14.1-14.6 tok/s on 2 threads); at 2 tokens
# 8 rows were still faster for Q4_0/Q4_K (213 against 140 GOP/s), 16 for Q8_0 (140 against 105).
WIDE_MIN_TOKENS = {_Q4_0: 3, _Q4_K: 3, _Q5_0: 2, _Q8_0: 2}
_Q4_0_WIDE, _Q4_K_WIDE, _Q5_0_WIDE, _Q8_0_WIDE = (WIDE_MIN_TOKENS[q] for q in (_Q4_0, _Q4_K, _Q5_0, _Q8_0))


def _transpose8(e, rows):
    """8 x <8 x i32> -> 8 x <8 x i32>, out[k][j] = rows[j][k] (unpack 32, unpack 64, permute 128)."""
    lo32, hi32 = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    lo64, hi64 = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    first, second = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    t = [e.shuffle(rows[2 * p], rows[2 * p + 1], m) for p in range(4) for m in (lo32, hi32)]
    u = []
    for h in (0, 4):  # rows 0-3, rows 4-7
        t0, t1, t2, t3 = t[h:h + 4]
        u += [e.shuffle(t0, t2, lo64), e.shuffle(t0, t2, hi64), e.shuffle(t1, t3, lo64), e.shuffle(t1, t3, hi64)]
    out = [None] * 8
    for k in range(4):
        out[k], out[k + 4] = e.shuffle(u[k], u[k + 4], first), e.shuffle(u[k], u[k + 4], second)
    return out


def _store(e, base, offset, value):
    e.b.store(value, e.b.bitcast(e.at(base, offset), value.type.as_pointer()), align=1)


def _store_groups(e, tq, at, values):
    """The 8 rows' 32 values (<32 x i8> each) as 8 interleaved groups from byte `at` of tq."""
    groups = _transpose8(e, [e.b.bitcast(v, _vec(I32, 8)) for v in values])
    for k, g in enumerate(groups):
        _store(e, tq, e.plus(at, 32 * k), g)


def _interleave_q4_0(e, rows, tq, tsm, td, tab, i):
    o = e.index(i, _BLOCK_BYTES[_Q4_0])
    _store_groups(e, tq, e.index(i, _QK_TILE_BYTES),
                  [e.nibbles(e.load(row, e.plus(o, 2), I8, 16)) for row in rows])
    for j, row in enumerate(rows):
        _store(e, td, e.index(i, 4 * TD_PER_BLOCK, 4 * j), e.f16(tab, row, o))


def _interleave_q4_k(e, rows, tq, tsm, td, tab, i):
    o = e.index(i, _BLOCK_BYTES[_Q4_K])
    for s in range(QK_K // 32):
        _store_groups(e, tq, e.index(i, _Q4_K_TILE_BYTES, 256 * s),
                      [lanes._k4_nibbles(e, row, e.plus(o, 16), s) for row in rows])
    for j, row in enumerate(rows):
        sm = lanes._k4_scales_mins(e, row, o)  # 8 scales, 8 mins
        for s in range(8):
            scale = e.lane(sm, s)
            for half in (0, 1):
                _store(e, tsm, e.index(i, 2 * TSM_PER_BLOCK, 32 * s + 4 * j + 2 * half), scale)
            _store(e, tsm, e.index(i, 2 * TSM_PER_BLOCK, 32 * (8 + s // 2) + 4 * j + 2 * (s % 2)), e.lane(sm, 8 + s))
        _store(e, td, e.index(i, 4 * TD_PER_BLOCK, 4 * j), e.f16(tab, row, o))
        _store(e, td, e.index(i, 4 * TD_PER_BLOCK, 32 + 4 * j), e.f16(tab, row, e.plus(o, 2)))


def _interleave_lanes(q, e, rows, tq, tsm, td, tab, i):
    o = e.index(i, _BLOCK_BYTES[q])
    kind = LANE_TYPES[q]
    values = [kind.values(e, row, o) for row in rows]
    if kind.offset:
        values = [e.b.add(v, _splat(I8, 32, kind.offset)) for v in values]
    _store_groups(e, tq, e.index(i, _QK_TILE_BYTES), values)
    for j, row in enumerate(rows):
        _store(e, td, e.index(i, 4 * TD_PER_BLOCK, 4 * j), e.f16(tab, row, o))
        if kind.with_min:
            _store(e, td, e.index(i, 4 * TD_PER_BLOCK, 32 + 4 * j), e.f16(tab, row, e.plus(o, 2)))


def _interleave_q6_k(e, rows, tq, tsm, td, tab, i):
    """Quarter q (values 32q..32q+31) as 'sub-block' q of the Q4_K layout; tsm: at (24i + s) * 16
    scale s, each row's twice; at (24i + 16 + m) * 16 scales 2m, 2m + 1 of each row (elements
    2j, 2j + 1); td: d."""
    o = e.index(i, _BLOCK_BYTES[_Q6_K])
    for q in range(QK_K // 32):
        _store_groups(e, tq, e.index(i, _Q4_K_TILE_BYTES, 256 * q),
                      [lanes._q6_k_quarter(e, row, o, q // 4, q % 4) for row in rows])
    for j, row in enumerate(rows):
        scales = e.b.sext(e.load(row, e.plus(o, 192), I8, 16), _vec(I16, 16))
        for sc in range(16):
            for half in (0, 1):
                _store(e, tsm, e.index(i, 2 * TSM_Q6_K_PER_BLOCK, 32 * sc + 4 * j + 2 * half), e.lane(scales, sc))
            _store(e, tsm, e.index(i, 2 * TSM_Q6_K_PER_BLOCK, 32 * (16 + sc // 2) + 4 * j + 2 * (sc % 2)),
                   e.lane(scales, sc))
        _store(e, td, e.index(i, 4 * TD_PER_BLOCK, 4 * j), e.f16(tab, row, e.plus(o, 208)))


def _interleave_body(q):
    if q in LANE_TYPES:
        return lambda *a: _interleave_lanes(q, *a)
    return {_Q4_0: _interleave_q4_0, _Q4_K: _interleave_q4_k, _Q6_K: _interleave_q6_k}[q]


def _data(context, builder, ty, value):
    return context.make_array(ty)(context, builder, value).data


@intrinsic
def interleave(typingctx, qtype, w, r, nb, tab, tq, tsm, td):
    """Rows r..r+7 of w (uint8, each row's bytes) into the tile tq, tsm, td (module docstring)."""
    if not isinstance(qtype, types.IntegerLiteral):
        raise errors.RequireLiteralValue(qtype)
    body = _interleave_body(qtype.literal_value)

    def codegen(context, builder, sig, args):
        e = Emit(context, builder)
        wa = context.make_array(sig.args[1])(context, builder, args[1])
        rows = [cgutils.get_item_pointer(context, builder, sig.args[1], wa,
                                         [builder.add(args[2], ir.Constant(I64, j)), ir.Constant(I64, 0)])
                for j in range(ROWS)]
        tab_p, tq_p, tsm_p, td_p = (_data(context, builder, sig.args[k], args[k]) for k in (4, 5, 6, 7))
        tq_p, tsm_p, td_p = (builder.bitcast(p, I8.as_pointer()) for p in (tq_p, tsm_p, td_p))

        def block(i, accs):
            body(e, rows, tq_p, tsm_p, td_p, tab_p, i)
            return []
        e.block_loop(args[3], [], block)
        return context.get_dummy_value()
    return types.void(qtype, w, types.int64, types.int64, tab, tq, tsm, td), codegen


def _unpack_q6_k(e, sources, tq, tsm, td, i):
    """Block i of 8 packed Q6_K rows a source into the tile: the same vectors the packed source
    gives, each group's side by side (_Tile's layout for len(sources) groups)."""
    g = len(sources)
    for h, src in enumerate(sources):
        for q in range(QK_K // 32):
            for m in range(QK // 4):
                _store(e, tq, e.index(i, g * _Q4_K_TILE_BYTES, g * (256 * q + 32 * m) + 32 * h), src.group(i, q, m))
        for s in range(16):
            _store(e, tsm, e.index(i, 2 * g * TSM_Q6_K_PER_BLOCK, g * 32 * s + 32 * h), src.q6_scales(i, s // 2, s % 2))
        for p in range(8):
            _store(e, tsm, e.index(i, 2 * g * TSM_Q6_K_PER_BLOCK, g * 32 * (16 + p) + 32 * h),
                   src.q6_scale_pairs(i, p))
        _store(e, td, e.index(i, 4 * g * TD_PER_BLOCK, 32 * h), src.d(i))


@intrinsic
def unpack_packed(typingctx, qtype, groups, w, r, nb, tab, tq, tsm, td):
    """Rows r..r + 8 * groups - 1 of a packed Q6_K matrix w into the tile tq, tsm, td (for one
    group interleave's result): a prompt's tokens then skip the packed values' bit steps."""
    q, g = _literal(qtype, groups)

    def codegen(context, builder, sig, args):
        e = Emit(context, builder)
        wa = context.make_array(sig.args[2])(context, builder, args[2])
        tab_p = _data(context, builder, sig.args[5], args[5])
        sources = [_Packed(e, q, cgutils.get_item_pointer(context, builder, sig.args[2], wa,
                                                          [builder.add(args[3], ir.Constant(I64, ROWS * h)),
                                                           ir.Constant(I64, 0)]), tab_p) for h in range(g)]
        tq_p, tsm_p, td_p = (builder.bitcast(_data(context, builder, sig.args[k], args[k]), I8.as_pointer())
                             for k in (6, 7, 8))

        def block(i, accs):
            _unpack_q6_k(e, sources, tq_p, tsm_p, td_p, i)
            return []
        e.block_loop(args[4], [], block)
        return context.get_dummy_value()
    return types.void(qtype, groups, w, types.int64, types.int64, tab, tq, tsm, td), codegen


def _token_bytes(e, x8, at, width=ROWS):
    """The 4 int8 values at byte `at` of a token's x8 row, broadcast to <4 * width x i8>."""
    return e.b.bitcast(e.broadcast(e.load(x8, at, I32), width), _vec(I8, 4 * width))


class _Tile:
    """Where gemm finds a per-call tile's parts (the module docstring's tq, tsm, td). A tile of
    `groups` 8-row groups holds each of its vectors for rows 0-7, then the same for rows 8-15..:
    one load gives all the groups' (half None), or the 8 rows of group `half`."""

    def __init__(self, e, q, tq, tsm, td, groups=1, half=None):
        self.e, self.tq, self.tsm, self.td, self.groups = e, tq, tsm, td, groups
        self.stride = _Q4_K_TILE_BYTES if q in (_Q4_K, _Q6_K) else _QK_TILE_BYTES
        self.width = ROWS * groups if half is None else ROWS  # rows a vector holds
        self.skip = 0 if half is None else 32 * half  # each part is 32 bytes per 8 rows

    def _load(self, base, i, block_bytes, at, ty, per_group):
        """The vector at byte `at` (an int or an i64 value) of block i's part. Here and below, a
        (sub-)block or group index may be an i64 value: a loop over them (_group_sums16)."""
        g = self.groups
        plus = self.e.scaled(at, g, self.skip)
        return self.e.load(base, self.e.index(i, g * block_bytes, plus), ty, per_group * self.width // ROWS)

    def prefetch(self, i):
        """The tile is in the caches already."""

    def group(self, i, s, k):
        """<32 x i8> a group: the 8 rows' values 4k..4k+3 of (sub-)block s of block i."""
        return self._load(self.tq, i, self.stride, self.e.total(self.e.scaled(s, 256), self.e.scaled(k, 32)), I8, 32)

    def d(self, i, which=0):
        """<8 x float> a group: the 8 rows' d (which 0) or dmin / m (which 1) of block i."""
        return self._load(self.td, i, 4 * TD_PER_BLOCK, 32 * which, F32, 8)

    def scales(self, i, s):
        """Q4_K: <16 x i16> a group, sub-block s's scales, each row's twice."""
        return self._load(self.tsm, i, 2 * TSM_PER_BLOCK, 32 * s, I16, 16)

    def scales32(self, i, s):
        """Q4_K: <8 x i32> a group, sub-block s's scales, one a row."""
        return self.e.b.zext(self.e.shuffle(self.scales(i, s), None, range(0, 2 * self.width, 2)),
                             _vec(I32, self.width))

    def mins(self, i, p):
        """Q4_K: <16 x i16> a group, row j's mins of sub-blocks 2p, 2p + 1 at elements 2j, 2j + 1."""
        return self._load(self.tsm, i, 2 * TSM_PER_BLOCK, 32 * (8 + p), I16, 16)

    def q6_scales(self, i, q, half):
        """Q6_K: <16 x i16> a group, scale 2q + half of each row twice (quarter q's first or
        second 16 values)."""
        return self._load(self.tsm, i, 2 * TSM_Q6_K_PER_BLOCK, self.e.scaled(q, 64, 32 * half), I16, 16)

    def q6_scale_pairs(self, i, m):
        """Q6_K: <16 x i16> a group, scales 2m, 2m + 1 of each row."""
        return self._load(self.tsm, i, 2 * TSM_Q6_K_PER_BLOCK, 32 * (16 + m), I16, 16)


class _Packed(_Tile):
    """Where gemm finds the same parts in 8 rows packed at load (`pack`, PACKED_LAYOUT)."""

    def __init__(self, e, q, rows, tab):
        self.e, self.rows, self.tab, self.q, self.width = e, rows, tab, q, ROWS
        self.layout = _PACKED_LAYOUT[q]

    def _at(self, i, part, plus=0):
        return self.e.index(i, self.layout.block_bytes, self.e.total(getattr(self.layout, part), plus))

    def prefetch(self, i):
        """The cache lines PREFETCH_BYTES ahead of block i."""
        if not PREFETCH_BYTES[self.q]:
            return
        ahead = -(-PREFETCH_BYTES[self.q] // self.layout.block_bytes) * self.layout.block_bytes
        for line in range(0, self.layout.block_bytes, 64):
            self.e.prefetch(self.rows, self.e.index(i, self.layout.block_bytes, ahead + line))

    def group(self, i, s, k):
        if self.q == _Q8_0:  # the tile's group k as it is
            return self.e.load(self.rows, self._at(i, "qs", 32 * k), I8, 32)
        if self.q == _Q6_K:
            return self._q6_k_group(i, s, k)
        if self.q == _Q5_0:
            return self.e.b.or_(self._nibbles(i, 0, k % 4, k // 4), self._q5_0_fifth_bits(i, k))
        if self.q == _Q4_0:  # vector m's low nibbles are values 4m.., its high ones 16 + 4m..
            chunk, m, high = 0, k % 4, k // 4
        else:  # sub-block s: chunk s // 2, low nibbles for s even
            chunk, m, high = s // 2, k, s % 2
        return self._nibbles(i, chunk, m, high)

    def _nibbles(self, i, chunk, m, high):
        bits = self.e.load(self.rows, self._at(i, "qs", self.e.scaled(m, 32, 256 * chunk)), I8, 32)
        if high:
            bits = self.e.b.lshr(bits, _splat(I8, 32, 4))
        return self.e.b.and_(bits, _splat(I8, 32, 15))

    def _q5_0_fifth_bits(self, i, k):
        """Group k's fifth bits as 16 (packing.py's `high`: bit k of each byte)."""
        b, v = self.e.b, self.e.load(self.rows, self._at(i, "high"), I8, 32)
        v = b.shl(v, _splat(I8, 32, 4 - k)) if k < 4 else (b.lshr(v, _splat(I8, 32, k - 4)) if k > 4 else v)
        return b.and_(v, _splat(I8, 32, 16))

    def d(self, i, which=0):
        return self.e.f16x8(self.tab, self.rows, self._at(i, "d", 16 * which))

    def scales(self, i, s):
        v = self.e.load(self.rows, self._at(i, "scales", 8 * s), I8, 8)
        return self.e.b.zext(self.e.shuffle(v, None, [j // 2 for j in range(16)]), _vec(I16, 16))

    def scales32(self, i, s):
        return self.e.b.zext(self.e.load(self.rows, self._at(i, "scales", 8 * s), I8, 8), _vec(I32, 8))

    def mins(self, i, p):
        return self.e.b.zext(self.e.load(self.rows, self._at(i, "mins", 16 * p), I8, 16), _vec(I16, 16))

    def _q6_k_group(self, i, q, m):
        """Quarter q's values 4m..4m+3 of the 8 rows (packing.py's Q6_K vectors)."""
        b, n = self.e.b, m % 4
        vec = [self.e.load(self.rows, self._at(i, "qs", self.e.scaled(q, 192, 96 * (m // 4) + 32 * v)), I8, 32)
               for v in range(3)]
        if n != 2:
            return b.and_(vec[n if n < 2 else 2], _splat(I8, 32, 63))
        low = b.lshr(vec[0], _splat(I8, 32, 6))
        mid = b.and_(b.lshr(vec[1], _splat(I8, 32, 4)), _splat(I8, 32, 12))
        top = b.and_(b.lshr(vec[2], _splat(I8, 32, 2)), _splat(I8, 32, 48))
        return b.or_(low, b.or_(mid, top))

    def q6_scale_pairs(self, i, m):  # the layout's own order: row j's scales 2m, 2m + 1 at bytes 2j, 2j + 1
        return self.e.b.sext(self.e.load(self.rows, self._at(i, "scales", 16 * m), I8, 16), _vec(I16, 16))

    def q6_scales(self, i, q, half):
        v = self.e.load(self.rows, self._at(i, "scales", self.e.scaled(q, 16)), I8, 16)
        return self.e.b.sext(self.e.shuffle(v, None, [2 * (j // 2) + half for j in range(16)]), _vec(I16, 16))


class _Packed16:
    """Two 8-row groups of a packed matrix side by side in 512-bit vectors (AVX512-VNNI): element
    j < 8 of each part is row j of the first group, 8 + j row j of the second. Each row's lanes
    and float steps stay its own, so the results are the 8-row kernel's bits, with half the
    instructions per multiply-add."""
    width = 2 * ROWS

    def __init__(self, e, q, rows, rows2, tab):
        self.e = e
        self.halves = (_Packed(e, q, rows, tab), _Packed(e, q, rows2, tab))

    def _both(self, part, *args):
        a, b = (getattr(h, part)(*args) for h in self.halves)
        return self.e.shuffle(a, b, range(2 * a.type.count))

    def prefetch(self, i):
        for h in self.halves:
            h.prefetch(i)

    def group(self, i, s, k):
        return self._both("group", i, s, k)

    def d(self, i, which=0):
        return self._both("d", i, which)

    def scales32(self, i, s):
        return self._both("scales32", i, s)

    def mins(self, i, p):
        return self._both("mins", i, p)

    def q6_scales(self, i, q, half):
        return self._both("q6_scales", i, q, half)

    def q6_scale_pairs(self, i, m):
        return self._both("q6_scale_pairs", i, m)


def _group_sums16_loop(e, src, i, subs, cols, x8_at):
    """_group_sums16 of each sub-block s of `subs` (their columns' lists), as a loop over the
    8 groups that LLVM cannot see through (Emit.opaque): unrolled, the 64 groups of a Q4_K
    super-block are one straight block, whose schedule unpacked every group's weights first,
    spilled them, and reloaded one from the stack per multiply. Q4_K's sub-blocks 2c and 2c + 1
    are the low and high nibbles of one packed vector, loaded once a group."""
    n = len(cols)

    def group(k, accs):
        new = list(accs)
        for h, s in enumerate(subs):
            wv = src.group(i, s, k)
            for c, col in enumerate(cols):
                y = _token_bytes(e, col.x8, e.b.add(x8_at(s), e.scaled(k, 4)))
                new[h * n + c] = e.b.add(new[h * n + c], e.maddubs(wv, y))
        return new
    accs = e.block_loop(e.opaque(QK // 4), [_splat(I16, 16, 0)] * (n * len(subs)), group)
    return [accs[h * n:h * n + n] for h in range(len(subs))]


def _group_sums16(e, src, i, s, cols, x8_at):
    """Per column: <16 x i16>, the 8 rows' sums (2 lanes each) over the 32 values of (sub-)block
    s of block i against the column's 32 values at byte x8_at of its x8 row."""
    acc = [_splat(I16, 16, 0)] * len(cols)
    for k in range(QK // 4):
        wv = src.group(i, s, k)
        for c, col in enumerate(cols):
            acc[c] = e.b.add(acc[c], e.maddubs(wv, _token_bytes(e, col.x8, e.plus(x8_at, 4 * k))))
    return acc


class _Column(NamedTuple):
    """One token's pointers (its x8 row, xd, yc and xs rows) and its accumulators."""
    x8: ir.Value
    xd: ir.Value
    yc: ir.Value
    xs: ir.Value
    accs: list


def _group_sums32(e, src, i, s, cols, x8_at):
    """Per column: <8 x i32>, row j's sum over the 32 values of (sub-)block s of block i against
    the column's 32 values: vpdpbusd where the target has it, else _group_sums16's pairs added."""
    if not e.vnni:
        return [e.madd(s16, _splat(I16, 16, 1)) for s16 in _group_sums16(e, src, i, s, cols, x8_at)]
    acc = [_splat(I32, src.width, 0)] * len(cols)
    for k in range(QK // 4):
        wv = src.group(i, s, k)
        for c, col in enumerate(cols):
            acc[c] = e.dot_u8_add(acc[c], wv, _token_bytes(e, col.x8, e.plus(x8_at, 4 * k), src.width))
    return acc


def _scalar(e, row, i):
    return e.b.load(e.b.gep(row, [i]))


def _gemm_q4_0(e, src, cols, i):
    """Per column: [acc] -> [acc + float(isum) * (d_w * d_x)] over block i."""
    dw, w = src.d(i), src.width
    sums = _group_sums32(e, src, i, 0, cols, e.index(i, QK))
    out = []
    for col, s32 in zip(cols, sums):
        isum = e.b.sub(s32, e.broadcast(_scalar(e, col.yc, i), w))
        d = e.b.fmul(dw, e.broadcast(_scalar(e, col.xd, i), w))
        out.append([e.fmuladd(e.b.sitofp(isum, _vec(F32, w)), d, col.accs[0])])
    return out


def _gemm_q4_k(e, src, cols, i):
    """Per column: [acc, accm] -> [acc + float(isum) * (d_w * d_x), accm + float(imin) * (dmin_w * d_x)]."""
    dw, dmw, w = src.d(i), src.d(i, 1), src.width
    isum = [_splat(I32, w, 0)] * len(cols)
    for s in range(QK_K // 32):
        if e.vnni:  # the same integers: row j's 32-value sum times its scale
            scales = src.scales32(i, s)
            sums = _group_sums32(e, src, i, s, cols, e.index(i, QK_K, 32 * s))
            isum = [e.b.add(a, e.b.mul(s32, scales)) for a, s32 in zip(isum, sums)]
        elif s % 2 == 0:
            pair = _group_sums16_loop(e, src, i, (s, s + 1), cols, lambda s: e.index(i, QK_K, 32 * s))
            for sub, sums in zip((s, s + 1), pair):
                scales = src.scales(i, sub)
                isum = [e.b.add(a, e.madd(s16, scales)) for a, s16 in zip(isum, sums)]
    out = []
    for col, si in zip(cols, isum):
        imin = _splat(I32, w, 0)
        for p in range(4):
            mins = src.mins(i, p)
            pair = e.b.bitcast(e.broadcast(_scalar(e, col.yc, e.index(i, 4, p)), w), _vec(I16, 2 * w))
            imin = e.b.add(imin, e.madd(mins, pair))
        dx = e.broadcast(_scalar(e, col.xd, i), w)
        out.append([e.fmuladd(e.b.sitofp(si, _vec(F32, w)), e.b.fmul(dw, dx), col.accs[0]),
                    e.fmuladd(e.b.sitofp(imin, _vec(F32, w)), e.b.fmul(dmw, dx), col.accs[1])])
    return out


def _gemm_lanes(q, e, src, cols, i):
    """Per column: [lane 0..7 accumulators (+ summs)] over block i, each lane k FMA-added with
    float(lane k of the 8 rows) * (d_w * d_x) as vec_dot adds it; summs += m_w * s_x."""
    kind, w = LANE_TYPES[q], src.width
    dw = src.d(i)
    d = [e.b.fmul(dw, e.broadcast(_scalar(e, col.xd, i), w)) for col in cols]
    out = [list(col.accs) for col in cols]
    as_unsigned = kind.signed and e.vnni  # w ^ 0x80 = w + 128: vpdpbusd needs no abs/sign steps
    biased = kind.offset or as_unsigned  # the tokens' yc takes the offset off
    for k in range(QK // 4):
        wv = src.group(i, 0, k)
        if as_unsigned:
            wv = e.b.xor(wv, _splat(I8, 4 * w, -_Q8_0_VNNI_OFFSET))
        for c, col in enumerate(cols):
            y = _token_bytes(e, col.x8, e.index(i, QK, 4 * k), w)
            if biased:
                yc = e.broadcast(_scalar(e, col.yc, e.index(i, QK // 4, k)), w)
                lane_k = e.dot_u8_add(yc, wv, y)
            else:
                lane_k = e.dot_i8(wv, y) if kind.signed else e.dot_u8(wv, y)
            out[c][k] = e.fmuladd(e.b.sitofp(lane_k, _vec(F32, w)), d[c], out[c][k])
    if kind.with_min:
        mw = src.d(i, 1)
        for c, col in enumerate(cols):
            out[c][8] = e.fmuladd(mw, e.broadcast(_scalar(e, col.xs, i), w), out[c][8])
    return out


def _gemm_q6_k(e, src, cols, i):
    """Per column: 8 lane accumulators; lane m of each row FMA-adds float(sumi_m - offset_m) *
    (d_x * d_w), sumi_m the sum over the quarters q of scale(q, m // 4) * (values 4m..4m+3 of
    quarter q . y), offset_m = 32 * (bsums 2m, 2m + 1 . scales 2m, 2m + 1): ggml's q6_K lanes."""
    dw, w = src.d(i), src.width

    def quarter(q, flat):
        sumis = [flat[8 * c:8 * c + 8] for c in range(len(cols))]
        for m in range(QK // 4):
            wv, scales = src.group(i, q, m), src.q6_scales(i, q, m // 4)
            for col, sumi in zip(cols, sumis):
                y = _token_bytes(e, col.x8, e.index(i, QK_K, e.scaled(q, 32, 4 * m)), w)
                sumi[m] = e.madd_add(sumi[m], e.maddubs(wv, y), scales)
        return [v for sumi in sumis for v in sumi]
    flat = [_splat(I32, w, 0)] * (8 * len(cols))
    if e.vnni:
        for q in range(QK_K // 32):
            flat = quarter(q, flat)
    else:  # a loop LLVM keeps (_group_sums16_loop)
        flat = e.block_loop(e.opaque(QK_K // 32), flat, quarter)
    sumis = [flat[8 * c:8 * c + 8] for c in range(len(cols))]
    out = []
    for col, sumi in zip(cols, sumis):
        d = e.b.fmul(e.broadcast(_scalar(e, col.xd, i), w), dw)
        new = []
        for m in range(8):
            pair = e.b.bitcast(e.broadcast(_scalar(e, col.yc, e.index(i, 8, m)), w), _vec(I16, 2 * w))
            offset = e.b.shl(e.madd(src.q6_scale_pairs(i, m), pair), _splat(I32, w, 5))
            new.append(e.fmuladd(e.b.sitofp(e.b.sub(sumi[m], offset), _vec(F32, w)), d, col.accs[m]))
        out.append(new)
    return out


def _lanes_total(e, accs):
    """hsum_float_8 of each of the 8 rows, vertically (Emit.sum8 of the 8 lane vectors), + summs."""
    total = e.sum8(accs[:8])
    return e.b.fadd(total, accs[8]) if len(accs) > 8 else total


class _GemmBody(NamedTuple):
    block: Callable  # (e, source, cols, i) -> each column's new accumulators
    n_acc: int       # <8 x float> accumulators per column
    total: Callable  # (e, accs) -> <8 x float>, the 8 rows' results


def _gemm_body(q):
    if q in LANE_TYPES:
        return _GemmBody(lambda *a: _gemm_lanes(q, *a), 8 + LANE_TYPES[q].with_min, _lanes_total)
    if q == _Q4_0:
        return _GemmBody(_gemm_q4_0, 1, lambda e, accs: accs[0])
    if q == _Q6_K:
        return _GemmBody(_gemm_q6_k, 8, _lanes_total)
    return _GemmBody(_gemm_q4_k, 2, lambda e, accs: e.b.fsub(accs[0], accs[1]))


def _literal(*values):
    for v in values:
        if not isinstance(v, types.IntegerLiteral):
            raise errors.RequireLiteralValue(v)
    return [v.literal_value for v in values]


def _emit_gemm(context, builder, body, n_cols, source, arrays, nb, t, r):
    """gemm's block loop: out[t + c, r:r + source's width] for c < n_cols. arrays: the
    (type, value) of x8, xd, yc, xs, out."""
    e = Emit(context, builder)
    arr = [(ty, context.make_array(ty)(context, builder, v)) for ty, v in arrays]

    def item(k, row, col):
        return cgutils.get_item_pointer(context, builder, arr[k][0], arr[k][1], [row, col])
    zero = ir.Constant(I64, 0)
    rows = [builder.add(t, ir.Constant(I64, c)) for c in range(n_cols)]
    col_ptrs = [tuple(item(k, rc, zero) for k in range(4)) for rc in rows]
    src, n = source(e), body.n_acc

    def block(i, accs):
        src.prefetch(i)
        cols = [_Column(*p, accs[n * c:n * c + n]) for c, p in enumerate(col_ptrs)]
        return [v for new in body.block(e, src, cols, i) for v in new]
    accs = e.block_loop(nb, [_splat(F32, src.width, 0.0)] * (n * n_cols), block)
    for c, rc in enumerate(rows):
        value = body.total(e, accs[n * c:n * c + n])
        builder.store(value, builder.bitcast(item(4, rc, r), value.type.as_pointer()), align=1)
    return context.get_dummy_value()


# Where gemm's weights come from: a per-call tile (interleave, unpack_packed) or a packed matrix
TILE, PACKED = 0, 1


@intrinsic
def gemm(typingctx, qtype, source, groups, ncols, a, b, c, x8, xd, yc, xs, nb, t, out, r):
    """out[t + j, r:r + 8 * groups] = rows r.. times token t + j, for j < ncols (constants, as
    are source and groups): x8 the tokens' int8 values, xd their block scales, yc their
    column_sums, xs Q8_1's s. From a TILE, a, b, c are its tq, tsm, td; from a PACKED matrix, a
    is the 2-d uint8 array of its rows' bytes (`pack`; 8 rows' packed blocks at row r), b the f16
    table, c unused. Two groups go side by side in 512-bit vectors (_Packed16, _Tile's groups)
    where the target has AVX512-VNNI, else one after the other."""
    q, src_kind, g, n_cols = _literal(qtype, source, groups, ncols)

    def codegen(context, builder, sig, args):
        at = [builder.add(args[14], ir.Constant(I64, ROWS * h)) for h in range(g)]
        if src_kind == TILE:
            tq, tsm, td = (builder.bitcast(_data(context, builder, sig.args[k], args[k]), I8.as_pointer())
                           for k in (4, 5, 6))

            def source(half):
                return lambda e: _Tile(e, q, tq, tsm, td, g, half)
        else:
            wa = context.make_array(sig.args[4])(context, builder, args[4])
            rows = [cgutils.get_item_pointer(context, builder, sig.args[4], wa, [r, ir.Constant(I64, 0)]) for r in at]
            tab = _data(context, builder, sig.args[5], args[5])

            def source(half):
                if half is None and g == 2:
                    return lambda e: _Packed16(e, q, rows[0], rows[1], tab)
                return lambda e: _Packed(e, q, rows[half or 0], tab)
        arrays = [(sig.args[k], args[k]) for k in (7, 8, 9, 10, 13)]
        if g == 1 or Emit(context, builder).vnni:
            return _emit_gemm(context, builder, _gemm_body(q), n_cols, source(None), arrays, args[11], args[12], at[0])
        for h in range(g):
            _emit_gemm(context, builder, _gemm_body(q), n_cols, source(h), arrays, args[11], args[12], at[h])
        return context.get_dummy_value()
    return types.void(qtype, source, groups, ncols, a, b, c, x8, xd, yc, xs, types.int64, types.int64, out,
                      types.int64), codegen


@njit(inline="always")
def covers(qtype, n_tok):
    """Whether a matmul of n_tok tokens goes through the tiles (MIN_TOKENS)."""
    if qtype == _Q4_0:
        return n_tok >= _Q4_0_MIN
    if qtype == _Q4_K:
        return n_tok >= _Q4_K_MIN
    if qtype == _Q6_K:
        return n_tok >= _Q6_K_MIN
    return (qtype == _Q4_1 or qtype == _Q5_0 or qtype == _Q5_1 or qtype == _Q8_0) and n_tok >= _LANES_MIN


@njit(inline="always")
def _wide_enough(qtype, n_tok):
    """Whether n_tok tokens of a packed matrix go 16 rows a pass (WIDE_MIN_TOKENS)."""
    if qtype == _Q4_0:
        return n_tok >= _Q4_0_WIDE
    if qtype == _Q4_K:
        return n_tok >= _Q4_K_WIDE
    if qtype == _Q5_0:
        return n_tok >= _Q5_0_WIDE
    if qtype == _Q8_0:
        return n_tok >= _Q8_0_WIDE
    return qtype == _Q6_K and n_tok >= _Q6_K_MIN


@njit(inline="always")
def column_sums(qtype, x8, xs, nb):
    """The tokens' yc (module docstring): Q4_0 from x8, Q4_K from Q8_K's group sums xs; for
    Q5_0 (and Q8_0 where vpdpbusd takes its values + 128), per block and 4-value group k,
    -offset * the group's sum; none for the other lane types."""
    n = x8.shape[0]
    biased = qtype == _Q5_0 or (qtype == _Q8_0 and lanes.target_has_vnni())
    per_block = 1 if qtype == _Q4_0 else (4 if qtype == _Q4_K else (QK // 4 if biased or qtype == _Q6_K else 0))
    yc = np.empty((n, nb * per_block), np.int32)
    if per_block == 0:
        return yc
    offset = _Q5_0_OFFSET if qtype == _Q5_0 else _Q8_0_VNNI_OFFSET
    for t in range(n):
        for i in range(nb):
            if biased:
                for k in range(QK // 4):
                    s = 0
                    for m in range(4):
                        s += x8[t, i * QK + 4 * k + m]
                    yc[t, i * (QK // 4) + k] = -offset * s
            elif qtype == _Q6_K:  # pairs of Q8_K's 16-value group sums 2m, 2m + 1
                for m in range(8):
                    g = i * (QK_K // 16) + 2 * m
                    word = (int(xs[t, g]) & 0xFFFF) | ((int(xs[t, g + 1]) & 0xFFFF) << 16)
                    yc[t, i * 8 + m] = word - (1 << 32) if word >= (1 << 31) else word
            elif qtype == _Q4_0:
                s = 0
                for m in range(QK):
                    s += x8[t, i * QK + m]
                yc[t, i] = 8 * s
            else:
                for p in range(4):
                    g = i * (QK_K // 16) + 4 * p
                    lo = (int(xs[t, g]) + int(xs[t, g + 1])) & 0xFFFF
                    hi = (int(xs[t, g + 2]) + int(xs[t, g + 3])) & 0xFFFF
                    word = lo | (hi << 16)
                    yc[t, i * 4 + p] = word - (1 << 32) if word >= (1 << 31) else word
    return yc


@njit(inline="always")
def _new_tile(qtype, nb):
    tq = np.empty(nb * (_Q4_K_TILE_BYTES if qtype == _Q4_K or qtype == _Q6_K else _QK_TILE_BYTES), np.uint8)
    tsm = np.empty(nb * (TSM_PER_BLOCK if qtype == _Q4_K else (TSM_Q6_K_PER_BLOCK if qtype == _Q6_K else 0)),
                   np.int16)
    return tq, tsm, np.empty(nb * TD_PER_BLOCK, np.float32)


@njit(inline="always")
def _times_tokens(qtype, source, groups, a, b, c, x8, xd, yc, xs, nb, out, r):
    """Rows r..r + 8 * groups - 1 (gemm's source, groups, a, b, c) times every token, 4 at a
    time for Q4_0/Q4_K; the lane types' 8 accumulators a token allow 2, 16-row Q6_K's 8 lane and
    8 sum vectors a token 1."""
    n_tok = x8.shape[0]
    t = 0
    if qtype == _Q4_0 or qtype == _Q4_K:
        while t + 4 <= n_tok:
            gemm(qtype, source, groups, 4, a, b, c, x8, xd, yc, xs, nb, t, out, r)
            t += 4
    if qtype != _Q6_K or groups == 1:
        while t + 2 <= n_tok:
            gemm(qtype, source, groups, 2, a, b, c, x8, xd, yc, xs, nb, t, out, r)
            t += 2
    while t < n_tok:
        gemm(qtype, source, groups, 1, a, b, c, x8, xd, yc, xs, nb, t, out, r)
        t += 1


@njit(inline="always")
def matmul(qtype, w, x8, xd, xs, out, r0, r1, tab, nb):
    """Rows r0 .. (the last whole 8) of W times every token; returns the first row left undone."""
    yc = column_sums(qtype, x8, xs, nb)
    tq, tsm, td = _new_tile(qtype, nb)
    r = r0
    while r + ROWS <= r1:
        interleave(qtype, w, r, nb, tab, tq, tsm, td)
        _times_tokens(qtype, TILE, 1, tq, tsm, td, x8, xd, yc, xs, nb, out, r)
        r += ROWS
    return r


@njit(inline="always")
def matmul_packed(qtype, w, x8, xd, xs, out, r0, r1, tab, nb):
    """Rows r0..r1-1 (multiples of 8) of a packed matrix w (kernels/packing.py) times every
    token, 16 rows a vector where the target has AVX512-VNNI."""
    yc = column_sums(qtype, x8, xs, nb)
    wide = lanes.target_has_vnni() and _wide_enough(qtype, x8.shape[0])
    r = r0
    if qtype == _Q6_K and x8.shape[0] >= _Q6_K_MIN:  # a prompt: the values unpacked once, for all its tokens
        tq, tsm, td = _new_tile(qtype, (2 if wide else 1) * nb)
        if wide:
            while r + 2 * ROWS <= r1:
                unpack_packed(qtype, 2, w, r, nb, tab, tq, tsm, td)
                _times_tokens(qtype, TILE, 2, tq, tsm, td, x8, xd, yc, xs, nb, out, r)
                r += 2 * ROWS
        for r in range(r, r1, ROWS):
            unpack_packed(qtype, 1, w, r, nb, tab, tq, tsm, td)
            _times_tokens(qtype, TILE, 1, tq, tsm, td, x8, xd, yc, xs, nb, out, r)
        return
    if wide:
        while r + 2 * ROWS <= r1:
            _times_tokens(qtype, PACKED, 2, w, tab, tab, x8, xd, yc, xs, nb, out, r)
            r += 2 * ROWS
    for r in range(r, r1, ROWS):
        _times_tokens(qtype, PACKED, 1, w, tab, tab, x8, xd, yc, xs, nb, out, r)
