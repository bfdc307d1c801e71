"""The forward pass: real models against llama.cpp's logits and greedy continuations, the KV cache
(incremental == batched, truncate, overflow) on tiny synthetic models, and unsupported inputs.

Tolerances. llama.cpp quantizes every matmul's activations to 8 bits (Q8_0/Q8_1/Q8_K), keeps
K/V in float16 and multiplies V by float16 probabilities; our kernels and forward pass do the same,
but summation orders differ and each tiny difference can flip a rounding step. Measured on these
prompts: switching 8-bit activation quantization on or off alone moves the top-20 logits by up to
0.49 (SmolLM2); ours vs llama.cpp is at most 0.82. LOGIT_TOL = 1.0. Wrong norms, scales or rope
pairing move logits by several units and flip top-1 ids; subtler bugs (a position off by one)
hide in this noise on quantized models, which is why the cache is also checked exactly on
tiny float32 models below.
"""
from __future__ import annotations

import numpy as np
import pytest

from ggufile.runtime.errors import GGUFileError, UnsupportedModelError
from ggufile.runtime.gguf.reader import GGUFReader
from ggufile.runtime.model.transformer import KVCache, Model, ModelConfig, load_model

LOGIT_TOL = 1.0
# A greedy mismatch is acceptable only where the two candidates are this close in our logits.
# For scale: llama.cpp's own builds disagree here ('def fibonacci(n):' step 13: the AVX2 build
# that made the reference picks 2822, the AVX-512 build of the same version picks 304 by 0.33;
# our decode step, by 0.68), and builds differ by up to 0.55 on these logits.
NEAR_TIE = 0.75
DECODE_REFS = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.decode.json", "gemma3": "gemma-3-270m-q4_k_m.decode.json"}


@pytest.fixture(scope="module")
def loaded(real_model):
    name, path, ref = real_model
    return name, load_model(GGUFReader(path)), ref


# --------------------------------------------------------------------------- real models vs llama.cpp

def test_next_token_logits_match_llama_cpp(loaded):
    name, model, ref = loaded
    worst = 0.0
    for g in ref["generate"]:
        logits = model.forward(np.array(g["prompt_ids"], dtype=np.int32), model.new_cache(256))
        assert logits.shape == (model.config.n_vocab,) and logits.dtype == np.float32
        assert int(np.argmax(logits)) == g["top20_ids"][0], g["prompt"]
        diff = np.abs(logits[g["top20_ids"]] - np.array(g["top20_logits"], dtype=np.float32)).max()
        worst = max(worst, float(diff))
    print(f"\n{name}: max |logit diff| over top-20, all prompts = {worst:.3f}")
    assert worst < LOGIT_TOL


def test_greedy_continuations_match_llama_cpp(loaded):
    """Decode llama.cpp's 32 greedy tokens one at a time (teacher-forced: we always feed its token).

    Up to the first disagreement this is exactly our own greedy continuation, so `matched` is how
    many of the 32 we reproduce. Past it, the per-step agreement shows whether later disagreements
    are isolated near-ties (numerics) or a drift (a bug).
    """
    name, model, ref = loaded
    first8_ok, steps, agree, report = 0, 0, 0, []
    for g in ref["generate"]:
        want = g["greedy_ids"]
        cache = model.new_cache(256)
        logits = model.forward(np.array(g["prompt_ids"], dtype=np.int32), cache)
        matched = None
        for t, ref_id in enumerate(want):
            got = int(np.argmax(logits))
            steps += 1
            if got == ref_id:
                agree += 1
            else:
                gap = float(logits[got] - logits[ref_id])
                assert gap < NEAR_TIE, f"{g['prompt']!r}: step {t} picks {got} over llama.cpp's {ref_id} by {gap:.3f}"
                if matched is None:
                    matched = t
                    report.append(f"{t}/{len(want)} (top-2 gap {gap:.3f})")
            logits = model.forward(np.array([ref_id], dtype=np.int32), cache)
        if matched is None:
            matched = len(want)
            report.append(f"{matched}/{len(want)}")
        first8_ok += matched >= min(8, len(want))
    print(f"\n{name}: greedy tokens matched per prompt: {', '.join(report)}; first 8 identical on "
          f"{first8_ok}/{len(ref['generate'])}; teacher-forced agreement {agree}/{steps}")
    assert agree >= 0.95 * steps
    assert first8_ok >= len(ref["generate"]) - 1


