"""Make the README's quantization table: size, bits/weight, perplexity and decode speed per type.

    python examples/quant_table.py                 # SmolLM2-135M, all types, a modest corpus slice
    python examples/quant_table.py --ctx 512 --chunks 8 --types Q8_0,Q4_K_M

Starts from an F16 GGUF made by dequantizing the SmolLM2 example model (so every type is
quantized from the same 16-bit weights, as llama-quantize would from a converted model), then
for each type: `quantize_file`, file size, bits per weight (tensor bytes * 8 / weights),
perplexity on Pride and Prejudice (builder/corpus.py) with llama.cpp's method, and greedy
decode speed. Prints a Markdown table; intermediate GGUFs go to --work (deleted unless --keep).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ggufile.builder.corpus import corpus_text
from ggufile.builder.fetch import fetch_model
from ggufile.builder.quantize_model import quantize_file
from ggufile.runtime.gguf.reader import GGUFReader
from ggufile.runtime.model.transformer import load_model
from ggufile.runtime.perplexity import evaluate
from ggufile.runtime.tokenizer.tokenizer import Tokenizer

DEFAULT_TYPES = ("F16,Q8_0,Q6_K,Q5_K_M,Q5_K,Q5_1,Q5_0,Q4_K_M,Q4_K_S,Q4_K,Q4_1,Q4_0,Q3_K_M,Q3_K,Q2_K")


def bits_per_weight(path: Path) -> tuple[float, str]:
    with GGUFReader(path) as r:
        nbytes = sum(t.nbytes for t in r.tensors.values())
        n = sum(t.n_elements for t in r.tensors.values())
        mix = Counter(t.ggml_type.name for t in r.tensors.values() if len(t.shape) > 1)
    return nbytes * 8 / n, " ".join(f"{k}×{v}" for k, v in mix.most_common())


def decode_speed(model, prompt: list[int], n_gen: int) -> float:
    cache = model.new_cache(len(prompt) + n_gen + 1)
    logits = model.forward(np.asarray(prompt), cache)
    t0 = time.perf_counter()
    for _ in range(n_gen):
        logits = model.forward(np.array([int(np.argmax(logits))]), cache)
    return n_gen / (time.perf_counter() - t0)


def measure(path: Path, tokens: list[int], bos: int | None, args) -> tuple[float, float, float]:
    reader = GGUFReader(path)
    model = load_model(reader)
    res = evaluate(model, tokens, args.ctx, bos, args.chunks)
    speed = decode_speed(model, tokens[:8], args.gen)
    return res.stats.ppl, res.stats.stderr, speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=DEFAULT_TYPES, help="comma-separated types/mixes")
    ap.add_argument("--ctx", type=int, default=128, help="perplexity chunk size (llama.cpp -c)")
    ap.add_argument("--chunks", type=int, default=4, help="chunks evaluated per type")
    ap.add_argument("--gen", type=int, default=16, help="tokens generated for the decode speed")
    ap.add_argument("--work", type=Path, default=None, help="where the GGUFs go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the quantized GGUFs")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="quant_table."))
    work.mkdir(parents=True, exist_ok=True)
    src = fetch_model("smollm2")
    f16 = work / "smollm2-f16.gguf"
    if not f16.exists():
        print(f"dequantizing {src.name} -> {f16.name}", file=sys.stderr)
        quantize_file(src, f16, "F16")
    with GGUFReader(f16) as r:
        tok = Tokenizer.from_metadata(r.metadata)
    # Enough text for the chunks asked for (~4 characters per token, with margin).
    text = corpus_text()[: args.ctx * args.chunks * 6 + 2000]
    tokens = tok.encode(text, add_special=True)
    bos = tok.bos_id if tok.add_bos else None

    rows, base = [], None
    try:
        for name in [t.strip() for t in args.types.split(",") if t.strip()]:
            path = f16 if name.upper() == "F16" else work / f"smollm2-{name}.gguf"
            t0 = time.perf_counter()
            if not path.exists():
                quantize_file(f16, path, name)
            t_quant = time.perf_counter() - t0
            bpw, mix = bits_per_weight(path)
            ppl, err, speed = measure(path, tokens, bos, args)
            base = base if base is not None else ppl
            rows.append((name, path.stat().st_size / 1e6, bpw, ppl, err, (ppl / base - 1) * 100, speed, mix))
            print(f"{name}: {rows[-1][1]:.1f} MB, {bpw:.2f} bpw, PPL {ppl:.3f} ± {err:.3f}, "
                  f"{speed:.1f} tok/s (quantized in {t_quant:.0f}s)", file=sys.stderr)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"SmolLM2-135M-Instruct, perplexity on Pride and Prejudice: {args.chunks} chunks x {args.ctx} tokens "
          f"(llama.cpp method), decode = greedy tokens/s on this machine. The F16 baseline is the "
          f"dequantized Q4_1 release, so Q4_1 requantizes it almost losslessly; differences within "
          f"the ± standard error are noise at this slice size. SmolLM2's 576-wide rows are not a "
          f"multiple of 256, so most K-quant tensors take llama.cpp's fallback types (last column).\n")
    print("| type | file MB | bits/weight | PPL | Δ PPL vs F16 | decode tok/s | 2-D tensor types |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, mb, bpw, ppl, err, delta, speed, mix in rows:
        print(f"| {name} | {mb:.1f} | {bpw:.2f} | {ppl:.3f} ± {err:.3f} | {delta:+.2f}% | {speed:.1f} | {mix} |")


if __name__ == "__main__":
    main()
