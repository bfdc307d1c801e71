"""Run tokens through the compiled step: the whole model packed into the step's flat tables.

`CompiledStep.for_model(model)` packs a Model once (where each weight lies in the mapped file,
the norm weights in one float32 array, the dimensions); `step(token, cache)` then runs one
token, and `forward(ids, cache)` a prompt, as a single call per pool thread and chunk of
CHUNK tokens (kernels/src/step.py), instead of ~120 pool rounds and the Python glue between
them. Both go through the same compiled code, token by token in the same order, so a prompt's
logits are the same bits whether it came in one piece, in chunks or one token at a time. It gives None where it cannot run the model (the NumPy
backend, a kernel build without the step, a weight type it lacks, a float32 KV cache), and the
caller keeps the Python forward pass.
"""
from __future__ import annotations

import ctypes
import mmap
import sys
import threading

import numpy as np

from ggufile.runtime import kernels
from ggufile.runtime.model import ops
from ggufile.runtime.model.transformer import lazy_zeros
from ggufile.runtime.errors import GGUFFormatError
from ggufile.runtime.gguf.constants import QK, QK_K, GGMLType
from ggufile.runtime.kernels import packing
from ggufile.runtime.kernels import step_layout as S
from ggufile.runtime.kernels.compiled import F16_TABLE
from ggufile.runtime.kernels.reference import row_elements
from ggufile.runtime.kernels.types import Q8_0_FAMILY, Q8_K_FAMILY
from ggufile.runtime.kernels.types import WEIGHT_TYPES as STEP_WEIGHT_TYPES  # its dispatch covers them all (tested)

# Tokens per step call in a prompt: the scratch (activations, their 8-bit blocks) grows with it
# (~0.5 MB a token at 8B), and the matmul kernels' token tiles are about this size anyway.
CHUNK = 64


