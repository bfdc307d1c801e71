"""The small maths of a transformer layer, on float32 NumPy arrays: norms, RoPE, attention, activations.

The heavy lifting (quantized matmuls) lives in `ggufile.runtime.kernels`; these helpers are the
glue between them. Each follows the ggml op that llama.cpp uses, so our logits match its logits.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ggufile.runtime import kernels

_SQRT_2_OVER_PI = np.float32(np.sqrt(2.0 / np.pi))
_GELU_COEF_A = np.float32(0.044715)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * w over the last axis (ggml_rms_norm then ggml_mul).

    Gemma's "(1 + w)" convention needs nothing here: convert_hf_to_gguf already stores w + 1.
    """
    ms = np.einsum("...i,...i->...", x, x, dtype=np.float32) / np.float32(x.shape[-1])
    scale = 1.0 / np.sqrt(ms + np.float32(eps), dtype=np.float32)
    return (x * scale[..., None]) * w


@dataclass(frozen=True)
class RopeFreqs:
    """How ggml turns a position into per-pair rotation angles (see rope_angles)."""
    theta_scale: np.float32  # base^(-2/n_rot), in float32 as ggml's powf gives it
    divisors: np.ndarray | None  # (n_rot/2,) Llama 3.1's rope_freqs.weight, or None
    mult: np.ndarray  # (n_rot/2,) float32: freq_scale, or YaRN's per-pair blend of 1 and freq_scale
    mscale: float  # cos/sin magnitude: 1, or YaRN's 1 + 0.1 ln(1/freq_scale)


def rope_freqs(n_rot: int, base: float, scale: float, freq_factors: np.ndarray | None,
               yarn: tuple[int, float, float] | None = None) -> RopeFreqs:
    """RoPE frequencies as ggml_rope_ext computes them.

    Plain/linear: theta_i = scale * p * base^(-2i/n_rot) / factor_i.
    YaRN, yarn = (n_ctx_orig, beta_fast, beta_slow): pairs that turn fast over the original context
    keep the unscaled theta, slow pairs take scale * theta, with a linear ramp between (ggml's
    rope_yarn with ext_factor 1), and cos/sin grow by 1 + 0.1 ln(1/scale).
    """
    n_pairs = n_rot // 2
    theta_scale = np.float32(base) ** np.float32(-2.0 / n_rot)
    divisors = None if freq_factors is None else freq_factors.astype(np.float32)
    if yarn is None or scale == 1.0:
        return RopeFreqs(theta_scale, divisors, np.full(n_pairs, scale, dtype=np.float32), 1.0)
    n_ctx_orig, beta_fast, beta_slow = yarn

    def corr_dim(n_rotations: float) -> float:  # the pair index that turns n_rotations times over n_ctx_orig
        return n_rot * math.log(n_ctx_orig / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(0.0, math.floor(corr_dim(beta_fast)))
    high = min(n_rot - 1.0, math.ceil(corr_dim(beta_slow)))
    i = np.arange(n_pairs, dtype=np.float64)
    mix = 1.0 - np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)  # 1: extrapolate, 0: interpolate
    mult = (scale * (1.0 - mix) + mix).astype(np.float32)
    return RopeFreqs(theta_scale, divisors, mult, 1.0 + 0.1 * math.log(1.0 / scale))


def rope_angles(positions: np.ndarray, f: RopeFreqs) -> np.ndarray:
    """Angles (n_tok, n_rot/2) float32, by ggml's recurrence theta_{i+1} = theta_i * theta_scale from
    theta_0 = p, in float32: it rounds a little differently from p * base^(-2i/n_rot), and following
    it keeps q.k bit-close to llama.cpp's."""
    steps = np.full((len(positions), len(f.mult)), f.theta_scale, dtype=np.float32)
    steps[:, 0] = positions
    theta = np.cumprod(steps, axis=1, dtype=np.float32)
    if f.divisors is not None:
        theta /= f.divisors
    return theta * f.mult


@functools.cache
def _libm_function(name: str):
    """The C library's float function `name` (cosf, sinf, tanhf: what ggml calls), or None where
    no libm loads (glibc's and macOS's by their names: no ldconfig or compiler run to look)."""
    import ctypes

    for soname in ("libm.so.6", "libm.dylib"):
        try:
            f = getattr(ctypes.CDLL(soname), name)
        except (OSError, AttributeError):
            continue
        f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
        return f
    return None


