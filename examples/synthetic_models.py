"""Random-weight GGUF models of every supported architecture, for checking ggufile against llama.cpp.

    python examples/synthetic_models.py OUT_DIR [--arch qwen2,...] [--type Q8_0] [--real]

Tensor names come from gguf-py's tables (MODEL_TENSORS / TENSOR_NAMES) and the metadata keys
from its GGUFWriter, as llama.cpp's convert_hf_to_gguf.py writes them, so the files are what a
converted release looks like, only random. The weights are scaled so that the logits are spread
(a std of a few units) and not flat: greedy continuations then mean something.

FAMILIES holds one small shape per family (the tests' models); REAL_SHAPES the shape of a popular
release of each (for `ggufile bench`; gigabytes, never committed). `tokenizer="none"` writes
llama.cpp's dummy vocabulary (vocab_size tokens, no text); `tokenizer=<path of a vocab GGUF>`
copies a real tokenizer's metadata (see builder/fetch.py, deepseek-r1-qwen).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ggufile.builder.quantizers import quantize
from ggufile.runtime.gguf.constants import GGMLType


@dataclass(frozen=True)
class Shape:
    arch: str
    n_layer: int = 2
    n_embd: int = 256
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_ff: int = 512
    n_vocab: int = 512
    n_ctx: int = 4096
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0  # qwen3moe's expert_feed_forward_length (0: n_ff)
    tied: bool = False
    extras: dict = field(default_factory=dict)  # family-specific metadata/tensor switches


# One small shape per family and variant; every matrix's k is a multiple of 256 (K-quants).
FAMILIES: dict[str, Shape] = {
    "llama": Shape("llama"),
    "llama3": Shape("llama", extras={"rope_freqs": True}),  # Llama 3.1+ rope_freqs.weight
    "mistral": Shape("llama", extras={"sliding_window": 64}),  # llama arch; llama.cpp ignores it
    "mixtral": Shape("llama", n_expert=8, n_expert_used=2),
    "qwen2": Shape("qwen2", tied=True),
    "qwen3": Shape("qwen3", head_dim=128),  # key_length != n_embd / n_head
    "qwen3moe": Shape("qwen3moe", head_dim=128, n_expert=8, n_expert_used=2, n_ff_exp=256),
    "phi3": Shape("phi3", n_head_kv=4, extras={"longrope": True}),
    "gemma2": Shape("gemma2", n_layer=4, n_head_kv=2, tied=True, extras={"sliding_window": 8}),
    "gemma3": Shape("gemma3", n_layer=6, n_head_kv=1, tied=True, extras={"sliding_window": 8}),
}

# qwen2 with DeepSeek-R1-Distill-Qwen's tokenizer (builder/fetch.py deepseek-r1-qwen-vocab): its
# 152,064 tokens, and an end-of-sentence token (151643) likely enough that chats end on it.
DEEPSEEK_EOS = 151643
DEEPSEEK_QWEN2 = Shape("qwen2", n_vocab=152064, n_ctx=131072, extras={"eos_boost": (DEEPSEEK_EOS, 3.5)})

# Real release shapes (n_vocab reduced where it only costs memory: the output matmul is kept large).
REAL_SHAPES: dict[str, Shape] = {
    "qwen2": Shape("qwen2", n_layer=28, n_embd=1536, n_head=12, n_head_kv=2, head_dim=128, n_ff=8960,
                   n_vocab=151936, n_ctx=32768, tied=True),  # Qwen2.5-1.5B
    "qwen3": Shape("qwen3", n_layer=36, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128, n_ff=12288,
                   n_vocab=151936, n_ctx=40960),  # Qwen3-8B
    "qwen3moe": Shape("qwen3moe", n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_ff=6144,
                      n_vocab=151936, n_ctx=40960, n_expert=128, n_expert_used=8, n_ff_exp=768),  # Qwen3-30B-A3B
    "mixtral": Shape("llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128, n_ff=14336,
                     n_vocab=32000, n_ctx=32768, n_expert=2, n_expert_used=2),  # Mixtral-8x7B layers, 2 experts
    "phi3": Shape("phi3", n_layer=32, n_embd=3072, n_head=24, n_head_kv=8, head_dim=128, n_ff=8192,
                  n_vocab=200064, n_ctx=131072, tied=True, extras={"longrope": True}),  # Phi-4-mini
    "gemma2": Shape("gemma2", n_layer=26, n_embd=2304, n_head=8, n_head_kv=4, head_dim=256, n_ff=9216,
                    n_vocab=256000, n_ctx=8192, tied=True, extras={"sliding_window": 4096}),  # Gemma-2-2B
}


def _tensor_names(arch: str) -> set[str]:
    """gguf-py's names of the tensors `arch` may have (its converter writes no others)."""
    import gguf

    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    return {gguf.TENSOR_NAMES[kind] for kind in gguf.MODEL_TENSORS[arch_enum]}


