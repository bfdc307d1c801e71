"""The compiled backends (AOT extension modules or Numba JIT) behind the kernels API.

`CompiledBackend(name, ns)` drives the kernels found as attributes of `ns` (same names and
signatures as src/exports.SIGNATURES):

- decode (n_tok <= MATVEC_MAX_TOKENS): the activation rows are quantized to 8 bits per block
  once (shared by every weight of a matmul_multi), then each thread runs the `mv_*` kernel on
  its slice of the rows, straight on the quantized blocks.
- prefill: each thread dequantizes tiles of its rows to float32 (`dq_*`) and multiplies them
  with NumPy's matmul (BLAS), so no dequantized copy of a whole weight is ever made. The
  activations BLAS sees are the 8-bit ones the decode path uses, dequantized: llama.cpp
  quantizes activations in batched matmuls too, and dequant(W) . dequant(q8(x)) is its integer
  dot product up to float rounding, so prompt and decode logits agree with each other and
  with llama.cpp. F16 and BF16 weights see activations rounded to fp16 / bf16 (their
  vec_dot_type), in decode (`mv_f16`, `mv_bf16`) and prefill alike.
"""
from __future__ import annotations

import functools

import numpy as np

from ggufile.runtime.kernels import reference
from ggufile.runtime.gguf.constants import QK, QK_K, QUANT_TABLE, GGMLType
from ggufile.runtime.errors import UnsupportedModelError
from ggufile.runtime.kernels import types
from ggufile.runtime.kernels.packing import PACKED_LAYOUT
from ggufile.runtime.kernels.pool import RowPool, split_rows
from ggufile.runtime.kernels.step_layout import S_ABORT

# At or below this many tokens the quantized matvec kernels beat dequantize + BLAS.
MATVEC_MAX_TOKENS = 4
# A pool round hands work to sleeping threads: each starts ~15-25 us after the calling thread
# (wake-up, then its Python job reaches the kernel), which runs its own slice at once. So the
# calling thread's slice is made bigger by about that head start (`_first_share`): a 0.55 MB
# Q4_1 matvec went 113 us -> 83 us on 2 threads (equal halves: 113-120 us, no gain).
HANDOFF_US = 20.0
# Decode matvec speed per thread, to turn weight bytes into time for the share above: the lane
# kernels' slowest common types (Q4_0/Q5_0 ~13 GB/s a thread; Q8_0/Q6_K do twice that).
MATVEC_BYTES_PER_US = 13000.0
# Below this much decode work (weight bytes x tokens) a task runs whole on the calling thread:
# the head start would be most of it.
MIN_PARALLEL_WORK = 256 * 1024
# Prefill rounds use the pool above this many weight bytes.
MIN_PARALLEL_PREFILL_BYTES = 128 * 1024
# Below this many elements an element-wise prefill pass (activation quantization, GELU, fp16
# rounding: ~0.3-1 ns an element) runs on the calling thread: a pool round costs ~20-50 us.
MIN_PARALLEL_ELEMENTS = 256 * 1024
# Query tokens per prefill attention chunk: its scores (n_head x 32 x keys floats) stay in L2,
# and a 128-token prompt makes 4 chunks (costs 1:2:3:4), which two threads share evenly.
ATTN_CHUNK = 32
# Float32 elements of one dequantized prefill tile (per thread, 2 MB): big enough for BLAS to be efficient.
TILE_ELEMENTS = 512 * 1024

with np.errstate(invalid="ignore"):  # its signalling-NaN entries raise FE_INVALID on aarch64 (a warning)
    F16_TABLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
F16_TABLE.flags.writeable = False

T = GGMLType
# The 8-bit activation format each block type is multiplied with (Q8_0 and Q8_1 share one
# quantization: Q8_1 adds d*sum).
_Q8_0, _Q8_K = types.Q8_0, types.Q8_K
ACTIVATION = {t: types.TRAITS[t].activation for t in types.BLOCK_TYPES}


