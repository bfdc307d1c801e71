"""/v1/embeddings: mean-pooled, normalised final-norm hidden states, batched, float and base64."""
from __future__ import annotations

import numpy as np
import pytest

httpx = pytest.importorskip("httpx2")

from fake_engine import FakeEngine, running_server  # noqa: E402
from ggufile.runtime.server.app import create_app  # noqa: E402


def test_embeddings_need_the_flag():
    with running_server(create_app(FakeEngine())) as url:
        r = httpx.post(url + "/v1/embeddings", json={"input": "hi"})
    assert r.status_code == 501 and "--embeddings" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def real(smollm2_path):
    from ggufile.runtime.engine import Engine

    engine = Engine.open(smollm2_path, n_ctx=512)
    with running_server(create_app(engine, embeddings=True)) as url:
        yield url, engine


@pytest.mark.real_model
def test_real_embeddings_with_openai_client(real):
    openai = pytest.importorskip("openai")
    url, engine = real
    api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Stock markets fell sharply today."]
    out = api.embeddings.create(model="text-embedding-3-small", input=texts)  # base64 on the wire
    vecs = np.array([d.embedding for d in out.data])
    assert vecs.shape == (3, engine.model.config.n_embd) and [d.index for d in out.data] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]  # the paraphrase is closer than the unrelated text
    assert out.usage.prompt_tokens == sum(len(engine.tokenize(t)) for t in texts)
    floats = httpx.post(url + "/embeddings", json={"input": texts[0], "encoding_format": "float"}, timeout=120).json()
    assert np.allclose(floats["data"][0]["embedding"], vecs[0], atol=1e-6)  # batching changes nothing
    ids = engine.tokenize(texts[0])
    by_ids = httpx.post(url + "/v1/embeddings", json={"input": ids, "encoding_format": "float"}, timeout=120).json()
    assert np.allclose(by_ids["data"][0]["embedding"], vecs[0], atol=1e-6)
    for bad in ({"input": []}, {"input": 5}, {"input": "x", "dimensions": 8}, {"input": [[10**9]]}):
        assert httpx.post(url + "/v1/embeddings", json=bad, timeout=120).status_code == 400


@pytest.mark.real_model
def test_real_embeddings_match_llama_cpp(real, smollm2_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    url, engine = real
    text = "The capital of France is Paris."
    ours = np.array(httpx.post(url + "/v1/embeddings", json={"input": text, "encoding_format": "float"},
                               timeout=120).json()["data"][0]["embedding"])
    ref = llama_cpp.Llama(str(smollm2_path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                          verbose=False, n_ctx=512)
    theirs = np.array(ref.embed(text, normalize=True))
    assert float(ours @ theirs) > 0.999
