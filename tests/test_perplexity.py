"""Perplexity: the pure numeric parts against direct formulas, the chunking/BOS/scoring rules of
llama.cpp's perplexity.cpp on a recording fake model, the corpus decoder, and a real-model run."""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from ggufile.builder.corpus import decode_r_strings
from ggufile.runtime.errors import GGUFileError
from ggufile.runtime.perplexity import (
    NLLStats,
    chunk_input,
    evaluate,
    n_chunks_for,
    perplexity_command,
    scored_targets,
    token_nll,
)


def test_token_nll_is_negative_log_softmax():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((5, 50)) * 10).astype(np.float32)
    targets = np.array([0, 7, 49, 3, 3])
    l64 = logits.astype(np.float64)
    expected = -(l64[np.arange(5), targets] - np.log(np.exp(l64).sum(axis=1)))
    np.testing.assert_allclose(token_nll(logits, targets), expected, rtol=1e-6)


def test_stats_match_llama_cpp_formula():
    nlls = np.array([1.0, 2.0, 0.5, 3.0])
    s = NLLStats()
    s.add(nlls[:2])
    s.add(nlls[2:])
    mean = nlls.mean()
    assert s.ppl == pytest.approx(math.exp(mean))
    var = (nlls ** 2).mean() - mean ** 2
    assert s.stderr == pytest.approx(math.exp(mean) * math.sqrt(var / 3))
    assert s.per_chunk == [pytest.approx(math.exp(1.5)), pytest.approx(math.exp(mean))]


def test_chunking_rules():
    assert n_chunks_for(1100, 512) == 2 and n_chunks_for(5000, 512, 3) == 3
    with pytest.raises(GGUFileError, match="at least 1024 tokens"):
        n_chunks_for(1000, 512)
    toks = list(range(100, 140))
    assert chunk_input(toks, 1, 8, bos_id=1).tolist() == [1, 109, 110, 111, 112, 113, 114, 115]
    assert chunk_input(toks, 1, 8, bos_id=None).tolist() == list(range(108, 116))
    # positions 4..6 of chunk 1 predict tokens 5..7 of it
    assert scored_targets(toks, 1, 8).tolist() == [113, 114, 115]


class FakeModel:
    """Records what it is fed; predicts `next = token + 1` with confidence set by `sharp`."""

    def __init__(self, n_vocab=300, sharp=2.0):
        self.n_vocab, self.sharp, self.calls = n_vocab, sharp, []

    class Cache:
        def __init__(self, n_ctx):
            self.n_ctx, self.tokens = n_ctx, []

    def new_cache(self, n_ctx):
        return self.Cache(n_ctx)

    def forward(self, ids, cache, all_logits=False):
        ids = np.asarray(ids)
        cache.tokens.extend(ids.tolist())
        assert len(cache.tokens) <= cache.n_ctx
        self.calls.append((list(cache.tokens), all_logits))
        logits = np.zeros((len(ids), self.n_vocab), dtype=np.float32)
        logits[np.arange(len(ids)), (ids + 1) % self.n_vocab] = self.sharp
        return logits if all_logits else logits[-1]


def test_evaluate_follows_perplexity_cpp():
    model = FakeModel()
    tokens = [1] + list(range(10, 10 + 40))  # BOS + text, as encode(add_special=True) gives
    res = evaluate(model, tokens, n_ctx=16, bos_id=1)
    assert res.n_chunks == 2 and res.stats.count == 2 * 7  # n_ctx - 1 - n_ctx/2 per chunk
    # each chunk starts from an empty cache with BOS over its first token
    full = [tokens_seen for tokens_seen, all_logits in model.calls if all_logits]
    assert full[0] == tokens[:16] and full[1] == [1] + tokens[17:32]
    # every scored target is the predicted token: NLL = -log(e^s / (e^s + V - 1))
    s, v = model.sharp, model.n_vocab
    assert res.stats.ppl == pytest.approx((math.exp(s) + v - 1) / math.exp(s))


def test_uniform_model_has_perplexity_of_vocab_size():
    res = evaluate(FakeModel(n_vocab=64, sharp=0.0), list(range(64)) * 4, n_ctx=32, bos_id=None)
    assert res.stats.ppl == pytest.approx(64) and res.stats.stderr == pytest.approx(0, abs=1e-5)


def test_decode_r_character_vector():
    def charsxp(s):
        b = s.encode()
        return struct.pack(">ii", 0x40009, len(b)) + b
    raw = (b"X\n" + struct.pack(">iii", 3, 0x40201, 0x30500) + struct.pack(">i", 5) + b"UTF-8"
           + struct.pack(">ii", 16, 3) + charsxp("It is a truth") + struct.pack(">ii", 9, -1) + charsxp("café"))
    assert decode_r_strings(raw) == ["It is a truth", "", "café"]


def test_cli_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(perplexity_command, ["-m", str(tmp_path / "m.gguf"), "-f", str(tmp_path / "t.txt")])
    assert res.exit_code != 0 and "no such file" in res.output and "Traceback" not in res.output


@pytest.mark.real_model
def test_smollm2_perplexity_on_austen(smollm2_path, tmp_path):
    from ggufile.builder.corpus import corpus_text

    text = tmp_path / "t.txt"
    text.write_text(corpus_text()[:3000], encoding="utf-8")
    res = CliRunner().invoke(perplexity_command, ["-m", str(smollm2_path), "-f", str(text), "-c", "32",
                                                  "--chunks", "2"])
    assert res.exit_code == 0, res.output
    ppl = float(res.output.split("PPL = ")[1].split()[0])
    assert 3 < ppl < 60  # a 135M instruct model on Austen: ~15-20 at c=512
