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
from ggufile.runtime.kernels.src.exports import _round_f16, gelu_f16
from ggufile.runtime.kernels.step_layout import (
    C_EMBD, C_GELU, C_HEAD_DIM, C_N_EMBD, C_N_FF, C_N_HEAD, C_N_KV, C_N_LAYER, C_N_ROT, C_N_VOCAB,
    C_NEOX, C_OUTPUT, C_OUTPUT_NORM, C_POS, C_QK, C_QK_K, C_TOKEN, C_WINDOW, F_EMBD_SCALE, F_EPS,
    L_ATTN_NORM, L_DOWN, L_FFN_NORM, L_GATE, L_K_NORM, L_POST_ATTN_NORM, L_POST_FFN_NORM, L_Q_NORM,
    L_SWA, L_UP, L_WK, L_WO, L_WQ, L_WV, R_COS_K, R_COS_Q, R_SIN_K, R_SIN_Q, ROPE_SWA, T_COLS,
    T_OFFSET, T_ROW_BYTES, T_ROWS, T_TYPE)
from ggufile.runtime.kernels.src.sync import barrier

_F32, _F16, _BF16 = int(GGMLType.F32), int(GGMLType.F16), int(GGMLType.BF16)
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = (int(GGMLType.Q4_0), int(GGMLType.Q4_1), int(GGMLType.Q5_0),
                                     int(GGMLType.Q5_1), int(GGMLType.Q8_0))
_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = (int(GGMLType.Q2_K), int(GGMLType.Q3_K), int(GGMLType.Q4_K),
                                     int(GGMLType.Q5_K), int(GGMLType.Q6_K))


def _kernel(name):
    """A exports.py kernel as a callee of the step, with the flags it is exported with."""
    return njit(fastmath=set(exports.fastmath_for(name)))(getattr(exports, name))


_mv_f32, _mv_f16, _mv_bf16 = _kernel("mv_f32"), _kernel("mv_f16"), _kernel("mv_bf16")
_mv_q4_0, _mv_q4_1, _mv_q5_0, _mv_q5_1, _mv_q8_0 = (
    _kernel("mv_q4_0"), _kernel("mv_q4_1"), _kernel("mv_q5_0"), _kernel("mv_q5_1"), _kernel("mv_q8_0"))
_mv_q2_k, _mv_q3_k, _mv_q4_k, _mv_q5_k, _mv_q6_k = (
    _kernel("mv_q2_k"), _kernel("mv_q3_k"), _kernel("mv_q4_k"), _kernel("mv_q5_k"), _kernel("mv_q6_k"))
_dq_f16, _dq_bf16 = _kernel("dq_f16"), _kernel("dq_bf16")
_dq_q4_0, _dq_q4_1, _dq_q5_0, _dq_q5_1, _dq_q8_0 = (
    _kernel("dq_q4_0"), _kernel("dq_q4_1"), _kernel("dq_q5_0"), _kernel("dq_q5_1"), _kernel("dq_q8_0"))
_dq_q2_k, _dq_q3_k, _dq_q4_k, _dq_q5_k, _dq_q6_k = (
    _kernel("dq_q2_k"), _kernel("dq_q3_k"), _kernel("dq_q4_k"), _kernel("dq_q5_k"), _kernel("dq_q6_k"))
_quantize_q8_0, _quantize_q8_k = _kernel("quantize_q8_0"), _kernel("quantize_q8_k")


# --- weights as views of the file's bytes ------------------------------------------------------

@njit(inline="always")
def _bytes(blob, tensors, t):
    """Tensor t's rows as a (rows, row_bytes) uint8 view of the file."""
    off, rows, rb = tensors[t, T_OFFSET], tensors[t, T_ROWS], tensors[t, T_ROW_BYTES]
    return blob[off:off + rows * rb].reshape((rows, rb))


@njit(inline="always")
def _head(flat, n):
    """The first n values of a flat buffer as a (1, n) matrix (the kernels' row layout)."""
    return flat[:n].reshape((1, n))