def test_logits_are_llama_cpp_decode_logits_bit_for_bit(loaded):
    """Every logit of every step, prompt prefilled then 32 greedy tokens decoded, equals llama.cpp's
    when it decodes one token at a time (its vec_dot and repacked-gemv paths; for batches it
    switches to tinyBLAS, another summation order): sha256 of each float32 row, recorded by
    examples/llama_cpp_decode_ref.py. Holds with the compiled step, which follows ggml's AVX2
    order everywhere (integer row dots, ggml_v_expf, RoPE's FMAs, sums in ggml's order)."""
    import hashlib
    import json

    from conftest import DATA
    from ggufile.runtime import kernels
    from ggufile.runtime.kernels import cpu

    if kernels.step_backend() is None or not {"avx2", "fma"} <= cpu.cpu_flags() or kernels.backend == "aot:generic":
        pytest.skip("needs the compiled step on an FMA target (ggml's AVX2 FMAs)")
    name, model, _ = loaded
    ref = json.loads((DATA / DECODE_REFS[name]).read_text(encoding="utf-8"))
    identical, total = 0, 0
    for case in ref["decode"]:
        cache = model.new_cache(256)
        logits = model.forward(np.array(case["prompt_ids"], dtype=np.int32), cache)
        for step, (want, token) in enumerate(zip(case["logits_sha256"], case["greedy_ids"] + [None])):
            total += 1
            identical += hashlib.sha256(logits.astype(np.float32).tobytes()).hexdigest() == want
            if token is not None:
                assert int(np.argmax(logits)) == token, (case["prompt_ids"], step)
                logits = model.forward(np.array([token], dtype=np.int32), cache)
    print(f"\n{name}: {identical}/{total} logit rows bit-identical to llama.cpp's decode")
    assert identical == total


def test_real_model_incremental_close_to_batched(loaded):
    """On the real model, decode one token at a time stays on the batched forward's predictions.

    Only a smoke test: with 8-bit activations and float16 K/V, a 1e-6 difference in summation
    order (batched vs single-row attention) can flip a rounding step and move logits by up to ~1
    (measured: gemma3 1.0 over the top-20), which is as much as a wrong position does. The exact
    check of the cache logic is test_incremental_decode_equals_batched_forward on float weights.
    """
    name, model, ref = loaded
    ids = np.array(ref["generate"][0]["prompt_ids"] + ref["generate"][0]["greedy_ids"][:4], dtype=np.int32)
    batched = model.forward(ids, model.new_cache(64), all_logits=True)  # (n, n_vocab)
    cache = model.new_cache(64)
    model.forward(ids[:-4], cache)
    for i in range(len(ids) - 4, len(ids)):
        step = model.forward(ids[i:i + 1], cache)
        top = np.argsort(-batched[i])[:20]
        assert int(np.argmax(step)) == int(top[0])
        assert np.abs(step[top] - batched[i][top]).max() < 1.5


# --------------------------------------------------------------------------- tiny synthetic models

def write_tiny_gguf(path, arch="llama", n_layer=2, n_embd=32, n_head=4, n_head_kv=2, head_dim=8,
                    n_ff=48, n_vocab=64, sliding_window=4, tied=False, seed=0):
    """A random float32 model in a real GGUF file, small enough to check the cache logic exactly."""
    import gguf  # test oracle only

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(128)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(n_vocab)
    if arch == "gemma3":
        w.add_sliding_window(sliding_window)

    def mat(rows, k, scale=None):
        return (rng.standard_normal((rows, k)) * (scale or k ** -0.5)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd, 1.0))
    w.add_tensor("output_norm.weight", norm(n_embd))
    if not tied:
        w.add_tensor("output.weight", mat(n_vocab, n_embd))
    for il in range(n_layer):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", norm(n_embd))
        w.add_tensor(p + "attn_q.weight", mat(n_head * head_dim, n_embd))
        w.add_tensor(p + "attn_k.weight", mat(n_head_kv * head_dim, n_embd))
        w.add_tensor(p + "attn_v.weight", mat(n_head_kv * head_dim, n_embd))
        w.add_tensor(p + "attn_output.weight", mat(n_embd, n_head * head_dim))
        w.add_tensor(p + "ffn_norm.weight", norm(n_embd))
        w.add_tensor(p + "ffn_gate.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", mat(n_embd, n_ff))
        if arch == "gemma3":
            w.add_tensor(p + "attn_q_norm.weight", norm(head_dim))
            w.add_tensor(p + "attn_k_norm.weight", norm(head_dim))
            w.add_tensor(p + "post_attention_norm.weight", norm(n_embd))
            w.add_tensor(p + "post_ffw_norm.weight", norm(n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# gemma3 with 6 layers has one global layer (il 5) and a window of 4 that the sequences outgrow.
TINY = {
    "llama": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tied=True, n_head_kv=4),
    "gemma3": dict(arch="gemma3", n_layer=6, n_head=4, n_head_kv=1, head_dim=16, sliding_window=4),
}


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tmp_path_factory) -> Model:
    path = write_tiny_gguf(tmp_path_factory.mktemp("tiny") / f"{request.param}.gguf", **TINY[request.param])
    return load_model(GGUFReader(path))


