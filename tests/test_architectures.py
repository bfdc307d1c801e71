"""Every architecture in archs.ARCHS on small random-weight models (examples/synthetic_models.py):
the cache and the compiled step against the Python pass, mixture-of-experts decode reading only the
chosen experts, and, where llama-cpp-python is installed, our logits and greedy continuations
against llama.cpp's on the same files, for several weight types.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from ggufile.runtime import kernels
from ggufile.runtime.errors import UnsupportedModelError
from ggufile.runtime.gguf.reader import GGUFReader
from ggufile.runtime.model.archs import SUPPORTED_ARCHS
from ggufile.runtime.model.step import CompiledStep
from ggufile.runtime.model.transformer import ModelConfig, load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import synthetic_models as sm  # noqa: E402

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
# Relative to the spread of llama.cpp's logits (max - min over the vocabulary), the worst
# difference on its top 20. F32 weights: only summation order differs (measured <= 2e-4);
# quantized weights: 8-bit activations on both sides, rounding flips (measured <= 0.012).
REL_TOL = {"F32": 0.002, "Q8_0": 0.03, "Q4_K": 0.03}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    cache = {}

    def get(family: str, qtype: str = "F32") -> Path:
        if (family, qtype) not in cache:
            cache[family, qtype] = sm.write_model(root / f"{family}-{qtype}.gguf", sm.FAMILIES[family], qtype)
        return cache[family, qtype]

    return get


def test_every_family_has_a_small_model():
    assert {s.arch for s in sm.FAMILIES.values()} == set(SUPPORTED_ARCHS)


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError) as err:
        ModelConfig.from_gguf({"general.architecture": "mamba"})
    msg = str(err.value)
    assert "\n" not in msg and "'mamba'" in msg and all(a in msg for a in SUPPORTED_ARCHS)


def test_cli_refuses_an_unsupported_architecture_in_one_line(tmp_path):
    import subprocess

    import gguf

    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab", "d"])
    w.add_token_types([1, 1, 1, 1])
    w.add_token_merges(["a b"])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = subprocess.run([sys.executable, "-m", "ggufile.builder.cli", "run", "-m", str(path), "-p", "hi"],
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 1
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1 and "'mamba'" in lines[0] and "qwen3moe" in lines[0], got.stderr


def test_configs_read_what_each_family_sets(files):
    cfg = {f: load_model(GGUFReader(files(f))).config for f in ("qwen3", "gemma2", "qwen3moe", "mixtral", "phi3")}
    assert cfg["qwen3"].head_dim == 128 and cfg["qwen3"].n_embd // cfg["qwen3"].n_head == 64
    g = cfg["gemma2"]
    assert (g.attn_softcap, g.final_softcap, g.sliding_window) == (50.0, 30.0, 8)
    assert [g.is_swa(il) for il in range(4)] == [True, False, True, False]
    assert (cfg["qwen3moe"].n_expert, cfg["qwen3moe"].n_expert_used, cfg["qwen3moe"].n_ff) == (8, 2, 256)
    assert (cfg["mixtral"].n_expert, cfg["mixtral"].n_ff) == (8, 512)
    assert cfg["phi3"].rope_attn_factor == pytest.approx(1.19) and cfg["phi3"].sliding_window == 0


@pytest.mark.parametrize("family", list(sm.FAMILIES))
def test_incremental_decode_equals_batched(family, files):
    model = load_model(GGUFReader(files(family)))
    ids = np.array(sm.PROMPTS[1], dtype=np.int32)
    batched = model.forward(ids, model.new_cache(32), all_logits=True)
    cache = model.new_cache(32)
    model._forward_batch(ids[:5], cache, False)
    rows = [model._forward_batch(ids[i:i + 1], cache, False) for i in range(5, len(ids))]
    spread = float(batched.max() - batched.min())
    assert np.abs(np.array(rows) - batched[5:]).max() < 1e-3 * spread


@pytest.mark.parametrize("family", list(sm.FAMILIES))
def test_compiled_step_equals_the_python_pass(family, files):
    model = load_model(GGUFReader(files(family, "Q8_0")))
    step = CompiledStep.for_model(model)
    if kernels.step_backend() is None:
        assert step is None
        pytest.skip("no compiled step on this backend")
    assert step is not None, f"{family} does not pack into the step"
    prompt, tokens = np.array(sm.PROMPTS[0], dtype=np.int32), [9, 33, 61, 0, 12, 50, 7, 8, 100, 3]
    out = []
    for use_step in (False, True):
        cache = model.new_cache(32)
        model._forward_batch(prompt, cache, False)
        out.append(np.array([step.step(t, cache) if use_step else
                             model._forward_batch(np.array([t], dtype=np.int32), cache, False) for t in tokens]))
    spread = float(out[0].max() - out[0].min())
    assert np.abs(out[1] - out[0]).max() < 0.02 * spread


@pytest.mark.parametrize("family", ["mixtral", "qwen3moe"])
def test_moe_decode_reads_only_the_chosen_experts(family, files, tmp_path):
    """Experts no token chose are overwritten with NaN in the file: decoding gives the same logits
    (a NaN read even with weight 0 would poison them), in the Python pass and in the step."""
    from ggufile.runtime.model import transformer

    path = files(family)
    model = load_model(GGUFReader(path))
    c = model.config
    prompt, tokens = np.array([1], dtype=np.int32), [9, 33]  # <= 6 of the 8 experts per layer
    used = [set() for _ in range(c.n_layer)]
    route = transformer.route

    def spy(cfg, logits):
        chosen, wts = route(cfg, logits)
        spy.layer_calls.append(chosen)
        return chosen, wts

    spy.layer_calls = []
    transformer.route = spy
    try:
        want = _decode(model, prompt, tokens, step=False)
    finally:
        transformer.route = route
    for i, chosen in enumerate(spy.layer_calls):
        used[i % c.n_layer].update(int(e) for e in chosen.reshape(-1))
    poisoned = tmp_path / "poisoned.gguf"
    data = bytearray(path.read_bytes())
    reader = GGUFReader(path)
    n_poisoned = 0
    for il in range(c.n_layer):
        for kind in ("gate", "up", "down"):
            info = reader.tensors[f"blk.{il}.ffn_{kind}_exps.weight"]
            per_expert = info.nbytes // c.n_expert
            for e in set(range(c.n_expert)) - used[il]:
                at = info.offset + e * per_expert
                data[at:at + per_expert] = np.full(per_expert // 4, np.nan, np.float32).tobytes()
                n_poisoned += 1
    assert n_poisoned > 0
    poisoned.write_bytes(bytes(data))
    bad = load_model(GGUFReader(poisoned))
    np.testing.assert_array_equal(_decode(bad, prompt, tokens, step=False), want)
    if kernels.step_backend() is not None:
        got = _decode(bad, prompt, tokens, step=True)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, _decode(model, prompt, tokens, step=True), rtol=0, atol=0)


def _decode(model, prompt, tokens, step: bool):
    cache = model.new_cache(32)
    model._forward_batch(prompt, cache, False)
    run = CompiledStep.for_model(model) if step else None
    # the prompt pass runs the prompt (all experts' rows of its tokens); decode: one token at a time
    return np.array([run.step(t, cache) if step else model._forward_batch(np.array([t], dtype=np.int32), cache, False)
                     for t in tokens])


# --------------------------------------------------------------------------- against llama.cpp

CASES = [(f, "F32") for f in sm.FAMILIES] + [(f, q) for f in ("qwen2", "qwen3", "qwen3moe", "mixtral", "phi3",
                                                                "gemma2") for q in ("Q8_0", "Q4_K")]


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python (the bench extra) is not installed")
@pytest.mark.parametrize("family,qtype", CASES, ids=[f"{f}-{q}" for f, q in CASES])
def test_logits_and_greedy_match_llama_cpp(family, qtype, files):
    path = files(family, qtype)
    ref = sm.llama_cpp_run(path)
    ours = sm.ours_run(path, forced=[r["greedy"] for r in ref])
    a = sm.agreement(ours, ref)
    print(f"\n{family} {qtype}: {a}")
    assert a["top1"] == f"{len(ref)}/{len(ref)}"
    assert a["rel_diff"] < REL_TOL[qtype]
    # Fed llama.cpp's greedy tokens, we pick the same but at near-ties (random weights make many:
    # a flip where two logits are within the quantization noise is numerics, a drift is a bug).
    assert a["forced_agree"] >= 0.9 * a["greedy_total"]
    assert a["worst_tie_gap"] < REL_TOL[qtype]
