"""The model checked as a whole before any kernel sees it: one table of what each key may hold.

`checked_config(metadata, tensors)` is the only way from a file's metadata to a ModelConfig:
1. every hyperparameter key the model reads is checked for type and range (HPARAMS),
2. the config built from them is checked for consistency (heads, key/value lengths, rope
   dimensions against the head, vocab size against the token list),
3. every tensor the forward pass uses is checked against the config (TENSORS: shape and type).
Failures are one line naming the key or tensor. The compiled step indexes memory by these
numbers with no bounds checks, so nothing here may be skipped or made lenient.

The tokenizer's own keys (tokens, merges, scores, token types) have their table in
TOKENIZER_ARRAYS, checked by `check_tokenizer_metadata`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ggufile.runtime.errors import GGUFileError, GGUFFormatError, UnsupportedModelError
from ggufile.runtime.gguf.constants import Keys
from ggufile.runtime.kernels.types import FLOAT_TYPES, WEIGHT_TYPES

INT, FLOAT, STR, BOOL = "int", "float", "str", "bool"

# Far beyond any real model, far below what would overflow an int64 product or a 32-bit index.
MAX_DIM = 1 << 20
MAX_HEADS = 1 << 12
MAX_LAYERS = 1 << 12
MAX_CTX = 1 << 24


@dataclass(frozen=True)
class HParam:
    key: str  # with {arch}
    kind: str  # INT | FLOAT | STR
    lo: float | None = None  # inclusive bounds (numbers)
    hi: float | None = None


# Every metadata key ModelConfig.from_gguf reads. Presence (required or defaulted) is its business.
HPARAMS = (
    HParam(Keys.EMBEDDING_LENGTH, INT, 1, MAX_DIM),
    HParam(Keys.BLOCK_COUNT, INT, 1, MAX_LAYERS),
    HParam(Keys.FEED_FORWARD_LENGTH, INT, 1, MAX_DIM),
    HParam(Keys.HEAD_COUNT, INT, 1, MAX_HEADS),
    HParam(Keys.HEAD_COUNT_KV, INT, 1, MAX_HEADS),
    HParam(Keys.KEY_LENGTH, INT, 1, MAX_DIM),
    HParam(Keys.VALUE_LENGTH, INT, 1, MAX_DIM),
    HParam(Keys.CONTEXT_LENGTH, INT, 0, MAX_CTX),
    HParam(Keys.RMS_EPS, FLOAT, 0.0, 1.0),
    HParam(Keys.ROPE_DIMENSION_COUNT, INT, 0, MAX_DIM),
    HParam(Keys.ROPE_FREQ_BASE, FLOAT, 1e-6, 1e15),
    HParam(Keys.ROPE_SCALING_TYPE, STR),
    HParam(Keys.ROPE_SCALING_FACTOR, FLOAT, 0.0, 1e6),
    HParam(Keys.ROPE_SCALING_ORIG_CTX, INT, 0, MAX_CTX),
    HParam(Keys.SLIDING_WINDOW, INT, 0, MAX_CTX),
    HParam(Keys.VOCAB_SIZE, INT, 1, 1 << 24),
)

# Tokenizer arrays: key -> element kind the tokenizer needs.
TOKENIZER_ARRAYS = {
    Keys.TOKENS: STR,
    Keys.MERGES: STR,
    Keys.SCORES: FLOAT,
    Keys.TOKEN_TYPE: INT,
}
# Tokenizer scalars: key -> kind (special-token ids are not here: like llama.cpp, an id out of
# range or of the wrong type is ignored and the default is kept, see tokenizer/vocab.py).
TOKENIZER_SCALARS = {
    Keys.TOKENIZER_MODEL: STR,
    Keys.TOKENIZER_PRE: STR,
    Keys.ADD_BOS: BOOL,
    Keys.ADD_EOS: BOOL,
    Keys.ADD_SPACE_PREFIX: BOOL,
}

# Tensors the forward pass reads: (name, kind, shape in GGML order as a function of the config).
# MAT: a weight matrix of a supported type; VEC: a float vector (norm weights).
MAT, VEC = "matrix", "vector"
LAYER_TENSORS = {
    "llama": (
        ("attn_norm.weight", VEC, lambda c: (c.n_embd,)),
        ("attn_q.weight", MAT, lambda c: (c.n_embd, c.n_head * c.head_dim)),
        ("attn_k.weight", MAT, lambda c: (c.n_embd, c.n_head_kv * c.head_dim)),
        ("attn_v.weight", MAT, lambda c: (c.n_embd, c.n_head_kv * c.head_dim)),
        ("attn_output.weight", MAT, lambda c: (c.n_head * c.head_dim, c.n_embd)),
        ("ffn_norm.weight", VEC, lambda c: (c.n_embd,)),
        ("ffn_gate.weight", MAT, lambda c: (c.n_embd, c.n_ff)),
        ("ffn_up.weight", MAT, lambda c: (c.n_embd, c.n_ff)),
        ("ffn_down.weight", MAT, lambda c: (c.n_ff, c.n_embd)),
    ),
}
LAYER_TENSORS["gemma3"] = LAYER_TENSORS["llama"] + (
    ("attn_q_norm.weight", VEC, lambda c: (c.head_dim,)),
    ("attn_k_norm.weight", VEC, lambda c: (c.head_dim,)),
    ("post_attention_norm.weight", VEC, lambda c: (c.n_embd,)),
    ("post_ffw_norm.weight", VEC, lambda c: (c.n_embd,)),
)
# (name, kind, shape, required)
MODEL_TENSORS = (
    ("token_embd.weight", MAT, lambda c: (c.n_embd, c.n_vocab), True),
    ("output.weight", MAT, lambda c: (c.n_embd, c.n_vocab), False),
    ("output_norm.weight", VEC, lambda c: (c.n_embd,), True),
    ("rope_freqs.weight", VEC, lambda c: (c.n_rot // 2,), False),
)


def checked_config(metadata: Mapping, tensors: Mapping):
    """The ModelConfig of a GGUF, every value it holds checked (see the module docstring)."""
    from ggufile.runtime.model.transformer import ModelConfig

    arch = metadata.get(Keys.ARCHITECTURE)
    if isinstance(arch, str) and arch in LAYER_TENSORS:
        check_hparams(metadata, arch)
        check_tokenizer_metadata(metadata)  # the vocabulary size comes from the token list
    cfg = ModelConfig.from_gguf(metadata)  # refuses unknown architectures and missing keys
    check_consistency(cfg, metadata)
    check_tensors(cfg, tensors)
    return cfg


# -- 1. types and ranges ---------------------------------------------------------------------

def check_hparams(metadata: Mapping, arch: str) -> None:
    for p in HPARAMS:
        key = p.key.format(arch=arch)
        if key in metadata:
            check_value(key, metadata[key], p.kind, p.lo, p.hi)


def check_value(key: str, value, kind: str, lo=None, hi=None) -> None:
    """`value` is a scalar of `kind` within [lo, hi], else a one-line error naming `key`."""
    if kind == STR:
        if not isinstance(value, str):
            raise GGUFFormatError(f"metadata {key} must be a string, not {_kind_of(value)}")
        return
    if kind == BOOL:
        if not isinstance(value, bool):
            raise GGUFFormatError(f"metadata {key} must be a boolean, not {_kind_of(value)}")
        return
    if isinstance(value, (np.ndarray, list, tuple)):
        raise UnsupportedModelError(f"metadata {key} holds an array (per-layer values are not supported)")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise GGUFFormatError(f"metadata {key} must be a number, not {_kind_of(value)}")
    if kind == INT and not isinstance(value, (int, np.integer)):
        raise GGUFFormatError(f"metadata {key} must be an integer, not {value!r}")
    if kind == FLOAT and not math.isfinite(value):
        raise GGUFFormatError(f"metadata {key} must be a finite number, not {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise GGUFFormatError(f"metadata {key} = {value!r} is out of range [{lo}, {hi}]")


def _kind_of(value) -> str:
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if hasattr(value, "__len__"):
        return "an array"
    return type(value).__name__


# -- 2. consistency --------------------------------------------------------------------------

def check_consistency(cfg, metadata: Mapping) -> None:
    key = lambda k: k.format(arch=cfg.arch)
    if cfg.n_head % cfg.n_head_kv:
        raise GGUFFormatError(f"metadata {key(Keys.HEAD_COUNT)} = {cfg.n_head} is not a multiple of "
                              f"{key(Keys.HEAD_COUNT_KV)} = {cfg.n_head_kv}")
    if cfg.n_head * cfg.head_dim > MAX_DIM or cfg.n_head_kv * cfg.head_dim > MAX_DIM:
        raise GGUFFormatError(f"metadata {key(Keys.HEAD_COUNT)} x {key(Keys.KEY_LENGTH)} is too large")
    if not (0 < cfg.n_rot <= cfg.head_dim and cfg.n_rot % 2 == 0):
        raise GGUFFormatError(f"metadata {key(Keys.ROPE_DIMENSION_COUNT)} = {cfg.n_rot} must be even, "
                              f"positive and at most the head size {cfg.head_dim}")
    n_tokens = _token_count(metadata)
    if n_tokens is not None and cfg.n_vocab != n_tokens:
        raise GGUFFormatError(f"metadata {key(Keys.VOCAB_SIZE)} = {cfg.n_vocab} does not match the "
                              f"{n_tokens} tokens of {Keys.TOKENS}")
    if cfg.n_vocab < 1:
        raise GGUFFormatError(f"the model has no vocabulary ({Keys.TOKENS} is missing or empty)")
    if not (math.isfinite(cfg.rope_scale) and cfg.rope_scale > 0):  # 1 / factor: a tiny factor overflows
        raise GGUFFormatError(f"metadata {key(Keys.ROPE_SCALING_FACTOR)} is not a usable scale")


def _token_count(metadata: Mapping) -> int | None:
    tokens = metadata.get(Keys.TOKENS)
    return None if tokens is None or isinstance(tokens, str) else len(tokens)


# -- 3. tensors ------------------------------------------------------------------------------

def check_tensors(cfg, tensors: Mapping) -> None:
    for il in range(cfg.n_layer):
        for name, kind, shape in LAYER_TENSORS[cfg.arch]:
            check_tensor(tensors, f"blk.{il}.{name}", kind, shape(cfg), required=True)
    for name, kind, shape, required in MODEL_TENSORS:
        check_tensor(tensors, name, kind, shape(cfg), required)


def check_tensor(tensors: Mapping, name: str, kind: str, shape: tuple[int, ...], required: bool) -> None:
    info = tensors.get(name)
    if info is None:
        if required:
            raise GGUFFormatError(f"missing tensor {name!r}")
        return
    allowed = WEIGHT_TYPES if kind == MAT else FLOAT_TYPES
    if info.ggml_type not in allowed:
        raise UnsupportedModelError(f"tensor {name!r} has unsupported type {info.ggml_type.name} for a {kind}")
    got = tuple(info.shape)
    if kind == VEC:
        got = tuple(d for d in got if d != 1) or (1,)
    if got != shape:
        raise GGUFFormatError(f"tensor {name!r} has shape {tuple(info.shape)}, expected {shape}")


# -- tokenizer -------------------------------------------------------------------------------

def check_tokenizer_metadata(metadata: Mapping) -> None:
    """Types of the tokenizer's keys: token and merge lists of strings, numeric scores/types."""
    for key, kind in TOKENIZER_SCALARS.items():
        if key in metadata:
            check_value(key, metadata[key], kind)
    for key, kind in TOKENIZER_ARRAYS.items():
        if key in metadata:
            check_array(key, metadata[key], kind)