def test_tiny_config(tiny):
    c = tiny.config
    assert isinstance(c, ModelConfig) and c.n_vocab == 64
    if c.arch == "gemma3":
        assert [c.is_swa(il) for il in range(6)] == [True] * 5 + [False]
        assert c.embd_scale == pytest.approx(np.sqrt(c.n_embd)) and c.attn_scale == pytest.approx(16 ** -0.5)
    else:
        assert not any(c.is_swa(il) for il in range(c.n_layer))


def test_incremental_decode_equals_batched_forward(tiny):
    ids = np.random.default_rng(1).integers(0, 64, size=12).astype(np.int32)
    batched = tiny.forward(ids, tiny.new_cache(32), all_logits=True)  # (12, n_vocab)
    assert batched.shape == (12, 64)
    cache = tiny.new_cache(32)
    rows = [tiny.forward(ids[:5], cache, all_logits=True)]  # a prompt, then one token at a time
    rows += [tiny.forward(ids[i:i + 1], cache)[None] for i in range(5, 12)]
    assert cache.n_tokens == 12
    # K, V, q and the probabilities are rounded to float16 (as llama.cpp does), so a different
    # batching can flip a rounding: ~1e-3 here, where a wrong position or mask would be O(1).
    np.testing.assert_allclose(np.concatenate(rows), batched, rtol=0, atol=5e-3)
    # the last-token default equals the last row of all_logits
    np.testing.assert_allclose(tiny.forward(ids, tiny.new_cache(32)), batched[-1], rtol=0, atol=2e-5)


def test_float16_cache_gives_the_same_logits(tiny):
    """K/V are rounded to float16 either way (as llama.cpp stores them): the default float16
    cache (the compiled step, where there is one) and a float32 one (the Python pass) agree, up
    to the two passes' summation orders (float weights: nothing amplifies them)."""
    ids = np.arange(9, dtype=np.int32)
    c16, c32 = tiny.new_cache(16), tiny.new_cache(16, dtype=np.float32)
    assert c16.k.dtype == np.float16 and c32.k.dtype == np.float32
    for part in (ids[:6], ids[6:]):
        np.testing.assert_allclose(tiny.forward(part, c16, all_logits=True),
                                   tiny.forward(part, c32, all_logits=True), rtol=0, atol=2e-3)