def _root(a: np.ndarray) -> np.ndarray:
    """The array at the bottom of a view chain (for weights: the reader's map of the file)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


class _Packer:
    """Collects weight matrices (file offsets) and norm vectors (one float32 array)."""

    def __init__(self, blob: np.ndarray):
        self.blob = blob
        self._base = blob.ctypes.data
        self.tensors: list[tuple] = []
        self._tensor_ids: dict[int, int] = {}
        self.vectors: list[np.ndarray] = []
        self._vector_len = 0

    def matrix(self, qw) -> int:
        """Row number of weight `qw` in the tensor table (a tied weight appears once)."""
        data = qw.data
        offset = data.ctypes.data - self._base
        if (qw.qtype not in STEP_WEIGHT_TYPES or _root(data) is not self.blob or data.ndim != 2
                or not data.flags.c_contiguous or not 0 <= offset <= self.blob.nbytes - data.nbytes):
            raise _CannotPack
        if offset not in self._tensor_ids:
            k = row_elements(data, qw.qtype)
            self._tensor_ids[offset] = len(self.tensors)
            self.tensors.append((offset, int(qw.qtype), data.shape[0], k, data.nbytes // data.shape[0], S.BLOB_FILE))
        return self._tensor_ids[offset]

    def copy(self, t: int) -> int:
        """A second row for tensor t (the same bytes), for what only one of its uses packs."""
        self.tensors.append(self.tensors[t])
        return len(self.tensors) - 1

    def vector(self, v: np.ndarray | None) -> int:
        """Offset of norm weight `v` in the packed float32 array, -1 for None."""
        if v is None:
            return -1
        at = self._vector_len
        self.vectors.append(np.asarray(v, dtype=np.float32).reshape(-1))
        self._vector_len += self.vectors[-1].size
        return at


class _CannotPack(Exception):
    pass


class CompiledStep:
    def __init__(self, model, backend, blob: np.ndarray, tensors, layers, vecs, cfg, cfg_f):
        self.model, self.backend = model, backend
        c = model.config
        self._blob, self._tensors, self._layers, self._vecs = blob, tensors, layers, vecs
        self._cfg, self._cfg_f = cfg, cfg_f
        k = max(1, c.n_expert_used)
        # one token's width in each work row (a (n, width) matrix per row, see decode_token);
        # a mixture-of-experts layer keeps one token's router, gate|up and outputs in W_MOE
        self._width = max(c.n_embd, 2 * c.n_ff, (c.n_head + 2 * c.n_head_kv) * c.head_dim,
                          c.n_expert + 2 * k + 2 * c.n_ff * k + c.n_embd * k)
        self._max_k = max(c.n_embd, c.n_ff * k, c.n_head * c.head_dim)
        self._work = self._acts = np.zeros((0, 0), dtype=np.float32)  # sized per call (_scratch)
        self._scores = np.zeros((0, 0), dtype=np.float32)  # (threads, ATTN_HEADS * n_ctx), sized by _run()
        self._sync = np.zeros(S.SYNC_LEN, dtype=np.int64)
        self._gelu = ops.gelu_f16_table()
        self._rope = np.zeros((0, S.ROPE_ROWS, c.n_rot), dtype=np.float32)  # by position, grown
        self._rope_freqs = None  # the global layers' frequencies self._rope was built with
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, model, backend=None) -> "CompiledStep | None":
        """The step for `model` on `backend` (default: the kernels' own), or None where it cannot run."""
        backend = backend or kernels.step_backend()
        if backend is None or getattr(backend, "decode_token", None) is None:
            return None
        w, c = model.weights, model.config
        try:
            packer = _Packer(_root(w.tok_embd.data))
            layers = np.array([_layer_row(packer, L, c.is_swa(il)) for il, L in enumerate(w.layers)],
                              dtype=np.int64)
            cfg = np.zeros(S.CFG_LEN, dtype=np.int64)
            cfg[S.C_EMBD] = packer.matrix(w.tok_embd)
            cfg[S.C_OUTPUT] = packer.matrix(w.output)
            if cfg[S.C_OUTPUT] == cfg[S.C_EMBD]:  # tied: the output matrix gets a row of its own,
                cfg[S.C_OUTPUT] = packer.copy(cfg[S.C_EMBD])  # packed below, the lookups stay on the file
            cfg[S.C_OUTPUT_NORM] = packer.vector(w.output_norm)
        except _CannotPack:
            return None
        cfg[[S.C_N_EMBD, S.C_N_HEAD, S.C_N_KV, S.C_HEAD_DIM, S.C_N_FF, S.C_N_VOCAB, S.C_N_ROT]] = (
            c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_ff, c.n_vocab, c.n_rot)
        cfg[S.C_NEOX], cfg[S.C_GELU], cfg[S.C_WINDOW] = int(c.rope_neox), int(c.gelu), c.sliding_window
        cfg[S.C_N_LAYER], cfg[S.C_QK], cfg[S.C_QK_K] = c.n_layer, QK, QK_K
        cfg[S.C_N_EXPERT], cfg[S.C_N_EXPERT_USED] = c.n_expert, c.n_expert_used
        cfg_f = np.zeros(S.CFG_F_LEN, dtype=np.float32)
        cfg_f[S.F_EPS], cfg_f[S.F_EMBD_SCALE], cfg_f[S.F_ATTN_SOFTCAP] = c.rms_eps, c.embd_scale, c.attn_softcap
        tensors = np.array(packer.tensors, dtype=np.int64).reshape(-1, S.TENSOR_COLS)
        cfg[S.C_ACTS] = _activation_kinds(tensors, int(cfg[S.C_EMBD]))
        vecs = np.concatenate(packer.vectors).astype(np.float32)
        _assert_shapes(c, tensors, layers, cfg, packer.vectors)
        packed = _pack_weights(backend, tensors, packer.blob, int(cfg[S.C_EMBD]))
        return cls(model, backend, (packer.blob, _readonly(packed)), _readonly(tensors), _readonly(layers),
                   _readonly(vecs), cfg, cfg_f)

    def supports(self, cache) -> bool:
        """Whether the step can write this cache: float16, C order, this model's shape (the
        compiled code trusts the shape: it has no bounds checks)."""
        c = self.model.config
        k_shape = (c.n_layer, c.n_head_kv, cache.n_ctx, c.head_dim)
        v_shape = (c.n_layer, c.n_head_kv, c.head_dim, cache.n_ctx)
        return all(a.dtype == np.float16 and a.flags.c_contiguous and a.shape == shape
                   for a, shape in ((cache.k, k_shape), (cache.v, v_shape))) and 0 <= cache.n_tokens < cache.n_ctx

    def step(self, token: int, cache) -> np.ndarray:
        """Logits (n_vocab,) after token `token` at position cache.n_tokens; appends its K/V."""
        return self.forward(np.array([token], dtype=np.int64), cache)

    def forward(self, ids: np.ndarray, cache, all_logits: bool = False) -> np.ndarray:
        """Tokens `ids` at positions cache.n_tokens..; appends their K/V. Returns the last
        token's logits (n_vocab,), or every token's (n, n_vocab) with all_logits."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        n = len(ids)
        if not 0 < n <= cache.n_ctx - cache.n_tokens:
            raise ValueError(f"{n} tokens do not fit a cache of {cache.n_ctx} holding {cache.n_tokens}")
        # only the prompt's last token needs the output matrix, unless every token's logits are wanted
        wanted = np.arange(n, dtype=np.int64) if all_logits else np.array([n - 1], dtype=np.int64)
        logits = self._chunked(ids, np.arange(cache.n_tokens, cache.n_tokens + n, dtype=np.int64),
                               np.zeros(n, dtype=np.int64), wanted, cache.k, cache.v, cache)
        cache.n_tokens += n
        return logits if all_logits else logits[0]

    def forward_batch(self, items) -> list[np.ndarray]:
        """items = [(ids, cache)], the caches distinct slots of one SlotCaches (model/slots.py):
        every item's tokens in one call (in CHUNK-token calls when there are more), each at its
        own cache's positions; returns each item's last-token logits."""
        pool = items[0][1].pool
        ids = np.concatenate([np.asarray(i, dtype=np.int64).reshape(-1) for i, _ in items])
        positions = np.concatenate([np.arange(c.n_tokens, c.n_tokens + len(i), dtype=np.int64) for i, c in items])
        seqs = np.concatenate([np.full(len(i), c.seq, dtype=np.int64) for i, c in items])
        last = np.cumsum([len(i) for i, _ in items]) - 1  # each item's last token
        logits = self._chunked(ids, positions, seqs, last, pool.k, pool.v, items[0][1])
        for i, cache in items:
            cache.n_tokens += len(i)
        return list(logits)

    def _chunked(self, ids, positions, seqs, wanted, k, v, cache) -> np.ndarray:
        """_run over CHUNK tokens at a time; the soft-capped logits of the tokens `wanted`
        (ascending indices into ids), one row each."""
        rows = []
        with self._lock:  # one call at a time: the scratch, tables and rope rows are shared
            for a in range(0, len(ids), CHUNK):
                b = min(a + CHUNK, len(ids))
                outputs = (wanted[(wanted >= a) & (wanted < b)] - a).astype(np.int64)
                rows.append(self._run(ids[a:b], positions[a:b], seqs[a:b], outputs, k, v, cache))
        logits = np.concatenate(rows)
        cap = self.model.config.final_softcap
        if cap:  # row by row: NumPy's vector tanh may round an element by where it sits in the array
            for row in logits:
                row[:] = ops.softcap(row, cap)
        return logits

    def _run(self, ids, positions, seqs, outputs, k, v, cache) -> np.ndarray:
        """One compiled call: tokens ids at positions of sequences seqs (layer seq * n_layer + il
        of the caches k, v, float16 (seqs * n_layer, n_kv, n_ctx, head_dim)); the logits of the
        tokens `outputs`. `cache` stands for the caches' size (and LongRoPE's choice)."""
        n = len(ids)
        self._fill_rope(int(positions.max()) + 1, cache)
        n_threads = self.backend.pool.n_threads
        if self._scores.shape[0] != n_threads or self._scores.shape[1] < S.ATTN_HEADS * cache.n_ctx:
            # ATTN_HEADS rows of attention scores per thread (the step trusts this shape: no bounds checks)
            self._scores = np.zeros((n_threads, S.ATTN_HEADS * cache.n_ctx), dtype=np.float32)
        if self._work.shape[1] < n * self._width:
            self._work = np.zeros((S.WORK_ROWS, n * self._width), dtype=np.float32)
            self._acts = np.zeros((6, n * self._max_k), dtype=np.float32)
        logits = np.empty((len(outputs), self.model.config.n_vocab), dtype=np.float32)
        rope = np.ascontiguousarray(self._rope[positions].reshape(n * S.ROPE_ROWS, -1))
        self.backend.run_step(self._sync, (
            self._blob, self._tensors, self._layers, self._vecs, self._cfg, self._cfg_f, rope,
            self._gelu, F16_TABLE, k.view(np.uint16), v.view(np.uint16), self._work, self._scores,
            self._acts, logits, _readonly(ids), _readonly(positions), _readonly(seqs), _readonly(outputs)))
        return logits

    def _fill_rope(self, end: int, cache) -> None:
        """The cos/sin rows of every position below `end`, each computed once, alone, exactly
        as the Python pass builds them (ops.rope_tables). Rebuilt when the cache's
        size picks other frequencies (LongRoPE)."""
        m, c = self.model, self.model.config
        freqs = m.rope_for(cache)
        if freqs is not self._rope_freqs:
            self._rope, self._rope_freqs = self._rope[:0], freqs
        have = self._rope.shape[0]
        if end <= have:
            return
        grown = np.zeros((max(end, 2 * have), S.ROPE_ROWS, c.n_rot), dtype=np.float32)
        grown[:have] = self._rope
        tables = ((0, freqs), (S.ROPE_SWA, m.rope_freqs_swa)) if c.sliding_window else ((0, freqs),)
        for pos in range(have, grown.shape[0]):
            at = np.array([pos])
            for base, f in tables:
                rows = (ops.rope_tables(at, f, c.rope_neox, c.attn_scale) + ops.rope_tables(at, f, c.rope_neox))
                for i, table in enumerate(rows):  # cos q, sin q, cos k, sin k
                    grown[pos, base + i] = table.reshape(-1)
        self._rope = grown


def _layer_row(packer: _Packer, L, swa: bool) -> list[int]:
    row = [-1] * S.LAYER_COLS
    matrices = [(S.L_WO, L.wo), (S.L_GATE, L.w_gate), (S.L_UP, L.w_up), (S.L_DOWN, L.w_down)]
    if L.wqkv is not None:  # the fused matrix writes q, k, v side by side, as three would
        matrices.append((S.L_WQ, L.wqkv))
    else:
        matrices += [(S.L_WQ, L.wq), (S.L_WK, L.wk), (S.L_WV, L.wv)]
    for col, qw in matrices:
        if qw is not None:
            row[col] = packer.matrix(qw)
    for col, v in ((S.L_ATTN_NORM, L.attn_norm), (S.L_FFN_NORM, L.ffn_norm), (S.L_Q_NORM, L.q_norm),
                   (S.L_K_NORM, L.k_norm), (S.L_POST_ATTN_NORM, L.post_attn_norm),
                   (S.L_POST_FFN_NORM, L.post_ffn_norm), (S.L_QKV_BIAS, L.bqkv)):
        row[col] = packer.vector(v)
    row[S.L_SWA] = int(swa)
    ex = L.experts
    if ex is not None:
        row[S.L_ROUTER] = packer.matrix(ex.gate_inp)
        ids = [packer.matrix(qw) for qw in ex.gate + ex.up + ex.down]
        if ids != list(range(ids[0], ids[0] + len(ids))):  # the step finds expert e at first + e
            raise _CannotPack
        row[S.L_EXPERTS] = ids[0]
    return row


def _layer_matrices(c, row) -> dict[int, tuple[int, int]]:
    """Column -> (rows, k) of the dense matrices a layer row holds: q/k/v apart or fused, gate and
    up apart or fused (phi3), none of the FFN's where experts replace it."""
    E, F, D = c.n_embd, c.n_ff, c.head_dim
    QD, KVD = c.n_head * D, c.n_head_kv * D
    fused_qkv = row[S.L_WK] < 0
    shapes = {S.L_WO: (E, QD), S.L_WQ: (QD + 2 * KVD, E) if fused_qkv else (QD, E)}
    if not fused_qkv:
        shapes.update({S.L_WK: (KVD, E), S.L_WV: (KVD, E)})
    if row[S.L_EXPERTS] < 0:
        fused_up = row[S.L_GATE] < 0
        shapes.update({S.L_UP: (2 * F, E) if fused_up else (F, E), S.L_DOWN: (E, F)})
        if not fused_up:
            shapes[S.L_GATE] = (F, E)
    return shapes


