"""The compiled one-token step (runtime/model/step.py, kernels/src/step.py) against the
Python forward pass it replaces for decoding, on every backend that has it.

The real models' decode steps go through it in test_model.py / test_generation.py (llama.cpp's
references); here tiny synthetic models check it value by value, including what the real ones
lack: float weights, a sliding window the sequence outgrows, tied embeddings, thread counts.
"""
from __future__ import annotations

import importlib.util
import threading

import numpy as np
import pytest

from ggufile.runtime import kernels
from ggufile.runtime.model.step import CompiledStep
from ggufile.runtime.gguf.constants import GGMLType
from ggufile.runtime.gguf.reader import GGUFReader
from ggufile.runtime.kernels import compiled
from ggufile.runtime.model.transformer import load_model
from test_kernels import _backend_ids, load_backend
from test_model import TINY, write_tiny_gguf

HAS_NUMBA = importlib.util.find_spec("numba") is not None


@pytest.fixture(scope="module", params=[name for name in _backend_ids() if name != "numpy"])
def backend(request):
    loaded = load_backend(request.param)
    if loaded.decode_token is None:
        pytest.skip(f"{request.param} was built before the step")
    return loaded


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("tiny") / f"{request.param}.gguf", **TINY[request.param])
    return load_model(GGUFReader(path))


PROMPT = np.array([3, 17, 42, 5], dtype=np.int32)
CONTINUATION = [9, 33, 61, 0, 12, 50, 7]  # past the gemma3 tiny model's window of 4


def _decode(model, step, tokens, n_ctx=32):
    """Logits after each of `tokens` (after PROMPT), one token at a time, and the cache."""
    cache = model.new_cache(n_ctx)
    model._forward_batch(PROMPT, cache, False)
    out = []
    for t in tokens:
        if step is None:
            out.append(model._forward_batch(np.array([t], dtype=np.int32), cache, False))
        else:
            out.append(step.step(t, cache))
    return np.array(out), cache


def test_step_matches_the_python_pass(tiny, backend):
    step = CompiledStep.for_model(tiny, backend)
    assert step is not None
    want, want_cache = _decode(tiny, None, CONTINUATION)
    got, got_cache = _decode(tiny, step, CONTINUATION)
    n = len(PROMPT) + len(CONTINUATION)
    assert got_cache.n_tokens == want_cache.n_tokens == n
    # float32 weights: no 8-bit requantization to amplify the last-bit differences (RMSNorm sums
    # in double here, float32 there), so the two agree closely
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
    np.testing.assert_allclose(got_cache.k[:, :, :n], want_cache.k[:, :, :n], rtol=0, atol=2e-3)
    np.testing.assert_allclose(got_cache.v[:, :, :n], want_cache.v[:, :, :n], rtol=0, atol=2e-3)


def test_step_takes_bf16_weights(backend, tmp_path):
    """A BF16 model (every matrix, the token embedding too) decodes in the step: the same
    mv_bf16 dot products (bf16-rounded activations) as the Python pass, the same embedding rows."""
    from ggufile.builder.quantize_model import quantize_file

    f32 = write_tiny_gguf(tmp_path / "f32.gguf", **TINY["llama"])
    quantize_file(f32, tmp_path / "bf16.gguf", "BF16")
    model = load_model(GGUFReader(tmp_path / "bf16.gguf"))
    assert {model.weights.tok_embd.qtype, model.weights.layers[0].wq.qtype} == {GGMLType.BF16}
    step = CompiledStep.for_model(model, backend)
    assert step is not None
    want, _ = _decode(model, None, CONTINUATION)
    got, _ = _decode(model, step, CONTINUATION)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)


def test_step_results_do_not_depend_on_the_thread_count(tiny, backend):
    """Threads split rows and heads, never a sum: any count gives the same bits."""
    step = CompiledStep.for_model(tiny, backend)
    saved = backend.pool.n_threads
    results = []
    try:
        for n in sorted({1, min(2, saved), saved}):
            backend.pool.n_threads = n
            results.append(_decode(tiny, step, CONTINUATION)[0])
    finally:
        backend.pool.n_threads = saved
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_forward_uses_the_step_for_one_token(tiny):
    """Model.forward takes the step when the kernels have it, the Python pass for float32
    caches (and everything else)."""
    if kernels.step_backend() is None:
        assert tiny._compiled_step() is None
        return
    assert isinstance(tiny._compiled_step(), CompiledStep)
    cache = tiny.new_cache(16)
    tiny.forward(PROMPT, cache)
    via_forward = tiny.forward(np.array([9], dtype=np.int32), cache)
    direct = tiny.new_cache(16)
    tiny._compiled_step().forward(PROMPT, direct)
    np.testing.assert_array_equal(via_forward, tiny._compiled_step().step(9, direct))
    c32 = tiny.new_cache(16, dtype=np.float32)
    tiny.forward(PROMPT, c32)
    assert not tiny._compiled_step().supports(c32)
    np.testing.assert_allclose(tiny.forward(np.array([9], dtype=np.int32), c32), via_forward, atol=5e-3)