def test_sliding_window_changes_only_long_contexts():
    """gemma3's local layers stop seeing tokens `window` positions back; within the window nothing changes."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        short = load_model(GGUFReader(write_tiny_gguf(Path(d) / "a.gguf", **{**TINY["gemma3"], "sliding_window": 4})))
        wide = load_model(GGUFReader(write_tiny_gguf(Path(d) / "b.gguf", **{**TINY["gemma3"], "sliding_window": 64})))
        ids = np.arange(10, dtype=np.int32)
        a = short.forward(ids, short.new_cache(16), all_logits=True)
        b = wide.forward(ids, wide.new_cache(16), all_logits=True)
        np.testing.assert_allclose(a[:4], b[:4], atol=2e-5)  # positions 0..3 see < 4 keys either way
        assert np.abs(a[4] - b[4]).max() > 1e-3  # position 4 is the first to lose key 0


def test_long_prompts_are_split_into_batches(tiny, monkeypatch):
    from ggufile.runtime.model import transformer as model_mod

    ids = np.random.default_rng(3).integers(0, 64, size=11).astype(np.int32)
    whole = tiny.forward(ids, tiny.new_cache(16), all_logits=True)
    monkeypatch.setattr(model_mod, "MAX_BATCH", 4)
    cache = tiny.new_cache(16)
    np.testing.assert_allclose(tiny.forward(ids, cache, all_logits=True), whole, rtol=0, atol=5e-3)
    assert cache.n_tokens == 11
    np.testing.assert_allclose(tiny.forward(ids, tiny.new_cache(16)), whole[-1], rtol=0, atol=5e-3)


def test_truncate_reuses_prefix(tiny):
    rng = np.random.default_rng(2)
    prefix, first, second = (rng.integers(0, 64, size=n).astype(np.int32) for n in (6, 4, 3))
    cache = tiny.new_cache(32)
    tiny.forward(np.concatenate([prefix, first]), cache)
    cache.truncate(len(prefix))
    assert cache.n_tokens == len(prefix)
    reused = tiny.forward(second, cache, all_logits=True)
    fresh = tiny.forward(np.concatenate([prefix, second]), tiny.new_cache(32), all_logits=True)[len(prefix):]
    np.testing.assert_allclose(reused, fresh, rtol=0, atol=2e-5)
    with pytest.raises(GGUFileError):
        cache.truncate(cache.n_tokens + 1)


def test_context_overflow_and_bad_ids(tiny):
    cache = tiny.new_cache(8)
    assert isinstance(cache, KVCache)
    tiny.forward(np.arange(6, dtype=np.int32), cache)
    with pytest.raises(GGUFileError, match="context"):
        tiny.forward(np.arange(3, dtype=np.int32), cache)
    assert cache.n_tokens == 6  # a refused step leaves the cache as it was
    with pytest.raises(GGUFileError):
        tiny.forward(np.array([64], dtype=np.int32), cache)


def test_unknown_architecture_is_reported(tmp_path):
    import gguf

    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="mamba"):
        load_model(GGUFReader(path))


def test_unsupported_rope_scaling_is_reported():
    meta = {"general.architecture": "llama", "llama.embedding_length": 32, "llama.attention.head_count": 4,
            "llama.block_count": 1, "llama.feed_forward_length": 8, "llama.context_length": 64,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 16,
            "llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 4.0}
    with pytest.raises(UnsupportedModelError, match="longrope"):
        ModelConfig.from_gguf(meta)
    meta["llama.rope.scaling.type"] = "linear"
    assert ModelConfig.from_gguf(meta).rope_scale == 0.25
    meta["llama.rope.scaling.type"] = "yarn"
    with pytest.raises(GGUFileError, match="original_context_length"):
        ModelConfig.from_gguf(meta)
    meta["llama.rope.scaling.original_context_length"] = 4096
    c = ModelConfig.from_gguf(meta)
    assert (c.rope_scaling, c.rope_scale, c.rope_yarn_orig_ctx) == ("yarn", 0.25, 4096)


def test_yarn_frequencies():
    """Fast pairs keep their speed, slow pairs are slowed by the factor, cos/sin grow by 1 + 0.1 ln(factor)."""
    from ggufile.runtime.model import ops

    f_plain = ops.rope_freqs(128, 10000.0, 1.0, None)
    f_yarn = ops.rope_freqs(128, 10000.0, 0.25, None, (4096, 32.0, 1.0))
    assert f_plain.mscale == 1.0 and f_yarn.mscale == pytest.approx(1 + 0.1 * np.log(4))
    plain, yarn = (ops.rope_angles(np.array([1]), f)[0] for f in (f_plain, f_yarn))  # radians per position
    np.testing.assert_allclose(plain, 10000.0 ** (-np.arange(0, 128, 2) / 128), rtol=1e-5)
    # pair i turns 4096 * theta_i / 2pi times over the original context: > 32 -> untouched, < 1 -> scaled
    turns = 4096 * plain / (2 * np.pi)
    np.testing.assert_allclose(yarn[turns > 40], plain[turns > 40])
    np.testing.assert_allclose(yarn[turns < 0.8], plain[turns < 0.8] * 0.25)
    assert np.all(np.diff(yarn) < 0)  # still monotone
