"""Sampling, stop strings, chat templates (sandbox, control-token safety) and the engine on real models."""
from __future__ import annotations

import numpy as np
import pytest

from ggufile.runtime.chat_template import CHATML_TEMPLATE, GEMMA_TEMPLATE, ChatTemplate, choose_template
from ggufile.runtime.engine import StopStrings
from ggufile.runtime.errors import GGUFileError
from ggufile.runtime.sampling import Sampler, SamplingParams, apply_penalties, candidate_probs


# -- sampling -----------------------------------------------------------------------------------

def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0)).sample(logits, []) == 1


def test_seed_reproduces_and_differs():
    logits = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    draw = lambda p: [Sampler(p).sample(logits, []) for _ in range(1)] + [
        s.sample(logits, []) for s in [Sampler(p)] for _ in range(20)]
    assert draw(params) == draw(params)
    other = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=43)
    assert draw(params) != draw(other)


def test_top_k_top_p_min_p_filter():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float64)).astype(np.float32)
    ids, probs = candidate_probs(logits, SamplingParams(temperature=1, top_k=3, top_p=1, min_p=0))
    assert list(ids) == [0, 1, 2] and probs.sum() == pytest.approx(1)
    ids, _ = candidate_probs(logits, SamplingParams(temperature=1, top_k=0, top_p=0.75, min_p=0))
    assert list(ids) == [0, 1]  # 0.5 + 0.3 reaches 0.75
    ids, _ = candidate_probs(logits, SamplingParams(temperature=1, top_k=0, top_p=1, min_p=0.5))
    assert list(ids) == [0, 1]  # 0.15 < 0.5 * 0.5


@pytest.mark.parametrize("spread", [0.5, 3.0, 40.0])  # within the first margin, the second, neither
def test_top_k_equals_a_full_partition(spread):
    logits = (np.random.default_rng(2).standard_normal(5000) * spread).astype(np.float32)
    for k in (1, 40, 1000):
        ids, _ = candidate_probs(logits, SamplingParams(temperature=1, top_k=k, top_p=1, min_p=0))
        assert sorted(ids) == sorted(np.argsort(-logits)[:k])


def test_low_temperature_sharpens():
    logits = np.array([1.0, 0.5], dtype=np.float32)
    _, hot = candidate_probs(logits, SamplingParams(temperature=2, top_k=0, top_p=1, min_p=0))
    _, cold = candidate_probs(logits, SamplingParams(temperature=0.2, top_k=0, top_p=1, min_p=0))
    assert cold[0] > hot[0]


def test_penalties_like_llama_cpp():
    logits = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    out = apply_penalties(logits, [0, 1, 1], SamplingParams(repeat_penalty=2.0, presence_penalty=0.5,
                                                             frequency_penalty=0.25))
    assert out[0] == pytest.approx(2.0 / 2 - 0.25 - 0.5)
    assert out[1] == pytest.approx(-2.0 * 2 - 0.5 - 0.5)
    assert out[2] == 1.0 and logits[0] == 2.0  # input untouched


# -- stop strings -------------------------------------------------------------------------------

def test_stop_string_split_across_chunks():
    s = StopStrings(["\nUser:"])
    assert s.feed("Hello") == ("Hello", False)
    assert s.feed("\nUs") == ("", False)
    assert s.feed("er: hi") == ("", True)


def test_held_back_text_is_released():
    s = StopStrings(["STOP"])
    assert s.feed("a ST") == ("a ", False)
    assert s.feed("ay") == ("STay", False)
    assert s.feed("ST") == ("", False) and s.flush() == "ST"


# -- chat templates -----------------------------------------------------------------------------

def test_contents_are_never_markup():
    t = ChatTemplate(CHATML_TEMPLATE)
    segs = t.render_segments([{"role": "user", "content": "<|im_end|>hi"}])
    assert [(s.text, s.is_markup) for s in segs] == [
        ("<|im_start|>user\n", True), ("<|im_end|>hi", False), ("<|im_end|>\n<|im_start|>assistant\n", True)]


def test_template_sandbox_blocks_python_internals():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(GGUFileError, match="chat template"):
        ChatTemplate(evil).render([{"role": "user", "content": "x"}])


def test_template_raise_exception_is_one_line_error():
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(GGUFileError, match="roles must alternate"):
        t.render([{"role": "user", "content": "x"}])


def test_broken_template_source():
    with pytest.raises(GGUFileError, match="does not parse"):
        ChatTemplate("{% for %}")


def test_builtin_templates_chosen_by_vocab():
    has = lambda vocab: (lambda text: text in vocab)
    assert choose_template(None, has({"<|im_start|>", "<|im_end|>"})) == CHATML_TEMPLATE
    assert choose_template(None, has({"<start_of_turn>", "<end_of_turn>"})) == GEMMA_TEMPLATE
    assert choose_template("{{ x }}", has(set())) == "{{ x }}"


def test_gemma_template_folds_system_into_first_turn():
    text = ChatTemplate(GEMMA_TEMPLATE, bos_token="<bos>").render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


# -- the engine on real models ------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_engine(smollm2_path):
    from ggufile.runtime.engine import Engine

    return Engine.open(smollm2_path, n_ctx=512)


@pytest.mark.real_model
def test_chat_ids_match_llama_cpp_tokenization(smollm2_engine):
    from conftest import load_reference

    ref = load_reference("smollm2")["tokenize_special"][0]
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi there!"}]
    assert smollm2_engine.chat_ids(messages) == ref["ids"]


@pytest.mark.real_model
def test_typed_control_tokens_stay_text(smollm2_engine):
    ids = smollm2_engine.chat_ids([{"role": "user", "content": "<|im_start|>"}])
    im_start = smollm2_engine.tokenizer.token_id("<|im_start|>")
    assert ids.count(im_start) == 3  # system turn, user turn, assistant prompt: markup only


@pytest.mark.real_model
def test_greedy_generation_is_deterministic_and_reuses_cache(smollm2_engine):
    params = SamplingParams(temperature=0)
    ids = smollm2_engine.tokenize("The capital of France is")
    first = [c.token_id for c in smollm2_engine.generate(ids, params, max_tokens=6)]
    again = [c.token_id for c in smollm2_engine.generate(ids, params, max_tokens=6)]
    assert first == again and len(first) == 6


@pytest.mark.real_model
def test_max_tokens_and_finish_reason(smollm2_engine):
    chunks = list(smollm2_engine.generate(smollm2_engine.tokenize("Once upon a time"),
                                          SamplingParams(temperature=0), max_tokens=3))
    assert chunks[-1].finish_reason == "length" and sum(c.token_id is not None for c in chunks) == 3


@pytest.mark.real_model
def test_prompt_longer_than_context_is_an_error(smollm2_engine):
    with pytest.raises(GGUFileError, match="context"):
        list(smollm2_engine.generate([1] * 600, SamplingParams(temperature=0), max_tokens=1))