def write_model(path: Path, s: Shape, qtype: GGMLType | str = GGMLType.F32, seed: int = 0,
                tokenizer: str | Path = "none", tiled: bool = False) -> Path:
    """A random model of shape `s` with every weight matrix in `qtype` (norms and the router in F32).

    tiled: each matrix's rows are drawn from a pool of 256 quantized random rows (real-shape
    models: gigabytes of valid blocks in seconds instead of hours of quantizing)."""
    import gguf

    qtype = GGMLType[qtype] if isinstance(qtype, str) else GGMLType(qtype)
    T = gguf.MODEL_TENSOR
    names = _tensor_names(s.arch)
    rng = np.random.default_rng(seed)
    E, H, KV, D = s.n_embd, s.n_head, s.n_head_kv, s.head_dim
    F = s.n_ff_exp or s.n_ff
    w = gguf.GGUFWriter(str(path), s.arch)
    w.add_name(f"synthetic-{s.arch}")
    w.add_block_count(s.n_layer)
    w.add_context_length(s.n_ctx)
    w.add_embedding_length(E)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    if D != E // H or s.arch in ("gemma2", "gemma3", "qwen3", "qwen3moe"):
        w.add_key_length(D)
        w.add_value_length(D)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1000000.0 if s.arch.startswith("qwen") else 10000.0)
    w.add_file_type(int(qtype) if qtype != GGMLType.F32 else 0)
    if s.n_expert:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
        if s.n_ff_exp:
            w.add_expert_feed_forward_length(s.n_ff_exp)
    if "sliding_window" in s.extras:
        w.add_sliding_window(s.extras["sliding_window"])
    if s.arch == "gemma2":
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    if s.extras.get("longrope"):
        w.add_rope_dimension_count(D)
        w.add_rope_scaling_attn_factors(1.19)
        w.add_rope_scaling_orig_ctx_len(4096)
    _add_tokenizer(w, s, tokenizer)

    def mat(rows, k, scale=1.0):
        if tiled:
            return _Tiled(rows, k, scale)
        return (rng.standard_normal((rows, k)) * (scale * k ** -0.5)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def put(kind, suffix, array, qt=None, bid=None):
        if gguf.TENSOR_NAMES[kind] not in names:
            raise KeyError(f"{s.arch} has no {kind.name} in gguf-py's MODEL_TENSORS")
        name = gguf.TENSOR_NAMES[kind].format(bid=bid) + suffix
        qt = qtype if qt is None else qt
        if isinstance(array, _Tiled):
            array = array.rows(qt, rng)
            w.add_tensor(name, array, raw_dtype=gguf.GGMLQuantizationType(int(qt)))
            return
        if isinstance(array, list):  # experts
            array = np.stack([a.rows(qt, rng) if isinstance(a, _Tiled) else a for a in array])
            if array.dtype == np.uint8:
                w.add_tensor(name, array, raw_dtype=gguf.GGMLQuantizationType(int(qt)))
                return
        if qt == GGMLType.F32 or array.ndim == 1:
            w.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
            return
        rows = array.reshape(-1, array.shape[-1])
        data = quantize(rows, qt)
        if qt in (GGMLType.F16,):
            w.add_tensor(name, data.view(np.float16).reshape(array.shape))
            return
        data = data.reshape(*array.shape[:-1], data.shape[-1])
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType(int(qt)))

    # a tied embedding is also the output matrix: keep its logits a few units wide
    embd = (_Tiled(s.n_vocab, E, 0.2 if s.tied else 1.0, per_row=False) if tiled else
            rng.standard_normal((s.n_vocab, E)) * (0.2 if s.tied else 1.0))
    output = None if s.tied else mat(s.n_vocab, E, 3.0)
    eos = s.extras.get("eos_boost")
    if eos is not None:
        # A chat model must stop: a constant in dimension 0 of every embedding survives to the
        # final norm, and the end-of-sequence row of the output reads it, so that EOS stays likely.
        token, boost = eos
        embd[:, 0] += 4.0
        output[token, 0] = boost
    put(T.TOKEN_EMBD, ".weight", embd if tiled else embd.astype(np.float32))
    put(T.OUTPUT_NORM, ".weight", norm(E))
    if output is not None:
        put(T.OUTPUT, ".weight", output)
    if s.extras.get("rope_freqs"):
        put(T.ROPE_FREQS, ".weight", np.linspace(1.0, 8.0, D // 2).astype(np.float32))
    if s.extras.get("longrope"):
        put(T.ROPE_FACTORS_SHORT, ".weight", (1.0 + 2.0 * rng.random(D // 2)).astype(np.float32))
        put(T.ROPE_FACTORS_LONG, ".weight", (1.0 + 20.0 * rng.random(D // 2)).astype(np.float32))
    for il in range(s.n_layer):
        b = dict(bid=il)
        put(T.ATTN_NORM, ".weight", norm(E), **b)
        if s.arch == "phi3":
            put(T.ATTN_QKV, ".weight", mat(H * D + 2 * KV * D, E), **b)
        else:
            put(T.ATTN_Q, ".weight", mat(H * D, E), **b)
            put(T.ATTN_K, ".weight", mat(KV * D, E), **b)
            put(T.ATTN_V, ".weight", mat(KV * D, E), **b)
        if s.arch == "qwen2":
            for kind, n in ((T.ATTN_Q, H * D), (T.ATTN_K, KV * D), (T.ATTN_V, KV * D)):
                put(kind, ".bias", (0.5 * rng.standard_normal(n)).astype(np.float32), **b)
        if s.arch in ("qwen3", "qwen3moe", "gemma3"):
            put(T.ATTN_Q_NORM, ".weight", norm(D), **b)
            put(T.ATTN_K_NORM, ".weight", norm(D), **b)
        put(T.ATTN_OUT, ".weight", mat(E, H * D), **b)
        if s.arch in ("gemma2", "gemma3"):
            put(T.ATTN_POST_NORM, ".weight", norm(E), **b)
            put(T.FFN_POST_NORM, ".weight", norm(E), **b)
        put(T.FFN_NORM, ".weight", norm(E), **b)
        if s.n_expert:
            put(T.FFN_GATE_INP, ".weight", mat(s.n_expert, E, 4.0), GGMLType.F32, **b)
            put(T.FFN_GATE_EXP, ".weight", [mat(F, E) for _ in range(s.n_expert)], **b)
            put(T.FFN_UP_EXP, ".weight", [mat(F, E) for _ in range(s.n_expert)], **b)
            put(T.FFN_DOWN_EXP, ".weight", [mat(E, F) for _ in range(s.n_expert)], **b)
        elif s.arch == "phi3":
            put(T.FFN_UP, ".weight", mat(2 * F, E), **b)
            put(T.FFN_DOWN, ".weight", mat(E, F), **b)
        else:
            put(T.FFN_GATE, ".weight", mat(F, E), **b)
            put(T.FFN_UP, ".weight", mat(F, E), **b)
            put(T.FFN_DOWN, ".weight", mat(E, F), **b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


_POOL_ROWS = 256
_pools: dict = {}


class _Tiled:
    """A (rows, k) random matrix to be written as quantized rows drawn from a small pool."""

    def __init__(self, rows: int, k: int, scale: float, per_row: bool = True):
        self.shape, self.scale = (rows, k), (scale * k ** -0.5) if per_row else scale

    def rows(self, qtype: GGMLType, rng) -> np.ndarray:
        rows, k = self.shape
        key = (qtype, k, self.scale)
        if key not in _pools:
            _pools[key] = quantize((rng.standard_normal((_POOL_ROWS, k)) * self.scale).astype(np.float32), qtype)
        return _pools[key][rng.integers(0, _POOL_ROWS, rows)]


def _add_tokenizer(w, s: Shape, tokenizer) -> None:
    """llama.cpp's dummy vocabulary ("none": vocab_size tokens), or the tokenizer metadata of a
    vocab-only GGUF, copied key by key."""
    if tokenizer == "none":
        w.add_tokenizer_model("none")
        w.add_vocab_size(s.n_vocab)
        return
    from ggufile.runtime.gguf.reader import GGUFReader

    import gguf

    with GGUFReader(Path(tokenizer)) as r:
        for key, value in r.metadata.items():
            if not key.startswith("tokenizer."):
                continue
            vtype = gguf.GGUFValueType(int(r.value_types[key]))
            if vtype == gguf.GGUFValueType.ARRAY:
                items = value.tolist() if hasattr(value, "tolist") else list(value)
                w.add_array(key, items)  # gguf-py types the items: str, int32, float32, as stored
            else:
                w.add_key_value(key, value, vtype)
        n = len(r.metadata["tokenizer.ggml.tokens"])
    if n != s.n_vocab:
        raise ValueError(f"the tokenizer has {n} tokens, the shape {s.n_vocab}")


# --------------------------------------------------------------------------- against llama.cpp

PROMPTS = ([1, 45, 99, 17, 300], [7, 250, 3, 41, 77, 5, 120, 9, 88, 400, 61, 2],
           list(np.random.default_rng(7).integers(0, 256, 40)))
N_GREEDY = 16


def llama_cpp_run(path: Path, prompts=PROMPTS, n_greedy: int = N_GREEDY, n_ctx: int = 128) -> list[dict]:
    """llama.cpp's logits after each prompt and its greedy continuation (llama-cpp-python)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, verbose=False,
                          logits_all=True)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(list(map(int, ids)))
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        greedy = []
        for _ in range(n_greedy):
            greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([greedy[-1]])
        out.append({"logits": logits, "greedy": greedy})
    llm.close()
    return out


def ours_run(path: Path, prompts=PROMPTS, n_greedy: int = N_GREEDY, n_ctx: int = 128,
             forced: list[list[int]] | None = None) -> list[dict]:
    """The same from ggufile's forward pass (prompt pass, then the decode step); with `forced`
    (llama.cpp's greedy tokens per prompt) also each step's pick when fed those tokens and, where
    it differs, how far llama.cpp's token is below ours in our logits."""
    from ggufile.runtime.gguf.reader import GGUFReader
    from ggufile.runtime.model.transformer import load_model

    model = load_model(GGUFReader(path))
    out = []
    for p, ids in enumerate(prompts):
        cache = model.new_cache(n_ctx)
        logits = model.forward(np.array(ids, dtype=np.int32), cache)
        first, greedy = logits, []
        for _ in range(n_greedy):
            greedy.append(int(np.argmax(logits)))
            logits = model.forward(np.array(greedy[-1:], dtype=np.int32), cache)
        run = {"logits": first, "greedy": greedy}
        if forced is not None:
            cache.truncate(len(ids))
            logits, gaps = first, []
            for ref_id in forced[p]:
                got = int(np.argmax(logits))
                gaps.append(0.0 if got == ref_id else float(logits[got] - logits[ref_id]))
                logits = model.forward(np.array([ref_id], dtype=np.int32), cache)
            run["forced_gaps"] = gaps
        out.append(run)
    return out


def agreement(ours: list[dict], ref: list[dict]) -> dict:
    """Over the prompts: worst |logit diff| on llama.cpp's top 20, that relative to the spread of
    llama.cpp's logits (max - min), top-1 agreement, greedy tokens matched before the first
    difference, and fed llama.cpp's greedy tokens: the steps where we pick its token and the
    largest top-2 gap (relative to the spread) where we do not."""
    worst = rel = 0.0
    top1 = matched = total = agree = 0
    worst_gap = 0.0
    for o, r in zip(ours, ref):
        top = np.argsort(-r["logits"])[:20]
        spread = float(r["logits"].max() - r["logits"].min())
        d = float(np.abs(o["logits"][top] - r["logits"][top]).max())
        worst = max(worst, d)
        rel = max(rel, d / spread)
        top1 += int(np.argmax(o["logits"]) == top[0])
        n = next((i for i, (a, b) in enumerate(zip(o["greedy"], r["greedy"])) if a != b), len(r["greedy"]))
        matched += n
        total += len(r["greedy"])
        gaps = o.get("forced_gaps", [])
        agree += sum(g == 0.0 for g in gaps)
        worst_gap = max([worst_gap] + [g / spread for g in gaps])
    return {"max_diff": round(worst, 4), "rel_diff": round(rel, 5), "top1": f"{top1}/{len(ref)}",
            "greedy": f"{matched}/{total}", "forced": f"{agree}/{total}", "forced_agree": agree,
            "worst_tie_gap": round(worst_gap, 5), "greedy_total": total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--arch", default=None, help="comma-separated FAMILIES/REAL_SHAPES names (default: all)")
    ap.add_argument("--type", default="Q8_0", help="weight type (F32, F16, Q8_0, Q4_K, ...)")
    ap.add_argument("--real", action="store_true", help="the real release shapes (gigabytes)")
    ap.add_argument("--layers", type=int, default=0, help="override the layer count")
    ap.add_argument("--tokenizer", default="none", help="'none' or a vocab-only GGUF to copy")
    ap.add_argument("--compare", action="store_true",
                    help="also run each file in llama.cpp and ggufile: one agreement row per file")
    args = ap.parse_args(argv)
    table = REAL_SHAPES if args.real else FAMILIES
    wanted = args.arch.split(",") if args.arch else list(table)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in wanted:
        s = table[name]
        if args.layers:
            s = replace(s, n_layer=args.layers)
        path = write_model(args.out / f"{name}-{args.type}.gguf", s, args.type, tokenizer=args.tokenizer,
                           tiled=args.real)
        print(f"{path}  {path.stat().st_size / 1e6:.1f} MB")
        if args.compare:
            ref = llama_cpp_run(path)
            a = agreement(ours_run(path, forced=[r["greedy"] for r in ref]), ref)
            rows.append(f"| {name} | {args.type} | {a['max_diff']:.4f} ({a['rel_diff']:.2%} of the spread) | "
                        f"{a['top1']} | {a['greedy']} | {a['forced']} (worst near-tie {a['worst_tie_gap']:.2%}) |")
    if rows:
        print("| model | weights | max logit diff, llama.cpp's top 20 | top-1 | greedy prefix | "
              "teacher-forced greedy |\n|---|---|---|---|---|---|")
        print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
