"""The model checked as a whole before any kernel sees it (issue 19), and the hostile-file cases
around it: files that are not regular, error text from the file, NaN logits, bad prompt bytes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fuzz_gguf
from ggufile.runtime.engine import Engine
from ggufile.runtime.errors import GGUFileError, GGUFFormatError, printable_line
from ggufile.runtime.gguf.reader import GGUFReader
from ggufile.runtime.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seeds")
    out = {}
    for shape in (fuzz_gguf.SEED_SHAPES[0], fuzz_gguf.SEED_SHAPES[3]):
        path = folder / f"{shape[0]}.gguf"
        fuzz_gguf.write_seed(path, *shape, rng=np.random.default_rng(0))
        out[shape[0]] = fuzz_gguf.Seed(path)
    return out


def variant(seed, tmp_path, **changes) -> Path:
    """The seed with metadata keys changed (None removes a key)."""
    meta = dict(seed.metadata)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path = tmp_path / "variant.gguf"
    path.write_bytes(fuzz_gguf._rewrite(seed, meta))
    return path


def refusal(path: Path) -> str:
    with pytest.raises(GGUFileError) as err:
        Engine.open(path, n_ctx=32)
    message = str(err.value)
    assert message.isprintable() and len(message) <= 400
    return message


def test_the_issue_crash_rope_dimension_1000000(tmp_path, smollm2_path):
    """gguf-set-metadata llama.rope.dimension_count 1000000 on a copy of SmolLM2 crashed `-p x -n 1`."""
    copy = tmp_path / "smol.gguf"
    shutil.copy(smollm2_path, copy)
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_set_metadata", "--force", str(copy),
                    "llama.rope.dimension_count", "1000000"], check=True, capture_output=True)
    assert "llama.rope.dimension_count" in refusal(copy)
    proc = subprocess.run([sys.executable, "-m", "ggufile.runtime", "-m", str(copy), "-p", "x", "-n", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("Error: metadata llama.rope.dimension_count = 1000000 must be even, "
                                   "positive and at most the head size 64")


L = "llama."
CASES = [
    ({L + "rope.dimension_count": 1000000}, "rope.dimension_count"),
    ({L + "rope.dimension_count": 0}, "rope.dimension_count"),
    ({L + "rope.dimension_count": 15}, "rope.dimension_count"),
    ({L + "rope.dimension_count": 2**31}, "rope.dimension_count"),
    ({L + "attention.head_count": 0}, "head_count"),
    ({L + "attention.head_count_kv": 0}, "head_count_kv"),
    ({L + "attention.head_count_kv": 3}, "head_count_kv"),
    ({L + "attention.head_count": "4"}, "head_count"),
    ({L + "attention.head_count": np.array([4, 4], np.uint32)}, "head_count"),
    ({L + "attention.key_length": 32, L + "attention.value_length": 32}, "attn_q.weight"),
    ({L + "attention.value_length": 8}, "value_length"),
    ({L + "attention.layer_norm_rms_epsilon": float("nan")}, "layer_norm_rms_epsilon"),
    ({L + "attention.layer_norm_rms_epsilon": float("inf")}, "layer_norm_rms_epsilon"),
    ({L + "rope.freq_base": float("nan")}, "rope.freq_base"),
    ({L + "rope.freq_base": 0.0}, "rope.freq_base"),
    ({L + "rope.scaling.factor": float("nan")}, "rope.scaling.factor"),
    ({L + "embedding_length": 2**40}, "embedding_length"),
    ({L + "block_count": 3}, "blk.2."),
    ({L + "block_count": 2**32 - 1}, "block_count"),
    ({L + "feed_forward_length": 64}, "ffn_gate.weight"),
    ({L + "context_length": -1}, "context_length"),
    ({L + "vocab_size": 100000}, "vocab_size"),
    ({"tokenizer.ggml.tokens": np.arange(5, dtype=np.uint32)}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.merges": np.arange(5, dtype=np.uint32)}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.token_type": ["a"] * 300}, "tokenizer.ggml.token_type"),
    ({"tokenizer.ggml.token_type": np.ones(300, np.float32)}, "tokenizer.ggml.token_type"),
    ({"tokenizer.ggml.add_bos_token": np.array([1, 2], np.uint32)}, "add_bos_token"),
    ({"tokenizer.ggml.model": 7}, "tokenizer.ggml.model"),
    ({"general.architecture": np.array([1], np.uint32)}, "architecture"),
]


@pytest.mark.parametrize("changes, named", CASES, ids=[c[1] + "-" + str(i) for i, c in enumerate(CASES)])
def test_inconsistent_metadata_is_one_line_naming_the_key(seeds, tmp_path, changes, named):
    path = variant(seeds["llama"], tmp_path, **{k.replace(".", "__"): v for k, v in changes.items()})
    assert named in refusal(path)


def test_gemma3_checks_its_extra_tensors(seeds, tmp_path):
    path = variant(seeds["gemma3"], tmp_path, gemma3__attention__key_length=32,
                   gemma3__attention__value_length=32, gemma3__rope__dimension_count=32)
    assert "attn_q.weight" in refusal(path)


def test_scores_with_nan_are_refused(seeds, tmp_path):
    n = len(seeds["gemma3"].metadata["tokenizer.ggml.tokens"])
    scores = np.zeros(n, np.float32)
    scores[5] = np.nan
    path = variant(seeds["gemma3"], tmp_path, tokenizer__ggml__scores=scores)
    assert "tokenizer.ggml.scores" in refusal(path)


def test_special_token_ids_out_of_range_are_ignored_like_llama_cpp(seeds, tmp_path):
    path = variant(seeds["llama"], tmp_path, tokenizer__ggml__eos_token_id=10**6,
                   tokenizer__ggml__bos_token_id=2**32 - 1)
    engine = Engine.open(path, n_ctx=32)
    assert engine.tokenizer.bos_id is None or engine.tokenizer.bos_id < engine.tokenizer.vocab_size
    list(engine.generate(engine.tokenize("x"), SamplingParams(temperature=0), max_tokens=2))


def test_valid_seeds_load_and_decode(seeds):
    for seed in seeds.values():
        engine = Engine.open(seed.path, n_ctx=32)
        out = list(engine.generate(engine.chat_ids([{"role": "user", "content": "x"}]),
                                   SamplingParams(temperature=0), max_tokens=2))
        assert out


def test_compiled_step_asserts_its_shapes_at_pack_time(seeds):
    from ggufile.runtime.model import step

    engine = Engine.open(seeds["llama"].path, n_ctx=32)
    model = engine.model
    packed = step.CompiledStep.for_model(model)
    if packed is None:
        pytest.skip("no compiled step in this kernel build")
    import dataclasses

    model.config = dataclasses.replace(model.config, n_rot=model.config.head_dim * 2)
    with pytest.raises(GGUFFormatError, match="rope"):
        step.CompiledStep.for_model(model)


def test_context_beyond_memory_is_refused(seeds, tmp_path, monkeypatch):
    from ggufile.runtime.model import validate

    path = variant(seeds["llama"], tmp_path, llama__context_length=1 << 20)
    monkeypatch.setattr(validate, "physical_memory", lambda: 256 << 20)
    Engine.open(path, n_ctx=4096)  # 2 layers x 2 kv heads x 16 dims: 4096 tokens is 4 MiB
    with pytest.raises(GGUFileError, match="KV cache"):
        Engine.open(path, n_ctx=1 << 20)  # 512 MiB


# -- files that are not regular -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_non_regular_files_are_refused_before_reading(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    for args in (["-m", "ggufile.runtime", "-m", str(path), "--info"],
                 ["-m", "ggufile.builder.cli", "inspect", str(path)],
                 ["-m", "ggufile.builder.cli", "build", str(path), "-o", str(tmp_path / "out")]):
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert proc.stderr.strip().splitlines() == [f"Error: {path}: is {'a FIFO' if kind == 'fifo' else 'a device'}, "
                                                    "not a regular file"]


def test_reader_refuses_a_fifo_without_blocking(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    with pytest.raises(GGUFFormatError, match="FIFO"):
        GGUFReader(path)


# -- error text from file contents ----------------------------------------------------------------

def test_error_text_is_escaped_and_truncated():
    evil = "\x1b[2J\x1b[H verified OK \r\n" + "A" * 1_000_000
    line = printable_line(evil)
    assert line.isprintable() and len(line) <= 400 and "\x1b" not in line
    assert str(GGUFileError(evil)) == line


def test_metadata_strings_reach_the_terminal_escaped(seeds, tmp_path):
    from ggufile.runtime.gguf.info import describe_gguf

    path = variant(seeds["llama"], tmp_path, general__name="\x1b[2J\x1b[Hverified OK" + "x" * 5000,
                   general__architecture="\x1b[31mevil" + "y" * 100000)
    with GGUFReader(path) as r:
        assert all(v.isprintable() and len(v) <= 200 for v in describe_gguf(r).values())
    message = refusal(path)
    assert "\x1b" not in message and "\\x1b" in message


# -- sampler, prompt bytes ------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_logits_are_never_sampled(temperature):
    logits = np.full(50, np.nan, np.float32)
    logits[7] = 1.0
    logits[9] = np.inf
    sampler = Sampler(SamplingParams(temperature=temperature, seed=1))
    assert sampler.sample(logits, [1, 2]) in (7, 9)
    with pytest.raises(GGUFileError, match="NaN"):
        sampler.sample(np.full(50, np.nan, np.float32), [])


def test_non_utf8_prompt_is_one_line(smollm2_path, tmp_path):
    env = dict(os.environ, LC_ALL="C.UTF-8")
    proc = subprocess.run([sys.executable.encode(), b"-m", b"ggufile.runtime", b"-m", bytes(smollm2_path),
                           b"-p", b"caf\xe9", b"-n", b"1"], capture_output=True, env=env, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == ("Error: -p/--prompt is not valid UTF-8 (byte 0xe9 at character 3); "
                                            "use a UTF-8 terminal or -f FILE")
