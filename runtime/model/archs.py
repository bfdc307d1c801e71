"""Every architecture the runtime runs, one table entry each (GGUF `general.architecture` -> Block).

A Block says how a family's layer differs from the llama skeleton that transformer.py runs:

    x = embd[ids] (* sqrt(n_embd))
    per layer:  h = rmsnorm(x);  q, k, v = Wq h (+bq), Wk h (+bk), Wv h (+bv)   (or one fused Wqkv)
                q, k = rmsnorm per head (qk_norm);  rope(q), rope(k)  (normal or NEOX pairs)
                a = softmax(softcap(q.k) + mask(window on SWA layers)) v
                x += postnorm(Wo a)
                h = rmsnorm(x);  x += postnorm(Wdown act(Wgate h) * Wup h)    (or the experts' sum)
    logits = softcap(Wout rmsnorm(x))

Both the batched prompt pass (transformer.py) and the compiled decode step (step.py packs the
same flags into the kernel's tables) read only the Block and the ModelConfig built from it.
Tensors that llama.cpp takes wherever a file has them (its create_tensor_qkv: attention biases,
a fused attn_qkv; an untied output) are found by name, for every family, as llama.cpp does.

Adding a family: read llama.cpp's src/models/<arch>.cpp, add a row here naming what differs,
and (only if it needs a step the skeleton lacks) that step in transformer.py and kernels/src/step.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    rope_neox: bool  # NEOX (dims i, i + n_rot/2) vs normal (adjacent pairs) rotation
    gelu: bool = False  # GELU-tanh gate instead of SiLU
    qk_norm: bool = False  # RMSNorm on each q/k head (attn_q_norm, attn_k_norm)
    post_norms: bool = False  # RMSNorm on attention / FFN outputs before the residual add
    embd_scale: bool = False  # token embeddings times sqrt(n_embd)
    fused_up: bool = False  # ffn_up holds gate and up (2 n_ff rows), no ffn_gate (phi3)
    experts: bool = False  # may be a mixture of experts (ffn_gate_inp, ffn_{gate,up,down}_exps)
    expert_ff_key: bool = False  # the experts' width is expert_feed_forward_length (else feed_forward_length)
    rope_factors: bool = False  # LongRoPE: rope_factors_short/long.weight and rope.scaling.attn_factor
    swa_pattern: int = 0  # layer il uses the window unless il % pattern == pattern - 1 (0: no SWA)
    swa_default: int = 0  # window when the metadata has none (0: no window without the key)
    swa_rope_base: float | None = None  # rope base of SWA layers (None: the global one)
    attn_softcap: float | None = None  # soft-cap on q.k (default; the metadata may override)
    final_softcap: float | None = None  # soft-cap on the logits (default; the metadata may override)
    big_gemma_scale: bool = False  # the 27B gemmas scale q by 1/sqrt(n_embd/n_head), not 1/sqrt(head_dim)


ARCHS: dict[str, Block] = {
    # src/models/llama.cpp (Llama 1-3, Mistral, Mixtral: experts when expert_count > 0).
    # llama.cpp ignores a llama-arch sliding_window (Mistral 7B v0.1): so do we.
    "llama": Block(rope_neox=False, experts=True),
    # src/models/qwen2.cpp: the llama block with q/k/v biases (found by name) and NEOX rope
    "qwen2": Block(rope_neox=True),
    # src/models/qwen3.cpp: per-head q/k RMSNorm; key_length may differ from n_embd / n_head
    "qwen3": Block(rope_neox=True, qk_norm=True),
    # src/models/qwen3moe.cpp: qwen3 attention, experts of expert_feed_forward_length
    "qwen3moe": Block(rope_neox=True, qk_norm=True, experts=True, expert_ff_key=True),
    # src/models/phi3.cpp: fused attn_qkv (found by name), fused gate+up, LongRoPE factors.
    # llama.cpp disables Phi's sliding window (PR 13676): so do we.
    "phi3": Block(rope_neox=True, fused_up=True, rope_factors=True),
    # src/models/gemma2.cpp: soft-caps, every other layer sliding (window 4096 by default), post norms
    "gemma2": Block(rope_neox=True, gelu=True, post_norms=True, embd_scale=True, swa_pattern=2,
                    swa_default=4096, attn_softcap=50.0, final_softcap=30.0, big_gemma_scale=True),
    # src/models/gemma3.cpp: q/k norms, 5 sliding layers of 6 with rope base 10000, post norms
    "gemma3": Block(rope_neox=True, gelu=True, qk_norm=True, post_norms=True, embd_scale=True,
                    swa_pattern=6, swa_rope_base=10000.0, big_gemma_scale=True),
}

SUPPORTED_ARCHS = tuple(ARCHS)

# The layer count of each family's 27B release, where big_gemma_scale applies (llama.cpp keys it
# on the model type it infers from the layer count).
_BIG_GEMMA_LAYERS = {"gemma2": 46, "gemma3": 62}


def attn_scale(arch: str, block: Block, n_layer: int, n_embd: int, n_head: int, head_dim: int) -> float:
    """The factor q is scaled by before q.k."""
    if block.big_gemma_scale and n_layer == _BIG_GEMMA_LAYERS.get(arch):
        return 1.0 / math.sqrt(n_embd // n_head)
    return 1.0 / math.sqrt(head_dim)