def _libm_map(name: str, x: np.ndarray, wide) -> np.ndarray:
    """libm's float function `name` of every element of float32 x, or wide() of it in double,
    rounded, where there is no libm (the nearest float, which glibc's functions nearly always
    give). Not NumPy's float32 functions: their SIMD versions miss the nearest float on ~15% of
    values (cos/sin of RoPE's angles), differently per ISA."""
    f = _libm_function(name)
    flat = x.reshape(-1)
    if f is None:
        return wide(flat.astype(np.float64)).astype(np.float32).reshape(x.shape)
    return np.array([f(v) for v in flat.tolist()], dtype=np.float32).reshape(x.shape)


def _cos_sin(ang: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cosf/sinf of float32 angles, as ggml's RoPE gets them."""
    return _libm_map("cosf", ang, np.cos), _libm_map("sinf", ang, np.sin)


def rope_tables(positions: np.ndarray, f: RopeFreqs, neox: bool,
                scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and signed sin of the angles, laid out for `rope` in the given mode.

    Shapes (n_tok, 1, n_rot/2, 2) for normal mode, (n_tok, 1, 2, n_rot/2) for NEOX, so they
    broadcast over heads. `scale` is folded in (the attention scale rides along for free on q).
    """
    ang = rope_angles(positions, f)  # (n_tok, n_rot/2)
    m = np.float32(f.mscale * scale)
    cos, sin = _cos_sin(ang)
    cos, sin = cos * m, sin * m
    axis = -2 if neox else -1
    cos2 = np.stack([cos, cos], axis=axis)
    sin2 = np.stack([-sin, sin], axis=axis)  # the first of each pair gets -sin
    return cos2[:, None], sin2[:, None]


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the first n_rot dims of every head of x (n_tok, n_heads, head_dim); returns a new array.

    Pairs (a, b) become (a cos - b sin, a sin + b cos). ggml's "normal" mode (llama) pairs adjacent
    dims (x0, x1), (x2, x3)...: the GGUF converter permuted llama's q/k weights for exactly this.
    NEOX mode (gemma) pairs x_i with x_{i + n_rot/2}. The tables' layout picks the mode.
    """
    n_tok, n_heads, hd = x.shape
    n_rot = cos.shape[-1] * cos.shape[-2]
    r = x[..., :n_rot].reshape(n_tok, n_heads, *cos.shape[-2:])  # (n_tok, n_heads, pairs..)
    swapped = r[..., ::-1] if cos.shape[-1] == 2 else r[..., ::-1, :]  # (b, a) for each (a, b)
    out = r * cos
    out += swapped * sin
    out = out.reshape(n_tok, n_heads, n_rot)
    if n_rot == hd:
        return out
    y = x.copy()
    y[..., :n_rot] = out
    return y


def causal_mask(n_tok: int, n_past: int, window: int = 0) -> np.ndarray:
    """Additive mask (n_tok, n_past + n_tok): 0 where query i may see key j, -inf elsewhere.

    Query i sits at position n_past + i. With a sliding window, key j is also hidden when
    pos_q - pos_k >= window (llama.cpp's LLAMA_SWA_TYPE_STANDARD).
    """
    q = np.arange(n_past, n_past + n_tok)[:, None]
    k = np.arange(n_past + n_tok)[None, :]
    hidden = k > q
    if window:
        hidden |= (q - k) >= window
    return np.where(hidden, np.float32(-np.inf), np.float32(0.0))


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None,
              softcap_at: float = 0.0) -> np.ndarray:
    """Grouped-query softmax attention; q is already scaled; scores soft-capped where softcap_at > 0.

    q (n_tok, n_head, hd); k, v (n_head_kv, n_keys, hd); mask (n_tok, n_keys) additive or None.
    Query head h reads kv head h // (n_head / n_head_kv), as ggml's broadcasting mul_mat does.
    Returns (n_tok, n_head * hd).
    """
    if q.dtype != np.float32:
        q = q.astype(np.float32)
    if k.dtype != np.float32:  # a float16 cache
        k, v = k.astype(np.float32), v.astype(np.float32)
    n_tok, n_head, hd = q.shape
    n_kv, n_keys = k.shape[0], k.shape[1]
    g = n_head // n_kv
    # (n_kv, g * n_tok, hd): each kv head's query group stacked, so one batched matmul per kv head.
    if n_tok == 1:
        qg = q.reshape(n_kv, g, hd)
    else:
        qg = q.reshape(n_tok, n_kv, g, hd).transpose(1, 2, 0, 3).reshape(n_kv, g * n_tok, hd)
    s = np.matmul(qg, k.transpose(0, 2, 1))  # (n_kv, g * n_tok, n_keys)
    s = softcap(s, softcap_at)
    if mask is not None:
        s4 = s.reshape(n_kv, g, n_tok, n_keys)
        s4 += mask
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    # llama.cpp (no flash attention) multiplies the float16 V cache by the probabilities
    # converted to float16: round them the same way.
    s = s.astype(np.float16).astype(np.float32)
    o = np.matmul(s, v)  # (n_kv, g * n_tok, hd)
    if n_tok == 1:
        return o.reshape(1, n_head * hd)
    return o.reshape(n_kv, g, n_tok, hd).transpose(2, 0, 1, 3).reshape(n_tok, n_head * hd)


def _compiled():
    """The compiled kernel backend (fused prefill passes on its thread pool), None on the NumPy one."""
    return kernels.compiled_backend()


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q0: int, window: int = 0,
                     softcap_at: float = 0.0) -> np.ndarray:
    """attention() of queries at positions q0.. over the keys at positions 0.., each query seeing
    the keys at or before its position (and, with a window, after position - window).

    q (n_tok, n_head, hd) float32, already scaled and rounded to fp16 (round_f16); k, v
    (n_head_kv, q0 + n_tok, hd), fp16-rounded values. Returns (n_tok, n_head * hd).
    """
    b = _compiled()
    if b is not None and k.dtype == np.float32 and v.dtype == np.float32 and not softcap_at:
        return b.attention(q, k, v, q0, window)
    n = q.shape[0]
    mask = causal_mask(n, q0, window) if n > 1 or (window and q0 + n > window) else None
    return attention(q, k, v, mask, softcap_at)


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """cap * tanh(x / cap) as ggml computes it (scale by 1/cap, tanh, scale by cap); x if cap is 0."""
    if not cap:
        return x
    y = np.tanh(x * np.float32(1.0 / cap))
    y *= np.float32(cap)
    return y