class CompiledBackend:
    def __init__(self, name: str, ns, pool: RowPool | None = None):
        self.name = name
        self.pool = pool or RowPool()
        self._mv = {t: getattr(ns, f"mv_{t.name.lower()}") for t in ACTIVATION}
        self._dq = {t: getattr(ns, f"dq_{t.name.lower()}") for t in ACTIVATION}
        # the step's kernels for matrices packed at load (kernels/packing.py): it calls them
        # itself; here for the tests that hold them to _mv's bits
        self.mv_packed = {t: getattr(ns, f"mv_{t.name.lower()}_packed") for t in PACKED_LAYOUT}
        self._pack = {t: getattr(ns, f"pack_{t.name.lower()}") for t in PACKED_LAYOUT}
        self._mv_f32, self._mv_f16, self._dq_f16 = ns.mv_f32, ns.mv_f16, ns.dq_f16
        self._mv_bf16, self._dq_bf16 = ns.mv_bf16, ns.dq_bf16
        self._quantize = {_Q8_0: ns.quantize_q8_0, _Q8_K: ns.quantize_q8_k}
        # prefill's fused element-wise passes
        self._roundtrip = {_Q8_0: ns.q8_0_roundtrip, _Q8_K: ns.q8_k_roundtrip}
        self._round_f16, self._geglu, self._softmax = ns.round_f16, ns.geglu_f16, ns.softmax_f16
        self.scan_strings = ns.scan_strings
        self.decode_token = getattr(ns, "decode_token", None)  # absent from builds older than the step

    def pack(self, qtype: GGMLType, w: np.ndarray, out: np.ndarray) -> None:
        """w (rows, row bytes) packed into out (rows, packed row bytes; kernels/packing.py),
        the 8-row groups split across the pool."""
        fn, groups = self._pack[qtype], w.shape[0] // 8
        self.pool.run([functools.partial(fn, w, out, g0, g1)
                       for g0, g1 in split_rows(groups, self.pool.n_threads) if g1 > g0])

    # --- the compiled one-token step (src/step.decode_token) -------------------------------

    def run_step(self, sync: np.ndarray, args: tuple) -> None:
        """decode_token(tid, n, sync, *args) on every pool thread at once. The threads meet at
        barriers inside, so all must run: one that fails to start aborts the others' wait."""
        n = self.pool.n_threads
        sync[:] = 0
        status = [0] * n

        def job(tid: int):
            def run() -> None:
                try:
                    status[tid] = self.decode_token(tid, n, sync, *args)
                except BaseException:
                    sync[S_ABORT] = 1
                    raise
            return run

        self.pool.run([job(tid) for tid in range(n)])
        if any(status):
            raise RuntimeError("the compiled decode step was aborted")

    # --- dequantization ---------------------------------------------------------------------

    def dequantize(self, raw: np.ndarray, qtype: GGMLType, n_elements: int) -> np.ndarray:
        if qtype not in self._dq:
            return reference.dequantize(raw, qtype, n_elements)
        info = QUANT_TABLE[qtype]
        n_bytes = n_elements // info.block_size * info.type_size
        row = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)[:n_bytes]
        if n_elements % info.block_size or row.size != n_bytes:
            raise ValueError(f"{n_elements} {qtype.name} elements need {n_bytes} bytes, got {row.size}")
        row = row.reshape(1, n_bytes)
        out = np.empty((1, n_elements), dtype=np.float32)
        self._dq[qtype](row, np.zeros(1, np.int64), out, F16_TABLE, info.block_size)
        return out.reshape(-1)

    def get_rows(self, w: np.ndarray, qtype: GGMLType, ids: np.ndarray, k: int) -> np.ndarray:
        check_weight(w, qtype, k)
        if len(ids) and (ids.min() < 0 or ids.max() >= w.shape[0]):
            raise IndexError(f"row ids must be in [0, {w.shape[0]})")
        if qtype in (T.F16, T.BF16):
            return self._dq_16bit(w, qtype, ids, np.empty((len(ids), k), dtype=np.float32))
        if qtype not in self._dq:
            return reference.dequantize_matrix(np.ascontiguousarray(w[ids]), qtype, k)
        out = np.empty((len(ids), k), dtype=np.float32)
        self._dq[qtype](w, ids, out, F16_TABLE, QUANT_TABLE[qtype].block_size)
        return out

    # --- matmul -----------------------------------------------------------------------------

    def matmul(self, w: np.ndarray, qtype: GGMLType, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        self.matmul_multi([(w, qtype)], x, [out])
        return out

    def matmul_multi(self, pairs, x: np.ndarray, outs: list[np.ndarray]) -> list[np.ndarray]:
        n_tok, k = x.shape
        activations: dict[str, tuple] = {}
        tasks = []  # (run(r0, r1), rows, weight bytes, prefill tile rows)
        for (w, qtype), out in zip(pairs, outs):
            check_weight(w, qtype, k)
            if out.shape != (n_tok, w.shape[0]) or out.dtype != np.float32 or not out.flags.c_contiguous:
                raise ValueError(f"out must be a C-contiguous float32 array of shape {(n_tok, w.shape[0])}")
            if n_tok > MATVEC_MAX_TOKENS and qtype != T.F32:
                x_seen = self._prefill_activations(qtype, x, activations)
                tasks.append((self._prefill_task(w, qtype, x_seen, out), w.shape[0], w.nbytes, _tile_rows(k)))
            else:
                tasks.append((self._matvec_task(w, qtype, x, out, activations), w.shape[0], w.nbytes, 0))
        if n_tok <= MATVEC_MAX_TOKENS:
            self._dispatch_decode(tasks, n_tok)
        else:
            self._dispatch_prefill(tasks)
        return outs

    def _matvec_task(self, w, qtype, x, out, activations):
        if qtype == T.F32:
            kernel = self._mv_f32
            return lambda r0, r1: kernel(w, x, out, r0, r1)
        if qtype in (T.F16, T.BF16):
            kernel, w16 = (self._mv_f16 if qtype == T.F16 else self._mv_bf16), _u16(w)
            return lambda r0, r1: kernel(w16, x, out, r0, r1, F16_TABLE)
        family = ACTIVATION.get(qtype)
        if family is None:
            raise UnsupportedModelError(f"tensor type {GGMLType(qtype).name} is not supported")
        if family not in activations:
            activations[family] = self._quantize_activations(family, x)
        xq, xd, xs = activations[family]
        kernel = self._mv[qtype]
        block = QUANT_TABLE[qtype].block_size
        if qtype in types.WITH_SUMS:
            return lambda r0, r1: kernel(w, xq, xd, xs, out, r0, r1, F16_TABLE, block)
        return lambda r0, r1: kernel(w, xq, xd, out, r0, r1, F16_TABLE, block)

    def _prefill_activations(self, qtype: GGMLType, x: np.ndarray, activations: dict) -> np.ndarray:
        """x as llama.cpp's dot product for W's type sees it (ggml's vec_dot_type)."""
        if qtype in (T.F16, T.BF16):  # multiplied with F16- / BF16-rounded activations
            key = qtype.name
            if key not in activations:
                activations[key] = reference.dot_activations(x, qtype)
            return activations[key]
        family = ACTIVATION.get(qtype)
        if family is None:
            return x
        key = family + ":dequantized"
        if key not in activations:  # one fused pass, the rows split over the pool
            out = np.empty_like(x)
            kernel, block = self._roundtrip[family], QK if family == _Q8_0 else QK_K
            self._rows_parallel(lambda r0, r1: kernel(x, out, block, r0, r1), x.shape[0], x.size)
            activations[key] = out
        return activations[key]

    def _quantize_activations(self, family: str, x: np.ndarray) -> tuple:
        n_tok, k = x.shape
        block = QK if family == _Q8_0 else QK_K
        n_blocks = k // block
        xq = np.empty((n_tok, k), dtype=np.float32)
        xd = np.empty((n_tok, n_blocks), dtype=np.float32)
        # Q8_1: d * sum per block; Q8_K: sums of 16 values per group.
        xs = np.empty((n_tok, n_blocks if family == _Q8_0 else k // 16), dtype=np.float32)
        self._quantize[family](x, xq, xd, xs, block)
        return xq, xd, xs

    def _prefill_task(self, w, qtype, x, out):
        k = x.shape[1]
        tile_rows = _tile_rows(k)

        def run(r0: int, r1: int) -> None:
            tile = np.empty((tile_rows, k), dtype=np.float32)
            for t0 in range(r0, r1, tile_rows):
                t1 = min(r1, t0 + tile_rows)
                part = self._dequant_tile(w, qtype, t0, t1, tile[:t1 - t0])
                np.matmul(x, part.T, out=out[:, t0:t1])

        return run

    def _dq_16bit(self, w, qtype, ids, out):
        """Rows `ids` of an F16 or BF16 weight as float32, into out."""
        if qtype == T.BF16:
            self._dq_bf16(w, ids, out)
        else:
            self._dq_f16(_u16(w), ids, out, F16_TABLE)
        return out

    def _dequant_tile(self, w, qtype, r0, r1, tile):
        if qtype == T.F32:
            return w[r0:r1]
        ids = np.arange(r0, r1, dtype=np.int64)
        if qtype in (T.F16, T.BF16):
            self._dq_16bit(w, qtype, ids, tile)
        elif qtype in self._dq:
            self._dq[qtype](w, ids, tile, F16_TABLE, QUANT_TABLE[qtype].block_size)
        else:
            raise UnsupportedModelError(f"tensor type {GGMLType(qtype).name} is not supported")
        return tile

    def _dispatch_prefill(self, tasks) -> None:
        """One pool round, the tasks' row tiles dealt to the threads in turn. Tiles sit on the
        grid every thread count uses (multiples of the tile height), so every row goes through
        the same BLAS call shape and prefill logits do not depend on GGUFILE_THREADS (splitting
        rows elsewhere changed them by up to ~1: BLAS rounding, amplified by the 8-bit
        requantization of the next matmul's activations)."""
        n = self.pool.n_threads
        if n == 1 or sum(task[2] for task in tasks) < MIN_PARALLEL_PREFILL_BYTES:
            for run, rows, _, _ in tasks:
                run(0, rows)
            return
        per_thread: list[list] = [[] for _ in range(n)]
        dealt = 0
        for run, rows, _, tile in tasks:
            tile = tile or -(-rows // n)  # F32 matvecs (rows independent): n equal pieces
            for t0 in range(0, rows, tile):
                per_thread[dealt % n].append((run, t0, min(rows, t0 + tile)))
                dealt += 1
        self.pool.run([_job(slices) for slices in per_thread if slices])

    # --- prefill's element-wise passes and attention ------------------------------------------

    def _rows_parallel(self, run, rows: int, n_elements: int) -> None:
        """run(r0, r1) over [0, rows) in one pool round, equal row ranges per thread (for
        kernels whose rows are independent: the split never changes a result)."""
        n = self.pool.n_threads
        if n == 1 or n_elements < MIN_PARALLEL_ELEMENTS or rows < 2:
            run(0, rows)
            return
        self.pool.run([_job([(run, r0, r1)]) for r0, r1 in split_rows(rows, n)])

    def round_f16(self, x: np.ndarray) -> np.ndarray:
        """x (C-contiguous float32, any shape) rounded to fp16 precision, as a new float32 array."""
        x2 = x.reshape(x.shape[0], -1)
        out = np.empty_like(x2)
        self._rows_parallel(lambda r0, r1: self._round_f16(x2, out, r0, r1), x2.shape[0], x2.size)
        return out.reshape(x.shape)

    def geglu(self, g: np.ndarray, u: np.ndarray, table: np.ndarray) -> np.ndarray:
        """g = gelu(g) * u in place (g, u: C-contiguous float32 (n, n_ff); table: GELU by fp16 bits)."""
        self._rows_parallel(lambda r0, r1: self._geglu(g, u, table, r0, r1), g.shape[0], g.size)
        return g

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, q0: int, window: int) -> np.ndarray:
        """Causal (optionally sliding-window) softmax attention of prompt queries.

        q (n, n_head, hd) float32, scaled and fp16-rounded; k, v (n_kv, q0 + n, hd) float32: the
        cache through the last query; query i sits at position q0 + i. Returns (n, n_head * hd).
        Queries go in chunks of ATTN_CHUNK tokens, each multiplied with only the keys it can
        see, the chunks dealt to the pool threads; the chunk grid is the same for any thread
        count, so the result is too.
        """
        n, n_head, hd = q.shape
        n_kv = k.shape[0]
        g = n_head // n_kv
        # (n_kv, n * g, hd), rows in (token, head of the group) order: a token chunk is contiguous
        qg = np.ascontiguousarray(q.reshape(n, n_kv, g, hd).transpose(1, 0, 2, 3)).reshape(n_kv, n * g, hd)
        o = np.empty_like(qg)

        def run(i0: int, i1: int) -> None:
            k0, k1 = _key_range(q0 + i0, q0 + i1, window)
            s = np.matmul(qg[:, i0 * g:i1 * g], k[:, k0:k1].transpose(0, 2, 1))  # (n_kv, rows, keys)
            self._softmax(s, q0 + i0, g, k0, window)
            np.matmul(s, v[:, k0:k1], out=o[:, i0 * g:i1 * g])

        chunks = [(i0, min(n, i0 + ATTN_CHUNK)) for i0 in range(0, n, ATTN_CHUNK)]
        per_thread: list[list] = [[] for _ in range(self.pool.n_threads)]
        load = [0] * len(per_thread)
        # longest first, each to the least loaded thread (a chunk's cost: queries x keys)
        for i0, i1 in sorted(chunks, key=lambda c: -_attention_cost(c, q0, window)):
            t = load.index(min(load))
            per_thread[t].append((run, i0, i1))
            load[t] += _attention_cost((i0, i1), q0, window)
        self.pool.run([_job(slices) for slices in per_thread if slices])
        # (n_kv, n, g * hd) -> (n, n_kv * g * hd): head h = kv * g + j, as ggml's broadcast has it
        return o.reshape(n_kv, n, g * hd).transpose(1, 0, 2).reshape(n, n_head * hd)

    def _dispatch_decode(self, tasks, n_tok: int) -> None:
        """One pool round: thread i runs the i-th slice of every big task's rows, the calling
        thread's slice bigger (_first_share); small tasks run whole on the calling thread.
        Decided per task, so a weight is split the same way alone or fused with others."""
        n = self.pool.n_threads
        per_thread: list[list] = [[] for _ in range(n)]
        for run, rows, nbytes, _ in tasks:
            work = nbytes * n_tok
            if n == 1 or work < MIN_PARALLEL_WORK:
                per_thread[0].append((run, 0, rows))
                continue
            for i, (r0, r1) in enumerate(split_rows(rows, n, align=8, first=_first_share(work, n))):
                per_thread[i].append((run, r0, r1))
        self.pool.run([_job(slices) for slices in per_thread if slices])


def _key_range(p_first: int, p_end: int, window: int) -> tuple[int, int]:
    """Key positions [k0, k1) that queries at positions [p_first, p_end) can see."""
    return (max(0, p_first - window + 1) if window else 0), p_end


def _attention_cost(chunk: tuple[int, int], q0: int, window: int) -> int:
    k0, k1 = _key_range(q0 + chunk[0], q0 + chunk[1], window)
    return (chunk[1] - chunk[0]) * (k1 - k0)


def _tile_rows(k: int) -> int:
    return max(8, TILE_ELEMENTS // k)


def _first_share(work: int, n: int) -> float:
    """The calling thread's fraction of a round's rows: an equal share plus the head start the
    other threads need (HANDOFF_US) - all that matters for a small matvec, nothing for a big one."""
    total_us = work / MATVEC_BYTES_PER_US
    return min(0.9, (total_us + (n - 1) * HANDOFF_US) / n / total_us)


def check_weight(w: np.ndarray, qtype: GGMLType, k: int) -> None:
    """The compiled kernels trust their arguments' memory layout: check it once per call."""
    if qtype in (T.F32, T.F16, T.BF16):
        dtypes = {T.F32: (np.float32,), T.F16: (np.float16, np.uint16), T.BF16: (np.uint16,)}[qtype]
        row_len = k
    else:
        info = QUANT_TABLE.get(qtype)
        if info is None:
            raise UnsupportedModelError(f"tensor type {GGMLType(qtype).name} is not supported")
        dtypes, row_len = (np.uint8,), k // info.block_size * info.type_size
        if k % info.block_size:
            raise ValueError(f"row length {k} is not a multiple of the {qtype.name} block size")
    if w.ndim != 2 or w.dtype not in dtypes or w.shape[1] != row_len or not w.flags.c_contiguous:
        raise ValueError(f"{GGMLType(qtype).name} weight must be a C-contiguous {dtypes[0].__name__} "
                         f"matrix with {row_len} columns, got {w.dtype} {w.shape}")


def _job(slices):
    def job() -> None:
        for run, r0, r1 in slices:
            run(r0, r1)
    return job


def _u16(w: np.ndarray) -> np.ndarray:
    """F16 weights as their uint16 bit patterns (a view)."""
    return w if w.dtype == np.uint16 else w.view(np.uint16)
