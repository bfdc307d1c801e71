"""Every kernel backend equals the NumPy reference (reference.py) for every weight type.

Backends tested: numpy, jit (when numba is importable) and each AOT variant built here that
this CPU can run. Decode matmuls (few tokens) quantize activations to 8 bits like llama.cpp
(F16 weights: round them to fp16), so they are compared with reference.reference_matvec (same
scheme, exact sums) to float rounding, and loosely with the float product.
"""
from __future__ import annotations

import importlib.util

import ggml_lanes
import numpy as np
import pytest
from test_quants import random_blocks

from ggufile.runtime import kernels
from ggufile.runtime.gguf.constants import QUANT_TABLE, GGMLType
from ggufile.runtime.kernels import compiled, cpu, numpy_backend, packing, reference, types

ALL_TYPES = sorted(types.WEIGHT_TYPES)
QUANT_TYPES = sorted(types.WEIGHT_TYPES - types.FLOAT_TYPES)


def _aot_variants() -> list[str]:
    found = []
    for variant in cpu.runnable_variants():
        if importlib.util.find_spec(f"ggufile.runtime.kernels.{cpu.module_name(variant)}"):
            found.append(variant)
    return found


def _backend_ids() -> list[str]:
    ids = ["numpy"]
    if importlib.util.find_spec("numba"):
        ids.append("jit")
    return ids + [f"aot:{v}" for v in _aot_variants()]


_BACKENDS: dict = {}


def load_backend(name: str):
    """Backend `name` (one of _backend_ids()), loaded once per test session."""
    if name not in _BACKENDS:
        if name == "numpy":
            _BACKENDS[name] = numpy_backend
        elif name == "jit":
            from ggufile.runtime.kernels.src import jit as jit_backend

            _BACKENDS[name] = compiled.CompiledBackend(name, jit_backend.load())
        else:
            _BACKENDS[name] = kernels._load_aot(name.split(":", 1)[1])
    return _BACKENDS[name]


@pytest.fixture(scope="module", params=_backend_ids())
def backend(request):
    return load_backend(request.param)


