"""Write random-weight GGUFs at the real shapes of Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B.

    python examples/real_shapes.py                  # every shape, every type
    python examples/real_shapes.py 1b:q4_0 8b:q4_k_m

The weights are random quantized blocks written directly (random quants, fp16 scales chosen so
each matrix's values have a standard deviation of about 1/sqrt(row length): activations stay
finite through every layer), never a float model quantized, so a 5 GB file takes about a
minute. The tensor types follow llama.cpp's quantizer for the three file types: Q8_0 everywhere;
Q4_0 with a Q6_K output; Q4_K_M with Q6_K for the output and for attn_v / ffn_down in
llama.cpp's "more bits" layers. The vocabulary is 128,256 placeholder tokens (256 byte tokens,
a few merges, Llama 3's special tokens): enough to load in ggufile and llama.cpp and to feed
token ids, not to read text. Written under $GGUFILE_CACHE/synthetic (default
~/.cache/ggufile/synthetic); never commit them. Prints each file's path.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from ggufile.builder.fetch import cache_dir
from ggufile.builder.gguf_writer import TensorSpec, Typed, write_gguf
from ggufile.runtime.gguf.constants import QUANT_TABLE, Ftype, GGMLType, GGUFValueType
from ggufile.runtime.tokenizer.pretokenize import BYTE_TO_CHAR

T = GGMLType


@dataclass(frozen=True)
class Shape:
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    tied: bool  # output = token embedding (Llama 3.2)
    n_head_kv: int = 8
    n_vocab: int = 128256


SHAPES = {  # the models' config.json
    "1b": Shape(n_embd=2048, n_layer=16, n_head=32, n_ff=8192, tied=True),
    "3b": Shape(n_embd=3072, n_layer=28, n_head=24, n_ff=8192, tied=True),
    "8b": Shape(n_embd=4096, n_layer=32, n_head=32, n_ff=14336, tied=False),
}
FILE_TYPES = {"q4_0": Ftype.MOSTLY_Q4_0, "q4_k_m": Ftype.MOSTLY_Q4_K_M, "q8_0": Ftype.MOSTLY_Q8_0}
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def tensor_type(ftype: Ftype, name: str, il: int, n_layer: int) -> GGMLType:
    """llama.cpp's llama_tensor_get_type for these three file types (the default, non-pure mix)."""
    if ftype == Ftype.MOSTLY_Q8_0:
        return T.Q8_0
    if name == "output":
        return T.Q6_K
    if ftype == Ftype.MOSTLY_Q4_0:
        return T.Q4_0
    more_bits = il < n_layer // 8 or il >= 7 * n_layer // 8 or (il - n_layer // 8) % 3 == 2
    return T.Q6_K if name in ("attn_v", "ffn_down") and more_bits else T.Q4_K


def _f16_bits(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float16).view(np.uint8).reshape(-1, 2)


