"""llama.cpp's decode-path logits as a bit-exact reference (dev only: needs llama-cpp-python).

    python examples/llama_cpp_decode_ref.py MODEL.gguf REFERENCE.json OUT.json

For each prompt of REFERENCE.json (tests/data/*.gguf.json), llama.cpp decodes the prompt one
token at a time (so every matrix product is its vec_dot path, never tinyBLAS, which it uses for
batches of 2 or more), then 32 greedy tokens; OUT.json keeps the greedy ids and the sha256 of
every step's float32 logit row, which the tests compare with ours bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import sys

import numpy as np


def decode_reference(model_path: str, prompts: list[list[int]], n_greedy: int = 32) -> list[dict]:
    import llama_cpp as L

    L.llama_backend_init()
    model = L.llama_model_load_from_file(model_path.encode(), L.llama_model_default_params())
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    out = []
    for ids in prompts:
        params = L.llama_context_default_params()
        params.n_ctx, params.n_threads, params.n_threads_batch, params.flash_attn_type = 2048, 2, 2, 0
        ctx = L.llama_init_from_model(model, params)

        def feed(token: int) -> np.ndarray:
            one = (L.llama_token * 1)(token)
            if L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) != 0:
                raise RuntimeError("llama_decode failed")
            return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()

        for token in ids:
            logits = feed(token)
        rows, greedy = [logits], []
        for _ in range(n_greedy):
            greedy.append(int(np.argmax(rows[-1])))
            rows.append(feed(greedy[-1]))
        L.llama_free(ctx)
        out.append({"prompt_ids": ids, "greedy_ids": greedy,
                    "logits_sha256": [hashlib.sha256(r.astype(np.float32).tobytes()).hexdigest() for r in rows]})
    return out


def main(argv: list[str]) -> int:
    model_path, ref_path, out_path = argv
    ref = json.load(open(ref_path, encoding="utf-8"))
    prompts = [g["prompt_ids"] for g in ref["generate"]]
    result = {"model": ref["model"], "llama_cpp_python": __import__("llama_cpp").__version__,
              "decode": decode_reference(model_path, prompts)}
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print("wrote", out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
