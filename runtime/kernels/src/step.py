"""One token through the whole model in one compiled call per thread (Numba source, like exports.py).

Decoding one token is ~120 small matvecs with a little glue between them (norms, RoPE,
attention). Driven from Python, each matvec costs a thread-pool hand-off (15-25 us) plus the
glue's interpreter time: 8-10 ms a token on SmolLM2, as much as the matvecs themselves. Here
every pool thread calls `decode_token` once per token; the threads split each matvec's rows
and each layer's attention heads, and meet at a spinning barrier (sync.py) between stages.
Thread 0 also does the small serial steps (norms, RoPE, activation quantization).

Numerics are those of the Python forward pass (model/transformer.py, model/ops.py), which follows llama.cpp's:
8-bit activations in every quantized matvec (the same `mv_*` kernels), float16-rounded q, K, V
and attention probabilities, the GELU read from ggml's float16 table (exports.gelu_f16),
RMSNorm summed in double as ggml does. The model arrives as flat tables (step_layout); weights stay in the mapped file.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ggufile.runtime.gguf.constants import GGMLType
from ggufile.runtime.kernels.src import exports
from ggufile.runtime.kernels.src.exports import _f16_bits, _fmuladd, _round_f16, gelu_f16, v_expf
from ggufile.runtime.kernels.src.lanes import dot_f16_heads
from ggufile.runtime.kernels.step_layout import (
    A_Q8_0, A_Q8_K, ATTN_HEADS, C_ACTS, C_EMBD, C_GELU, C_HEAD_DIM, C_N_EMBD, C_N_EXPERT, C_N_EXPERT_USED,
    C_N_FF, C_N_HEAD, C_N_KV, C_N_LAYER, C_N_ROT, C_N_VOCAB, C_NEOX, C_OUTPUT, C_OUTPUT_NORM, C_QK,
    C_QK_K, C_WINDOW, F_ATTN_SOFTCAP, F_EMBD_SCALE, F_EPS, L_ATTN_NORM, L_DOWN, L_EXPERTS,
    L_FFN_NORM, L_GATE, L_K_NORM, L_POST_ATTN_NORM, L_POST_FFN_NORM, L_Q_NORM, L_QKV_BIAS, L_ROUTER,
    L_SWA, L_UP, L_WK, L_WO, L_WQ, L_WV, PACKED_TYPE_BASE, R_COS_K, R_COS_Q, R_SIN_K, R_SIN_Q,
    ROPE_ROWS, ROPE_SWA, T_BLOB, T_COLS, T_OFFSET, T_ROW_BYTES, T_ROWS, T_TYPE, W_ATT, W_FFN, W_H,
    W_MOE, W_QKV, W_X)
from ggufile.runtime.kernels.src.sync import barrier

_F32, _F16, _BF16 = int(GGMLType.F32), int(GGMLType.F16), int(GGMLType.BF16)
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = (int(GGMLType.Q4_0), int(GGMLType.Q4_1), int(GGMLType.Q5_0),
                                     int(GGMLType.Q5_1), int(GGMLType.Q8_0))
_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = (int(GGMLType.Q2_K), int(GGMLType.Q3_K), int(GGMLType.Q4_K),
                                     int(GGMLType.Q5_K), int(GGMLType.Q6_K))
_P4_0, _P4_K, _P5_0, _P6_K, _P8_0 = (PACKED_TYPE_BASE + _Q4_0, PACKED_TYPE_BASE + _Q4_K, PACKED_TYPE_BASE + _Q5_0,
                                     PACKED_TYPE_BASE + _Q6_K, PACKED_TYPE_BASE + _Q8_0)  # packed at load


def _kernel(name):
    """A exports.py kernel as a callee of the step, with the flags it is exported with."""
    return njit(fastmath=set(exports.fastmath_for(name)))(getattr(exports, name))


_mv_f32, _mv_f16, _mv_bf16 = _kernel("mv_f32"), _kernel("mv_f16"), _kernel("mv_bf16")
_mv_q4_0, _mv_q4_1, _mv_q5_0, _mv_q5_1, _mv_q8_0 = (
    _kernel("mv_q4_0"), _kernel("mv_q4_1"), _kernel("mv_q5_0"), _kernel("mv_q5_1"), _kernel("mv_q8_0"))
_mv_q2_k, _mv_q3_k, _mv_q4_k, _mv_q5_k, _mv_q6_k = (
    _kernel("mv_q2_k"), _kernel("mv_q3_k"), _kernel("mv_q4_k"), _kernel("mv_q5_k"), _kernel("mv_q6_k"))
_mv_q4_0_packed, _mv_q4_k_packed, _mv_q5_0_packed, _mv_q6_k_packed, _mv_q8_0_packed = (
    _kernel("mv_q4_0_packed"), _kernel("mv_q4_k_packed"), _kernel("mv_q5_0_packed"), _kernel("mv_q6_k_packed"),
    _kernel("mv_q8_0_packed"))
_dq_f16, _dq_bf16 = _kernel("dq_f16"), _kernel("dq_bf16")
_dq_q4_0, _dq_q4_1, _dq_q5_0, _dq_q5_1, _dq_q8_0 = (
    _kernel("dq_q4_0"), _kernel("dq_q4_1"), _kernel("dq_q5_0"), _kernel("dq_q5_1"), _kernel("dq_q8_0"))
_dq_q2_k, _dq_q3_k, _dq_q4_k, _dq_q5_k, _dq_q6_k = (
    _kernel("dq_q2_k"), _kernel("dq_q3_k"), _kernel("dq_q4_k"), _kernel("dq_q5_k"), _kernel("dq_q6_k"))
_quantize_q8_0, _quantize_q8_k = _kernel("quantize_q8_0"), _kernel("quantize_q8_k")


# --- weights as views of the file's bytes ------------------------------------------------------

@njit(inline="always")
def _bytes(blob, tensors, t):
    """Tensor t's rows as a (rows, row_bytes) uint8 view of the file or of the packed weights
    (blob: the pair of them)."""
    off, rows, rb = tensors[t, T_OFFSET], tensors[t, T_ROWS], tensors[t, T_ROW_BYTES]
    return blob[tensors[t, T_BLOB]][off:off + rows * rb].reshape((rows, rb))


@njit(inline="always")
def _rows(flat, t0, t1, n):
    """Rows t0..t1-1 of the (tokens, n) matrix laid out at the start of a flat buffer (the
    kernels' row layout)."""
    return flat[t0 * n:t1 * n].reshape((t1 - t0, n))


@njit
def _matvec(blob, tensors, t, x, acts, out, r0, r1, tab, qk, qk_k):
    """out[:, r0:r1] = rows r0..r1-1 of tensor t times each token's x (n, k), on x's 8-bit blocks
    in `acts` where the type has them (see _quantize)."""
    if r1 <= r0:
        return
    qt, k, n = tensors[t, T_TYPE], tensors[t, T_COLS], x.shape[0]
    w = _bytes(blob, tensors, t)
    if qt == _F16:
        _mv_f16(w.view(np.uint16), x, out, r0, r1, tab)
    elif qt == _BF16:
        _mv_bf16(w.view(np.uint16), x, out, r0, r1, tab)
    elif qt == _F32:
        _mv_f32(w.view(np.float32), x, out, r0, r1)
    elif qt == _Q2_K or qt == _Q3_K or qt == _Q4_K or qt == _Q5_K or qt == _Q6_K or qt == _P4_K \
            or qt == _P6_K:
        xq, xd, xs = _rows(acts[3], 0, n, k), _rows(acts[4], 0, n, k // qk_k), _rows(acts[5], 0, n, k // 16)
        if qt == _Q2_K:
            _mv_q2_k(w, xq, xd, xs, out, r0, r1, tab, qk_k)
        elif qt == _Q3_K:
            _mv_q3_k(w, xq, xd, xs, out, r0, r1, tab, qk_k)
        elif qt == _Q4_K:
            _mv_q4_k(w, xq, xd, xs, out, r0, r1, tab, qk_k)
        elif qt == _Q5_K:
            _mv_q5_k(w, xq, xd, xs, out, r0, r1, tab, qk_k)
        elif qt == _Q6_K:
            _mv_q6_k(w, xq, xd, xs, out, r0, r1, tab, qk_k)
        elif qt == _P4_K:
            _mv_q4_k_packed(w, xq, xd, xs, out, r0, r1, tab, qk_k)
        elif qt == _P6_K:
            _mv_q6_k_packed(w, xq, xd, xs, out, r0, r1, tab, qk_k)
    elif qt == _Q4_0 or qt == _Q4_1 or qt == _Q5_0 or qt == _Q5_1 or qt == _Q8_0 or qt == _P4_0 or qt == _P5_0 \
            or qt == _P8_0:
        xq, xd, xs = _rows(acts[0], 0, n, k), _rows(acts[1], 0, n, k // qk), _rows(acts[2], 0, n, k // qk)
        if qt == _Q4_0:
            _mv_q4_0(w, xq, xd, out, r0, r1, tab, qk)
        elif qt == _Q4_1:
            _mv_q4_1(w, xq, xd, xs, out, r0, r1, tab, qk)
        elif qt == _Q5_0:
            _mv_q5_0(w, xq, xd, out, r0, r1, tab, qk)
        elif qt == _Q5_1:
            _mv_q5_1(w, xq, xd, xs, out, r0, r1, tab, qk)
        elif qt == _Q8_0:
            _mv_q8_0(w, xq, xd, out, r0, r1, tab, qk)
        elif qt == _P4_0:
            _mv_q4_0_packed(w, xq, xd, out, r0, r1, tab, qk)
        elif qt == _P5_0:
            _mv_q5_0_packed(w, xq, xd, out, r0, r1, tab, qk)
        elif qt == _P8_0:
            _mv_q8_0_packed(w, xq, xd, out, r0, r1, tab, qk)
    # no else: the packer (model/step.py) admits only the types above, a test keeps the two equal


@njit
def _get_row(blob, tensors, t, token, out, tab, qk, qk_k):
    """out[0] = the dequantized row `token` of tensor t (the embedding lookup)."""
    qt = tensors[t, T_TYPE]
    w = _bytes(blob, tensors, t)
    ids = np.empty(1, np.int64)
    ids[0] = token
    if qt == _Q4_0:
        _dq_q4_0(w, ids, out, tab, qk)
    elif qt == _Q4_1:
        _dq_q4_1(w, ids, out, tab, qk)
    elif qt == _Q5_0:
        _dq_q5_0(w, ids, out, tab, qk)
    elif qt == _Q5_1:
        _dq_q5_1(w, ids, out, tab, qk)
    elif qt == _Q8_0:
        _dq_q8_0(w, ids, out, tab, qk)
    elif qt == _Q2_K:
        _dq_q2_k(w, ids, out, tab, qk_k)
    elif qt == _Q3_K:
        _dq_q3_k(w, ids, out, tab, qk_k)
    elif qt == _Q4_K:
        _dq_q4_k(w, ids, out, tab, qk_k)
    elif qt == _Q5_K:
        _dq_q5_k(w, ids, out, tab, qk_k)
    elif qt == _Q6_K:
        _dq_q6_k(w, ids, out, tab, qk_k)
    elif qt == _F16:
        _dq_f16(w.view(np.uint16), ids, out, tab)
    elif qt == _BF16:
        _dq_bf16(w.view(np.uint16), ids, out)
    elif qt == _F32:
        row = w.view(np.float32)[token]
        for j in range(out.shape[1]):
            out[0, j] = row[j]


@njit(inline="always")
def _share(n, tid, n_threads):
    """Thread tid's [start, end) of n rows: equal parts, boundaries on multiples of 8 (the
    interleaved tiles' rows: a part of 8k rows leaves none to the one-row kernels)."""
    start = (n * tid // n_threads + 7) // 8 * 8
    end = n if tid == n_threads - 1 else (n * (tid + 1) // n_threads + 7) // 8 * 8
    return min(start, n), min(end, n)


# --- the small maths (thread 0) ----------------------------------------------------------------
# decode_token reassociates (exports.FASTMATH), and Numba compiles a callee with its caller's
# fast-math flags unless the callee names its own. Everything here that sums floats or computes
# ggml_v_expf says fastmath=False: in llama.cpp's order on every target, not in an order LLVM
# picks per vector width (which made aarch64 and x86-64 round apart).

@njit(fastmath=False)
def _rmsnorm(x, n, w, eps, out):
    """out[:n] = x / sqrt(mean(x^2) + eps) * w: ggml_rms_norm (summed in double, in order, as
    ggml's loop is), then ggml_mul."""
    total = 0.0
    for i in range(n):
        total += np.float64(x[i] * x[i])
    mean = np.float32(total / n)
    scale = np.float32(1.0) / np.sqrt(mean + eps)
    for i in range(n):
        out[i] = (x[i] * scale) * w[i]


@njit(fastmath=False)
def _rope(x, n_rot, cos, sin, neox):
    """Rotate the first n_rot dims of one head in place (ops.rope): pairs are adjacent dims, or
    dims i and i + n_rot/2 in NEOX mode; sin carries the sign of each pair's first member.
    ggml's rotate_pairs as GCC contracts it: x0*cos - x1*sin is fma(x0, cos, -(x1*sin)) and
    x0*sin + x1*cos is fma(x0, sin, x1*cos)."""
    half = n_rot // 2
    rotated = np.empty(n_rot, np.float32)
    for i in range(n_rot):
        if neox:
            first = i < half
            partner = i + half if first else i - half
        else:
            first = i % 2 == 0
            partner = i ^ 1
        if first:
            rotated[i] = _fmuladd(x[i], cos[i], x[partner] * sin[i])
        else:
            rotated[i] = _fmuladd(x[partner], sin[i], x[i] * cos[i])
    for i in range(n_rot):
        x[i] = rotated[i]


@njit
def _quantize(x, k, acts, t0, t1, cfg):
    """Tokens t0..t1-1 of x ((tokens, k) at the start of a flat buffer) -> their 8-bit blocks in
    acts = (Q8_0/Q8_1 values, scales, d*sums, Q8_K values, scales, group sums), flat buffers
    laid out (tokens, ...), those of the families the model's matrices read (C_ACTS); the Q8_K
    ones only when k holds whole super-blocks."""
    if t1 <= t0:
        return
    qk, qk_k, kinds = cfg[C_QK], cfg[C_QK_K], cfg[C_ACTS]
    row = _rows(x, t0, t1, k)
    if kinds & A_Q8_0:
        _quantize_q8_0(row, _rows(acts[0], t0, t1, k), _rows(acts[1], t0, t1, k // qk),
                       _rows(acts[2], t0, t1, k // qk), qk)
    if kinds & A_Q8_K and k % qk_k == 0:
        _quantize_q8_k(row, _rows(acts[3], t0, t1, k), _rows(acts[4], t0, t1, k // qk_k),
                       _rows(acts[5], t0, t1, k // 16), qk_k)


@njit(inline="always")
def _acts_at(a, o, qk, qk_k):
    """The activation buffers `a` (see _quantize) from element o on: one expert's own blocks."""
    return (a[0][o:], a[1][o // qk:], a[2][o // qk:], a[3][o:], a[4][o // qk_k:], a[5][o // 16:])


@njit
def _qk_rope_store(il, lay, cfg, vecs, rope, eps, q, k, v, cache_layer, pos, k_cache, v_cache):
    """One token's heads (q, k, v: its rows): q/k RMSNorm (gemma3), RoPE (attention scale folded
    into q's table; rope: this position's ROPE_ROWS rows), float16 rounding; K and V written into
    the cache's layer `cache_layer` (this layer of the token's sequence) at position pos."""
    H, KV, D, n_rot = cfg[C_N_HEAD], cfg[C_N_KV], cfg[C_HEAD_DIM], cfg[C_N_ROT]
    neox = cfg[C_NEOX] != 0
    base = ROPE_SWA if lay[L_SWA] else 0
    normed = np.empty(D, np.float32)
    for h in range(H + KV):
        is_q = h < H
        head = q[h * D:(h + 1) * D] if is_q else k[(h - H) * D:(h - H + 1) * D]
        norm = lay[L_Q_NORM] if is_q else lay[L_K_NORM]
        if norm >= 0:
            _rmsnorm(head, D, vecs[norm:norm + D], eps, normed)
            head[:] = normed
        if is_q:
            _rope(head, n_rot, rope[base + R_COS_Q], rope[base + R_SIN_Q], neox)
        else:
            _rope(head, n_rot, rope[base + R_COS_K], rope[base + R_SIN_K], neox)
        for i in range(D):
            head[i] = _round_f16(head[i])
        if not is_q:
            kv = h - H
            for i in range(D):
                k_cache[cache_layer, kv, pos, i] = np.uint16(_f16_bits(head[i]))
                v_cache[cache_layer, kv, i, pos] = np.uint16(_f16_bits(v[kv * D + i]))


@njit
def _split_qkv(fused, q, k, v):
    """One token's q, k, v rows from its fused q|k|v product."""
    nq, nk = q.shape[0], k.shape[0]
    q[:] = fused[:nq]
    k[:] = fused[nq:nq + nk]
    v[:] = fused[nq + nk:nq + 2 * nk]


@njit
def _add_bias(bias, vecs, q, k, v):
    """The q|k|v bias (qwen2) added to one token's rows."""
    nq, nk = q.shape[0], k.shape[0]
    for i in range(nq):
        q[i] += vecs[bias + i]
    for i in range(nk):
        k[i] += vecs[bias + nq + i]
        v[i] += vecs[bias + nq + nk + i]


@njit(fastmath=False)
def _attend_heads(heads, cache_layer, cfg, window, softcap, pos, h0, q, k_cache, v_cache, scores, tab, out):
    """Heads h0..h0+heads-1 (a constant; one kv head's) of softmax(q.K) V for the query at
    position pos over the keys it sees (ops.attention with one query; q, out: the token's rows;
    the cache holds fp16 bit patterns; scores: (ATTN_HEADS, n_ctx)). q.k is ggml_vec_dot_f16 of
    the fp16 key and the fp16-rounded query, as llama.cpp's KQ product on its float16 K cache;
    scores soft-capped where softcap > 0 (ops.softcap); the probabilities rounded to float16
    and dotted with each row of the transposed V cache (n_kv, head_dim, n_ctx). Each key and
    value row is widened once for all the heads (lanes.dot_f16_heads: each head's sums in its
    own order, the same bits as one head alone)."""
    H, KV, D = cfg[C_N_HEAD], cfg[C_N_KV], cfg[C_HEAD_DIM]
    first = max(0, pos - window + 1) if window > 0 else 0
    kv = h0 // (H // KV)
    qf = np.empty((heads, D), np.float32)
    for g in range(heads):
        for i in range(D):
            qf[g, i] = _round_f16(q[(h0 + g) * D + i])
    s = np.empty(heads, np.float32)
    best = np.full(heads, -np.inf, np.float32)
    for j in range(first, pos + 1):
        dot_f16_heads(heads, k_cache[cache_layer, kv, j], qf, tab, D, s)
        for g in range(heads):
            v = s[g]
            if softcap > 0:
                v = np.float32(np.tanh(v * np.float32(1.0 / softcap))) * softcap
            scores[g, j] = v
            best[g] = max(best[g], v)
    # softmax and V^T times the fp16 probabilities (ggml_vec_dot_f16) over the cache's cells,
    # which llama.cpp pads to a multiple of 32 (masked past pos and before the window: 0)
    n_kv = min((pos + 1 + 31) // 32 * 32, v_cache.shape[3])
    for g in range(heads):
        p = scores[g]
        inv = np.float32(1.0 / _softmax_exp(p, first, pos + 1, n_kv, best[g]))
        for j in range(first, pos + 1):
            p[j] = _round_f16(p[j] * inv)
        p[:first] = 0
        p[pos + 1:n_kv] = 0
    for i in range(D):
        dot_f16_heads(heads, v_cache[cache_layer, kv, i], scores, tab, n_kv, s)
        for g in range(heads):
            out[(h0 + g) * D + i] = s[g]


@njit(fastmath=False)
def _attend(cache_layer, cfg, window, softcap, pos, h0, heads, q, k_cache, v_cache, scores, tab, out):
    """_attend_heads of `heads` (1..ATTN_HEADS) heads from h0."""
    if heads == 4:
        _attend_heads(4, cache_layer, cfg, window, softcap, pos, h0, q, k_cache, v_cache, scores, tab, out)
    elif heads == 3:
        _attend_heads(3, cache_layer, cfg, window, softcap, pos, h0, q, k_cache, v_cache, scores, tab, out)
    elif heads == 2:
        _attend_heads(2, cache_layer, cfg, window, softcap, pos, h0, q, k_cache, v_cache, scores, tab, out)
    else:
        _attend_heads(1, cache_layer, cfg, window, softcap, pos, h0, q, k_cache, v_cache, scores, tab, out)


@njit
def _heads_per_call(n_tok, KV, group, n_threads):
    """How many of a kv head's query heads one _attend call serves: its whole group (at most
    ATTN_HEADS) while there are (token, kv head) pairs enough to keep the threads busy, else
    one (a decode with one kv head)."""
    return min(group, ATTN_HEADS) if n_tok * KV >= 2 * n_threads else 1


@njit(fastmath=False)
def _softmax_exp(s, first, last, n, best):
    """s[j] = exp(s[j] - best) for j in first..last-1 of a softmax row of n cells (the rest
    masked: exp 0), and the row's sum: ggml_vec_soft_max_f32, its 8-wide loop (ggml_v_expf,
    each 8's sum in float in hsum_float_8's order, added in double) up to n // 8 * 8, libm's
    expf one by one after."""
    vectored = n // 8 * 8
    lane = np.zeros(8, np.float32)
    total = 0.0
    for c0 in range(first // 8 * 8, min(last, vectored), 8):
        for k in range(8):
            j = c0 + k
            lane[k] = 0
            if first <= j < last:
                lane[k] = v_expf(s[j] - best)
                s[j] = lane[k]
        total += np.float64(((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7])))
    for j in range(max(first, vectored), last):
        s[j] = np.exp(s[j] - best)
        total += np.float64(s[j])
    return total


# numpy's error model: no zero-division branch, so the SiLU loop vectorizes (8192 values,
# one thread: 19.5 -> 11.4 us; the same bits)
@njit(fastmath=False, error_model="numpy")
def _glu(out, g, u, r0, r1, use_gelu, gelu_table):
    """out[r0:r1] = act(g) * u of rows of g.shape[0]: GELU (gemma, ggml's f16 table) or SiLU
    (llama) as ggml_vec_swiglu_f32 computes it: ggml_v_expf in whole vectors of 8, libm's
    expf for the n % 8 left at the end."""
    if use_gelu:
        for i in range(r0, r1):
            out[i] = gelu_f16(g[i], gelu_table) * u[i]
        return
    vectored = min(r1, g.shape[0] // 8 * 8)
    for i in range(r0, vectored):
        v = g[i]
        out[i] = v / (np.float32(1.0) + v_expf(np.float32(0.0) - v)) * u[i]
    for i in range(max(r0, vectored), r1):
        v = g[i]
        out[i] = v / (np.float32(1.0) + np.exp(-v)) * u[i]


# --- the step ----------------------------------------------------------------------------------

def decode_token(tid, n_threads, sync, blob, tensors, layers, vecs, cfg, cfg_f, rope, gelu_table,
                 tab, k_cache, v_cache, work, scores, acts, logits, tokens, positions, seqs, outputs):
    """Thread tid's part of the forward pass of `tokens` (n of them); every pool thread calls it
    with the same arguments but tid. Token t sits at position positions[t] of sequence seqs[t],
    whose layer il is the caches' layer seqs[t] * n_layer + il (one sequence, or several slots'
    caches stacked); writes every token's K/V and the logits of tokens `outputs` (one row each).
    Returns 0, or 1 if the round was aborted (a thread never came).

    Every token goes through the same operations in the same order whatever n is (a prompt of
    hundreds, one token of a decode, or one token of each of several sequences): each matrix
    product output is one lanes.py row dot of that token's 8-bit blocks, each norm, RoPE and
    attention one token's own loop, an expert layer one token at a time. So a token's logits do
    not depend on how it was batched or whether its prompt was cached. Threads split matrix
    rows, tokens and (token, head) pairs, never a sum.

    rope: (n * ROPE_ROWS, n_rot), each token's rows. work: float32 scratch (WORK_ROWS, n *
    width), each row a (n, dim) matrix of x | h | q,k,v | attention, fused products, down | out,
    gate, up | one token's experts (see _experts). scores: (n_threads, n_ctx). acts: (6, n *
    max k), the 8-bit activation blocks (see _quantize).
    """
    N = tokens.shape[0]
    E, H, KV, D, F = cfg[C_N_EMBD], cfg[C_N_HEAD], cfg[C_N_KV], cfg[C_HEAD_DIM], cfg[C_N_FF]
    qk, qk_k, n_layer = cfg[C_QK], cfg[C_QK_K], cfg[C_N_LAYER]
    eps, gelu, softcap = cfg_f[F_EPS], cfg[C_GELU] != 0, cfg_f[F_ATTN_SOFTCAP]
    a = (acts[0], acts[1], acts[2], acts[3], acts[4], acts[5])
    x, h = _rows(work[W_X], 0, N, E), _rows(work[W_H], 0, N, E)
    q = _rows(work[W_QKV], 0, N, H * D)
    k = _rows(work[W_QKV][N * H * D:], 0, N, KV * D)
    v = _rows(work[W_QKV][N * (H + KV) * D:], 0, N, KV * D)
    att, down = _rows(work[W_ATT], 0, N, H * D), _rows(work[W_ATT], 0, N, E)
    fused_qkv, fused_gu = _rows(work[W_ATT], 0, N, (H + 2 * KV) * D), _rows(work[W_ATT], 0, N, 2 * F)
    o, g, u = _rows(work[W_FFN], 0, N, E), _rows(work[W_FFN], 0, N, F), _rows(work[W_FFN][N * F:], 0, N, F)
    t0, t1 = _tokens(N, tid, n_threads)  # this thread's tokens in the per-token stages
    for t in range(t0, t1):
        _get_row(blob, tensors, cfg[C_EMBD], tokens[t], _rows(work[W_X], t, t + 1, E), tab, qk, qk_k)
        embd_scale = cfg_f[F_EMBD_SCALE]
        if embd_scale != 1.0:
            for i in range(E):
                x[t, i] *= embd_scale
    for il in range(n_layer):
        lay = layers[il]
        # ---- attention
        n = lay[L_ATTN_NORM]
        for t in range(t0, t1):
            _rmsnorm(x[t], E, vecs[n:n + E], eps, h[t])
        _quantize(work[W_H], E, a, t0, t1, cfg)
        if not barrier(sync, n_threads):
            return 1
        fused = lay[L_WK] < 0  # one q|k|v matrix
        for slot in (L_WQ, L_WK, L_WV):
            wt = lay[slot]
            if wt >= 0:
                r0, r1 = _share(tensors[wt, T_ROWS], tid, n_threads)
                part = fused_qkv if fused else (q if slot == L_WQ else (k if slot == L_WK else v))
                _matvec(blob, tensors, wt, h, a, part, r0, r1, tab, qk, qk_k)
        if not barrier(sync, n_threads):
            return 1
        bias = lay[L_QKV_BIAS]
        for t in range(t0, t1):
            if fused:
                _split_qkv(fused_qkv[t], q[t], k[t], v[t])
            if bias >= 0:
                _add_bias(bias, vecs, q[t], k[t], v[t])
            _qk_rope_store(il, lay, cfg, vecs, rope[t * ROPE_ROWS:(t + 1) * ROPE_ROWS], eps,
                           q[t], k[t], v[t], seqs[t] * n_layer + il, positions[t], k_cache, v_cache)
        if not barrier(sync, n_threads):
            return 1
        window = cfg[C_WINDOW] if lay[L_SWA] else 0
        group = H // KV
        per = _heads_per_call(N, KV, group, n_threads)
        chunks = (group + per - 1) // per  # calls per kv head
        calls = KV * chunks  # per token
        own = scores[tid].reshape((ATTN_HEADS, -1))
        for item in range(tid, N * calls, n_threads):  # (token, kv head, heads) triples, dealt in turn
            t, c = item // calls, item % calls
            h0 = (c // chunks) * group + (c % chunks) * per
            _attend(seqs[t] * n_layer + il, cfg, window, softcap, positions[t], h0,
                    min(per, group - (h0 % group)), q[t], k_cache, v_cache, own, tab, att[t])
        if not barrier(sync, n_threads):
            return 1
        _quantize(work[W_ATT], H * D, a, t0, t1, cfg)
        if not barrier(sync, n_threads):
            return 1
        r0, r1 = _share(E, tid, n_threads)
        _matvec(blob, tensors, lay[L_WO], att, a, o, r0, r1, tab, qk, qk_k)
        if not barrier(sync, n_threads):
            return 1
        # ---- feed-forward
        n = lay[L_FFN_NORM]
        for t in range(t0, t1):
            _residual(x[t], o[t], E, lay[L_POST_ATTN_NORM], vecs, eps, h[t])
            _rmsnorm(x[t], E, vecs[n:n + E], eps, h[t])
        _quantize(work[W_H], E, a, t0, t1, cfg)
        if not barrier(sync, n_threads):
            return 1
        if lay[L_EXPERTS] >= 0:
            for t in range(N):
                if not _experts(tid, n_threads, sync, blob, tensors, lay, cfg, work[W_H][t * E:], a,
                                work[W_MOE], down[t], gelu, gelu_table, tab, qk, qk_k):
                    return 1
        else:
            if lay[L_GATE] < 0:  # one fused gate|up matrix: a thread's gate rows are not its up rows
                r0, r1 = _share(2 * F, tid, n_threads)
                _matvec(blob, tensors, lay[L_UP], h, a, fused_gu, r0, r1, tab, qk, qk_k)
                if not barrier(sync, n_threads):
                    return 1
                r0, r1 = _share(F, tid, n_threads)
                for t in range(N):
                    _glu(g[t], fused_gu[t, :F], fused_gu[t, F:], r0, r1, gelu, gelu_table)
            else:
                r0, r1 = _share(F, tid, n_threads)
                _matvec(blob, tensors, lay[L_GATE], h, a, g, r0, r1, tab, qk, qk_k)
                _matvec(blob, tensors, lay[L_UP], h, a, u, r0, r1, tab, qk, qk_k)
                for t in range(N):
                    _glu(g[t], g[t], u[t], r0, r1, gelu, gelu_table)
            if not barrier(sync, n_threads):
                return 1
            _quantize(work[W_FFN], F, a, t0, t1, cfg)
            if not barrier(sync, n_threads):
                return 1
            r0, r1 = _share(E, tid, n_threads)
            _matvec(blob, tensors, lay[L_DOWN], g, a, down, r0, r1, tab, qk, qk_k)
        if not barrier(sync, n_threads):
            return 1
        for t in range(t0, t1):
            _residual(x[t], down[t], E, lay[L_POST_FFN_NORM], vecs, eps, h[t])
    if not barrier(sync, n_threads):  # h rows are the post-norm's scratch until here
        return 1
    # ---- output: the logits of the tokens asked for, row j for token outputs[j]
    n_out = outputs.shape[0]
    n = cfg[C_OUTPUT_NORM]
    j0, j1 = _tokens(n_out, tid, n_threads)
    for j in range(j0, j1):
        _rmsnorm(x[outputs[j]], E, vecs[n:n + E], eps, h[j])
    _quantize(work[W_H], E, a, j0, j1, cfg)
    if not barrier(sync, n_threads):
        return 1
    r0, r1 = _share(cfg[C_N_VOCAB], tid, n_threads)
    _matvec(blob, tensors, cfg[C_OUTPUT], _rows(work[W_H], 0, n_out, E), a, logits, r0, r1, tab, qk, qk_k)
    return 0


@njit(fastmath=False)
def _route(logits, n_expert, n_used, wts, chosen):
    """The token's experts, best first, and their weights (transformer.route): softmax over all
    n_expert, the top n_used, renormalised."""
    best = -np.inf
    for e in range(n_expert):
        best = max(best, logits[e])
    total = _softmax_exp(logits, 0, n_expert, n_expert, best)
    inv = np.float32(1.0 / total)
    for e in range(n_expert):
        logits[e] = logits[e] * inv
    picked = 0.0
    for j in range(n_used):
        top = -1
        for e in range(n_expert):
            if logits[e] >= 0 and (top < 0 or logits[e] > logits[top]):
                top = e
        chosen[j] = top
        wts[j] = logits[top]
        picked += np.float64(logits[top])
        logits[top] = -1.0  # taken
    norm = np.float32(max(np.float32(picked), np.float32(6.103515625e-5)))
    for j in range(n_used):
        wts[j] = wts[j] / norm


@njit
def _experts(tid, n_threads, sync, blob, tensors, lay, cfg, x, a, moe, out, gelu, gelu_table, tab, qk, qk_k):
    """The mixture-of-experts FFN of one token (transformer._moe; x: its normed row at the start
    of a flat buffer, out: its (E,) result), reading only the chosen experts' rows: x quantized
    and routed (thread 0), every chosen expert's gate/up rows split over the threads, their
    activations quantized one expert per thread, the down rows split, the weighted sum (thread 0).
    moe: scratch [router logits | weights | choices | gate, up per expert | outputs per expert].
    False if a barrier was aborted."""
    E, F = cfg[C_N_EMBD], cfg[C_N_FF]
    n_expert, k = cfg[C_N_EXPERT], cfg[C_N_EXPERT_USED]
    first = lay[L_EXPERTS]
    router, wts, chosen = moe[:n_expert], moe[n_expert:n_expert + k], moe[n_expert + k:n_expert + 2 * k]
    ffn = moe[n_expert + 2 * k:]
    outs = ffn[2 * k * F:]
    x2 = _rows(x, 0, 1, E)
    if tid == 0:
        _quantize(x, E, a, 0, 1, cfg)
    if not barrier(sync, n_threads):
        return False
    r0, r1 = _share(n_expert, tid, n_threads)
    _matvec(blob, tensors, lay[L_ROUTER], x2, a, _rows(router, 0, 1, n_expert), r0, r1, tab, qk, qk_k)
    if not barrier(sync, n_threads):
        return False
    if tid == 0:
        _route(router, n_expert, k, wts, chosen)
    if not barrier(sync, n_threads):
        return False
    r0, r1 = _share(F, tid, n_threads)
    for j in range(k):
        e = np.int64(chosen[j])
        g, u = ffn[2 * j * F:(2 * j + 1) * F], ffn[(2 * j + 1) * F:(2 * j + 2) * F]
        _matvec(blob, tensors, first + e, x2, a, _rows(g, 0, 1, F), r0, r1, tab, qk, qk_k)
        _matvec(blob, tensors, first + n_expert + e, x2, a, _rows(u, 0, 1, F), r0, r1, tab, qk, qk_k)
        _glu(g, g, u, r0, r1, gelu, gelu_table)
    if not barrier(sync, n_threads):
        return False
    for j in range(tid, k, n_threads):
        _quantize(ffn[2 * j * F:], F, _acts_at(a, j * F, qk, qk_k), 0, 1, cfg)
    if not barrier(sync, n_threads):
        return False
    r0, r1 = _share(E, tid, n_threads)
    for j in range(k):
        e = np.int64(chosen[j])
        _matvec(blob, tensors, first + 2 * n_expert + e, _rows(ffn[2 * j * F:], 0, 1, F),
                _acts_at(a, j * F, qk, qk_k), _rows(outs[j * E:], 0, 1, E), r0, r1, tab, qk, qk_k)
    if not barrier(sync, n_threads):
        return False
    if tid == 0:
        for i in range(E):
            out[i] = outs[i] * wts[0]
        for j in range(1, k):
            w = wts[j]
            for i in range(E):
                out[i] += outs[j * E + i] * w
    return True


@njit(inline="always")
def _tokens(n, tid, n_threads):
    return n * tid // n_threads, n * (tid + 1) // n_threads


@njit(inline="always")
def _residual(x, o, n, norm, vecs, eps, scratch):
    """x += o, with o RMS-normed first where the model has a post-norm (gemma3)."""
    if norm >= 0:
        _rmsnorm(o, n, vecs[norm:norm + n], eps, scratch)
        for i in range(n):
            x[i] += scratch[i]
    else:
        for i in range(n):
            x[i] += o[i]


def _signatures() -> dict:
    from numba import types as nt

    i64 = nt.int64
    f32_2d = nt.float32[:, ::1]
    ro_u8 = nt.Array(nt.uint8, 1, "C", readonly=True)
    blobs = nt.UniTuple(ro_u8, 2)  # the mapped file, the weights packed at load
    ro_i64_2d = nt.Array(nt.int64, 2, "C", readonly=True)
    ro_i64 = nt.Array(nt.int64, 1, "C", readonly=True)
    ro_f32 = nt.Array(nt.float32, 1, "C", readonly=True)
    ro_f32_2d = nt.Array(nt.float32, 2, "C", readonly=True)
    cache = nt.uint16[:, :, :, ::1]  # fp16 bit patterns
    return {"decode_token": i64(i64, i64, nt.int64[::1], blobs, ro_i64_2d, ro_i64_2d, ro_f32, ro_i64,
                                ro_f32, ro_f32_2d, ro_f32, ro_f32, cache, cache, f32_2d, f32_2d,
                                f32_2d, f32_2d, ro_i64, ro_i64, ro_i64, ro_i64)}


SIGNATURES = _signatures()
KERNEL_NAMES = tuple(SIGNATURES)