def random_weight(qtype: GGMLType, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """A weight matrix in the reader's form (read-only, like an mmap view)."""
    rng = np.random.default_rng(seed)
    if qtype == GGMLType.F32:
        w = rng.standard_normal((rows, k)).astype(np.float32) * 0.05
    elif qtype == GGMLType.F16:
        w = (rng.standard_normal((rows, k)) * 0.05).astype(np.float16)
    elif qtype == GGMLType.BF16:
        w = ((rng.standard_normal((rows, k)).astype(np.float32) * 0.05).view(np.uint32) >> 16).astype(np.uint16)
    else:
        info = QUANT_TABLE[qtype]
        w = random_blocks(qtype, rows * k // info.block_size, seed).reshape(rows, -1)
    w.flags.writeable = False
    return w


def float_product(w, qtype, x):
    return x.astype(np.float64) @ reference.dequantize_matrix(w, qtype, x.shape[1]).astype(np.float64).T


def assert_close(y, ref, rel):
    """|y - ref| <= rel * max|ref| elementwise (errors relative to the output's scale)."""
    scale = np.abs(ref).max() + 1e-30
    np.testing.assert_allclose(y, ref, atol=rel * scale, rtol=0)


# Weight types whose dot products see rounded activations (reference.dot_activations).
_ROUNDED_ACTIVATIONS = types.Q8_0_FAMILY | types.Q8_K_FAMILY | {GGMLType.F16, GGMLType.BF16}


def is_lane_decode(backend, qtype, n_tok) -> bool:
    """Compiled decode on llama.cpp's dot products (kernels/src/lanes.py): the activations as
    reference.dot_activations rounds them (8-bit blocks; fp16 / bf16 for F16 / BF16 weights)."""
    return (backend is not numpy_backend and n_tok <= compiled.MATVEC_MAX_TOKENS
            and qtype in _ROUNDED_ACTIVATIONS)


def is_8bit_via_blas(backend, qtype, n_tok) -> bool:
    """Compiled prefill and the numpy backend feed BLAS the dequantized 8-bit activations
    (F16 / BF16 weights: f16 / bf16-rounded x), as reference.dot_activations makes them."""
    return ((backend is numpy_backend or n_tok > compiled.MATVEC_MAX_TOKENS)
            and qtype in _ROUNDED_ACTIVATIONS)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact(backend, qtype):
    w = random_weight(qtype, 4, 512, seed=3)
    got = backend.dequantize(w, qtype, 4 * 512)
    np.testing.assert_array_equal(got, reference.dequantize(w, qtype, 4 * 512))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_get_rows_bit_exact(backend, qtype):
    w = random_weight(qtype, 20, 512, seed=9)
    ids = np.array([3, 0, 19, 3], dtype=np.int64)
    full = reference.dequantize_matrix(w, qtype, 512)
    np.testing.assert_array_equal(backend.get_rows(w, qtype, ids, 512), full[ids])


@pytest.mark.parametrize("n_tok", [1, 3, 9])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matmul_matches_reference(backend, qtype, n_tok):
    rows, k = 300, 512
    w = random_weight(qtype, rows, k, seed=5)
    x = np.random.default_rng(6).standard_normal((n_tok, k)).astype(np.float32)
    out = np.full((n_tok, rows), np.nan, dtype=np.float32)
    y = backend.matmul(w, qtype, x, out)
    assert y is out
    if is_lane_decode(backend, qtype, n_tok):
        assert_close(y, reference.reference_matvec(w, qtype, x), 2e-6)
        assert_close(y, float_product(w, qtype, x), 2e-2)
    elif is_8bit_via_blas(backend, qtype, n_tok):
        # Same activations as decode; only Q8_1's fp16-rounded d*sum term (and BLAS's float
        # sums) separates it from the exact reference.
        assert_close(y, reference.reference_matvec(w, qtype, x), 2e-3)
        assert_close(y, float_product(w, qtype, x), 2e-2)
    else:
        assert_close(y, float_product(w, qtype, x), 2e-6)


@pytest.mark.parametrize("rows", [1, 6, 37])
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_decode_row_counts_not_multiple_of_four(backend, qtype, rows):
    """Decode kernels walk rows four at a time; the last partial group must be right too."""
    k = 256
    w = random_weight(qtype, rows, k, seed=rows)
    x = np.random.default_rng(rows).standard_normal((2, k)).astype(np.float32)
    out = np.full((2, rows), np.nan, dtype=np.float32)
    y = backend.matmul(w, qtype, x, out)
    ref = reference.reference_matvec(w, qtype, x)
    assert_close(y, ref, 2e-6 if is_lane_decode(backend, qtype, 2) else 2e-3)


def _has_fma(backend_name: str) -> bool:
    """Whether this backend's kernels were compiled for a CPU with FMA (as ggml's AVX2 path)."""
    if backend_name == "jit":
        return "fma" in cpu.cpu_flags()
    variant = backend_name.split(":", 1)[1]
    return "fma" in cpu.variants_for_machine()[variant][1]


# Row lengths: 3 super-blocks, 23 blocks; F16/BF16 also n % 32 = 13 leftovers after 23 steps of 32.
_BIT_FOR_BIT_K = {**{t: 3 * 256 for t in types.Q8_K_FAMILY}, **{t: 23 * 32 for t in types.Q8_0_FAMILY},
                  GGMLType.F16: 23 * 32 + 13, GGMLType.BF16: 23 * 32 + 13}
# Exact products (16-bit floats): an FMA rounds as the add alone, so FMA-less targets match too.
_EXACT_PRODUCTS = (GGMLType.F16, GGMLType.BF16)


@pytest.mark.parametrize("n_tok", [1, 3])
@pytest.mark.parametrize("qtype", ggml_lanes.DECODE_TYPES, ids=lambda t: t.name)
def test_decode_is_llama_cpp_avx2_bit_for_bit(qtype, n_tok):
    """The lane kernels reproduce ggml's AVX2 vec_dot exactly (an emulation written from its C),
    on every compiled backend whose target has FMA; without FMA, to float rounding (F16/BF16
    exactly: their products are exact in float32, so an FMA rounds as the add alone)."""
    k = _BIT_FOR_BIT_K[qtype]
    w = random_weight(qtype, 37, k, seed=11)
    x = np.random.default_rng(5).standard_normal((n_tok, k)).astype(np.float32)
    ref = np.stack([ggml_lanes.matvec(w, qtype, row) for row in x])
    for name in _backend_ids()[1:]:
        y = load_backend(name).matmul(w, qtype, x, np.empty((n_tok, 37), np.float32))
        if _has_fma(name) or qtype in _EXACT_PRODUCTS:
            np.testing.assert_array_equal(y, ref, err_msg=name)
        else:
            assert_close(y, ref, 1e-6)


@pytest.mark.parametrize("n_tok", [1, 3])
@pytest.mark.parametrize("qtype", ggml_lanes.REPACKED, ids=lambda t: t.name)
def test_repacked_order_for_8k_rows_bit_for_bit(qtype, n_tok):
    """Q4_0/Q4_K matrices of 8k rows follow llama.cpp's repacked gemv/gemm order (the emulation's
    _repacked_matvec), whatever the number of tokens; 37 rows (above) keep vec_dot's."""
    k = _BIT_FOR_BIT_K[qtype]
    w = random_weight(qtype, 40, k, seed=12)
    x = np.random.default_rng(6).standard_normal((n_tok, k)).astype(np.float32)
    ref = np.stack([ggml_lanes.matvec(w, qtype, row) for row in x])
    vec_dot = np.stack([ggml_lanes.matvec(w[:39], qtype, row) for row in x])
    assert not np.array_equal(ref[:, :39], vec_dot)  # the two orders do round apart here
    for name in _backend_ids()[1:]:
        y = load_backend(name).matmul(w, qtype, x, np.empty((n_tok, 40), np.float32))
        if _has_fma(name):
            np.testing.assert_array_equal(y, ref, err_msg=name)
        else:
            assert_close(y, ref, 1e-6)


_NO_SUMS = (GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0)  # their kernels take no xs


@pytest.mark.parametrize("qtype", [*ggml_lanes.REPACKED, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1,
                                   GGMLType.Q8_0, GGMLType.Q6_K], ids=lambda t: t.name)
def test_interleaved_tiles_equal_one_token_at_a_time(qtype):
    """Prompts of Q4_0/Q4_K 8k-row matrices (and Q4_1/Q5_0/Q5_1/Q8_0/Q6_K ones of any rows) go through
    kernels/src/tiles.py (rows interleaved 8 at a time); each token's outputs are the bits the
    same kernel gives that token alone (lanes.dot_tile, below tiles.MIN_TOKENS), and vec_dot's or
    the repacked order's (the emulation's), for a row range that does not start or end on a
    multiple of 8 (the rows left over take lanes.dot_tile)."""
    k, rows, r0, r1, n_tok = _BIT_FOR_BIT_K[qtype], 48, 4, 43, 19  # >= tiles.MIN_TOKENS, odd
    w = random_weight(qtype, rows, k, seed=13)
    x = np.random.default_rng(7).standard_normal((n_tok, k)).astype(np.float32)
    ref = np.stack([ggml_lanes.matvec(w, qtype, row) for row in x])[:, r0:r1]
    for name in _backend_ids()[1:]:
        b = load_backend(name)
        xq, xd, xs = b._quantize_activations(compiled.ACTIVATION[qtype], x)
        sums = () if qtype in _NO_SUMS else (xs,)
        block = QUANT_TABLE[qtype].block_size

        def mv(t0, t1):
            out = np.zeros((t1 - t0, rows), np.float32)
            b._mv[qtype](w, xq[t0:t1], xd[t0:t1], *(s[t0:t1] for s in sums), out, r0, r1, compiled.F16_TABLE, block)
            return out
        together = mv(0, n_tok)
        alone = np.concatenate([mv(t, t + 1) for t in range(n_tok)])
        np.testing.assert_array_equal(together, alone, err_msg=name)
        assert not together[:, :r0].any() and not together[:, r1:].any()
        if _has_fma(name):
            np.testing.assert_array_equal(together[:, r0:r1], ref, err_msg=name)
        else:
            assert_close(together[:, r0:r1], ref, 1e-6)


@pytest.mark.parametrize("qtype", list(packing.PACKED_LAYOUT), ids=lambda t: t.name)
def test_packed_matrices_give_the_files_bits(qtype):
    """The Q4_0/Q4_K/Q5_0/Q6_K/Q8_0 matrices the step packs at load (kernels/packing.py) give the bits of the
    file's layout for any number of tokens, on a thread's rows (multiples of 8), and write
    nothing else."""
    k, rows, r0, r1 = _BIT_FOR_BIT_K[qtype], 56, 8, 48  # 40 rows: two 16-row passes and one of 8
    w = random_weight(qtype, rows, k, seed=5)
    packed = packing.pack(qtype, w)
    packed.flags.writeable = False
    assert packed.shape == (rows, packing.packed_row_bytes(qtype, k))
    x = np.random.default_rng(8).standard_normal((17, k)).astype(np.float32)
    block = QUANT_TABLE[qtype].block_size
    for name in _backend_ids()[1:]:
        b = load_backend(name)
        xq, xd, xs = b._quantize_activations(compiled.ACTIVATION[qtype], x)
        sums = () if qtype in _NO_SUMS else (xs,)
        copy = np.zeros_like(packed)
        b.pack(qtype, w, copy)  # the exported packer (pool threads) against the NumPy oracle
        np.testing.assert_array_equal(copy, packed, err_msg=name)
        for n in (1, 2, 3, 4, 11, 17):  # 17: past the file layout's Q6_K tile threshold
            want, got = np.zeros((n, rows), np.float32), np.zeros((n, rows), np.float32)
            acts = (xq[:n], xd[:n], *(s[:n] for s in sums))
            b._mv[qtype](w, *acts, want, r0, r1, compiled.F16_TABLE, block)
            b.mv_packed[qtype](packed, *acts, got, r0, r1, compiled.F16_TABLE, block)
            np.testing.assert_array_equal(got, want, err_msg=f"{name}, {n} tokens")


@pytest.mark.skipif(not importlib.util.find_spec("numba"), reason="needs numba")
@pytest.mark.parametrize("n", [64, 77, 256 + 13])
def test_one_row_against_several_heads_is_each_heads_own_dot(n):
    """lanes.dot_f16_heads (attention: a key or value row shared by a kv head's query heads)
    gives each head dot_f16's bits, the head's values as float32 holding fp16 numbers."""
    from numba import njit

    from ggufile.runtime.kernels.src import lanes

    @njit
    def both(row, xs, x16s, tab, n):
        got, want = np.zeros((4, 4), np.float32), np.zeros(4, np.float32)
        lanes.dot_f16_heads(1, row, xs, tab, n, got[0])
        lanes.dot_f16_heads(2, row, xs, tab, n, got[1])
        lanes.dot_f16_heads(3, row, xs, tab, n, got[2])
        lanes.dot_f16_heads(4, row, xs, tab, n, got[3])
        for g in range(4):
            want[g] = lanes.dot_f16(row, x16s[g], tab, n)
        return got, want

    rng = np.random.default_rng(3)
    row = rng.standard_normal(n).astype(np.float16).view(np.uint16)
    x16s = (rng.standard_normal((4, n)) * 3).astype(np.float16)
    got, want = both(row, x16s.astype(np.float32), x16s.view(np.uint16), compiled.F16_TABLE, n)
    for heads in range(1, 5):
        np.testing.assert_array_equal(got[heads - 1, :heads], want[:heads])


@pytest.mark.skipif(not importlib.util.find_spec("numba"), reason="needs numba")
@pytest.mark.parametrize("qtype", ggml_lanes.DECODE_TYPES, ids=lambda t: t.name)
def test_portable_lanes_equal_the_avx2_intrinsics(qtype, monkeypatch):
    """Targets without AVX2 (the generic variant, aarch64) get portable vector IR: the same integer
    lanes, so on one machine the same bits as the x86 intrinsics. (F16 on x86 without AVX2 reads
    fp16 through the table instead of vcvtph2ps: the same floats.)"""
    import numba

    from ggufile.runtime.kernels.src import exports, lanes

    name = f"mv_{qtype.name.lower()}"
    monkeypatch.setattr(lanes, "_target_has_avx2", lambda context: False)
    portable = numba.njit(getattr(exports, name))  # compiled now, with the patch in place
    k = 640 + 13 if qtype in _EXACT_PRODUCTS else 512 if qtype in types.Q8_K_FAMILY else 640
    w = random_weight(qtype, 29, k, seed=2)
    x = np.random.default_rng(2).standard_normal((1, k)).astype(np.float32)
    out = np.empty((1, 29), np.float32)
    if qtype in _EXACT_PRODUCTS:  # (BF16 widening is the same portable IR on every target)
        portable(w.view(np.uint16), x, out, 0, 29, compiled.F16_TABLE)
    else:
        xq, xd, xs = load_backend("jit")._quantize_activations(compiled.ACTIVATION[qtype], x)
        sums = () if qtype in _NO_SUMS else (xs,)
        portable(w, xq, xd, *sums, out, 0, 29, compiled.F16_TABLE, QUANT_TABLE[qtype].block_size)
    np.testing.assert_array_equal(out, load_backend("jit").matmul(w, qtype, x, np.empty_like(out)))


def test_matmul_multi_equals_separate_matmuls(backend):
    if backend is numpy_backend:
        pytest.skip("numpy backend has no fused dispatch")
    x = np.random.default_rng(0).standard_normal((1, 1024)).astype(np.float32)
    pairs = [(random_weight(t, r, 1024, seed=r), t) for t, r in
             [(GGMLType.Q4_K, 400), (GGMLType.Q6_K, 240), (GGMLType.Q4_1, 96), (GGMLType.F32, 8)]]
    outs = [np.empty((1, w.shape[0]), np.float32) for w, _ in pairs]
    backend.matmul_multi(pairs, x, outs)
    for y, (w, t) in zip(outs, pairs):
        np.testing.assert_array_equal(y, backend.matmul(w, t, x, np.empty_like(y)))


@pytest.mark.parametrize("n_tok", [1, 9])
def test_results_do_not_depend_on_the_thread_count(backend, n_tok):
    """Rows are split across threads differently for each thread count; outputs stay bit-identical
    (decode: row-independent kernels; prefill: tiles on one grid), so logits do too."""
    if backend is numpy_backend:
        pytest.skip("numpy backend has no thread pool")
    x = np.random.default_rng(1).standard_normal((n_tok, 512)).astype(np.float32)
    pairs = [(random_weight(t, r, 512, seed=r), t) for t, r in
             [(GGMLType.Q4_1, 2000), (GGMLType.Q8_0, 1500), (GGMLType.Q6_K, 900), (GGMLType.F32, 40)]]
    results = {}
    saved = backend.pool.n_threads
    try:
        for n in (1, 2):
            backend.pool.n_threads = min(n, saved)
            outs = [np.empty((n_tok, w.shape[0]), np.float32) for w, _ in pairs]
            results[n] = backend.matmul_multi(pairs, x, outs)
    finally:
        backend.pool.n_threads = saved
    for a, b in zip(results[1], results[2]):
        if getattr(backend, "name", "") == "aot:generic":
            # Known: the SSE2 build's Q6_K kernel rounds a row differently depending on its
            # place among the four rows walked together (LLVM associates the sums per place).
            assert_close(a, b, 1e-6)
        else:
            np.testing.assert_array_equal(a, b)


# --- the public API (whichever backend was selected) ------------------------------------------


def test_api_shapes_and_out():
    w = random_weight(GGMLType.Q8_0, 16, 64)
    out = np.empty((2, 16), np.float32)
    assert kernels.matmul(w, GGMLType.Q8_0, np.ones((2, 64), np.float32), out=out) is out
    assert kernels.matmul(w, GGMLType.Q8_0, np.ones(64, np.float32)).shape == (1, 16)
    assert kernels.get_rows(w, GGMLType.Q8_0, [1, 2]).shape == (2, 64)
    assert kernels.dequantize(w, GGMLType.Q8_0, 16 * 64).shape == (16 * 64,)
    ys = kernels.matmul_multi([(w, GGMLType.Q8_0), (w, GGMLType.Q8_0)], np.ones((1, 64), np.float32))
    assert len(ys) == 2 and np.array_equal(ys[0], ys[1])


def test_backend_is_named():
    assert kernels.backend in {"numpy", "jit"} or kernels.backend.startswith("aot:")


def test_cpu_flag_parsing_and_variant_choice():
    info = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c bmi1 bmi2 movbe\n"
    flags = cpu.cpu_flags(info)
    assert {"avx2", "fma"} <= flags
    assert cpu.runnable_variants(flags, "x86_64") == ["x86-64-v3", "generic"]
    assert cpu.runnable_variants(frozenset(), "x86_64") == ["generic"]
    v4 = flags | {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"}
    assert cpu.runnable_variants(v4, "x86_64") == ["x86-64-v4", "x86-64-v3", "generic"]
    assert cpu.runnable_variants(v4 | {"avx512_vnni"}, "x86_64")[0] == "x86-64-v4-vnni"
    assert cpu.runnable_variants(frozenset(), "riscv64") == []


# --- ahead-of-time builds ----------------------------------------------------------------------

AOT_VARIANTS = _aot_variants()
needs_aot = pytest.mark.skipif(not AOT_VARIANTS, reason="no AOT kernels built for this CPU "
                               "(python -m ggufile.runtime.kernels.src.aot_build)")


def test_aot_build_flags_release_the_gil():
    pytest.importorskip("numba")
    from ggufile.runtime.kernels.src import aot_build

    flags = aot_build.kernel_flags()
    assert flags.release_gil and flags.fastmath


@needs_aot
@pytest.mark.parametrize("variant", AOT_VARIANTS)
def test_aot_wrappers_call_pyeval_savethread(variant):
    """A pycc wrapper built with release_gil imports PyEval_SaveThread; a GIL-holding one does not."""
    module = kernels._load_aot(variant)
    spec = importlib.util.find_spec(f"ggufile.runtime.kernels.{cpu.module_name(variant)}")
    assert module.name == f"aot:{variant}"
    with open(spec.origin, "rb") as f:
        assert b"PyEval_SaveThread" in f.read()


@needs_aot
def test_aot_kernel_lets_other_threads_run():
    """While a kernel runs in a thread, the main thread keeps executing Python code."""
    import threading

    mod = kernels._load_aot(AOT_VARIANTS[0])
    w = np.zeros((8192, 4096 // 32 * 34), dtype=np.uint8)  # 35 MB of Q8_0: many ms per pass
    x = np.ones((1, 4096), np.float32)
    out = np.empty((1, 8192), np.float32)
    started = threading.Event()

    def work():
        started.set()
        for _ in range(5):
            mod.matmul(w, GGMLType.Q8_0, x, out)

    t = threading.Thread(target=work)
    mod.pool.n_threads, saved = 1, mod.pool.n_threads  # run the kernel in `t` itself
    try:
        t.start()
        started.wait()
        steps = 0
        while t.is_alive():
            steps += 1
    finally:
        t.join()
        mod.pool.n_threads = saved
    # Holding the GIL, the kernel would leave this loop a handful of steps at most.
    assert steps > 1000


NO_NUMBA_SCRIPT = r"""
import sys, importlib.abc
class BlockNumba(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "numba" or name.startswith("numba.") or name == "llvmlite" or name.startswith("llvmlite."):
            raise ImportError("numba is blocked in this test")
sys.meta_path.insert(0, BlockNumba())
import numpy as np
from ggufile.runtime import kernels
from ggufile.runtime.kernels import reference
from ggufile.runtime.gguf.constants import GGMLType
assert kernels.backend.startswith("aot:"), kernels.backend
assert "numba" not in sys.modules and "llvmlite" not in sys.modules
rng = np.random.default_rng(0)
w = rng.integers(0, 256, (64, 8 * 34), dtype=np.uint8)
w.reshape(-1, 34)[:, 1] &= 0x3B  # finite fp16 scales
x = rng.standard_normal((1, 256)).astype(np.float32)
y = kernels.matmul(w, GGMLType.Q8_0, x)
ref = reference.reference_matvec(w, GGMLType.Q8_0, x)
assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), np.abs(y - ref).max()
print("OK", kernels.backend)
"""


@needs_aot
def test_aot_backend_runs_without_numba():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GGUFILE_KERNELS"}
    proc = subprocess.run([sys.executable, "-c", NO_NUMBA_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK aot:")


def test_bad_weight_layout_is_an_error_not_a_crash(backend):
    if backend is numpy_backend:
        pytest.skip("numpy backend reads any layout")
    x = np.ones((1, 64), np.float32)
    with pytest.raises(ValueError):
        backend.matmul(np.zeros((4, 64), np.float32), GGMLType.Q8_0, x, np.empty((1, 4), np.float32))
    with pytest.raises(ValueError):
        backend.matmul(np.zeros((4, 136), np.uint8)[:, ::2], GGMLType.Q8_0, x, np.empty((1, 4), np.float32))
    with pytest.raises(IndexError):
        backend.get_rows(np.zeros((4, 68), np.uint8), GGMLType.Q8_0, np.array([4]), 64)


# --- GGUF string scanning ----------------------------------------------------------------------


def _scan_strings_py(buf: bytes, pos: int, count: int):
    starts, ends = [], []
    for _ in range(count):
        if pos + 8 > len(buf):
            return -1, starts, ends
        n = int.from_bytes(buf[pos:pos + 8], "little")
        pos += 8
        if n > len(buf) - pos:
            return -1, starts, ends
        starts.append(pos)
        pos += n
        ends.append(pos)
    return pos, starts, ends


def _gguf_strings(texts: list[bytes], prefix: bytes = b"") -> bytes:
    return prefix + b"".join(len(t).to_bytes(8, "little") + t for t in texts)


def test_scan_strings_matches_a_python_loop(backend):
    scan = backend.scan_strings
    if scan is None:
        assert backend is numpy_backend
        pytest.skip("numpy backend has no string scanner (callers loop in Python)")
    texts = [b"", b"a", "h\u00e9llo".encode(), b"x" * 300, b"\x00\xff"]
    raw = _gguf_strings(texts, prefix=b"HEAD")
    buf = np.frombuffer(raw, dtype=np.uint8)  # read-only, like the mmap'd file
    starts = np.full(len(texts), -7, np.int64)
    ends = np.full(len(texts), -7, np.int64)
    end, ref_starts, ref_ends = _scan_strings_py(raw, 4, len(texts))
    assert scan(buf, 4, len(texts), starts, ends) == end == len(raw)
    assert starts.tolist() == ref_starts and ends.tolist() == ref_ends
    assert [raw[a:b] for a, b in zip(starts, ends)] == texts
    assert scan(buf, 4, 0, starts, ends) == 4


@pytest.mark.parametrize("cut", [1, 5, 9, 20])
def test_scan_strings_truncated_is_minus_one(backend, cut):
    if backend.scan_strings is None:
        pytest.skip("numpy backend has no string scanner")
    raw = _gguf_strings([b"abc", b"defgh" * 3])[:-cut]
    assert _scan_strings_py(raw, 0, 2)[0] == -1
    out = np.zeros(2, np.int64)
    assert backend.scan_strings(np.frombuffer(raw, np.uint8), 0, 2, out, out.copy()) == -1
    huge = np.frombuffer((2**64 - 1).to_bytes(8, "little") + b"zz", np.uint8)  # length overflows
    assert backend.scan_strings(huge, 0, 1, out, out.copy()) == -1
    assert backend.scan_strings(np.frombuffer(raw, np.uint8), 0, 3, out, out.copy()) == -1  # outputs too short


def test_scan_strings_is_exported():
    assert kernels.scan_strings is None or callable(kernels.scan_strings)