def round_f16(x: np.ndarray) -> np.ndarray:
    """x rounded to float16 precision, as float32 (a new array)."""
    b = _compiled()
    if b is None:
        return x.astype(np.float16).astype(np.float32)
    return b.round_f16(np.ascontiguousarray(x, dtype=np.float32))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (Gemma's gelu_pytorch_tanh), computed the way ggml does it.

    ggml builds with GGML_GELU_FP16: the input is rounded to float16 and the result read from a
    float16 table, with x <= -10 -> 0 and x >= 10 -> x. Rounding the same way keeps greedy
    continuations on llama.cpp's path where two tokens are nearly tied.
    """
    xh = x.astype(np.float16).astype(np.float32)
    y = 0.5 * xh * (1.0 + np.tanh(_SQRT_2_OVER_PI * xh * (1.0 + _GELU_COEF_A * xh * xh)))
    y = y.astype(np.float16).astype(np.float32)
    y[x <= -10.0] = 0.0
    big = x >= 10.0
    y[big] = x[big]
    return y


def _ggml_gelu(x: np.ndarray) -> np.ndarray:
    """ggml_gelu_f32 as GCC compiles it for ggml's table (contracted: 1 + a*x*x is one FMA) with
    libm's tanhf: every entry of ggml's table, where NumPy's tanh missed 234 of them."""
    x = x.astype(np.float32)
    inner = (np.float64(1.0) * (_GELU_COEF_A * x) * x + 1.0).astype(np.float32)  # the FMA, rounded once
    t = _libm_map("tanhf", (_SQRT_2_OVER_PI * x) * inner, np.tanh)
    return (np.float32(0.5) * x) * (np.float32(1.0) + t)


_gelu_table: np.ndarray | None = None


def gelu_f16_table() -> np.ndarray:
    """gelu_tanh of every fp16 value, indexed by its bit pattern (ggml's table, as float32)."""
    global _gelu_table
    if _gelu_table is None:
        with np.errstate(all="ignore"):  # inf and NaN entries: never read (|x| >= 10 is handled apart);
            # casting the signalling NaNs raises FE_INVALID on aarch64
            every_f16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
            table = np.zeros_like(every_f16)
            used = np.abs(every_f16) < 10.0
            table[used] = _ggml_gelu(every_f16[used]).astype(np.float16).astype(np.float32)
        table.flags.writeable = False
        _gelu_table = table
    return _gelu_table


def geglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """gelu_tanh(g) * u (ggml's geglu), computed in place in g (float32 (n, n_ff), C-contiguous)."""
    b = _compiled()
    if b is None:
        g = gelu_tanh(g)
        g *= u
        return g
    return b.geglu(g, u, gelu_f16_table())