def check_array(key: str, value, kind: str) -> None:
    from ggufile.runtime.gguf.reader import StringArray

    if kind == STR:
        if not isinstance(value, (StringArray, list)) or (
                isinstance(value, list) and not all(isinstance(v, str) for v in value)):
            raise GGUFFormatError(f"metadata {key} must be an array of strings")
        return
    if not isinstance(value, np.ndarray) or value.ndim != 1:
        raise GGUFFormatError(f"metadata {key} must be an array of numbers")
    if kind == INT and value.dtype.kind not in "iu":
        raise GGUFFormatError(f"metadata {key} must be an array of integers, not {value.dtype}")
    if kind == FLOAT and value.dtype.kind not in "iuf":
        raise GGUFFormatError(f"metadata {key} must be an array of numbers, not {value.dtype}")
    if kind == FLOAT and value.dtype.kind == "f" and not np.isfinite(value).all():
        raise GGUFFormatError(f"metadata {key} holds NaN or infinite values")


# -- allocation budget -----------------------------------------------------------------------

def kv_cache_bytes(cfg, n_ctx: int, itemsize: int = 4) -> int:
    return 2 * cfg.n_layer * cfg.n_head_kv * n_ctx * cfg.head_dim * itemsize


def check_context_budget(cfg, n_ctx: int, itemsize: int = 4) -> None:
    """The KV cache of `n_ctx` tokens fits in this machine's memory (the weights are justified by
    the file itself: every dimension was checked against a tensor's shape)."""
    need = kv_cache_bytes(cfg, n_ctx, itemsize)
    ram = physical_memory()
    if ram and need > ram:
        raise GGUFileError(f"a context of {n_ctx} tokens needs {need / 2**30:.1f} GiB for its KV cache, more "
                           f"than this machine's {ram / 2**30:.1f} GiB; choose a smaller --ctx-size")


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
