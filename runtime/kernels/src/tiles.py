"""Q4_0/Q4_K matmuls of several tokens on weight rows interleaved 8 at a time (prompts).

llama.cpp repacks Q4_0/Q4_K matrices of 8k rows and sums each row as exact integer block sums,
each FMA-added with d_w * d_x into one float per row (lanes._repacked_row). An integer sum is
the same whatever order builds it, so any kernel that keeps those float steps gives llama.cpp's
bits. Here a thread first copies 8 rows into a tile (`interleave`) where, for each 4 values k of
a 32-value group, one 32-byte vector holds the 8 rows' 4 unsigned 4-bit values (row j at bytes
4j..4j+3). `gemm` then multiplies it by a token's 4 bytes broadcast (vpmaddubsw): the 8 rows'
partial sums come out as the 8 lanes of one vector, so there is no per-row horizontal sum, and
each block's float steps are 3 vector operations for 8 rows. The copy is made once per call and
serves all its tokens (up to model/step.py's CHUNK). Sums stay 16-bit inside a 32-value group:
8 x 2 x 15 x 128 = 30720 < 2^15, so nothing saturates.

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
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from ggufile.runtime.gguf.constants import QK, QK_K, QUANT_TABLE, GGMLType
from ggufile.runtime.kernels.src import lanes
from ggufile.runtime.kernels.src.lanes import F32, I8, I16, I32, I64, Emit, _splat, _vec

ROWS = 8
_Q4_0, _Q4_K = lanes.Q4_0_REPACKED, lanes.Q4_K_REPACKED
# tq bytes per block: 32 bytes for each 4-value group of the block (plain ints: matmul reads them)
_Q4_0_TILE_BYTES, _Q4_K_TILE_BYTES = (QK // 4) * 32, (QK_K // 4) * 32
TILE_BYTES = {_Q4_0: _Q4_0_TILE_BYTES, _Q4_K: _Q4_K_TILE_BYTES}
_BLOCK_BYTES = {_Q4_0: QUANT_TABLE[GGMLType.Q4_0].type_size, _Q4_K: QUANT_TABLE[GGMLType.Q4_K].type_size}
TSM_PER_BLOCK, TD_PER_BLOCK = 12 * 16, 16


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
    _store_groups(e, tq, e.index(i, TILE_BYTES[_Q4_0]),
                  [e.nibbles(e.load(row, e.plus(o, 2), I8, 16)) for row in rows])
    for j, row in enumerate(rows):
        _store(e, td, e.index(i, 4 * TD_PER_BLOCK, 4 * j), e.f16(tab, row, o))


def _interleave_q4_k(e, rows, tq, tsm, td, tab, i):
    o = e.index(i, _BLOCK_BYTES[_Q4_K])
    for s in range(QK_K // 32):
        _store_groups(e, tq, e.index(i, TILE_BYTES[_Q4_K], 256 * s),
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


def _data(context, builder, ty, value):
    return context.make_array(ty)(context, builder, value).data


@intrinsic
def interleave(typingctx, qtype, w, r, nb, tab, tq, tsm, td):
    """Rows r..r+7 of w (uint8, each row's bytes) into the tile tq, tsm, td (module docstring)."""
    if not isinstance(qtype, types.IntegerLiteral):
        raise errors.RequireLiteralValue(qtype)
    body = {_Q4_0: _interleave_q4_0, _Q4_K: _interleave_q4_k}[qtype.literal_value]

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


def _group_sums16(e, tq, at, cols, x8_at):
    """Per column: <16 x i16>, the 8 rows' sums (2 lanes each) over one 32-value group of the
    tile at byte `at` against the column's 32 values at byte x8_at(column) of its x8 row."""
    acc = [_splat(I16, 16, 0)] * len(cols)
    for k in range(QK // 4):
        wv = e.load(tq, e.plus(at, 32 * k), I8, 32)
        for c, col in enumerate(cols):
            y = e.b.bitcast(e.broadcast(e.load(col[0], e.plus(x8_at(c), 4 * k), I32), 8), _vec(I8, 32))
            acc[c] = e.b.add(acc[c], e.maddubs(wv, y))
    return acc


def _gemm_q4_0(e, tq, tsm, td, cols, i):
    """Per column: (acc,) -> (acc + float(isum) * (d_w * d_x),) over block i."""
    dw = e.load(td, e.index(i, 4 * TD_PER_BLOCK), F32, 8)
    sums = _group_sums16(e, tq, e.index(i, TILE_BYTES[_Q4_0]), cols, lambda c: e.index(i, QK))
    out = []
    for (x8, xd, yc, acc), s16 in zip(cols, sums):
        isum = e.b.sub(e.madd(s16, _splat(I16, 16, 1)), e.broadcast(e.b.load(e.b.gep(yc, [i])), 8))
        d = e.b.fmul(dw, e.broadcast(e.b.load(e.b.gep(xd, [i])), 8))
        out.append((e.fmuladd(e.b.sitofp(isum, _vec(F32, 8)), d, acc[0]),))
    return out


def _gemm_q4_k(e, tq, tsm, td, cols, i):
    """Per column: (acc, accm) -> (acc + float(isum) * (d_w * d_x), accm + float(imin) * (dmin_w * d_x))."""
    dw = e.load(td, e.index(i, 4 * TD_PER_BLOCK), F32, 8)
    dmw = e.load(td, e.index(i, 4 * TD_PER_BLOCK, 32), F32, 8)
    isum = [_splat(I32, 8, 0)] * len(cols)
    for s in range(QK_K // 32):
        sums = _group_sums16(e, tq, e.index(i, TILE_BYTES[_Q4_K], 256 * s), cols,
                             lambda c, s=s: e.index(i, QK_K, 32 * s))
        scales = e.load(tsm, e.index(i, 2 * TSM_PER_BLOCK, 32 * s), I16, 16)
        isum = [e.b.add(a, e.madd(s16, scales)) for a, s16 in zip(isum, sums)]
    out = []
    for (x8, xd, yc, acc), si in zip(cols, isum):
        imin = _splat(I32, 8, 0)
        for p in range(4):
            mins = e.load(tsm, e.index(i, 2 * TSM_PER_BLOCK, 32 * (8 + p)), I16, 16)
            pair = e.b.bitcast(e.broadcast(e.b.load(e.b.gep(yc, [e.index(i, 4, p)])), 8), _vec(I16, 16))
            imin = e.b.add(imin, e.madd(mins, pair))
        dx = e.broadcast(e.b.load(e.b.gep(xd, [i])), 8)
        out.append((e.fmuladd(e.b.sitofp(si, _vec(F32, 8)), e.b.fmul(dw, dx), acc[0]),
                    e.fmuladd(e.b.sitofp(imin, _vec(F32, 8)), e.b.fmul(dmw, dx), acc[1])))
    return out


@intrinsic
def gemm(typingctx, qtype, ncols, tq, tsm, td, x8, xd, yc, nb, t, out, r):
    """out[t + c, r:r + 8] = the tile's 8 rows times token t + c, for c < ncols (a constant):
    x8 the tokens' int8 values, xd their block scales, yc their column_sums."""
    for lit in (qtype, ncols):
        if not isinstance(lit, types.IntegerLiteral):
            raise errors.RequireLiteralValue(lit)
    q, n_cols = qtype.literal_value, ncols.literal_value
    body, n_acc = {_Q4_0: (_gemm_q4_0, 1), _Q4_K: (_gemm_q4_k, 2)}[q]

    def codegen(context, builder, sig, args):
        e = Emit(context, builder)
        tq_p, tsm_p, td_p = (builder.bitcast(_data(context, builder, sig.args[k], args[k]), I8.as_pointer())
                             for k in (2, 3, 4))
        arrays = {k: context.make_array(sig.args[k])(context, builder, args[k]) for k in (5, 6, 7, 10)}

        def item(k, row, col):
            return cgutils.get_item_pointer(context, builder, sig.args[k], arrays[k], [row, col])
        zero = ir.Constant(I64, 0)
        rows = [builder.add(args[9], ir.Constant(I64, c)) for c in range(n_cols)]
        col_ptrs = [(item(5, rc, zero), item(6, rc, zero), item(7, rc, zero)) for rc in rows]

        def block(i, accs):
            cols = [p + (accs[n_acc * c:n_acc * c + n_acc],) for c, p in enumerate(col_ptrs)]
            return [v for new in body(e, tq_p, tsm_p, td_p, cols, i) for v in new]
        accs = e.block_loop(args[8], [_splat(F32, 8, 0.0)] * (n_acc * n_cols), block)
        for c, rc in enumerate(rows):
            acc = accs[n_acc * c:n_acc * c + n_acc]
            value = acc[0] if n_acc == 1 else builder.fsub(acc[0], acc[1])
            builder.store(value, builder.bitcast(item(10, rc, args[11]), value.type.as_pointer()), align=1)
        return context.get_dummy_value()
    return types.void(qtype, ncols, tq, tsm, td, x8, xd, yc, types.int64, types.int64, out, types.int64), codegen


@njit(inline="always")
def column_sums(qtype, x8, xs, nb):
    """The tokens' yc (module docstring): Q4_0 from x8, Q4_K from Q8_K's group sums xs."""
    n = x8.shape[0]
    per_block = 1 if qtype == _Q4_0 else 4
    yc = np.empty((n, nb * per_block), np.int32)
    for t in range(n):
        for i in range(nb):
            if qtype == _Q4_0:
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
def matmul(qtype, w, x8, xd, xs, out, r0, r1, tab, nb):
    """Rows r0 .. (the last whole 8) of W times every token; returns the first row left undone."""
    n_tok = x8.shape[0]
    yc = column_sums(qtype, x8, xs, nb)
    tq = np.empty(nb * (_Q4_0_TILE_BYTES if qtype == _Q4_0 else _Q4_K_TILE_BYTES), np.uint8)
    tsm = np.empty(nb * TSM_PER_BLOCK, np.int16)
    td = np.empty(nb * TD_PER_BLOCK, np.float32)
    r = r0
    while r + ROWS <= r1:
        interleave(qtype, w, r, nb, tab, tq, tsm, td)
        t = 0
        while t + 4 <= n_tok:
            gemm(qtype, 4, tq, tsm, td, x8, xd, yc, nb, t, out, r)
            t += 4
        while t < n_tok:
            gemm(qtype, 1, tq, tsm, td, x8, xd, yc, nb, t, out, r)
            t += 1
        r += ROWS
    return r
