"""Mixture-of-experts decode reads only the chosen experts: tok/s against expert_count.

    python examples/moe_scaling.py OUT_DIR [--counts 8,32,128] [--used 8] [--type Q4_K]

Writes Qwen3-30B-A3B-shaped layers (2 of them, vocabulary cut to 32k) with each expert count,
and decodes 32 tokens with ggufile's compiled step: the weight bytes a token reads (the dense
tensors plus expert_used_count experts per layer) and the measured tok/s. With only the chosen
experts read, tok/s follows expert_used_count and stays flat as expert_count grows 16x.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_models as sm  # noqa: E402


def bytes_per_token(model) -> tuple[int, int]:
    """(weight bytes one decode step reads, bytes of all weights): dense tensors whole, of the
    experts only the n_used chosen per layer."""
    w, c = model.weights, model.config
    dense = [w.output]
    read = total = 0
    for L in w.layers:
        dense += [m for m in (L.wq, L.wk, L.wv, L.wqkv, L.wo, L.w_gate, L.w_up, L.w_down) if m is not None]
        if L.experts is not None:
            dense.append(L.experts.gate_inp)
            per_expert = sum(ms[0].data.nbytes for ms in (L.experts.gate, L.experts.up, L.experts.down))
            read += c.n_expert_used * per_expert
            total += c.n_expert * per_expert
    d = sum(m.data.nbytes for m in dense)
    return read + d + w.tok_embd.data.nbytes // c.n_vocab, total + d + w.tok_embd.data.nbytes


def main(argv=None) -> int:
    from ggufile.runtime.gguf.reader import GGUFReader
    from ggufile.runtime.model.transformer import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--counts", default="16,64,256")
    ap.add_argument("--used", type=int, default=8)
    ap.add_argument("--type", default="Q4_K")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    base = replace(sm.REAL_SHAPES["qwen3moe"], n_layer=2, n_vocab=32000)
    print("| expert_count | expert_used_count | file (MB) | weight MB read per token | decode tok/s |")
    print("|---|---|---|---|---|")
    for n in map(int, args.counts.split(",")):
        path = sm.write_model(args.out / f"qwen3moe-{n}x.gguf", replace(base, n_expert=n, n_expert_used=args.used),
                              args.type, tiled=True)
        model = load_model(GGUFReader(path))
        cache = model.new_cache(args.tokens + 16)
        logits = model.forward(np.arange(8, dtype=np.int32), cache)
        logits = model.forward(np.array([int(np.argmax(logits))], dtype=np.int32), cache)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.tokens):
            logits = model.forward(np.array([int(np.argmax(logits))], dtype=np.int32), cache)
        rate = args.tokens / (time.perf_counter() - t0)
        read, total = bytes_per_token(model)
        print(f"| {n} | {args.used} | {path.stat().st_size / 1e6:.0f} | {read / 1e6:.0f} of {total / 1e6:.0f} | {rate:.1f} |")
        del model
        path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