def random_blocks(qtype: GGMLType, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, row_bytes) of random blocks whose values have std ~ 1/sqrt(k)."""
    info = QUANT_TABLE[qtype]
    nb = rows * k // info.block_size
    blocks = np.frombuffer(rng.bytes(nb * info.type_size), dtype=np.uint8).reshape(nb, info.type_size).copy()
    std = k ** -0.5
    jitter = rng.uniform(0.5, 1.5, nb)  # scales vary from block to block, as trained weights' do
    if qtype == T.Q4_0:  # d, 16 bytes of nibbles: (q - 8) * d, std(q) ~ 4.6
        blocks[:, 0:2] = _f16_bits(std / 4.6 * jitter)
    elif qtype == T.Q8_0:  # d, 32 int8: q * d, std(q) ~ 74
        blocks[:, 0:2] = _f16_bits(std / 74 * jitter)
    elif qtype == T.Q4_K:  # d, dmin, 12 bytes of 6-bit scales/mins (mean ~31), nibbles (mean 7.5)
        d = std / (4.6 * 31) * jitter
        blocks[:, 0:2] = _f16_bits(d)
        blocks[:, 2:4] = _f16_bits(d * 7.5)  # mins cancel the nibbles' mean on average
    elif qtype == T.Q6_K:  # ql, qh, 16 int8 scales, d: d * sc * (q - 32), std(q) ~ 18.5
        blocks[:, 192:208] = (blocks[:, 192:208].view(np.int8) // 4 + 32).view(np.uint8)  # 0..63: sane
        blocks[:, 208:210] = _f16_bits(std / (18.5 * 36) * jitter)
    else:
        raise ValueError(f"no random blocks for {qtype.name}")
    return blocks.reshape(rows, -1)


def vocabulary(n_vocab: int) -> dict:
    byte_chars = list(BYTE_TO_CHAR)
    merged = ["Ġt", "Ġa", "in", "he", "re", "on", "Ġth", "er"]
    merges = ["Ġ t", "Ġ a", "i n", "h e", "r e", "o n", "Ġt h", "e r"]
    n_special = 256
    fillers = [f"[t{i}]" for i in range(n_vocab - len(byte_chars) - len(merged) - n_special)]
    special = SPECIAL + [f"<|reserved_special_token_{i}|>" for i in range(n_special - len(SPECIAL))]
    tokens = byte_chars + merged + fillers + special
    types = [1] * (n_vocab - n_special) + [3] * n_special
    first_special = n_vocab - n_special
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": Typed(GGUFValueType.STRING, tokens),
        "tokenizer.ggml.token_type": Typed(GGUFValueType.INT32, types),
        "tokenizer.ggml.merges": Typed(GGUFValueType.STRING, merges),
        "tokenizer.ggml.bos_token_id": Typed(GGUFValueType.UINT32, first_special),
        "tokenizer.ggml.eos_token_id": Typed(GGUFValueType.UINT32, first_special + 4),
    }


def llama3_rope_divisors(n_rot: int, base: float = 500000.0) -> np.ndarray:
    """Llama 3.1's rope_freqs.weight (factor 32, low/high frequency factors 1 and 4, 8192 context)."""
    factor, low, high, old_ctx = 32.0, 1.0, 4.0, 8192
    freqs = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(wavelen < old_ctx / high, 1.0,
                   np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def tensors(shape: Shape, ftype: Ftype, seed: int) -> list[TensorSpec]:
    E, F, L = shape.n_embd, shape.n_ff, shape.n_layer
    D = E // shape.n_head
    KV = shape.n_head_kv * D
    rng = np.random.default_rng(seed)
    specs = []

    def matrix(name: str, base: str, rows: int, k: int, il: int = -1) -> None:
        qtype = tensor_type(ftype, base, il, L)
        sub = np.random.default_rng([seed, len(specs)])  # each tensor its own stream: written lazily
        specs.append(TensorSpec(name, (k, rows), qtype, lambda: random_blocks(qtype, rows, k, sub)))

    def vector(name: str, values: np.ndarray) -> None:
        specs.append(TensorSpec(name, (values.size,), T.F32, values.astype(np.float32)))

    embd_base = "output" if shape.tied else "token_embd"  # tied: llama.cpp quantizes it as the output
    matrix("token_embd.weight", embd_base if ftype != Ftype.MOSTLY_Q4_K_M or shape.tied else "token_embd",
           shape.n_vocab, E)
    vector("rope_freqs.weight", llama3_rope_divisors(D))
    vector("output_norm.weight", 1 + 0.05 * rng.standard_normal(E))
    if not shape.tied:
        matrix("output.weight", "output", shape.n_vocab, E)
    for il in range(L):
        p = f"blk.{il}."
        vector(p + "attn_norm.weight", 1 + 0.05 * rng.standard_normal(E))
        matrix(p + "attn_q.weight", "attn_q", E, E, il)
        matrix(p + "attn_k.weight", "attn_k", KV, E, il)
        matrix(p + "attn_v.weight", "attn_v", KV, E, il)
        matrix(p + "attn_output.weight", "attn_output", E, E, il)
        vector(p + "ffn_norm.weight", 1 + 0.05 * rng.standard_normal(E))
        matrix(p + "ffn_gate.weight", "ffn_gate", F, E, il)
        matrix(p + "ffn_up.weight", "ffn_up", F, E, il)
        matrix(p + "ffn_down.weight", "ffn_down", E, F, il)
    return specs


def metadata(name: str, shape: Shape, ftype: Ftype) -> dict:
    D = shape.n_embd // shape.n_head
    u32 = lambda v: Typed(GGUFValueType.UINT32, v)  # noqa: E731
    f32 = lambda v: Typed(GGUFValueType.FLOAT32, v)  # noqa: E731
    return {
        "general.architecture": "llama",
        "general.name": f"synthetic {name} (random weights)",
        "general.file_type": u32(int(ftype)),
        "llama.context_length": u32(131072),
        "llama.embedding_length": u32(shape.n_embd),
        "llama.block_count": u32(shape.n_layer),
        "llama.feed_forward_length": u32(shape.n_ff),
        "llama.attention.head_count": u32(shape.n_head),
        "llama.attention.head_count_kv": u32(shape.n_head_kv),
        "llama.attention.layer_norm_rms_epsilon": f32(1e-5),
        "llama.rope.freq_base": f32(500000.0),
        "llama.rope.dimension_count": u32(D),
        "llama.vocab_size": u32(shape.n_vocab),
        **vocabulary(shape.n_vocab),
    }


def write(shape_name: str, type_name: str, seed: int = 0):
    shape, ftype = SHAPES[shape_name], FILE_TYPES[type_name]
    out = cache_dir() / "synthetic"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"synthetic-llama-{shape_name}.{type_name}.gguf"
    if not path.exists():
        write_gguf(path, metadata(f"llama-{shape_name}", shape, ftype), tensors(shape, ftype, seed))
    return path


def main(argv: list[str]) -> int:
    wanted = argv or [f"{s}:{t}" for s in SHAPES for t in FILE_TYPES]
    for item in wanted:
        shape_name, _, type_name = item.partition(":")
        if shape_name not in SHAPES or type_name not in FILE_TYPES:
            print(f"unknown model {item!r}: use SHAPE:TYPE, SHAPE in {sorted(SHAPES)}, TYPE in {sorted(FILE_TYPES)}",
                  file=sys.stderr)
            return 2
        print(write(shape_name, type_name), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
