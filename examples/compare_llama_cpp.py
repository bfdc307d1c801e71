"""Dev check against llama.cpp (llama-cpp-python, never a runtime dependency).

    python examples/compare_llama_cpp.py quant            # our quantizers vs ggml's C (bytes)
    python examples/compare_llama_cpp.py file F16.gguf [--types Q8_0,Q4_K_M]  # vs llama-quantize
    python examples/compare_llama_cpp.py ppl  [-c 128 --chunks 4] [--model smollm2|gemma3|PATH]
    python examples/compare_llama_cpp.py greedy --model PATH.gguf   # e.g. a file from `ggufile quantize`

quant:  random weights through ggml_quantize_chunk (libggml-base, ctypes) and through
        ggufile.builder.quantizers; reports the fraction of identical blocks per type.
file:   `quantize_file` and llama_model_quantize on the same F16 GGUF, per mix: whole files compared.
ppl:    perplexity.cpp's method run on llama.cpp's logits (logits_all) and on ours, same
        tokens, same chunks; reports both and their relative difference.
greedy: 24 greedy tokens from llama.cpp and from ggufile for a few prompts.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import sys
from pathlib import Path

import numpy as np

from ggufile.builder.corpus import corpus_text
from ggufile.builder.fetch import fetch_model
from ggufile.runtime.gguf.constants import QUANT_TABLE, GGMLType
from ggufile.runtime.gguf.reader import GGUFReader
from ggufile.runtime.model.transformer import load_model
from ggufile.runtime.perplexity import NLLStats, chunk_input, n_chunks_for, scored_targets, token_nll
from ggufile.builder.quantizers import quantize
from ggufile.runtime.tokenizer.tokenizer import Tokenizer

PROMPTS = ["The capital of France is", "Once upon a time, there was a little", "def fibonacci(n):"]


def model_path(arg: str) -> Path:
    return fetch_model(arg) if arg in ("smollm2", "gemma3") else Path(arg)


def ggml_base() -> ctypes.CDLL:
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    cands = sorted(glob.glob(str(libdir / "libggml-base*.so*"))) + sorted(glob.glob(str(libdir / "libggml*.so*")))
    for c in cands:
        lib = ctypes.CDLL(c)
        if hasattr(lib, "ggml_quantize_chunk"):
            lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            return lib
    sys.exit(f"no libggml with ggml_quantize_chunk under {libdir}")


def cmd_quant(_args) -> None:
    lib = ggml_base()
    rng = np.random.default_rng(0)
    rows, k = 256, 2048
    x = (rng.standard_normal((rows, k)) * rng.uniform(1e-3, 2, (rows, 1))).astype(np.float32)
    for t in (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1,
              GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K):
        info = QUANT_TABLE[t]
        ref = np.zeros((rows * k // info.block_size, info.type_size), dtype=np.uint8)
        lib.ggml_quantize_chunk(int(t), x.ctypes.data, ref.ctypes.data, 0, rows, k, None)
        ours = quantize(x, t).reshape(ref.shape)
        same = (ours == ref).all(axis=1).mean()
        print(f"{t.name:5s} identical blocks: {same * 100:.3f}%  ({ref.shape[0]} blocks)")


def cmd_file(args) -> None:
    import tempfile

    import llama_cpp

    from ggufile.builder.quantize_model import get_mix, quantize_file

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.types.split(","):
            ours, ref = Path(tmp) / f"ours-{name}.gguf", Path(tmp) / f"ref-{name}.gguf"
            quantize_file(args.f16, ours, name)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = int(get_mix(name).ftype), 2
            if llama_cpp.llama_model_quantize(str(args.f16).encode(), str(ref).encode(), ctypes.byref(params)):
                sys.exit(f"llama_model_quantize failed for {name}")
            same = ours.read_bytes() == ref.read_bytes()
            print(f"{name}: {'byte-identical to' if same else 'DIFFERS from'} llama-quantize "
                  f"({ours.stat().st_size} vs {ref.stat().st_size} bytes)", flush=True)
            ours.unlink(), ref.unlink()


def llama(path: Path, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                 n_threads=2, verbose=False)


def cmd_ppl(args) -> None:
    path = model_path(args.model)
    text = corpus_text()[: args.ctx * args.chunks * 6 + 2000]
    reader = GGUFReader(path)
    tok = Tokenizer.from_metadata(reader.metadata)
    ours_tokens = tok.encode(text, add_special=True)
    llm = llama(path, args.ctx)
    ref_tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    if list(ref_tokens) != list(ours_tokens):
        print(f"note: tokenizations differ ({len(ref_tokens)} vs {len(ours_tokens)} tokens); using llama.cpp's")
    tokens = list(ref_tokens)
    bos = llm.token_bos() if tok.add_bos else None
    n = n_chunks_for(len(tokens), args.ctx, args.chunks)
    model = load_model(reader)
    ref_stats, our_stats = NLLStats(), NLLStats()
    first = args.ctx // 2
    for i in range(n):
        chunk, targets = chunk_input(tokens, i, args.ctx, bos), scored_targets(tokens, i, args.ctx)
        llm.reset()
        llm.eval(chunk.tolist())
        ref_stats.add(token_nll(np.asarray(llm.scores[first:args.ctx - 1], dtype=np.float32), targets))
        cache = model.new_cache(args.ctx)
        logits = model.forward(chunk, cache, all_logits=True)
        our_stats.add(token_nll(logits[first:args.ctx - 1], targets))
        print(f"[{i + 1}] llama.cpp {ref_stats.ppl:.4f}  ggufile {our_stats.ppl:.4f}", flush=True)
    rel = our_stats.ppl / ref_stats.ppl - 1
    print(f"{path.name}: c={args.ctx}, {n} chunks, {ref_stats.count} scored tokens\n"
          f"  llama.cpp PPL = {ref_stats.ppl:.4f} ± {ref_stats.stderr:.4f}\n"
          f"  ggufile   PPL = {our_stats.ppl:.4f} ± {our_stats.stderr:.4f}\n"
          f"  relative difference {rel * 100:+.3f}%  ({'within' if abs(rel) < 0.01 else 'OUTSIDE'} 1%)")


def cmd_greedy(args) -> None:
    path = model_path(args.model)
    reader = GGUFReader(path)
    tok = Tokenizer.from_metadata(reader.metadata)
    model = load_model(reader)
    llm = llama(path, 256)
    agree = 0
    for p in PROMPTS:
        ids = tok.encode(p, add_special=True)
        ref = []
        llm.reset()
        for t in llm.generate(ids, temp=0.0, top_k=1):
            ref.append(t)
            if len(ref) == args.n:
                break
        cache = model.new_cache(len(ids) + args.n + 1)
        logits = model.forward(np.asarray(ids), cache)
        ours = []
        for _ in range(args.n):
            ours.append(int(np.argmax(logits)))
            logits = model.forward(np.array([ours[-1]]), cache)
        same = next((i for i, (a, b) in enumerate(zip(ref, ours)) if a != b), args.n)
        agree += same == args.n
        print(f"{p!r}: identical for {same}/{args.n} tokens\n  llama.cpp: {tok.decode(ref)!r}\n"
              f"  ggufile:   {tok.decode(ours)!r}")
    print(f"{path.name}: {agree}/{len(PROMPTS)} prompts identical for {args.n} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("quant")
    f = sub.add_parser("file")
    f.add_argument("f16", type=Path, help="an F16 GGUF (e.g. from `ggufile quantize IN OUT -t F16`)")
    f.add_argument("--types", default="Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q2_K,Q3_K_M,Q4_K_S,Q4_K_M,Q5_K_M,Q6_K")
    p = sub.add_parser("ppl")
    p.add_argument("--model", default="smollm2")
    p.add_argument("-c", "--ctx", type=int, default=128)
    p.add_argument("--chunks", type=int, default=4)
    g = sub.add_parser("greedy")
    g.add_argument("--model", default="smollm2")
    g.add_argument("-n", type=int, default=24)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    {"quant": cmd_quant, "file": cmd_file, "ppl": cmd_ppl, "greedy": cmd_greedy}[args.cmd](args)


if __name__ == "__main__":
    main()