def _assert_shapes(c, tensors, layers, cfg, vectors) -> None:
    """What the compiled step indexes without bounds checks, asserted once here: every matrix has
    the (rows, k) the config promises, every norm vector its length, rope covers <= one head."""
    E, F, D = c.n_embd, c.n_ff, c.head_dim
    QD, KVD = c.n_head * D, c.n_head_kv * D
    vec_len = {S.L_ATTN_NORM: E, S.L_FFN_NORM: E, S.L_Q_NORM: D, S.L_K_NORM: D,
               S.L_POST_ATTN_NORM: E, S.L_POST_FFN_NORM: E, S.L_QKV_BIAS: QD + 2 * KVD}
    starts = np.cumsum([0] + [v.size for v in vectors])
    sizes = dict(zip(starts[:-1].tolist(), (v.size for v in vectors)))

    def matrix(row: int, shape: tuple[int, int], what: str) -> None:
        if tuple(tensors[row, [S.T_ROWS, S.T_COLS]]) != shape:
            raise GGUFFormatError(f"compiled step: {what} is {tuple(tensors[row, [S.T_ROWS, S.T_COLS]])}, "
                                  f"expected {shape}")

    def vector(at: int, n: int, what: str) -> None:
        if at >= 0 and sizes.get(int(at)) != n:
            raise GGUFFormatError(f"compiled step: {what} has {sizes.get(int(at))} values, expected {n}")

    for il, row in enumerate(layers):
        for col, shape in _layer_matrices(c, row).items():
            matrix(row[col], shape, f"layer {il} matrix {col}")
        if row[S.L_EXPERTS] >= 0:
            first, n = row[S.L_EXPERTS], c.n_expert
            matrix(row[S.L_ROUTER], (n, E), f"layer {il} router")
            for e in range(n):
                for at, shape in ((first + e, (F, E)), (first + n + e, (F, E)), (first + 2 * n + e, (E, F))):
                    matrix(at, shape, f"layer {il} expert {e}")
        for col, n in vec_len.items():
            vector(row[col], n, f"layer {il} norm {col}")
    matrix(cfg[S.C_EMBD], (c.n_vocab, E), "token embeddings")
    matrix(cfg[S.C_OUTPUT], (c.n_vocab, E), "output")
    vector(cfg[S.C_OUTPUT_NORM], E, "output norm")
    if not (0 < c.n_rot <= D and c.n_rot % 2 == 0) or len(layers) != c.n_layer:
        raise GGUFFormatError(f"compiled step: rope dimensions {c.n_rot} / head {D} / layers {len(layers)}")


