"""The transformer: config from GGUF metadata, weights as mmap views, and the forward pass.

One skeleton, llama.cpp's llama graph; what each family changes in it (norms, biases, rope kind,
soft-caps, sliding windows, experts) is its row in archs.ARCHS, which this module and the
compiled step (step.py) both read.

The forward pass only sees arrays: `load_model` takes an open GGUFReader and keeps views into it.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from ggufile.runtime import kernels
from ggufile.runtime.model import ops
from ggufile.runtime.model.archs import ARCHS, SUPPORTED_ARCHS, Block, attn_scale
from ggufile.runtime.gguf.constants import GGMLType, Keys
from ggufile.runtime.kernels.types import WEIGHT_TYPES
from ggufile.runtime.errors import GGUFileError, GGUFFormatError, UnsupportedModelError

__all__ = ["SUPPORTED_ARCHS", "ModelConfig", "Model", "KVCache", "load_model"]

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
    n_ff: int  # the dense FFN's width, or each expert's
    n_ctx_train: int
    rms_eps: float
    n_rot: int  # dims of each head that RoPE rotates (usually head_dim)
    rope_base: float
    rope_scale: float  # ggml freq_scale: 1 / linear scaling factor
    rope_neox: bool  # NEOX (halves) vs normal (adjacent pairs) rotation
    attn_scale: float  # applied to q before q.k
    embd_scale: float  # applied to the token embeddings
    gelu: bool  # GELU-tanh gate (gemma) instead of SiLU (llama)
    qk_norm: bool  # RMSNorm on each q/k head
    post_norms: bool  # RMSNorm on attention / FFN outputs before the residual add
    block: Block | None = None  # the family's row in archs.ARCHS
    sliding_window: int = 0  # 0: every layer is global
    swa_layers: tuple[bool, ...] = ()  # per layer: attends through the window
    rope_base_swa: float = 10000.0
    rope_scale_swa: float = 1.0
    rope_scaling: str = "none"  # none | linear | yarn
    rope_yarn_orig_ctx: int = 0  # YaRN / LongRoPE: the context length the model was trained at
    rope_attn_factor: float = 1.0  # cos/sin magnitude (LongRoPE's attention factor)
    attn_softcap: float = 0.0  # q.k -> cap tanh(q.k / cap) (0: none)
    final_softcap: float = 0.0  # logits -> cap tanh(logits / cap) (0: none)
    n_expert: int = 0  # 0: a dense FFN
    n_expert_used: int = 0

    @classmethod
    def from_gguf(cls, metadata: dict) -> "ModelConfig":
        arch = metadata.get(Keys.ARCHITECTURE)
        block = ARCHS.get(arch) if isinstance(arch, str) else None
        if block is None:
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
        n_layer = int(get(Keys.BLOCK_COUNT))
        if int(get(Keys.VALUE_LENGTH, head_dim)) != head_dim:
            raise UnsupportedModelError("models with key_length != value_length are not supported")
        if n_head % n_head_kv:
            raise GGUFFormatError(f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
        n_vocab = metadata.get(Keys.VOCAB_SIZE.format(arch=arch))
        if n_vocab is None:
            n_vocab = len(metadata.get(Keys.TOKENS, ()))
        n_expert = int(get(Keys.EXPERT_COUNT, 0)) if block.experts else 0
        n_ff_key = Keys.EXPERT_FEED_FORWARD_LENGTH if n_expert and block.expert_ff_key else Keys.FEED_FORWARD_LENGTH
        rope_base = float(get(Keys.ROPE_FREQ_BASE, 10000.0))
        window, swa_layers = _sliding_window(metadata, arch, block, n_layer)
        return cls(
            arch=arch, block=block,
            n_vocab=int(n_vocab),
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_ff=int(get(n_ff_key)),
            n_ctx_train=int(get(Keys.CONTEXT_LENGTH)),
            rms_eps=float(get(Keys.RMS_EPS)),
            n_rot=int(get(Keys.ROPE_DIMENSION_COUNT, head_dim)),
            rope_base=rope_base,
            rope_neox=block.rope_neox,
            attn_scale=attn_scale(arch, block, n_layer, n_embd, n_head, head_dim),
            embd_scale=float(np.sqrt(n_embd)) if block.embd_scale else 1.0,
            gelu=block.gelu, qk_norm=block.qk_norm, post_norms=block.post_norms,
            sliding_window=window, swa_layers=swa_layers,
            rope_base_swa=float(get(Keys.ROPE_FREQ_BASE_SWA, block.swa_rope_base or rope_base)),
            rope_scale_swa=1.0,
            rope_attn_factor=float(get(Keys.ROPE_SCALING_ATTN_FACTOR, 1.0)) if block.rope_factors else 1.0,
            attn_softcap=float(get(Keys.ATTN_SOFTCAP, block.attn_softcap)) if block.attn_softcap else 0.0,
            final_softcap=float(get(Keys.FINAL_SOFTCAP, block.final_softcap or 0.0)),
            n_expert=n_expert,
            n_expert_used=_expert_used(get, n_expert),
            **_rope_scaling(metadata, arch, block),
        )

    def is_swa(self, il: int) -> bool:
        return bool(self.sliding_window) and self.swa_layers[il]


def _sliding_window(metadata: dict, arch: str, block: Block, n_layer: int) -> tuple[int, tuple[bool, ...]]:
    """The window and which layers use it (llama.cpp's load_swa_pattern: a per-layer array or a
    period in sliding_window_pattern, else the family's period)."""
    if not block.swa_pattern:
        return 0, (False,) * n_layer
    window = int(metadata.get(Keys.SLIDING_WINDOW.format(arch=arch), block.swa_default))
    if window <= 0:
        return 0, (False,) * n_layer
    pattern = metadata.get(Keys.SLIDING_WINDOW_PATTERN.format(arch=arch), block.swa_pattern)
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != n_layer:
            raise GGUFFormatError(f"sliding_window_pattern has {len(pattern)} entries for {n_layer} layers")
        return window, tuple(bool(p) for p in pattern)
    pattern = int(pattern)
    return window, tuple(pattern == 0 or il % pattern < pattern - 1 for il in range(n_layer))


def _expert_used(get, n_expert: int) -> int:
    if not n_expert:
        return 0
    used = int(get(Keys.EXPERT_USED_COUNT))
    if not 0 < used <= n_expert:
        raise GGUFFormatError(f"expert_used_count {used} is not in 1..expert_count {n_expert}")
    return used


def _rope_scaling(metadata: dict, arch: str, block: Block) -> dict:
    """rope_scale (ggml's freq_scale = 1/factor) and the scaling kind; llama.cpp's YaRN betas (32, 1) assumed."""
    kind = str(metadata.get(Keys.ROPE_SCALING_TYPE.format(arch=arch), "none"))
    factor = float(metadata.get(Keys.ROPE_SCALING_FACTOR.format(arch=arch), 1.0) or 1.0)
    orig = int(metadata.get(Keys.ROPE_SCALING_ORIG_CTX.format(arch=arch), 0))
    if block.rope_factors:  # LongRoPE: the factors come as tensors; the original context picks them
        return dict(rope_scale=1.0, rope_scaling="none", rope_yarn_orig_ctx=orig)
    if kind == "none" or factor == 1.0:
        return dict(rope_scale=1.0, rope_scaling="none")
    if kind == "linear":
        return dict(rope_scale=1.0 / factor, rope_scaling="linear")
    if kind == "yarn":
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
class Experts:
    """A mixture-of-experts FFN: the router and each expert's matrices (views of the 3-D tensors)."""
    gate_inp: QW  # (n_expert, n_embd)
    gate: list[QW]  # n_expert x (n_ff, n_embd)
    up: list[QW]  # n_expert x (n_ff, n_embd)
    down: list[QW]  # n_expert x (n_embd, n_ff)


@dataclass
class Layer:
    attn_norm: np.ndarray  # (n_embd,)
    wq: QW | None  # (n_head * head_dim, n_embd); None when fused into wqkv
    wk: QW | None  # (n_head_kv * head_dim, n_embd)
    wv: QW | None  # (n_head_kv * head_dim, n_embd)
    wo: QW  # (n_embd, n_head * head_dim)
    ffn_norm: np.ndarray  # (n_embd,)
    w_gate: QW | None  # (n_ff, n_embd); None when fused into w_up (phi3) or with experts
    w_up: QW | None  # (n_ff, n_embd), or (2 n_ff, n_embd) gate then up when fused
    w_down: QW | None  # (n_embd, n_ff)
    q_norm: np.ndarray | None = None  # (head_dim,)
    k_norm: np.ndarray | None = None  # (head_dim,)
    post_attn_norm: np.ndarray | None = None  # (n_embd,)
    post_ffn_norm: np.ndarray | None = None  # (n_embd,)
    wqkv: QW | None = None  # ((n_head + 2 n_head_kv) * head_dim, n_embd): q, k, v rows in one
    bqkv: np.ndarray | None = None  # ((n_head + 2 n_head_kv) * head_dim,) the q, k, v biases
    experts: Experts | None = None


@dataclass
class Weights:
    tok_embd: QW  # (n_vocab, n_embd)
    layers: list[Layer]
    output_norm: np.ndarray  # (n_embd,)
    output: QW  # (n_vocab, n_embd); the embedding matrix when tied
    rope_freqs: np.ndarray | None = None  # (n_rot/2,) per-frequency divisors (Llama 3.1, LongRoPE short)
    rope_freqs_long: np.ndarray | None = None  # (n_rot/2,) LongRoPE's, past the original context


def _load_weights(reader, cfg: ModelConfig) -> Weights:
    tensors = reader.tensors

    def matrix(name: str, rows: int, k: int, n_expert: int = 0) -> QW:
        info = tensors.get(name)
        if info is None:
            raise GGUFFormatError(f"missing tensor {name!r}")
        if info.ggml_type not in WEIGHT_TYPES:
            raise UnsupportedModelError(f"tensor {name!r} has unsupported type {info.ggml_type.name}")
        want = (k, rows, n_expert) if n_expert else (k, rows)
        if tuple(info.shape) != want:
            raise GGUFFormatError(f"tensor {name!r} has shape {tuple(info.shape)}, expected {want}")
        return QW(reader.tensor_matrix(name), GGMLType(info.ggml_type))

    def experts(name: str, rows: int, k: int) -> list[QW]:
        whole = matrix(name, rows, k, cfg.n_expert)
        return [QW(whole.data[e * rows:(e + 1) * rows], whole.qtype) for e in range(cfg.n_expert)]

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

    b = cfg.block
    E, H, D, F = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.n_ff
    KV = cfg.n_head_kv * D
    layers = []
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        layer = Layer(
            attn_norm=vector(p + "attn_norm.weight", E),
            wq=None, wk=None, wv=None,
            wo=matrix(p + "attn_output.weight", E, H * D),
            ffn_norm=vector(p + "ffn_norm.weight", E),
            w_gate=None, w_up=None, w_down=None,
            q_norm=vector(p + "attn_q_norm.weight", D) if b.qk_norm else None,
            k_norm=vector(p + "attn_k_norm.weight", D) if b.qk_norm else None,
            post_attn_norm=vector(p + "post_attention_norm.weight", E) if b.post_norms else None,
            post_ffn_norm=vector(p + "post_ffw_norm.weight", E) if b.post_norms else None,
        )
        # llama.cpp's create_tensor_qkv: a fused attn_qkv where the file has one, biases where it has them
        if p + "attn_qkv.weight" in tensors:
            layer.wqkv = matrix(p + "attn_qkv.weight", H * D + 2 * KV, E)
            layer.bqkv = vector(p + "attn_qkv.bias", H * D + 2 * KV, required=False)
        else:
            layer.wq = matrix(p + "attn_q.weight", H * D, E)
            layer.wk = matrix(p + "attn_k.weight", KV, E)
            layer.wv = matrix(p + "attn_v.weight", KV, E)
        if layer.bqkv is None:
            biases = [vector(p + f"attn_{x}.bias", n, required=False) for x, n in (("q", H * D), ("k", KV), ("v", KV))]
            if any(v is not None for v in biases):
                layer.bqkv = np.concatenate([np.zeros(n, np.float32) if v is None else v
                                             for v, n in zip(biases, (H * D, KV, KV))])
        if cfg.n_expert:
            layer.experts = Experts(
                gate_inp=matrix(p + "ffn_gate_inp.weight", cfg.n_expert, E),
                gate=experts(p + "ffn_gate_exps.weight", F, E),
                up=experts(p + "ffn_up_exps.weight", F, E),
                down=experts(p + "ffn_down_exps.weight", E, F))
        elif b.fused_up:
            layer.w_up = matrix(p + "ffn_up.weight", 2 * F, E)
            layer.w_down = matrix(p + "ffn_down.weight", E, F)
        else:
            layer.w_gate = matrix(p + "ffn_gate.weight", F, E)
            layer.w_up = matrix(p + "ffn_up.weight", F, E)
            layer.w_down = matrix(p + "ffn_down.weight", E, F)
        layers.append(layer)
    if not cfg.n_expert and "blk.0.ffn_gate_inp.weight" in tensors:
        raise UnsupportedModelError(f"mixture-of-experts {cfg.arch!r} models are not supported")
    for name in ("output.bias", "output_norm.bias", "blk.0.attn_output.bias"):
        if name in tensors:
            raise UnsupportedModelError(f"tensor {name!r} is not supported")
    tok_embd = matrix("token_embd.weight", cfg.n_vocab, E)
    output = matrix("output.weight", cfg.n_vocab, E) if "output.weight" in tensors else tok_embd
    n_pairs = cfg.n_rot // 2
    if b.rope_factors:
        short = vector("rope_factors_short.weight", n_pairs, required=False)
        long = vector("rope_factors_long.weight", n_pairs, required=False)
    else:
        short, long = vector("rope_freqs.weight", n_pairs, required=False), None
    return Weights(tok_embd=tok_embd, layers=layers, output_norm=vector("output_norm.weight", E),
                   output=output, rope_freqs=short, rope_freqs_long=long)


# --------------------------------------------------------------------------- KV cache

class KVCache:
    """Keys and values of every layer for positions 0..n_tokens-1, preallocated for n_ctx.

    Stored head-major: keys (n_layer, n_head_kv, n_ctx, head_dim), so that one head's keys
    k[il, h, :n] are a contiguous (n, head_dim) matrix; values transposed, (n_layer, n_head_kv,
    head_dim, n_ctx), as llama.cpp keeps them without flash attention, so that each output
    dimension is one dot product over positions (in its order, see kernels/src/step._attend); in float16,
    as llama.cpp keeps them (the values are fp16-rounded anyway; float32 still works in the
    Python pass). np.zeros maps fresh zero pages: only the positions written cost RAM, so a
    32k context or `-c 0` (the training context) reserves address space, not memory.
    """

    def __init__(self, cfg: ModelConfig, n_ctx: int, dtype=np.float16):
        if n_ctx < 1:
            raise GGUFileError(f"context size must be positive, got {n_ctx}")
        self.n_ctx = n_ctx
        self.n_tokens = 0
        self.k = lazy_zeros((cfg.n_layer, cfg.n_head_kv, n_ctx, cfg.head_dim), dtype)
        self.v = lazy_zeros((cfg.n_layer, cfg.n_head_kv, cfg.head_dim, n_ctx), dtype)

    def truncate(self, n: int) -> None:
        """Forget every position >= n (a chat turn keeps the prompt prefix it shares with the last one)."""
        if not 0 <= n <= self.n_tokens:
            raise GGUFileError(f"cannot truncate a cache of {self.n_tokens} tokens to {n}")
        self.n_tokens = n


def lazy_zeros(shape: tuple[int, ...], dtype, huge_pages: bool = False) -> np.ndarray:
    """Zeros in fresh anonymous pages that become resident one 4 KiB page at a time. Plain
    np.zeros would do, but transparent huge pages fault in 2 MiB at once, and writing one
    position touches every row of the transposed V cache: a 32k context would be resident
    from the first token. With huge_pages, in 2 MiB pages where the kernel has them, for memory
    that is written whole at once: first-touch page faults are what filling it costs most
    (4 GiB: 9.0 s in 4 KiB pages, 3.1 s in 2 MiB ones, on a 2-vCPU VM)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE", None)
    if n == 0 or advice is None:
        return np.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(advice)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


# --------------------------------------------------------------------------- model

class Model:
    def __init__(self, config: ModelConfig, weights: Weights):
        self.config = config
        self.weights = weights
        c = config
        yarn = (c.rope_yarn_orig_ctx, 32.0, 1.0) if c.rope_scaling == "yarn" else None
        self.rope_freqs = self._rope(weights.rope_freqs, yarn)
        # LongRoPE: llama.cpp takes the long factors for contexts past the original one
        self.rope_freqs_long = None if weights.rope_freqs_long is None else self._rope(weights.rope_freqs_long, None)
        self.rope_freqs_swa = ops.rope_freqs(c.n_rot, c.rope_base_swa, c.rope_scale_swa, None)
        self._swa_layers = [c.is_swa(il) for il in range(c.n_layer)]
        self._step = None  # the compiled one-token step, packed on the first decode
        self._step_packed = False

    def _rope(self, factors, yarn) -> ops.RopeFreqs:
        c = self.config
        f = ops.rope_freqs(c.n_rot, c.rope_base, c.rope_scale, factors, yarn)
        return f if c.rope_attn_factor == 1.0 else replace(f, mscale=f.mscale * c.rope_attn_factor)

    def rope_for(self, cache: "KVCache") -> ops.RopeFreqs:
        """The global layers' rope frequencies for a cache of this size."""
        if self.rope_freqs_long is not None and cache.n_ctx > (self.config.rope_yarn_orig_ctx or self.config.n_ctx_train):
            return self.rope_freqs_long
        return self.rope_freqs

    def new_cache(self, n_ctx: int | None = None, dtype=np.float16) -> KVCache:
        return KVCache(self.config, n_ctx or self.config.n_ctx_train, dtype)

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run tokens `ids` at positions cache.n_tokens.. and append their keys/values to the cache.

        Returns the next-token logits: (n_vocab,) for the last token, or (n, n_vocab) if all_logits.
        """
        ids = self._checked_ids(ids, cache)
        n = len(ids)
        step = self._compiled_step()
        if step is not None and step.supports(cache):  # prompts and decode alike: the same bits
            return step.forward(ids, cache, all_logits)
        if n <= MAX_BATCH:
            return self._forward_batch(ids, cache, all_logits)
        # Long prompts go in slices, like llama.cpp's micro-batches: bounds the (n, n_keys) scores.
        parts = [self._forward_batch(ids[i:i + MAX_BATCH], cache, all_logits) for i in range(0, n, MAX_BATCH)]
        return np.concatenate(parts) if all_logits else parts[-1]

    def forward_batch(self, items: list[tuple[np.ndarray, KVCache]]) -> list[np.ndarray]:
        """Several sequences at once: items = [(ids, cache)], each cache a different slot of one
        SlotCaches; appends each item's keys/values to its cache and returns each item's
        last-token logits. Every token's logits are the bits forward() gives it alone (the
        compiled step's operations are per token; without the step, the items run one by one)."""
        items = [(self._checked_ids(ids, cache), cache) for ids, cache in items]
        pool = getattr(items[0][1], "pool", None)
        step = self._compiled_step()
        if (step is not None and pool is not None and all(getattr(cache, "pool", None) is pool for _, cache in items)
                and len({cache.seq for _, cache in items}) == len(items)
                and all(step.supports(cache) for _, cache in items)):
            return step.forward_batch(items)
        return [self.forward(ids, cache) for ids, cache in items]

    def _checked_ids(self, ids, cache: KVCache) -> np.ndarray:
        """ids as int32 token ids that exist and fit the cache, or a one-line GGUFileError."""
        ids = np.asarray(ids).reshape(-1)
        n, p0, n_vocab = len(ids), cache.n_tokens, self.config.n_vocab
        if n == 0:
            raise GGUFileError("forward() needs at least one token")
        if p0 + n > cache.n_ctx:
            raise GGUFileError(f"context overflow: {p0} + {n} tokens exceed the context size {cache.n_ctx}")
        if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= n_vocab:
            raise GGUFileError(f"token ids must be integers in [0, {n_vocab})")
        return ids.astype(np.int32)

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
        rope = self.rope_for(cache)
        rope_k = ops.rope_tables(pos, rope, c.rope_neox)
        rope_q = ops.rope_tables(pos, rope, c.rope_neox, c.attn_scale)
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
                q, k, v = _qkv(L, h, H * D, KV * D)
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
                cache.v[il, :, :, p0:T] = ops.round_f16(v).transpose(1, 2, 0)
                a = ops.causal_attention(q, cache.k[il, :, :T], cache.v[il, :, :, :T].transpose(0, 2, 1), p0,
                                         c.sliding_window if swa else 0, c.attn_softcap)  # (n, n_head*head_dim)
                o = kernels.matmul(L.wo.data, L.wo.qtype, a)  # (n, n_embd)
                if c.post_norms:
                    o = ops.rmsnorm(o, L.post_attn_norm, c.rms_eps)
                x += o
                # ---- feed-forward
                h = ops.rmsnorm(x, L.ffn_norm, c.rms_eps)  # (n, n_embd)
                o = _moe(c, L.experts, h) if L.experts is not None else _ffn(c, L, h)  # (n, n_embd)
                if c.post_norms:
                    o = ops.rmsnorm(o, L.post_ffn_norm, c.rms_eps)
                x += o
        cache.n_tokens = T

        if not all_logits:
            x = x[-1:]
        x = ops.rmsnorm(x, w.output_norm, c.rms_eps)
        logits = kernels.matmul(w.output.data, w.output.qtype, x)  # (n or 1, n_vocab)
        logits = ops.softcap(logits, c.final_softcap)
        return logits if all_logits else logits[0]


def _qkv(L: Layer, h: np.ndarray, nq: int, nkv: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v (n, rows each) from one fused matrix or three, plus their biases."""
    b = L.bqkv
    if L.wqkv is not None:
        qkv = kernels.matmul(L.wqkv.data, L.wqkv.qtype, h)  # (n, nq + 2 nkv)
        if b is not None:
            qkv += b
        return qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
    q, k, v = kernels.matmul_multi([L.wq, L.wk, L.wv], h)
    if b is not None:
        q, k, v = q + b[:nq], k + b[nq:nq + nkv], v + b[nq + nkv:]
    return q, k, v


def _glu(c: ModelConfig, g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """act(g) * u: GELU-tanh (gemma) or SiLU."""
    if c.gelu:
        return ops.geglu(g, u)
    g = ops.silu(g)
    g *= u
    return g


def _ffn(c: ModelConfig, L: Layer, h: np.ndarray) -> np.ndarray:
    """Wdown act(Wgate h) * Wup h, with gate and up in one matrix where fused (gate rows first)."""
    if L.w_gate is None:
        gu = kernels.matmul(L.w_up.data, L.w_up.qtype, h)  # (n, 2 n_ff)
        g, u = np.ascontiguousarray(gu[:, :c.n_ff]), gu[:, c.n_ff:]
    else:
        g, u = kernels.matmul_multi([L.w_gate, L.w_up], h)  # (n, n_ff) each
    g = _glu(c, g, u)
    return kernels.matmul(L.w_down.data, L.w_down.qtype, g)


def route(c: ModelConfig, router_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each token's experts (n, n_used), best first, and their weights: llama.cpp's build_moe_ffn
    with softmax gating and norm_w (Mixtral, Qwen3-MoE): softmax over all experts, the top
    n_used, their probabilities renormalised to sum 1 (which equals Mixtral's softmax of the top
    logits)."""
    # sums in double, as ggml's soft_max (and the compiled step's _route) take them
    p = np.exp(router_logits - router_logits.max(axis=-1, keepdims=True))
    p *= (1.0 / p.sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    chosen = np.argsort(-p, axis=-1, kind="stable")[:, :c.n_expert_used]  # (n, n_used)
    wts = np.take_along_axis(p, chosen, axis=-1)
    wts /= np.maximum(wts.sum(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32),
                      np.float32(6.103515625e-5))
    return chosen, wts


def _moe(c: ModelConfig, ex: Experts, h: np.ndarray) -> np.ndarray:
    """The experts' FFNs, each on the tokens routed to it, weighted and summed in routing order."""
    n = h.shape[0]
    chosen, wts = route(c, kernels.matmul(ex.gate_inp.data, ex.gate_inp.qtype, h))
    out = np.zeros((n, c.n_expert_used, c.n_embd), dtype=np.float32)
    for e in np.unique(chosen):
        rows, slots = np.nonzero(chosen == e)
        he = np.ascontiguousarray(h[rows])
        g, u = kernels.matmul_multi([ex.gate[e], ex.up[e]], he)
        d = kernels.matmul(ex.down[e].data, ex.down[e].qtype, _glu(c, g, u))  # (len(rows), n_embd)
        out[rows, slots] = d * wts[rows, slots, None]
    total = out[:, 0].copy()
    for j in range(1, c.n_expert_used):
        total += out[:, j]
    return total


def load_model(reader) -> Model:
    """Build a Model over an open GGUFReader (weights stay mmap views into the file)."""
    from ggufile.runtime.model.validate import checked_config

    config = checked_config(reader.metadata, reader.tensors)
    return Model(config, _load_weights(reader, config))
