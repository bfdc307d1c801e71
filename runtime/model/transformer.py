"""The transformer: config from GGUF metadata, weights as mmap views, and the forward pass.

Two architecture families, following llama.cpp's graphs (src/models/llama.cpp, gemma3.cpp):

  llama   x = embd[ids]; per layer: x += Wo attn(rope(Wq n(x)), rope(Wk n(x)), Wv n(x))
                                    x += Wdown (silu(Wgate n(x)) * Wup n(x))
  gemma3  the same skeleton plus: embeddings scaled by sqrt(n_embd), RMSNorm on q and k per head,
          an RMSNorm after attention and after the FFN (before each residual add), GELU-tanh,
          NEOX RoPE, and 5 of every 6 layers attending through a sliding window with rope base 10000.

The forward pass only sees arrays: `load_model` takes an open GGUFReader and keeps views into it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ggufile.runtime import kernels
from ggufile.runtime.model import ops
from ggufile.runtime.gguf.constants import GGMLType, Keys
from ggufile.runtime.kernels.types import WEIGHT_TYPES
from ggufile.runtime.errors import GGUFileError, GGUFFormatError, UnsupportedModelError

SUPPORTED_ARCHS = ("llama", "gemma3")
# Most tokens one batched pass takes at once (longer prompts are split).
MAX_BATCH = 512


# --------------------------------------------------------------------------- config

@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    rms_eps: float
    n_rot: int  # dims of each head that RoPE rotates (usually head_dim)
    rope_base: float
    rope_scale: float  # ggml freq_scale: 1 / linear scaling factor
    rope_neox: bool  # NEOX (halves) vs normal (adjacent pairs) rotation
    attn_scale: float  # applied to q before q.k
    embd_scale: float  # applied to the token embeddings
    gelu: bool  # GELU-tanh gate (gemma) instead of SiLU (llama)
    qk_norm: bool  # RMSNorm on each q/k head (gemma3)
    post_norms: bool  # RMSNorm on attention / FFN outputs before the residual add (gemma3)
    sliding_window: int = 0  # 0: every layer is global
    swa_pattern: int = 0  # layer il is sliding-window unless il % swa_pattern == swa_pattern - 1
    rope_base_swa: float = 10000.0
    rope_scale_swa: float = 1.0
    rope_scaling: str = "none"  # none | linear | yarn
    rope_yarn_orig_ctx: int = 0  # YaRN: the context length the model was trained at

    @classmethod
    def from_gguf(cls, metadata: dict) -> "ModelConfig":
        arch = metadata.get(Keys.ARCHITECTURE)
        if not isinstance(arch, str) or arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"unsupported model architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

        def get(key, default=None):
            name = key.format(arch=arch)
            if name in metadata:
                return metadata[name]
            if default is None:
                raise GGUFFormatError(f"missing metadata key {name!r}")
            return default

        n_embd = int(get(Keys.EMBEDDING_LENGTH))
        n_head = int(get(Keys.HEAD_COUNT))
        n_head_kv = int(get(Keys.HEAD_COUNT_KV, n_head))
        head_dim = int(get(Keys.KEY_LENGTH, n_embd // n_head))
        if int(get(Keys.VALUE_LENGTH, head_dim)) != head_dim:
            raise UnsupportedModelError("models with key_length != value_length are not supported")
        if n_head % n_head_kv:
            raise GGUFFormatError(f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
        n_vocab = metadata.get(Keys.VOCAB_SIZE.format(arch=arch))
        if n_vocab is None:
            n_vocab = len(metadata.get(Keys.TOKENS, ()))
        common = dict(
            arch=arch,
            n_vocab=int(n_vocab),
            n_embd=n_embd,
            n_layer=int(get(Keys.BLOCK_COUNT)),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_ff=int(get(Keys.FEED_FORWARD_LENGTH)),
            n_ctx_train=int(get(Keys.CONTEXT_LENGTH)),
            rms_eps=float(get(Keys.RMS_EPS)),
            n_rot=int(get(Keys.ROPE_DIMENSION_COUNT, head_dim)),
            rope_base=float(get(Keys.ROPE_FREQ_BASE, 10000.0)),
            **_rope_scaling(metadata, arch),
        )
        if arch == "llama":
            return cls(**common, rope_neox=False, attn_scale=1.0 / math.sqrt(head_dim),
                       embd_scale=1.0, gelu=False, qk_norm=False, post_norms=False)
        # gemma3: llama.cpp hard-codes the 5-local:1-global pattern and the local rope base.
        # The attention scale is 1/sqrt(head_dim) except for the 27B (62 layers): 1/sqrt(n_embd/n_head).
        scale_dim = n_embd // n_head if common["n_layer"] == 62 else head_dim
        return cls(**common, rope_neox=True, attn_scale=1.0 / math.sqrt(scale_dim),
                   embd_scale=math.sqrt(n_embd), gelu=True, qk_norm=True, post_norms=True,
                   sliding_window=int(get(Keys.SLIDING_WINDOW)), swa_pattern=6,
                   rope_base_swa=10000.0, rope_scale_swa=1.0)

    def is_swa(self, il: int) -> bool:
        return bool(self.sliding_window) and il % self.swa_pattern < self.swa_pattern - 1


def _rope_scaling(metadata: dict, arch: str) -> dict:
    """rope_scale (ggml's freq_scale = 1/factor) and the scaling kind; llama.cpp's YaRN betas (32, 1) assumed."""
    kind = str(metadata.get(Keys.ROPE_SCALING_TYPE.format(arch=arch), "none"))
    factor = float(metadata.get(Keys.ROPE_SCALING_FACTOR.format(arch=arch), 1.0) or 1.0)
    if kind == "none" or factor == 1.0:
        return dict(rope_scale=1.0, rope_scaling="none")
    if kind == "linear":
        return dict(rope_scale=1.0 / factor, rope_scaling="linear")
    if kind == "yarn":
        orig = int(metadata.get(Keys.ROPE_SCALING_ORIG_CTX.format(arch=arch), 0))
        if orig <= 0:
            raise GGUFFormatError("YaRN rope scaling without rope.scaling.original_context_length")
        return dict(rope_scale=1.0 / factor, rope_scaling="yarn", rope_yarn_orig_ctx=orig)
    raise UnsupportedModelError(f"unsupported rope scaling type {kind!r} (supported: none, linear, yarn)")


# --------------------------------------------------------------------------- weights

class QW(NamedTuple):
    """A (possibly quantized) weight matrix as the kernels take it: raw rows and their type."""
    data: np.ndarray  # (rows, row_bytes) uint8, or (rows, k) float
    qtype: GGMLType


@dataclass
class Layer:
    attn_norm: np.ndarray  # (n_embd,)
    wq: QW  # (n_head * head_dim, n_embd)
    wk: QW  # (n_head_kv * head_dim, n_embd)
    wv: QW  # (n_head_kv * head_dim, n_embd)
    wo: QW  # (n_embd, n_head * head_dim)
    ffn_norm: np.ndarray  # (n_embd,)
    w_gate: QW  # (n_ff, n_embd)
    w_up: QW  # (n_ff, n_embd)
    w_down: QW  # (n_embd, n_ff)
    q_norm: np.ndarray | None = None  # (head_dim,)   gemma3
    k_norm: np.ndarray | None = None  # (head_dim,)   gemma3
    post_attn_norm: np.ndarray | None = None  # (n_embd,)   gemma3
    post_ffn_norm: np.ndarray | None = None  # (n_embd,)   gemma3


@dataclass
class Weights:
    tok_embd: QW  # (n_vocab, n_embd)
    layers: list[Layer]
    output_norm: np.ndarray  # (n_embd,)
    output: QW  # (n_vocab, n_embd); the embedding matrix when tied
    rope_freqs: np.ndarray | None = None  # (n_rot/2,) Llama 3.1+ per-frequency divisors


def _load_weights(reader, cfg: ModelConfig) -> Weights:
    tensors = reader.tensors

    def matrix(name: str, rows: int, k: int) -> QW:
        info = tensors.get(name)
        if info is None:
            raise GGUFFormatError(f"missing tensor {name!r}")
        if info.ggml_type not in WEIGHT_TYPES:
            raise UnsupportedModelError(f"tensor {name!r} has unsupported type {info.ggml_type.name}")
        if tuple(info.shape) != (k, rows):
            raise GGUFFormatError(f"tensor {name!r} has shape {tuple(info.shape)}, expected {(k, rows)}")
        return QW(reader.tensor_matrix(name), GGMLType(info.ggml_type))

    def vector(name: str, n: int, required: bool = True) -> np.ndarray | None:
        if name not in tensors:
            if required:
                raise GGUFFormatError(f"missing tensor {name!r}")
            return None
        v = np.asarray(reader.tensor_matrix(name))
        if v.dtype == np.uint16:  # BF16 -> float32: the bits are the high half
            v = (v.astype(np.uint32) << 16).view(np.float32)
        v = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
        if v.shape != (n,):
            raise GGUFFormatError(f"tensor {name!r} has {v.size} elements, expected {n}")
        return v

    E, H, D, F = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.n_ff
    KV = cfg.n_head_kv * D
    layers = []
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        gemma = cfg.arch == "gemma3"
        layers.append(Layer(
            attn_norm=vector(p + "attn_norm.weight", E),
            wq=matrix(p + "attn_q.weight", H * D, E),
            wk=matrix(p + "attn_k.weight", KV, E),
            wv=matrix(p + "attn_v.weight", KV, E),
            wo=matrix(p + "attn_output.weight", E, H * D),
            ffn_norm=vector(p + "ffn_norm.weight", E),
            w_gate=matrix(p + "ffn_gate.weight", F, E),
            w_up=matrix(p + "ffn_up.weight", F, E),
            w_down=matrix(p + "ffn_down.weight", E, F),
            q_norm=vector(p + "attn_q_norm.weight", D) if gemma else None,
            k_norm=vector(p + "attn_k_norm.weight", D) if gemma else None,
            post_attn_norm=vector(p + "post_attention_norm.weight", E) if gemma else None,
            post_ffn_norm=vector(p + "post_ffw_norm.weight", E) if gemma else None,
        ))
    if "blk.0.ffn_gate_inp.weight" in tensors:
        raise UnsupportedModelError("mixture-of-experts models are not supported")
    tok_embd = matrix("token_embd.weight", cfg.n_vocab, E)
    output = matrix("output.weight", cfg.n_vocab, E) if "output.weight" in tensors else tok_embd
    return Weights(tok_embd=tok_embd, layers=layers, output_norm=vector("output_norm.weight", E),
                   output=output, rope_freqs=vector("rope_freqs.weight", cfg.n_rot // 2, required=False))


# --------------------------------------------------------------------------- KV cache

class KVCache:
    """Keys and values of every layer for positions 0..n_tokens-1, preallocated for n_ctx.

    Stored head-major, (n_layer, n_head_kv, n_ctx, head_dim), so that one head's keys
    k[il, h, :n] are a contiguous (n, head_dim) matrix for the attention matmuls; in float16,
    as llama.cpp keeps them (the values are fp16-rounded anyway; float32 still works in the
    Python pass). np.zeros maps fresh zero pages: only the positions written cost RAM, so a
    32k context or `-c 0` (the training context) reserves address space, not memory.
    """

    def __init__(self, cfg: ModelConfig, n_ctx: int, dtype=np.float16):
        if n_ctx < 1:
            raise GGUFileError(f"context size must be positive, got {n_ctx}")
        self.n_ctx = n_ctx
        self.n_tokens = 0
        shape = (cfg.n_layer, cfg.n_head_kv, n_ctx, cfg.head_dim)
        self.k = np.zeros(shape, dtype=dtype)  # (n_layer, n_head_kv, n_ctx, head_dim)
        self.v = np.zeros(shape, dtype=dtype)  # (n_layer, n_head_kv, n_ctx, head_dim)

    def truncate(self, n: int) -> None:
        """Forget every position >= n (a chat turn keeps the prompt prefix it shares with the last one)."""
        if not 0 <= n <= self.n_tokens:
            raise GGUFileError(f"cannot truncate a cache of {self.n_tokens} tokens to {n}")
        self.n_tokens = n


# --------------------------------------------------------------------------- model

class Model:
    def __init__(self, config: ModelConfig, weights: Weights):
        self.config = config
        self.weights = weights
        c = config
        yarn = (c.rope_yarn_orig_ctx, 32.0, 1.0) if c.rope_scaling == "yarn" else None
        self.rope_freqs = ops.rope_freqs(c.n_rot, c.rope_base, c.rope_scale, weights.rope_freqs, yarn)
        self.rope_freqs_swa = ops.rope_freqs(c.n_rot, c.rope_base_swa, c.rope_scale_swa, None)
        self._swa_layers = [c.is_swa(il) for il in range(c.n_layer)]
        self._step = None  # the compiled one-token step, packed on the first decode
        self._step_packed = False

    def new_cache(self, n_ctx: int | None = None, dtype=np.float16) -> KVCache:
        return KVCache(self.config, n_ctx or self.config.n_ctx_train, dtype)

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run tokens `ids` at positions cache.n_tokens.. and append their keys/values to the cache.

        Returns the next-token logits: (n_vocab,) for the last token, or (n, n_vocab) if all_logits.
        """
        c = self.config
        ids = np.asarray(ids).reshape(-1)
        n, p0 = len(ids), cache.n_tokens
        if n == 0:
            raise GGUFileError("forward() needs at least one token")
        if p0 + n > cache.n_ctx:
            raise GGUFileError(f"context overflow: {p0} + {n} tokens exceed the context size {cache.n_ctx}")
        if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= c.n_vocab:
            raise GGUFileError(f"token ids must be integers in [0, {c.n_vocab})")
        ids = ids.astype(np.int32)
        step = self._compiled_step()
        if step is not None and step.supports(cache):  # prompts and decode alike: the same bits
            return step.forward(ids, cache, all_logits)
        if n <= MAX_BATCH:
            return self._forward_batch(ids, cache, all_logits)
        # Long prompts go in slices, like llama.cpp's micro-batches: bounds the (n, n_keys) scores.
        parts = [self._forward_batch(ids[i:i + MAX_BATCH], cache, all_logits) for i in range(0, n, MAX_BATCH)]
        return np.concatenate(parts) if all_logits else parts[-1]

    def _compiled_step(self):
        if not self._step_packed:
            from ggufile.runtime.model.step import CompiledStep

            self._step, self._step_packed = CompiledStep.for_model(self), True
        return self._step

    def _forward_batch(self, ids: np.ndarray, cache: KVCache, all_logits: bool) -> np.ndarray:
        c, w = self.config, self.weights
        n, p0 = len(ids), cache.n_tokens
        T = p0 + n  # keys visible after this step
        H, KV, D = c.n_head, c.n_head_kv, c.head_dim

        # positions this step writes, their rotations and the masks (shared by all layers of a kind)
        pos = np.arange(p0, T)
        # rotations for k, and for q with the attention scale folded in: 2 x (n, 1, pairs..)
        rope_k = ops.rope_tables(pos, self.rope_freqs, c.rope_neox)
        rope_q = ops.rope_tables(pos, self.rope_freqs, c.rope_neox, c.attn_scale)
        if c.sliding_window:
            rope_k_swa = ops.rope_tables(pos, self.rope_freqs_swa, c.rope_neox)
            rope_q_swa = ops.rope_tables(pos, self.rope_freqs_swa, c.rope_neox, c.attn_scale)

        x = kernels.get_rows(w.tok_embd.data, w.tok_embd.qtype, ids)  # (n, n_embd)
        if c.embd_scale != 1.0:
            x *= np.float32(c.embd_scale)

        with np.errstate(over="ignore"):  # exp overflow in silu/softmax is harmless (-> 0 weight)
            for il, L in enumerate(w.layers):
                swa = self._swa_layers[il]
                # ---- attention
                h = ops.rmsnorm(x, L.attn_norm, c.rms_eps)  # (n, n_embd)
                q, k, v = kernels.matmul_multi([L.wq, L.wk, L.wv], h)
                q = q.reshape(n, H, D)  # (n, n_head, head_dim)
                k = k.reshape(n, KV, D)  # (n, n_head_kv, head_dim)
                v = v.reshape(n, KV, D)  # (n, n_head_kv, head_dim)
                if c.qk_norm:
                    q = ops.rmsnorm(q, L.q_norm, c.rms_eps)
                    k = ops.rmsnorm(k, L.k_norm, c.rms_eps)
                q = ops.rope(q, *(rope_q_swa if swa else rope_q))  # scaled by attn_scale
                k = ops.rope(k, *(rope_k_swa if swa else rope_k))
                # llama.cpp keeps K and V in float16 and so also rounds q to float16 for q.k;
                # doing the same (even in a float32 cache) keeps our logits next to its logits.
                q = ops.round_f16(q)
                cache.k[il, :, p0:T] = ops.round_f16(k).transpose(1, 0, 2)
                cache.v[il, :, p0:T] = ops.round_f16(v).transpose(1, 0, 2)
                a = ops.causal_attention(q, cache.k[il, :, :T], cache.v[il, :, :T], p0,
                                         c.sliding_window if swa else 0)  # (n, n_head*head_dim)
                o = kernels.matmul(L.wo.data, L.wo.qtype, a)  # (n, n_embd)
                if c.post_norms:
                    o = ops.rmsnorm(o, L.post_attn_norm, c.rms_eps)
                x += o
                # ---- feed-forward
                h = ops.rmsnorm(x, L.ffn_norm, c.rms_eps)  # (n, n_embd)
                g, u = kernels.matmul_multi([L.w_gate, L.w_up], h)  # (n, n_ff) each
                if c.gelu:
                    g = ops.geglu(g, u)
                else:
                    g = ops.silu(g)
                    g *= u
                o = kernels.matmul(L.w_down.data, L.w_down.qtype, g)  # (n, n_embd)
                if c.post_norms:
                    o = ops.rmsnorm(o, L.post_ffn_norm, c.rms_eps)
                x += o
        cache.n_tokens = T

        if not all_logits:
            x = x[-1:]
        x = ops.rmsnorm(x, w.output_norm, c.rms_eps)
        logits = kernels.matmul(w.output.data, w.output.qtype, x)  # (n or 1, n_vocab)
        return logits if all_logits else logits[0]


def load_model(reader) -> Model:
    """Build a Model over an open GGUFReader (weights stay mmap views into the file)."""
    from ggufile.runtime.model.validate import checked_config

    config = checked_config(reader.metadata, reader.tensors)
    return Model(config, _load_weights(reader, config))