@njit
def _matvec(blob, tensors, t, x, acts, out, r0, r1, tab, qk, qk_k):
    """out[0, r0:r1] = rows r0..r1-1 of tensor t times x (1, k), on x's 8-bit blocks in `acts`
    where the type has them (see _quantize)."""
    if r1 <= r0:
        return
    qt, k = tensors[t, T_TYPE], tensors[t, T_COLS]
    w = _bytes(blob, tensors, t)
    if qt == _F16:
        _mv_f16(w.view(np.uint16), x, out, r0, r1, tab)
    elif qt == _BF16:
        _mv_bf16(w.view(np.uint16), x, out, r0, r1, tab)
    elif qt == _F32:
        _mv_f32(w.view(np.float32), x, out, r0, r1)
    elif qt == _Q2_K or qt == _Q3_K or qt == _Q4_K or qt == _Q5_K or qt == _Q6_K:
        xq, xd, xs = _head(acts[3], k), _head(acts[4], k // qk_k), _head(acts[5], k // 16)
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
    elif qt == _Q4_0 or qt == _Q4_1 or qt == _Q5_0 or qt == _Q5_1 or qt == _Q8_0:
        xq, xd, xs = _head(acts[0], k), _head(acts[1], k // qk), _head(acts[2], k // qk)
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
    """Thread tid's [start, end) of n rows: equal parts, boundaries on multiples of 4."""
    start = (n * tid // n_threads + 3) // 4 * 4
    end = n if tid == n_threads - 1 else (n * (tid + 1) // n_threads + 3) // 4 * 4
    return min(start, n), min(end, n)


# --- the small maths (thread 0) ----------------------------------------------------------------

@njit(inline="always")
def _rmsnorm(x, n, w, eps, out):
    """out[:n] = x / sqrt(mean(x^2) + eps) * w: ggml_rms_norm (sum in double), then ggml_mul."""
    total = 0.0
    for i in range(n):
        total += np.float64(x[i] * x[i])
    mean = np.float32(total / n)
    scale = np.float32(1.0) / np.sqrt(mean + eps)
    for i in range(n):
        out[i] = (x[i] * scale) * w[i]


@njit(inline="always")
def _rope(x, n_rot, cos, sin, neox):
    """Rotate the first n_rot dims of one head in place (ops.rope): pairs are adjacent dims, or
    dims i and i + n_rot/2 in NEOX mode; sin carries the sign of each pair's first member."""
    half = n_rot // 2
    rotated = np.empty(n_rot, np.float32)
    for i in range(n_rot):
        if neox:
            partner = i + half if i < half else i - half
        else:
            partner = i ^ 1
        r = x[i] * cos[i]
        r += x[partner] * sin[i]
        rotated[i] = r
    for i in range(n_rot):
        x[i] = rotated[i]


@njit
def _quantize(x, k, acts, qk, qk_k):
    """x[:k] -> its 8-bit blocks in acts = (Q8_0/Q8_1 values, scales, d*sums, Q8_K values,
    scales, group sums), flat buffers; the Q8_K ones only when k holds whole super-blocks."""
    row = _head(x, k)
    _quantize_q8_0(row, _head(acts[0], k), _head(acts[1], k // qk), _head(acts[2], k // qk), qk)
    if k % qk_k == 0:
        _quantize_q8_k(row, _head(acts[3], k), _head(acts[4], k // qk_k), _head(acts[5], k // 16), qk_k)


@njit
def _qk_rope_store(il, lay, cfg, vecs, rope, eps, q, k, v, k_cache, v_cache):
    """Per head: q/k RMSNorm (gemma3), RoPE (attention scale folded into q's table), float16
    rounding; K and V written into the cache at this position."""
    H, KV, D, n_rot, pos = cfg[C_N_HEAD], cfg[C_N_KV], cfg[C_HEAD_DIM], cfg[C_N_ROT], cfg[C_POS]
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
                k_cache[il, kv, pos, i] = head[i]
                v_cache[il, kv, pos, i] = _round_f16(v[kv * D + i])


@njit
def _attend(il, cfg, window, q, k_cache, v_cache, scores, h0, h1, out):
    """Heads h0..h1-1 of softmax(q.K) V over the visible keys (ops.attention with one query):
    probabilities rounded to float16 before they weight V, as llama.cpp's float16 V cache has them."""
    H, KV, D, pos = cfg[C_N_HEAD], cfg[C_N_KV], cfg[C_HEAD_DIM], cfg[C_POS]
    first = max(0, pos - window + 1) if window > 0 else 0
    group = H // KV
    for h in range(h0, h1):
        kv = h // group
        qh = q[h * D:(h + 1) * D]
        best = -np.inf
        for j in range(first, pos + 1):
            s = np.float32(0.0)
            key = k_cache[il, kv, j]
            for i in range(D):
                s += qh[i] * key[i]
            scores[j] = s
            best = max(best, s)
        total = 0.0
        for j in range(first, pos + 1):
            e = np.exp(scores[j] - best)
            scores[j] = e
            total += np.float64(e)
        inv = np.float32(1.0 / total)
        o = out[h * D:(h + 1) * D]
        o[:] = 0
        for j in range(first, pos + 1):
            p = _round_f16(scores[j] * inv)
            val = v_cache[il, kv, j]
            for i in range(D):
                o[i] += p * val[i]


@njit(inline="always")
def _glu(g, u, r0, r1, use_gelu, gelu_table):
    """g[r0:r1] = act(g) * u: GELU (gemma) or SiLU (llama), as ops.gelu_tanh / ops.silu."""
    for i in range(r0, r1):
        v = g[i]
        if use_gelu:
            a = gelu_f16(v, gelu_table)
        else:
            a = v / (np.float32(1.0) + np.exp(-v))
        g[i] = a * u[i]


# --- the step ----------------------------------------------------------------------------------

def decode_token(tid, n_threads, sync, blob, tensors, layers, vecs, cfg, cfg_f, rope, gelu_table,
                 tab, k_cache, v_cache, work, scores, acts, logits):
    """Thread tid's part of one token's forward pass; every pool thread calls it with the same
    arguments but tid. Writes logits (1, n_vocab) and this position's K/V; returns 0, or 1 if
    the round was aborted (a thread never came).

    work: float32 scratch (5, max(n_embd, 2 n_ff, (n_head + 2 n_head_kv) head_dim)), the rows
    being x | h | q,k,v | attention | out,gate,up. scores: (n_threads, n_ctx).
    acts: (6, max k) the 8-bit activation blocks, flat (see _quantize).
    """
    E, H, KV, D, F = cfg[C_N_EMBD], cfg[C_N_HEAD], cfg[C_N_KV], cfg[C_HEAD_DIM], cfg[C_N_FF]
    qk, qk_k = cfg[C_QK], cfg[C_QK_K]
    eps, gelu = cfg_f[F_EPS], cfg[C_GELU] != 0
    x, h, qkv, att, ffn = work[0], work[1], work[2], work[3], work[4]
    q, k, v = qkv[:H * D], qkv[H * D:(H + KV) * D], qkv[(H + KV) * D:(H + 2 * KV) * D]
    o, g, u = ffn[:E], ffn[:F], ffn[F:2 * F]  # o is done with before gate/up start
    a = (acts[0], acts[1], acts[2], acts[3], acts[4], acts[5])
    h2, att2, o2, g2 = _head(h, E), _head(att, H * D), _head(o, E), _head(g, F)
    if tid == 0:
        _get_row(blob, tensors, cfg[C_EMBD], cfg[C_TOKEN], _head(x, E), tab, qk, qk_k)
        embd_scale = cfg_f[F_EMBD_SCALE]
        if embd_scale != 1.0:
            for i in range(E):
                x[i] *= embd_scale
    for il in range(cfg[C_N_LAYER]):
        lay = layers[il]
        # ---- attention
        if tid == 0:
            n = lay[L_ATTN_NORM]
            _rmsnorm(x, E, vecs[n:n + E], eps, h)
            _quantize(h, E, a, qk, qk_k)
        if not barrier(sync, n_threads):
            return 1
        for slot, part in ((L_WQ, q), (L_WK, k), (L_WV, v)):
            t = lay[slot]
            r0, r1 = _share(tensors[t, T_ROWS], tid, n_threads)
            _matvec(blob, tensors, t, h2, a, _head(part, part.shape[0]), r0, r1, tab, qk, qk_k)
        if not barrier(sync, n_threads):
            return 1
        if tid == 0:
            _qk_rope_store(il, lay, cfg, vecs, rope, eps, q, k, v, k_cache, v_cache)
        if not barrier(sync, n_threads):
            return 1
        h0, h1 = _heads(H, tid, n_threads)
        _attend(il, cfg, cfg[C_WINDOW] if lay[L_SWA] else 0, q, k_cache, v_cache, scores[tid], h0, h1, att)
        if not barrier(sync, n_threads):
            return 1
        if tid == 0:
            _quantize(att, H * D, a, qk, qk_k)
        if not barrier(sync, n_threads):
            return 1
        r0, r1 = _share(E, tid, n_threads)
        _matvec(blob, tensors, lay[L_WO], att2, a, o2, r0, r1, tab, qk, qk_k)
        if not barrier(sync, n_threads):
            return 1
        # ---- feed-forward
        if tid == 0:
            _residual(x, o, E, lay[L_POST_ATTN_NORM], vecs, eps, h)
            n = lay[L_FFN_NORM]
            _rmsnorm(x, E, vecs[n:n + E], eps, h)
            _quantize(h, E, a, qk, qk_k)
        if not barrier(sync, n_threads):
            return 1
        r0, r1 = _share(F, tid, n_threads)
        _matvec(blob, tensors, lay[L_GATE], h2, a, g2, r0, r1, tab, qk, qk_k)
        _matvec(blob, tensors, lay[L_UP], h2, a, _head(u, F), r0, r1, tab, qk, qk_k)
        _glu(g, u, r0, r1, gelu, gelu_table)
        if not barrier(sync, n_threads):
            return 1
        if tid == 0:
            _quantize(g, F, a, qk, qk_k)
        if not barrier(sync, n_threads):
            return 1
        r0, r1 = _share(E, tid, n_threads)
        _matvec(blob, tensors, lay[L_DOWN], g2, a, _head(att, E), r0, r1, tab, qk, qk_k)
        if not barrier(sync, n_threads):
            return 1
        if tid == 0:
            _residual(x, att, E, lay[L_POST_FFN_NORM], vecs, eps, h)
    # ---- output
    if tid == 0:
        n = cfg[C_OUTPUT_NORM]
        _rmsnorm(x, E, vecs[n:n + E], eps, h)
        _quantize(h, E, a, qk, qk_k)
    if not barrier(sync, n_threads):
        return 1
    r0, r1 = _share(cfg[C_N_VOCAB], tid, n_threads)
    _matvec(blob, tensors, cfg[C_OUTPUT], h2, a, logits, r0, r1, tab, qk, qk_k)
    return 0


@njit(inline="always")
def _heads(n_head, tid, n_threads):
    return n_head * tid // n_threads, n_head * (tid + 1) // n_threads


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
    ro_u8 = nt.Array(nt.uint8, 1, "C", readonly=True)  # the mapped file
    ro_i64_2d = nt.Array(nt.int64, 2, "C", readonly=True)
    ro_i64 = nt.Array(nt.int64, 1, "C", readonly=True)
    ro_f32 = nt.Array(nt.float32, 1, "C", readonly=True)
    ro_f32_2d = nt.Array(nt.float32, 2, "C", readonly=True)
    cache = nt.float32[:, :, :, ::1]
    return {"decode_token": i64(i64, i64, nt.int64[::1], ro_u8, ro_i64_2d, ro_i64_2d, ro_f32, ro_i64,
                                ro_f32, ro_f32_2d, ro_f32, ro_f32, cache, cache, f32_2d, f32_2d,
                                f32_2d, f32_2d)}


SIGNATURES = _signatures()
KERNEL_NAMES = tuple(SIGNATURES)
