"""Parallel slots and continuous batching (issue #15): several requests decode in one batched step,
and none of them can tell — each gets the text it would get alone.

The model-level test compares logits bit for bit (the compiled step computes each token with the
same operations whatever else is in the call); the server tests run serve() in its own process
with the official `openai` client, as a team sharing one executable would.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ggufile.runtime import kernels
from test_server_load import ServerProcess

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.real_model

SLOT_SERVER = """
import sys
from ggufile.runtime.engine import Engine
from ggufile.runtime.server.app import serve
serve(Engine.open(sys.argv[1], n_ctx=1024), port=0, open_browser=False, parallel=int(sys.argv[2]),
      max_waiting=16, log=lambda m: print(m, flush=True))
"""

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Count from one to five.",
             "What is 12 times 12?", "Write a haiku about rain.", "Who wrote Hamlet?",
             "What do bees make?", "Say hello in Spanish."]


@pytest.mark.skipif(kernels.step_backend() is None, reason="needs the compiled step")
@pytest.mark.parametrize("model_path", ["smollm2_path", "gemma3_path"])
def test_batched_logits_equal_each_sequence_alone(model_path, request):
    """Prompts of 1-130 tokens (chunk boundaries inside) in one batch, then decode steps with every
    slot at a different position: each slot's logits are the bits it gets alone."""
    from ggufile.runtime.gguf.reader import GGUFReader
    from ggufile.runtime.model.slots import SlotCaches
    from ggufile.runtime.model.transformer import load_model

    model = load_model(GGUFReader(request.getfixturevalue(model_path)))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 1000, size=n).astype(np.int32) for n in (9, 130, 1, 70)]
    steps = [rng.integers(0, 1000, size=len(prompts)).astype(np.int32) for _ in range(3)]
    alone = []
    for s, prompt in enumerate(prompts):
        cache = model.new_cache(256)
        alone.append([model.forward(prompt, cache)] + [model.forward(step[s:s + 1], cache) for step in steps])
    pool = SlotCaches(model.config, len(prompts), 256)
    together = [model.forward_batch([(p, pool.slots[s]) for s, p in enumerate(prompts)])]
    together += [model.forward_batch([(step[s:s + 1], pool.slots[s]) for s in range(len(prompts))])
                 for step in steps]
    for s in range(len(prompts)):
        for i in range(len(steps) + 1):
            np.testing.assert_array_equal(together[i][s], alone[s][i])


def _client(url: str):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def _ask(client, question: str, max_tokens: int = 24) -> str:
    stream = client.chat.completions.create(model="any", stream=True, temperature=0, max_tokens=max_tokens,
                                            messages=[{"role": "user", "content": question}])
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def _slots(url: str) -> list[dict]:
    return httpx.get(url + "/slots", timeout=10).json()


def _wait_idle(url: str, timeout: float) -> float:
    """Seconds until no slot is processing."""
    start = time.monotonic()
    while any(s["is_processing"] for s in _slots(url)):
        assert time.monotonic() - start < timeout, _slots(url)
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def eight_slots(smollm2_path):
    server = ServerProcess(SLOT_SERVER, str(smollm2_path), "8")
    try:
        yield server
    finally:
        assert server.stop() == 0, "".join(server.output)


@pytest.mark.slow
def test_eight_streaming_clients_each_get_their_text_alone_and_memory_stays_flat(eight_slots):
    url = eight_slots.url
    client = _client(url)
    alone = [_ask(client, q) for q in QUESTIONS]  # one at a time: nothing to batch with
    assert all(alone) and len(set(alone)) > 1
    rss = []
    for _ in range(3):
        got: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, _ask(client, QUESTIONS[i])))
                   for i in range(len(QUESTIONS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert [got.get(i) for i in range(len(QUESTIONS))] == alone
        _wait_idle(url, 30)
        rss.append(eight_slots.rss_kib())
    assert rss[2] - rss[0] < 16 * 1024, rss  # KiB: no growth round over round
    health = httpx.get(url + "/health").json()
    assert health["slots_idle"] == 8 and health["slots_processing"] == 0
    metrics = httpx.get(url + "/metrics").text
    assert "llamacpp:requests_total " in metrics and "llamacpp:n_decode_total " in metrics


@pytest.mark.slow
def test_a_client_that_hangs_up_frees_its_slot_mid_prompt_and_mid_stream(eight_slots):
    url = eight_slots.url
    _wait_idle(url, 30)
    long_prompt = "Tell me everything about the history of the world. " * 80  # ~900 tokens
    body = {"model": "any", "stream": True, "max_tokens": 400, "temperature": 0,
            "messages": [{"role": "user", "content": long_prompt}]}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url + "/v1/chat/completions", json=body):
            time.sleep(0.3)  # the prompt is being processed; hang up before the first token
        assert _wait_idle(url, 5) < 5
    cached = max(s["n_cached_tokens"] for s in _slots(url))
    assert 0 < cached < 850, "the slot should have stopped between prompt chunks"

    body["messages"] = [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if '"content":"' in line:
                    break  # the first token; hang up mid-stream
        assert _wait_idle(url, 5) < 5
    decoded = max(s["next_token"]["n_decoded"] for s in _slots(url))
    assert decoded < 100
    assert _ask(_client(url), QUESTIONS[0])  # the slots still serve
