"""llama.cpp's AVX2 row dot products, lane for lane, as LLVM vector IR (Numba intrinsics).

ggml's x86 dot products (ggml-cpu/arch/x86/quants.c, the __AVX2__ branches, which AVX-512
builds use too) keep 8 float lanes per row. Per block, int32 lane j holds the products of
elements 4j..4j+3 of each 32-value group (times the group's scale for K-quants, less the
Q6_K offset term of its groups 2j and 2j+1); the lanes are converted to float and FMA-added
into the row's accumulator with the block scale; hsum_float_8 then adds the lanes as
((0+4)+(2+6)) + ((1+5)+(3+7)). Min terms go where ggml puts them, as that placement rounds
too: Q4_1/Q5_1/Q5_K into a float scalar added after the lanes, Q4_K into 4 lanes of their own,
Q2_K into the same 8 lanes (lane k: its groups 2k, 2k+1) just before the block's values.
Summed in any other order a logit moves by float rounding, and on near-ties that changes the
greedy token. Following ggml's lanes makes each row's result bit-identical to its AVX2 result.

The integer part is what Numba loops cannot express fast (they never become maddubs/pmaddwd),
so it is emitted here directly:
with the x86 AVX2 intrinsics ggml uses when the target has AVX2 (the x86-64-v3/v4 variants,
or the JIT on such a host; with AVX512-VNNI, vpdpbusd for maddubs + pmaddwd-with-ones, the
same int32 lanes in one instruction), else as portable vector IR (same integers, any target; there
`llvm.fmuladd` is an unfused multiply-add). Kernels that call these intrinsics are compiled
without fast-math (exports.fastmath_for): a reassociating flag would let LLVM reorder the lane
sums. (Speed figures: README, "Speed", and the commit messages.)

`dot_tile(qtype, nrows, ncols, w, r, x8, xd, xs, tab, nb, t, out)` is the dot products of
nrows weight rows (from row r of `w`, 2-d uint8: each row's bytes) with the 8-bit activations of
ncols tokens (from token t): `x8` the int8 activation values, `xd` their per-block float32
scales, `xs` Q8_1's d * sums or Q8_K's group sums (one row per token each), `tab` the fp16 ->
float32 table, `nb` the number of blocks; out[t + c, r + j] = row r + j . token t + c, each
llama.cpp's vec_dot of that row and token, in its order. `qtype`, `nrows` and `ncols` must be
compile-time constants: they pick the IR.

`dot_f16(row, x16, tab, n)` is ggml_vec_dot_f16 (F16 weights, whose vec_dot_type is F16: the
activations come as fp16 bit patterns too) under simd-mappings.h's __AVX__/__F16C__/__FMA__
mapping, GGML_F16_STEP 32 and GGML_F16_EPR 8: four <8 x float> accumulators, one per 8-element
quarter of each 32; GGML_F32x8_REDUCE; the n % 32 leftovers added one by one in double.

`dot_bf16(row, x16, n)` is ggml_vec_dot_bf16 (BF16 weights, vec_dot_type BF16: the activations
come as bf16 bit patterns, rounded by GGML_FP32_TO_BF16), its __AVX2__ branch: four <8 x float>
accumulators, one per 8-element quarter of each 32, each step _mm256_add_ps(_mm256_mul_ps(..)),
which GCC's AVX2 build contracts into one vfmadd231ps (GNU mode's -ffp-contract=fast): so an
FMA here too (bf16 products are exact in float32, so only products below FLT_MIN round
differently unfused); (c1+c3) + (c2+c4), then extract/movehl/movehdup, which is hsum8's order;
the n % 32 leftovers one by one in double.
bf16 -> float is a 16-bit left shift of the integer: the same IR on every target.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from ggufile.runtime.gguf.constants import QK, QK_K, QUANT_TABLE, GGMLType
from ggufile.runtime.kernels import cpu
from ggufile.runtime.kernels.step_layout import PACKED_TYPE_BASE
from ggufile.runtime.kernels.types import LANE_TYPES  # by name: numba's `types` is used here

I1, I8, I16, I32, I64, F32, F64, HALF = (ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32),
                                         ir.IntType(64), ir.FloatType(), ir.DoubleType(), ir.HalfType())

# Which integer instructions the IR uses: "portable", "avx2" or "avx512vnni" (AVX2's, and
# vpdpbusd for the 4-product int32 sums). The JIT asks its host CPU. An AOT build sets this per
# variant, in one process per variant (aot_build): Numba compiles the step's callee kernels with
# the JIT's context, once per process, whatever variant is being built.
ISA_ENV = "GGUFILE_LANES_ISA"
_AVX2_ISAS = ("avx2", "avx512vnni")  # those that use AVX2's intrinsics; any other value: portable


def _vec(t, n):
    return ir.VectorType(t, n)


def _const(t, values):
    return ir.Constant(_vec(t, len(values)), list(values))


def _splat(t, n, value):
    return _const(t, [value] * n)


def _target_isa(context) -> str:
    forced = os.environ.get(ISA_ENV)
    if forced:
        return forced
    features = set(context.codegen()._tm_features.split(","))
    if {"+avx512vnni", "+avx512vl"} <= features:
        return "avx512vnni"
    return "avx2" if "+avx2" in features else "portable"


def _target_has_avx2(context) -> bool:
    return _target_isa(context) in _AVX2_ISAS


def _target_converts_f16(context) -> bool:
    """Whether fpext half -> float is an instruction: vcvtph2ps (F16C, which every AVX2 CPU and
    x86-64-v3 has) or aarch64's fcvtl. Other x86 targets would call __extendhfsf2, which libgcc
    has only since GCC 12 (and the JIT may not find): there fp16 goes through the table instead,
    the same floats."""
    return cpu.machine() != "x86_64" or _target_has_avx2(context)


@intrinsic
def target_has_vnni(typingctx):
    """Whether the IR of this compilation uses vpdpbusd (a constant, for njit code's choices)."""
    def codegen(context, builder, sig, args):
        return ir.Constant(I1, _target_isa(context) == "avx512vnni")
    return types.boolean(), codegen


class Emit:
    """Builds one kernel's IR: vector loads, ggml's integer dot steps, the float lanes."""

    def __init__(self, context, builder):
        self.b = builder
        self.avx2 = _target_has_avx2(context)
        self.vnni = self.avx2 and _target_isa(context) == "avx512vnni"
        self.f16c = _target_converts_f16(context)

    # --- memory ---
    def at(self, base, offset):
        """The i8* `offset` bytes past base (offset: int or i64 value)."""
        off = ir.Constant(I64, offset) if isinstance(offset, int) else offset
        return self.b.gep(base, [off])

    def load(self, base, offset, t, n=0):
        """A (vector of n, or scalar) t at byte offset of base, unaligned."""
        ty = _vec(t, n) if n else t
        return self.b.load(self.b.bitcast(self.at(base, offset), ty.as_pointer()), align=1)

    def prefetch(self, base, offset):
        """A hint to bring the cache line at byte offset of base into the caches (no fault,
        whatever the address)."""
        self.call("llvm.prefetch.p0i8", ir.VoidType(), [self.at(base, offset), ir.Constant(I32, 0),
                                                         ir.Constant(I32, 3), ir.Constant(I32, 1)])

    def f16(self, tab, base, offset):
        """The fp16 number at byte offset of base, as float32 (through the table, as everywhere)."""
        bits = self.load(base, offset, I16)
        return self.b.load(self.b.gep(tab, [self.b.zext(bits, I64)]))

    def f16x8(self, tab, base, offset):
        """<8 x float>: the 8 fp16 numbers at byte offset of base (GGML_F32Cx8_LOAD)."""
        if self.f16c:
            bits = self.load(base, offset, I16, 8)
            return self.b.fpext(self.b.bitcast(bits, _vec(HALF, 8)), _vec(F32, 8))
        v = ir.Constant(_vec(F32, 8), None)
        for k in range(8):
            v = self.b.insert_element(v, self.f16(tab, base, self.plus(offset, 2 * k)), ir.Constant(I32, k))
        return v

    def bf16(self, base, offset, n=0):
        """The bf16 number (or <n x float> of n of them) at byte offset of base, as float32:
        its bits are a float32's upper half (GGML_BF16_TO_FP32, or AVX2's cvtepu16 + slli)."""
        i32 = _vec(I32, n) if n else I32
        bits = self.b.zext(self.load(base, offset, I16, n), i32)
        shifted = self.b.shl(bits, _splat(I32, n, 16) if n else ir.Constant(I32, 16))
        return self.b.bitcast(shifted, _vec(F32, n) if n else F32)

    def plus(self, o, k):
        """Byte offset value o + k (k: a constant)."""
        return self.b.add(o, ir.Constant(I64, k))

    def index(self, i, scale, plus=0):
        """i * scale + plus as an i64 value (plus: a constant or an i64 value)."""
        v = self.b.mul(i, ir.Constant(I64, scale))
        if isinstance(plus, ir.Value):
            return self.b.add(v, plus)
        return self.b.add(v, ir.Constant(I64, plus)) if plus else v

    def scaled(self, k, scale, plus=0):
        """k * scale + plus, a constant when k and plus are (each an int or an i64 value)."""
        if isinstance(k, int):
            return self.total(k * scale, plus)
        return self.index(k, scale, plus)

    def total(self, *terms):
        """The sum of terms (ints or i64 values), a constant when they all are."""
        const = sum(t for t in terms if isinstance(t, int))
        values = [t for t in terms if not isinstance(t, int)]
        if not values:
            return const
        out = values[0]
        for v in values[1:]:
            out = self.b.add(out, v)
        return self.b.add(out, ir.Constant(I64, const)) if const else out

    # --- vectors ---
    def shuffle(self, a, b, mask):
        return self.b.shuffle_vector(a, a if b is None else b, _const(I32, mask))

    def broadcast(self, scalar, n):
        one = self.b.insert_element(ir.Constant(_vec(scalar.type, n), None), scalar, ir.Constant(I32, 0))
        return self.shuffle(one, None, [0] * n)

    def pair_sum(self, v, n, t):
        """<n x iK> -> <n/2 x t>: element m = v[2m] + v[2m+1] (extended to t first)."""
        even = self.b.sext(self.shuffle(v, None, range(0, n, 2)), _vec(t, n // 2))
        odd = self.b.sext(self.shuffle(v, None, range(1, n, 2)), _vec(t, n // 2))
        return self.b.add(even, odd)

    def nibbles(self, qs16):
        """16 bytes -> 32: the low nibbles, then the high ones (ggml's bytes_from_nibbles_32)."""
        low = self.b.and_(qs16, _splat(I8, 16, 15))
        high = self.b.lshr(qs16, _splat(I8, 16, 4))
        return self.shuffle(low, high, range(32))

    def bit_set(self, v, bit):
        """<32 x i1>: whether bit `bit` of each byte of v is set."""
        return self.b.icmp_unsigned("!=", self.b.and_(v, _splat(I8, 32, 1 << bit)), _splat(I8, 32, 0))

    def either(self, cond, if_set, if_clear):
        """Per byte of <32 x i1> cond: the constant if_set or if_clear."""
        return self.b.select(cond, _splat(I8, 32, if_set), _splat(I8, 32, if_clear))

    def opaque(self, n):
        """The i64 constant n, hidden from LLVM (an empty asm that returns its operand): a loop
        counted by it stays a loop, neither unrolled nor scheduled as one straight block."""
        return self.b.asm(ir.FunctionType(I64, [I64]), "", "=r,0", [ir.Constant(I64, n)], side_effect=False)

    def call(self, name, ret, args):
        fnty = ir.FunctionType(ret, [a.type for a in args])
        return self.b.call(cgutils.get_or_insert_function(self.b.module, fnty, name), args)

    # --- ggml's integer steps ---
    def dot_i8(self, q, y):
        """<32 x i8> q, y -> <8 x i32>, lane j = sum of q*y over elements 4j..4j+3
        (mul_sum_i8_pairs_float before its conversion; q may be signed)."""
        if self.vnni:
            return self.dpbusd(_splat(I32, 8, 0), self.abs_i8(q), self.sign_i8(y, q))
        return self.madd(self.mul_i8_pairs(q, y), _splat(I16, 16, 1))

    def dot_u8(self, q, y):
        """dot_i8 for q known non-negative (Q4_1/Q5_1's values, ggml's mul_sum_us8_pairs_float):
        maddubs straight away, without dot_i8's abs/sign steps."""
        return self.dot_u8_add(_splat(I32, 8, 0), q, y)

    def dot_u8_add(self, acc, u, s):
        """<8 x i32> acc + dot_u8(u, s): vpdpbusd where the target has it (the same integers as
        maddubs then pmaddwd with ones, whose 16-bit pair sums never saturate here: |y| <= 127)."""
        if self.vnni:
            return self.dpbusd(acc, u, s)
        return self.b.add(acc, self.madd(self.maddubs(u, s), _splat(I16, 16, 1)))

    def dpbusd(self, acc, u, s):
        """<8 x i32> acc + the sums of 4 products of unsigned u and signed s bytes (AVX512-VNNI)."""
        n = acc.type.count  # 8 (ymm) or 16 (zmm) lanes
        as32 = [self.b.bitcast(v, _vec(I32, n)) for v in (u, s)]
        return self.call(f"llvm.x86.avx512.vpdpbusd.{32 * n}", _vec(I32, n), [acc, *as32])

    def abs_i8(self, q):
        return self.call("llvm.abs.v32i8", _vec(I8, 32), [q, ir.Constant(I1, 0)])

    def sign_i8(self, y, q):
        """y with the sign of q (0 where q is 0): psign."""
        return self.call("llvm.x86.avx2.psign.b", _vec(I8, 32), [y, q])

    def mul_i8_pairs(self, q, y):
        """<32 x i8> signed q, y -> <16 x i16> pair sums of q*y: maddubs(|q|, sign(y, q)), the
        same integers as ggml's maddubs of two unsigned parts subtracted (no saturation reached)."""
        if self.avx2:
            return self.maddubs(self.abs_i8(q), self.sign_i8(y, q))
        products = self.b.mul(self.b.sext(q, _vec(I16, 32)), self.b.sext(y, _vec(I16, 32)))
        return self.pair_sum(products, 32, I16)

    def maddubs(self, u, s):
        """<32 x i8> unsigned u, signed s -> <16 x i16> pair sums (no saturation reached here)."""
        if self.vnni and u.type.count == 64:  # zmm: 16-row tiles (tiles.py), AVX-512 targets only
            return self.call("llvm.x86.avx512.pmaddubs.w.512", _vec(I16, 32), [u, s])
        if self.avx2:
            return self.call("llvm.x86.avx2.pmadd.ub.sw", _vec(I16, 16), [u, s])
        products = self.b.mul(self.b.zext(u, _vec(I16, 32)), self.b.sext(s, _vec(I16, 32)))
        return self.pair_sum(products, 32, I16)

    def madd(self, a, b):
        """<16 x i16> a, b -> <8 x i32> pair sums of a*b (pmaddwd)."""
        if self.vnni and a.type.count == 32:  # zmm: 16-row tiles (tiles.py)
            return self.call("llvm.x86.avx512.pmaddw.d.512", _vec(I32, 16), [a, b])
        if self.avx2:
            return self.call("llvm.x86.avx2.pmadd.wd", _vec(I32, 8), [a, b])
        products = self.b.mul(self.b.sext(a, _vec(I32, 16)), self.b.sext(b, _vec(I32, 16)))
        return self.pair_sum(products, 16, I32)

    def madd_add(self, acc, a, b):
        """<8 x i32> acc + madd(a, b): one vpdpwssd where the target has AVX512-VNNI."""
        if self.vnni:
            n = acc.type.count
            as32 = [self.b.bitcast(v, _vec(I32, n)) for v in (a, b)]
            return self.call(f"llvm.x86.avx512.vpdpwssd.{32 * n}", _vec(I32, n), [acc, *as32])
        return self.b.add(acc, self.madd(a, b))

    # --- float lanes ---
    def fmuladd(self, a, b, c):
        """a * b + c: one FMA where the target has it (as ggml's _mm256_fmadd_ps), else two ops."""
        name = f"llvm.fmuladd.v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "llvm.fmuladd.f32"
        return self.call(name, a.type, [a, b, c])

    def fma_lanes(self, scale, lanes, acc):
        """acc + scale * float(lanes), per lane."""
        n = lanes.type.count
        return self.fmuladd(self.broadcast(scale, n), self.b.sitofp(lanes, _vec(F32, n)), acc)

    def lane(self, v, i):
        return self.b.extract_element(v, ir.Constant(I32, i))

    def hsum8(self, acc):
        """hsum_float_8: ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7))."""
        return self.sum8([self.lane(acc, k) for k in range(8)])

    def sum8(self, v):
        """hsum_float_8's order over 8 values (lanes, or whole vectors summed lane by lane)."""
        s = [self.b.fadd(v[k], v[k + 4]) for k in range(4)]
        return self.b.fadd(self.b.fadd(s[0], s[2]), self.b.fadd(s[1], s[3]))

    def hsum_i32(self, v):
        """The sum of <4 x i32> v's lanes (ggml's hadd_epi32 twice; integer, so any order)."""
        return self.b.add(self.b.add(self.lane(v, 0), self.lane(v, 1)),
                          self.b.add(self.lane(v, 2), self.lane(v, 3)))

    def hsum4(self, acc):
        """movehl + movehdup on 4 lanes: (l0+l2) + (l1+l3)."""
        return self.b.fadd(self.b.fadd(self.lane(acc, 0), self.lane(acc, 2)),
                           self.b.fadd(self.lane(acc, 1), self.lane(acc, 3)))

    def reduce8(self, acc):
        """GGML_F32x8_REDUCE's end: low + high half, then _mm_hadd_ps twice:
        ((l0+l4) + (l1+l5)) + ((l2+l6) + (l3+l7))."""
        s = [self.b.fadd(self.lane(acc, k), self.lane(acc, k + 4)) for k in range(4)]
        return self.b.fadd(self.b.fadd(s[0], s[1]), self.b.fadd(s[2], s[3]))

    def block_loop(self, nb, inits, body):
        """accs = inits; for i in range(nb): accs = body(i, accs). Returns the final accs."""
        b = self.b
        entry = b.basic_block
        loop, done = b.append_basic_block("blocks"), b.append_basic_block("blocks_done")
        b.cbranch(b.icmp_signed(">", nb, ir.Constant(I64, 0)), loop, done)
        b.position_at_end(loop)
        i = b.phi(I64)
        accs = [b.phi(v.type) for v in inits]
        i.add_incoming(ir.Constant(I64, 0), entry)
        for phi, v in zip(accs, inits):
            phi.add_incoming(v, entry)
        new = body(i, accs)
        nxt = b.add(i, ir.Constant(I64, 1))
        tail = b.basic_block
        i.add_incoming(nxt, tail)
        for phi, v in zip(accs, new):
            phi.add_incoming(v, tail)
        b.cbranch(b.icmp_signed("<", nxt, nb), loop, done)
        b.position_at_end(done)
        out = []
        for v0, v1 in zip(inits, new):
            phi = b.phi(v0.type)
            phi.add_incoming(v0, entry)
            phi.add_incoming(v1, tail)
            out.append(phi)
        return out


def _zeros(n):
    return ir.Constant(_vec(F32, n), [0.0] * n) if n else ir.Constant(F32, 0.0)


def _pointers(context, builder, sig, args):
    """Data pointers of the array arguments (as i8* / float*), scalars as they are."""
    out = []
    for ty, value in zip(sig.args, args):
        if isinstance(ty, types.Array):
            out.append(context.make_array(ty)(context, builder, value).data)
        else:
            out.append(value)
    return out


@intrinsic
def dot_tile(typingctx, qtype, nrows, ncols, w, r, x8, xd, xs, tab, nb, t, out):
    """Weight rows r..r+nrows-1 of w times tokens t..t+ncols-1 (see the module docstring). Each
    row's values are unpacked once per block for all the tokens, each token's loads once for
    all the rows, and every sum is built in the very order a 1 x 1 tile builds it, so a token's
    outputs are the same bits whatever tile it was computed in."""
    for lit in (qtype, nrows, ncols):
        if not isinstance(lit, types.IntegerLiteral):
            raise errors.RequireLiteralValue(lit)
    body, n_rows, n_cols = _BODIES[qtype.literal_value], nrows.literal_value, ncols.literal_value

    def codegen(context, builder, sig, args):
        arrays = {k: context.make_array(sig.args[k])(context, builder, args[k]) for k in (3, 5, 6, 7, 8, 11)}
        r_v, t_v, zero = args[4], args[10], ir.Constant(I64, 0)

        def item(k, i, j):
            return cgutils.get_item_pointer(context, builder, sig.args[k], arrays[k], [i, j])

        def plus(v, k):
            return builder.add(v, ir.Constant(I64, k))
        rows = [item(3, plus(r_v, j), zero) for j in range(n_rows)]
        cols = [(item(5, plus(t_v, c), zero), item(6, plus(t_v, c), zero), item(7, plus(t_v, c), zero))
                for c in range(n_cols)]
        sums = _tile(Emit(context, builder), body, rows, cols, arrays[8].data, args[9])
        for j, row_sums in enumerate(sums):
            for c, value in enumerate(row_sums):
                builder.store(value, item(11, plus(t_v, c), plus(r_v, j)))
        return context.get_dummy_value()
    return types.void(qtype, nrows, ncols, w, types.int64, x8, xd, xs, tab, types.int64, types.int64, out,
                      types.int64), codegen


@intrinsic
def dot_f16(typingctx, row, x16, tab, n):
    """ggml_vec_dot_f16 of one row: (row, x16, tab, n) -> float32, row and x16 the n fp16 bit
    patterns (uint16) of the weights and the activations, tab the fp16 -> float32 table."""
    def codegen(context, builder, sig, args):
        return _dot_f16(Emit(context, builder), _pointers(context, builder, sig, args))
    return types.float32(row, x16, tab, types.int64), codegen


@intrinsic
def dot_bf16(typingctx, row, x16, n):
    """ggml_vec_dot_bf16 of one row: (row, x16, n) -> float32, row and x16 the n bf16 bit
    patterns (uint16) of the weights and the activations."""
    def codegen(context, builder, sig, args):
        return _dot_bf16(Emit(context, builder), _pointers(context, builder, sig, args))
    return types.float32(row, x16, types.int64), codegen


_BITS = [1 << (j % 8) for j in range(32)]
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = (QUANT_TABLE[t].type_size for t in (
    GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
    GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K))


class _Loop(NamedTuple):
    """A row body's block loop: its accumulators' initial values, block(i, accs) -> accs, and
    final(accs) -> one float per activation column."""
    inits: list
    block: Callable
    final: Callable


def _tile(e, body, rows, cols, tab, nb):
    """Sums [row][column] of weight rows `rows` with activation columns `cols`, in one block
    loop: each (row, column) accumulates exactly as it would alone, and what only depends on
    a column (its loads, Q8_K group sums) is emitted once per row but identical, so LLVM keeps
    one copy for all the rows."""
    loops = [body(e, (row, cols, tab, nb)) for row in rows]
    sizes = [len(loop.inits) for loop in loops]
    starts = [sum(sizes[:k]) for k in range(len(loops))]

    def block(i, accs):
        return [v for loop, at, n in zip(loops, starts, sizes) for v in loop.block(i, accs[at:at + n])]
    accs = e.block_loop(nb, [v for loop in loops for v in loop.inits], block)
    return [loop.final(accs[at:at + n]) for loop, at, n in zip(loops, starts, sizes)]


def _simple_row(e, row, cols, tab, nb, block_bytes, values):
    """The Q4_0/Q5_0/Q8_0 loop: per block, lanes of values(o) . y, FMA-added with d_w * d_x."""
    def block(i, accs):
        o = e.index(i, block_bytes)
        q, dw = values(o), e.f16(tab, row, o)
        out = []
        for (x8, xd, _), acc in zip(cols, accs):
            y = e.load(x8, e.index(i, QK), I8, 32)
            d = e.b.fmul(dw, e.b.load(e.b.gep(xd, [i])))
            out.append(e.fma_lanes(d, e.dot_i8(q, y), acc))
        return out
    return _Loop([_zeros(8)] * len(cols), block, lambda accs: [e.hsum8(acc) for acc in accs])


def _high_bits(e, row, at):
    """bytes_from_bits_32: <32 x i1>, element j = bit j of the 4 bytes at offset `at`."""
    qh = e.shuffle(e.load(row, at, I8, 4), None, [j // 8 for j in range(32)])
    return e.b.icmp_unsigned("!=", e.b.and_(qh, _const(I8, _BITS)), _splat(I8, 32, 0))


def q4_0_values(e, row, o):
    """Q4_0 block at o: nibbles - 8 (signed)."""
    return e.b.sub(e.nibbles(e.load(row, e.plus(o, 2), I8, 16)), _splat(I8, 32, 8))


def q5_0_values(e, row, o):
    """Q5_0 block at o: nibbles | 0xF0 where the block's high bit is clear (= value - 16; signed)."""
    return e.b.or_(e.nibbles(e.load(row, e.plus(o, 6), I8, 16)),
                   e.either(_high_bits(e, row, e.plus(o, 2)), 0, 0xF0))


def q8_0_values(e, row, o):
    """Q8_0 block at o: its 32 signed bytes."""
    return e.load(row, e.plus(o, 2), I8, 32)


def q4_1_values(e, row, o):
    """Q4_1 block at o: nibbles (unsigned)."""
    return e.nibbles(e.load(row, e.plus(o, 4), I8, 16))


def q5_1_values(e, row, o):
    """Q5_1 block at o: nibbles | 0x10 where the block's high bit is set (unsigned)."""
    return e.b.or_(e.nibbles(e.load(row, e.plus(o, 8), I8, 16)),
                   e.either(_high_bits(e, row, e.plus(o, 4)), 0x10, 0))


def _dot_q4_0(e, p):
    """ggml_vec_dot_q4_0_q8_0."""
    row, cols, tab, nb = p
    return _simple_row(e, row, cols, tab, nb, _Q4_0, lambda o: q4_0_values(e, row, o))


def _dot_q5_0(e, p):
    """ggml_vec_dot_q5_0_q8_0."""
    row, cols, tab, nb = p
    return _simple_row(e, row, cols, tab, nb, _Q5_0, lambda o: q5_0_values(e, row, o))


def _dot_q8_0(e, p):
    """ggml_vec_dot_q8_0_q8_0."""
    row, cols, tab, nb = p
    return _simple_row(e, row, cols, tab, nb, _Q8_0, lambda o: q8_0_values(e, row, o))


def _min_row(e, p, block_bytes, values):
    """The Q4_1/Q5_1 loop: lanes of values(o) . y times d_w * d_x, plus the scalar sum of
    m_w * s_x (s_x: Q8_1's fp16 d * sum) added after the lanes."""
    row, cols, tab, nb = p

    def block(i, accs):
        o = e.index(i, block_bytes)
        q, dw, mw = values(o), e.f16(tab, row, o), e.f16(tab, row, e.plus(o, 2))
        out = []
        for c, (x8, xd, xs) in enumerate(cols):
            acc, summs = accs[2 * c:2 * c + 2]
            summs = e.fmuladd(mw, e.b.load(e.b.gep(xs, [i])), summs)
            d = e.b.fmul(dw, e.b.load(e.b.gep(xd, [i])))
            out += [e.fma_lanes(d, e.dot_u8(q, e.load(x8, e.index(i, QK), I8, 32)), acc), summs]
        return out
    return _Loop([_zeros(8), _zeros(0)] * len(cols), block,
                 lambda accs: [e.b.fadd(e.hsum8(accs[2 * c]), accs[2 * c + 1]) for c in range(len(cols))])


def _dot_q4_1(e, p):
    """ggml_vec_dot_q4_1_q8_1."""
    return _min_row(e, p, _Q4_1, lambda o: q4_1_values(e, p[0], o))


def _dot_q5_1(e, p):
    """ggml_vec_dot_q5_1_q8_1."""
    return _min_row(e, p, _Q5_1, lambda o: q5_1_values(e, p[0], o))


def _group_sums(e, bsums, i):
    """Super-block i's 16 Q8_K group sums (integer-valued float32) as <16 x i32>."""
    sums = e.load(e.b.bitcast(bsums, I8.as_pointer()), e.index(i, 64), F32, 16)
    return e.b.fptosi(sums, _vec(I32, 16))


def _bytes16(e, words):
    """Four i32 words -> <16 x i8>, little-endian (ggml's _mm_set_epi32 of its aux words)."""
    v = ir.Constant(_vec(I32, 4), None)
    for k, u in enumerate(words):
        v = e.b.insert_element(v, u, ir.Constant(I32, k))
    return e.b.bitcast(v, _vec(I8, 16))


def _k4_scales_mins(e, row, o):
    """Q4_K/Q5_K's 12 packed bytes at o + 4 -> <16 x i16>: the 8 scales, then the 8 mins
    (ggml's utmp dance)."""
    b = e.b
    c = lambda v: ir.Constant(I32, v)  # noqa: E731
    u0, u1, u2 = (e.load(row, e.plus(o, 4 + 4 * k), I32) for k in range(3))
    u3 = b.or_(b.and_(b.lshr(u2, c(4)), c(0x0F0F0F0F)), b.shl(b.and_(b.lshr(u1, c(6)), c(0x03030303)), c(4)))
    aux = b.and_(u1, c(0x3F3F3F3F))
    u1 = b.or_(b.and_(u2, c(0x0F0F0F0F)), b.shl(b.and_(b.lshr(u0, c(6)), c(0x03030303)), c(4)))
    u0 = b.and_(u0, c(0x3F3F3F3F))
    return b.zext(_bytes16(e, (u0, u1, aux, u3)), _vec(I16, 16))


def _q3_k_scales(e, row, o):
    """Q3_K's 12 packed bytes at o + 96 -> <16 x i16>: the 16 signed scales (ggml's aux words,
    each byte - 32)."""
    b = e.b
    c = lambda v: ir.Constant(I32, v)  # noqa: E731
    a0, a1, a2 = (e.load(row, e.plus(o, 96 + 4 * k), I32) for k in range(3))
    low = lambda a: b.and_(a, c(0x0F0F0F0F))  # noqa: E731
    high = lambda shift: b.shl(b.and_(b.lshr(a2, c(shift)), c(0x03030303)), c(4))  # noqa: E731
    words = (b.or_(low(a0), high(0)), b.or_(low(a1), high(2)),
             b.or_(low(b.lshr(a0, c(4))), high(4)), b.or_(low(b.lshr(a1, c(4))), high(6)))
    return b.sext(b.sub(_bytes16(e, words), _splat(I8, 16, 32)), _vec(I16, 16))


def _k4_min_products(e, sm, bsums, i):
    """Q4_K/Q5_K's mins: <4 x i32>, lane k = m_2k * (group sum of sub-block 2k) + m_2k+1 * (...)."""
    group = e.b.trunc(e.pair_sum(_group_sums(e, bsums, i), 16, I32), _vec(I16, 8))  # per 32-value sub-block
    mins = e.shuffle(sm, None, range(8, 16))
    prod = e.madd(e.shuffle(mins, _splat(I16, 8, 0), range(16)), e.shuffle(group, _splat(I16, 8, 0), range(16)))
    return e.shuffle(prod, None, range(4))


def _k4_sumi(e, x8, i, sm, values):
    """Q4_K/Q5_K: <8 x i32> lanes of the sum over the 8 sub-blocks s of scale_s * (values[s] . y),
    values[s] the 32 unsigned values of sub-block s (get_scale_shuffle_k4)."""
    b = e.b
    sumi = ir.Constant(_vec(I32, 8), [0] * 8)
    for j in range(QK_K // 64):
        p0, p1 = (e.madd(e.shuffle(sm, None, [s] * 16),
                         e.maddubs(values[s], e.load(x8, e.index(i, QK_K, 32 * s), I8, 32)))
                  for s in (2 * j, 2 * j + 1))
        sumi = b.add(sumi, b.add(p0, p1))
    return sumi


def _k4_nibbles(e, row, qs, s):
    """Q4_K/Q5_K sub-block s's 4 low bits: the low (s even) or high nibbles of the 32 bytes at
    qs + 32 * (s // 2)."""
    bits = e.load(row, e.plus(qs, 32 * (s // 2)), I8, 32)
    return e.b.lshr(bits, _splat(I8, 32, 4)) if s % 2 else e.b.and_(bits, _splat(I8, 32, 15))


def _k16_sumi(e, x8, i, scales, pairs):
    """Q2_K/Q3_K/Q6_K: <8 x i32> lanes of the sum over the 32-value quarters (j, l) (values
    128j + 32l ...) of scale * pairs(j, l, y), pairs the quarter's <16 x i16> pair products,
    its first 16 values taking scale 8j + 2l, the others 8j + 2l + 1 (get_scale_shuffle_q3k)."""
    b = e.b
    sumi = ir.Constant(_vec(I32, 8), [0] * 8)
    for j in range(QK_K // 128):
        parts = []
        for k in range(4):
            s = 8 * j + 2 * k
            y = e.load(x8, e.index(i, QK_K, 128 * j + 32 * k), I8, 32)
            parts.append(e.madd(e.shuffle(scales, None, [s] * 8 + [s + 1] * 8), pairs(j, k, y)))
        sumi = b.add(sumi, b.add(parts[0], parts[1]))
        sumi = b.add(sumi, b.add(parts[2], parts[3]))
    return sumi


def _quarters(values):
    """values(j, k) of every quarter of a super-block, computed once for all columns."""
    return {(j, k): values(j, k) for j in range(QK_K // 128) for k in range(4)}


def _crumbs(e, bits, k):
    """Bits 2k, 2k+1 of each byte (Q2_K/Q3_K's low 2 bits of quarter k)."""
    return e.b.and_(e.b.lshr(bits, _splat(I8, 32, 2 * k)), _splat(I8, 32, 3))


def _k_scale(e, xd, i, w, negate=False):
    """Super-block i's d_x times the weight's fp16 scale w (a float): d = d_x * d_w, or with
    negate, dmin = -d_x * dmin_w (as ggml writes it)."""
    dx = e.b.load(e.b.gep(xd, [i]))
    return e.b.fmul(e.b.fneg(dx) if negate else dx, w)


def _dot_q2_k(e, p):
    """ggml_vec_dot_q2_K_q8_K: per super-block, first the mins into the same 8 lanes (lane k:
    groups 2k, 2k+1 of mins . bsums) times -d_x * dmin_w, then lanes of scale * (2-bit values . y)
    times d = d_x * d_w."""
    row, cols, tab, nb = p
    b = e.b

    def block(i, accs):
        o = e.index(i, _Q2_K)
        dw, dminw = e.f16(tab, row, e.plus(o, 80)), e.f16(tab, row, e.plus(o, 82))
        packed = e.load(row, o, I8, 16)
        scales = b.zext(b.and_(packed, _splat(I8, 16, 15)), _vec(I16, 16))
        mins = b.zext(b.lshr(packed, _splat(I8, 16, 4)), _vec(I16, 16))
        q = _quarters(lambda j, k: _crumbs(e, e.load(row, e.plus(o, 16 + 32 * j), I8, 32), k))
        out = []
        for (x8, xd, bsums), acc in zip(cols, accs):
            acc = e.fma_lanes(_k_scale(e, xd, i, dminw, negate=True),
                              e.madd(mins, b.trunc(_group_sums(e, bsums, i), _vec(I16, 16))), acc)
            sumi = _k16_sumi(e, x8, i, scales, lambda j, k, y: e.maddubs(q[j, k], y))
            out.append(e.fma_lanes(_k_scale(e, xd, i, dw), sumi, acc))
        return out
    return _Loop([_zeros(8)] * len(cols), block, lambda accs: [e.hsum8(acc) for acc in accs])


def _dot_q3_k(e, p):
    """ggml_vec_dot_q3_K_q8_K: lanes of scale * (3-bit values . y), times d = d_x * d_w; a value
    is its 2 low bits, less 4 where its hmask bit is clear (ggml subtracts those products in i16)."""
    row, cols, tab, nb = p
    b = e.b

    def block(i, accs):
        o = e.index(i, _Q3_K)
        dw = e.f16(tab, row, e.plus(o, 108))
        hmask = e.load(row, o, I8, 32)
        scales = _q3_k_scales(e, row, o)

        def values(j, k):
            low = _crumbs(e, e.load(row, e.plus(o, 32 + 32 * j), I8, 32), k)
            return b.or_(low, e.either(e.bit_set(hmask, 4 * j + k), 0, 0xFC))
        q = _quarters(values)
        return [e.fma_lanes(_k_scale(e, xd, i, dw),
                            _k16_sumi(e, x8, i, scales, lambda j, k, y: e.mul_i8_pairs(q[j, k], y)), acc)
                for (x8, xd, _), acc in zip(cols, accs)]
    return _Loop([_zeros(8)] * len(cols), block, lambda accs: [e.hsum8(acc) for acc in accs])


def _k4_row(e, p, block_bytes, values, mins):
    """The Q4_K/Q5_K loop: lanes of the sum over sub-blocks s of scale_s * (values(o, s) . y),
    times d = d_x * d_w. The mins' products (<4 x i32>, see _k4_min_products) times
    dmin = -d_x * dmin_w go to an accumulator of their own, as ggml keeps it:
    mins = (its initial value, add(dmin, products, acc) -> acc, the float it adds in the end)."""
    row, cols, tab, nb = p
    init, add, final = mins

    def block(i, accs):
        o = e.index(i, block_bytes)
        dw, dminw = e.f16(tab, row, o), e.f16(tab, row, e.plus(o, 2))
        sm = _k4_scales_mins(e, row, o)
        q = [values(o, s) for s in range(QK_K // 32)]
        out = []
        for c, (x8, xd, bsums) in enumerate(cols):
            acc, acc_m = accs[2 * c:2 * c + 2]
            acc_m = add(_k_scale(e, xd, i, dminw, negate=True), _k4_min_products(e, sm, bsums, i), acc_m)
            out += [e.fma_lanes(_k_scale(e, xd, i, dw), _k4_sumi(e, x8, i, sm, q), acc), acc_m]
        return out
    return _Loop([_zeros(8), init] * len(cols), block,
                 lambda accs: [e.b.fadd(e.hsum8(accs[2 * c]), final(accs[2 * c + 1])) for c in range(len(cols))])


def _dot_q4_k(e, p):
    """ggml_vec_dot_q4_K_q8_K: nibbles; the mins in 4 float lanes (pairs of sub-blocks)."""
    return _k4_row(e, p, _Q4_K, lambda o, s: _k4_nibbles(e, p[0], e.plus(o, 16), s),
                   (_zeros(4), e.fma_lanes, e.hsum4))


def _hsum8_i32(e, v):
    """The sum of <8 x i32> v's lanes (integer: any order)."""
    return e.hsum_i32(e.b.add(e.shuffle(v, None, range(4)), e.shuffle(v, None, range(4, 8))))


def _repacked_row(e, p, block_bytes, block_sums, with_mins):
    """The order of llama.cpp's repacked gemv/gemm (repack.cpp, the AVX2 branches: one float
    lane per row, the same for 1 token or 4): per block the exact integer sums, then
    acc = fma(float(isum), d_w * d_x, acc), and with mins accm = fma(float(imin), dmin_w * d_x,
    accm); the row's result acc - accm. block_sums(o, i, column) -> (isum, imin)."""
    row, cols, tab, nb = p

    def block(i, accs):
        o = e.index(i, block_bytes)
        dw = e.f16(tab, row, o)
        dminw = e.f16(tab, row, e.plus(o, 2)) if with_mins else None
        sums = block_sums(o, i)
        out = []
        for c, (x8, xd, xs) in enumerate(cols):
            dx = e.b.load(e.b.gep(xd, [i]))
            isum, imin = sums(c, (x8, xd, xs))
            acc = e.fmuladd(e.b.sitofp(isum, F32), e.b.fmul(dw, dx), accs[2 * c])
            accm = e.fmuladd(e.b.sitofp(imin, F32), e.b.fmul(dminw, dx), accs[2 * c + 1]) if with_mins \
                else accs[2 * c + 1]
            out += [acc, accm]
        return out
    return _Loop([_zeros(0), _zeros(0)] * len(cols), block,
                 lambda accs: [e.b.fsub(accs[2 * c], accs[2 * c + 1]) if with_mins else accs[2 * c]
                               for c in range(len(cols))])


def _dot_q4_0_repacked(e, p):
    """ggml_gemv/gemm_q4_0_8x8_q8_0: each block's integer sum of (nibbles - 8) . y."""
    row = p[0]

    def block_sums(o, i):
        q = q4_0_values(e, row, o)
        return lambda c, col: (_hsum8_i32(e, e.dot_i8(q, e.load(col[0], e.index(i, QK), I8, 32))), None)
    return _repacked_row(e, p, _Q4_0, block_sums, with_mins=False)


def _dot_q4_k_repacked(e, p):
    """ggml_gemv/gemm_q4_K_8x8_q8_K: per super-block isum = sum over sub-blocks s of
    scale_s * (nibbles . y), imin = sum of min_s * (y's sum over s)."""
    row = p[0]

    def block_sums(o, i):
        sm = _k4_scales_mins(e, row, o)
        q = [_k4_nibbles(e, row, e.plus(o, 16), s) for s in range(QK_K // 32)]
        return lambda c, col: (_hsum8_i32(e, _k4_sumi(e, col[0], i, sm, q)),
                               e.hsum_i32(_k4_min_products(e, sm, col[2], i)))
    return _repacked_row(e, p, _Q4_K, block_sums, with_mins=True)


def _dot_q5_k(e, p):
    """ggml_vec_dot_q5_K_q8_K: nibbles | 0x10 where bit s of qh is set; the mins' integer total
    (hadd_epi32) into a float scalar."""
    row = p[0]

    def values(o, s):
        qh = e.load(row, e.plus(o, 16), I8, 32)
        return e.b.or_(_k4_nibbles(e, row, e.plus(o, 48), s), e.either(e.bit_set(qh, s), 0x10, 0))

    def add(dmin, prod, summs):
        return e.fmuladd(dmin, e.b.sitofp(e.hsum_i32(prod), F32), summs)
    return _k4_row(e, p, _Q5_K, values, (_zeros(0), add, lambda summs: summs))


def _q6_k_quarter(e, row, o, j, k):
    """Q6_K's 6-bit values of quarter k of half j (ql's nibbles, qh's 2-bit pairs)."""
    b = e.b
    m = lambda v: _splat(I8, 32, v)  # noqa: E731
    ql = e.load(row, e.plus(o, 64 * j + 32 * (k % 2)), I8, 32)
    qh = e.load(row, e.plus(o, 128 + 32 * j), I8, 32)
    return (b.or_(b.and_(ql, m(15)), b.shl(b.and_(qh, m(3)), m(4))),
            b.or_(b.and_(ql, m(15)), b.shl(b.and_(qh, m(12)), m(2))),
            b.or_(b.lshr(ql, m(4)), b.and_(qh, m(48))),
            b.or_(b.lshr(ql, m(4)), b.lshr(b.and_(qh, m(0xC0)), m(2))))[k]


def _dot_q6_k(e, p):
    """ggml_vec_dot_q6_K_q8_K: lanes of sum of scale * (6-bit values . y) less
    32 * (bsums . scales) of groups 2j, 2j+1, times d = d_x * d_w."""
    row, cols, tab, nb = p
    b = e.b

    def block(i, accs):
        o = e.index(i, _Q6_K)
        dw = e.f16(tab, row, e.plus(o, 208))
        scales = b.sext(e.load(row, e.plus(o, 192), I8, 16), _vec(I16, 16))
        q = _quarters(lambda j, k: _q6_k_quarter(e, row, o, j, k))
        out = []
        for (x8, xd, bsums), acc in zip(cols, accs):
            sums = b.trunc(_group_sums(e, bsums, i), _vec(I16, 16))
            offset = b.shl(e.madd(sums, scales), _splat(I32, 8, 5))
            sumi = _k16_sumi(e, x8, i, scales, lambda j, k, y: e.maddubs(q[j, k], y))
            out.append(e.fma_lanes(_k_scale(e, xd, i, dw), b.sub(sumi, offset), acc))
        return out
    return _Loop([_zeros(8)] * len(cols), block, lambda accs: [e.hsum8(acc) for acc in accs])


# GGML_F16_STEP elements a step, GGML_F16_EPR per accumulator (the 256-bit AVX mapping; ggml's
# AVX2 vec_dot_bf16 spells out the same 32 and 8).
_F16_STEP, _F16_EPR = 32, 8


def _half_rows(e, row, xs, n, load_row, load_x, reduce):
    """ggml's 16-bit float dot products (vec_dot_f16/bf16 on AVX2) of one row with each of xs:
    four <8 x float> sums, sum[j] = fma(x, y, sum[j]) over elements 8j..8j+7 of each 32,
    reduce((sum0 + sum2) + (sum1 + sum3)) widened to double, then the n % 32 leftovers' float
    products added in double, in order; one float32 per x. load_row / load_x (base, element
    index, 8 or 0) give 8 of their values (or one) as float; the row's are widened once for
    all the xs."""
    b = e.b
    steps = b.sdiv(n, ir.Constant(I64, _F16_STEP))
    per = _F16_STEP // _F16_EPR

    def step(i, accs):
        at = [e.index(i, _F16_STEP, _F16_EPR * j) for j in range(per)]
        w = [load_row(row, o, _F16_EPR) for o in at]
        return [e.fmuladd(w[j], load_x(x, at[j], _F16_EPR), accs[per * k + j])
                for k, x in enumerate(xs) for j in range(per)]
    sums = e.block_loop(steps, [_zeros(8)] * (per * len(xs)), step)
    totals = [b.fpext(reduce(b.fadd(b.fadd(s[0], s[2]), b.fadd(s[1], s[3]))), F64)
              for s in (sums[per * k:per * k + per] for k in range(len(xs)))]
    done = e.index(steps, _F16_STEP)

    def leftover(i, accs):
        at = b.add(done, i)
        w = load_row(row, at, 0)
        return [b.fadd(acc, b.fpext(b.fmul(w, load_x(x, at, 0)), F64)) for acc, x in zip(accs, xs)]
    totals = e.block_loop(b.sub(n, done), totals, leftover)
    return [b.fptrunc(t, F32) for t in totals]


def _f16_values(e, tab):
    """load_row for fp16 bit patterns: 8 (GGML_F32Cx8_LOAD) or one as float."""
    return lambda base, at, n: e.f16x8(tab, base, e.index(at, 2)) if n else e.f16(tab, base, e.index(at, 2))


def _dot_f16(e, p):
    """ggml_vec_dot_f16: GGML_F32x8_FMA steps, GGML_F32x8_REDUCE (reduce8). (fp16 products are
    exact in float32, so FMA or a multiply then an add round alike: targets without FMA give
    the same bits.)"""
    row, x16, tab, n = p
    values = _f16_values(e, tab)
    row, x16 = (e.b.bitcast(v, I8.as_pointer()) for v in (row, x16))
    return _half_rows(e, row, [x16], n, values, values, e.reduce8)[0]


def _dot_bf16(e, p):
    """ggml_vec_dot_bf16's __AVX2__ branch: _mm256_add_ps(_mm256_mul_ps(x, y), c) steps, fused
    as GCC compiles them, then extract + movehl + movehdup, hsum8's order."""
    row, x16, n = p
    row, x16 = (e.b.bitcast(v, I8.as_pointer()) for v in (row, x16))

    def values(base, at, k):
        return e.bf16(base, e.index(at, 2), k)
    return _half_rows(e, row, [x16], n, values, values, e.hsum8)[0]


@intrinsic
def dot_f16_heads(typingctx, heads, row, xs, tab, n, out):
    """ggml_vec_dot_f16 of one row of n fp16 bit patterns with each of the first `heads` (a
    constant) rows of xs, float32 numbers that are fp16 values (so each product is the fp16
    one's): out[g] = the g-th. The row is widened once for all of them (attention: a key or
    value row shared by its group's query heads)."""
    if not isinstance(heads, types.IntegerLiteral):
        raise errors.RequireLiteralValue(heads)
    g = heads.literal_value

    def codegen(context, builder, sig, args):
        e = Emit(context, builder)
        row_p, xs_p, tab_p, n, out_p = _pointers(context, builder, sig.replace(args=sig.args[1:]), args[1:])
        stride = builder.extract_value(context.make_array(sig.args[2])(context, builder, args[2]).strides, 0)
        xs_p = builder.bitcast(xs_p, I8.as_pointer())
        xrows = [builder.gep(xs_p, [builder.mul(stride, ir.Constant(I64, k))]) for k in range(g)]

        def floats(base, at, k):
            return e.load(base, e.index(at, 4), F32, k)
        results = _half_rows(e, builder.bitcast(row_p, I8.as_pointer()), xrows, n, _f16_values(e, tab_p),
                             floats, e.reduce8)
        for k, r in enumerate(results):
            builder.store(r, builder.gep(out_p, [ir.Constant(I64, k)]))
        return context.get_dummy_value()
    return types.void(heads, row, xs, tab, types.int64, out), codegen


_BODIES = {int(t): body for t, body in (
    (GGMLType.Q4_0, _dot_q4_0), (GGMLType.Q4_1, _dot_q4_1), (GGMLType.Q5_0, _dot_q5_0),
    (GGMLType.Q5_1, _dot_q5_1), (GGMLType.Q8_0, _dot_q8_0), (GGMLType.Q2_K, _dot_q2_k),
    (GGMLType.Q3_K, _dot_q3_k), (GGMLType.Q4_K, _dot_q4_k), (GGMLType.Q5_K, _dot_q5_k),
    (GGMLType.Q6_K, _dot_q6_k))}
# Every lane type (kernels/types.py) has its body here: dot_tile's, dot_f16's F16, dot_bf16's BF16.
assert frozenset(GGMLType(t) for t in _BODIES) | {GGMLType.F16, GGMLType.BF16} == LANE_TYPES
# Q4_0 and Q4_K matrices whose row count is a multiple of 8 in the order llama.cpp computes them
# on AVX2 (it repacks those, 8 rows interleaved: repack.cpp's ggml_repack_get_optimal_repack_type);
# the same ids as the step's packed matrices (kernels/packing.py), which are summed in that order.
REPACKED = PACKED_TYPE_BASE
Q4_0_REPACKED, Q4_K_REPACKED = REPACKED + int(GGMLType.Q4_0), REPACKED + int(GGMLType.Q4_K)
_BODIES[Q4_0_REPACKED] = _dot_q4_0_repacked
_BODIES[Q4_K_REPACKED] = _dot_q4_k_repacked
