"""A token's logits do not depend on how its prompt was batched: a prompt prefilled whole, or all
but its last token prefilled and the last decoded, or every token decoded one at a time, give
the same bits, for every weight type and both real models (issue #14: a cached prompt used to
recompute its last token through another path, and temperature 0 forked on a repeat).

The compiled step runs prompts and single tokens through the same per-token operations (see
kernels/src/step.decode_token), so these are exact comparisons, not tolerances.
"""
from __future__ import annotations

import numpy as np
import pytest

from ggufile.runtime import kernels
from ggufile.runtime.gguf.reader import GGUFReader
from ggufile.runtime.kernels import packing
from ggufile.runtime.kernels import step_layout as S
from ggufile.runtime.kernels.types import BLOCK_TYPES, QUANTIZABLE_TYPES
from ggufile.runtime.model import step as step_module
from ggufile.runtime.model.transformer import load_model
from test_model import write_tiny_gguf

pytestmark = pytest.mark.skipif(kernels.step_backend() is None, reason="needs the compiled step")

# Every matrix's row length a multiple of 256, so each type (K-quants included) applies to all.
SHAPE = dict(arch="llama", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512, n_vocab=96)
WEIGHT_TYPES = sorted(t.name for t in QUANTIZABLE_TYPES if t in BLOCK_TYPES) + ["F16", "BF16", "F32"]


def _prompt(n: int, n_vocab: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_vocab, size=n).astype(np.int32)


def _three_ways(model, ids, n_ctx=160):
    """Last-token logits: whole prompt; prompt[:-1] then the last token; one token at a time."""
    whole = model.forward(ids, model.new_cache(n_ctx))
    cache = model.new_cache(n_ctx)
    model.forward(ids[:-1], cache)
    cached = model.forward(ids[-1:], cache)
    cache = model.new_cache(n_ctx)
    for t in ids:
        stepwise = model.forward(t[None], cache)
    return whole, cached, stepwise


@pytest.fixture(scope="module")
def f32_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("prefill") / "f32.gguf", **SHAPE)


@pytest.mark.parametrize("qtype", WEIGHT_TYPES)
def test_prefill_equals_decode_for_every_weight_type(qtype, f32_path, tmp_path):
    from ggufile.builder.quantize_model import quantize_file

    path = f32_path
    if qtype != "F32":
        path = tmp_path / f"{qtype}.gguf"
        quantize_file(f32_path, path, qtype, pure=True)
    model = load_model(GGUFReader(path))
    assert model.weights.layers[0].wq.qtype.name == qtype
    ids = _prompt(step_module.CHUNK + 9, SHAPE["n_vocab"])  # two chunks: a boundary inside the prompt
    whole, cached, stepwise = _three_ways(model, ids)
    np.testing.assert_array_equal(cached, whole)
    np.testing.assert_array_equal(stepwise, whole)
    every = model.forward(ids, model.new_cache(160), all_logits=True)
    np.testing.assert_array_equal(every[-1], whole)


def test_prefill_equals_decode_on_the_real_models(real_model):
    name, path, _ = real_model
    model = load_model(GGUFReader(path))
    ids = _prompt(40, 30000, seed=2)
    whole, cached, stepwise = _three_ways(model, ids, n_ctx=64)
    np.testing.assert_array_equal(cached, whole)
    np.testing.assert_array_equal(stepwise, whole)


@pytest.mark.parametrize("tied", [False, True], ids=["output", "tied"])
@pytest.mark.parametrize("qtype", [t.name for t in packing.PACKED_LAYOUT])
def test_matrices_packed_at_load_give_the_files_logits(qtype, tied, tmp_path, monkeypatch):
    """The step packs the matrices kernels/packing.py lays out (8k rows), a slice of rows at a
    time (here 8 rows, so every matrix takes several), a tied output as a copy of its own; every
    logit is the bits the file's own layout gives (the step told to pack nothing)."""
    from ggufile.builder.quantize_model import quantize_file

    f32 = write_tiny_gguf(tmp_path / "f32.gguf", **SHAPE, tied=tied)
    path = tmp_path / f"{qtype}.gguf"
    quantize_file(f32, path, qtype, pure=True)
    ids = _prompt(step_module.CHUNK + 9, SHAPE["n_vocab"])
    monkeypatch.setattr(step_module, "_PACK_SLICE_BYTES", 1)
    packed_model = load_model(GGUFReader(path))
    packed = packed_model.forward(ids, packed_model.new_cache(160), all_logits=True)
    step = packed_model._compiled_step()
    blobs = step._tensors[:, S.T_BLOB]
    assert (blobs == S.BLOB_PACKED).sum() == 7 * SHAPE["n_layer"] + 1  # every layer's matrices, the output ...
    assert blobs[step._cfg[S.C_EMBD]] == S.BLOB_FILE  # ... but the embedding, read by rows
    monkeypatch.setattr(packing, "packable", lambda qtype, rows: False)
    plain_model = load_model(GGUFReader(path))
    plain = plain_model.forward(ids, plain_model.new_cache(160), all_logits=True)
    assert (plain_model._compiled_step()._tensors[:, S.T_BLOB] == S.BLOB_FILE).all()
    np.testing.assert_array_equal(packed, plain)


def test_results_do_not_depend_on_the_thread_count(f32_path, tmp_path):
    from ggufile.builder.quantize_model import quantize_file

    quantize_file(f32_path, tmp_path / "q4_k.gguf", "Q4_K", pure=True)
    model = load_model(GGUFReader(tmp_path / "q4_k.gguf"))
    backend = kernels.step_backend()
    ids = _prompt(20, SHAPE["n_vocab"])
    saved, results = backend.pool.n_threads, []
    try:
        for n in sorted({1, min(2, saved), saved}):  # at most the pool's threads
            backend.pool.n_threads = n
            results.append(model.forward(ids, model.new_cache(32), all_logits=True))
    finally:
        backend.pool.n_threads = saved
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_the_kv_cache_is_float16_and_touched_only_as_it_fills(f32_path):
    """A long context reserves address space, not memory: only the written positions' pages
    become resident (np.zeros maps the kernel's zero pages lazily)."""
    model = load_model(GGUFReader(f32_path))
    model.forward(_prompt(8, SHAPE["n_vocab"]), model.new_cache(16))  # packs the step, sizes its scratch
    cache = model.new_cache(1 << 18)  # 2 layers x 2 heads x 262144 x 64 x 2 bytes = 128 MiB each
    assert cache.k.dtype == cache.v.dtype == np.float16
    before = _rss_kib()
    model.forward(_prompt(8, SHAPE["n_vocab"]), cache)
    assert _rss_kib() - before < 16 * 1024  # far below the 256 MiB the two arrays span


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