def test_step_refuses_a_cache_it_would_overrun(tiny, backend):
    """The compiled code has no bounds checks: a cache of another shape goes to the Python pass."""
    step = CompiledStep.for_model(tiny, backend)
    assert step.supports(tiny.new_cache(16))
    other = tiny.new_cache(16)
    other.k = other.k[:, :, :, :-1].copy()  # as if made for a model with smaller heads
    assert not step.supports(other)
    full = tiny.new_cache(4)
    full.n_tokens = 4
    assert not step.supports(full)


def test_numpy_backend_has_no_step(tiny):
    from ggufile.runtime.kernels import numpy_backend

    assert CompiledStep.for_model(tiny, numpy_backend) is None


class _FailingThread:
    """A backend whose thread 1 fails before entering the step: the others must not wait forever."""

    def __init__(self, backend):
        self.pool = backend.pool
        self._inner = backend.decode_token

    def decode_token(self, tid, *args):
        if tid == 1:
            raise RuntimeError("thread 1 could not start")
        return self._inner(tid, *args)

    run_step = compiled.CompiledBackend.run_step


def test_a_thread_that_never_comes_aborts_the_step(tiny, backend):
    if backend.pool.n_threads < 2:
        pytest.skip("needs two pool threads")
    failing = _FailingThread(backend)
    step = CompiledStep.for_model(tiny, failing)
    cache = tiny.new_cache(16)
    tiny._forward_batch(PROMPT, cache, False)
    errors = []

    def run():
        try:
            step.step(9, cache)
        except RuntimeError as err:
            errors.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the step hung waiting for a thread that never came"
    assert errors and "could not start" in str(errors[0])
    # the pool and the step still work afterwards
    want = _decode(tiny, CompiledStep.for_model(tiny, backend), [9], n_ctx=16)[0][0]
    cache.truncate(len(PROMPT))
    np.testing.assert_array_equal(CompiledStep.for_model(tiny, backend).step(9, cache), want)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba needed to call the step's helpers directly")
def test_float16_rounding_helpers_match_numpy():
    from numba import njit

    from ggufile.runtime.kernels.src import exports

    round_all = njit(lambda xs: np.array([exports._round_f16(v) for v in xs], dtype=np.float32))
    bits_all = njit(lambda xs: np.array([np.int64(exports._f16_bits(v)) for v in xs]))
    rng = np.random.default_rng(0)
    xs = np.concatenate([
        rng.standard_normal(20000).astype(np.float32) * np.float32(10.0) ** rng.integers(-9, 5, 20000),
        np.array([0.0, -0.0, 65504.0, 65519.0, 65520.0, -70000.0, 6.1e-05, 5.96e-08, 2.9e-08, 3.0e-08],
                 dtype=np.float32)])
    with np.errstate(over="ignore"):
        want = xs.astype(np.float16)
    np.testing.assert_array_equal(round_all(xs), want.astype(np.float32))
    np.testing.assert_array_equal(bits_all(xs), want.view(np.uint16).astype(np.int64))


def test_the_step_quantizes_activations_for_the_families_its_matrices_read():
    """A Q4_K_M model's matrices read only Q8_K blocks, so the step makes no Q8_0 ones; the token
    embedding (here row 0) is only looked up and does not count."""
    from ggufile.runtime.kernels import step_layout as S
    from ggufile.runtime.model.step import _activation_kinds

    def table(*types):
        t = np.zeros((len(types), S.TENSOR_COLS), np.int64)
        t[:, S.T_TYPE] = types
        return t
    Q4_0, Q8_0, Q4_K, Q6_K, F16 = GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.F16
    assert _activation_kinds(table(Q6_K, Q4_K, Q6_K, Q4_K), 0) == S.A_Q8_K
    assert _activation_kinds(table(Q8_0, Q4_K, Q6_K), 0) == S.A_Q8_K
    assert _activation_kinds(table(Q6_K, Q4_0, Q8_0), 0) == S.A_Q8_0
    assert _activation_kinds(table(Q4_K, Q4_0, Q6_K), 0) == S.A_Q8_0 | S.A_Q8_K
    assert _activation_kinds(table(F16, F16), 0) == 0