def _activation_kinds(tensors: np.ndarray, embd_row: int) -> int:
    """step_layout's A_* bits of the activation blocks the step's matrices read (the token
    embedding is only looked up: a tied output matrix has a row of its own)."""
    kinds = {GGMLType(int(t)) for row, t in enumerate(tensors[:, S.T_TYPE]) if row != embd_row}
    return S.A_Q8_0 * bool(kinds & Q8_0_FAMILY) | S.A_Q8_K * bool(kinds & Q8_K_FAMILY)


def _pack_weights(backend, tensors: np.ndarray, blob: np.ndarray, embd: int) -> np.ndarray:
    """Packs the matrices kernels/packing.py packs (but the token embedding, read a row at a
    time) into one new array, points their tensor rows at it, and lets the kernel drop the
    file's pages they were copied from (the copy replaces them in memory, as llama.cpp's
    repacked buffers replace its mapping's pages; a tied output's lookups fault back in only
    the rows they read). Returns the packed weights."""
    chosen = [t for t in range(len(tensors)) if t != embd
              and packing.packable(GGMLType(tensors[t, S.T_TYPE]), int(tensors[t, S.T_ROWS]))]
    sizes = [int(tensors[t, S.T_ROWS]) * packing.packed_row_bytes(GGMLType(tensors[t, S.T_TYPE]),
                                                                   int(tensors[t, S.T_COLS])) for t in chosen]
    packed = lazy_zeros((max(1, sum(sizes)),), np.uint8, huge_pages=True)
    at = 0
    for t, size in zip(chosen, sizes):
        off, qtype, rows, k, rb, _ = (int(v) for v in tensors[t])
        source = blob[off:off + rows * rb].reshape(rows, rb)
        target = packed[at:at + size].reshape(rows, -1)
        # a slice at a time, each one's file pages dropped once copied: the file's and the packed
        # copy of one big matrix (a tied output, 263 MB at 1B Q8_0) are never resident together
        step = max(8, _PACK_SLICE_BYTES // rb // 8 * 8)
        for r0 in range(0, rows, step):
            backend.pack(GGMLType(qtype), source[r0:r0 + step], target[r0:r0 + step])
            _drop_pages(source[r0:r0 + step])
        _drop_pages(source)  # the pages the slices' edges shared
        tensors[t] = (at, S.PACKED_TYPE_BASE + qtype, rows, k, size // rows, S.BLOB_PACKED)
        at += size
    return packed


_PACK_SLICE_BYTES = 16 << 20


def _drop_pages(view: np.ndarray) -> None:
    """madvise(MADV_DONTNEED) the whole pages of a view of the mapped file: they leave the
    process's resident set (a later read maps them again from the page cache)."""
    if _LIBC is None:
        return
    start, end = view.ctypes.data, view.ctypes.data + view.nbytes
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)  # 4: Linux's value


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a
