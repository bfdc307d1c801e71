"""Hostile HTTP clients (issue 19): DNS rebinding hosts, slow and idle connections, connection
floods, lone surrogates, hang-ups during prompt processing, and errors that must stay one line."""
from __future__ import annotations

import logging
import socket
import threading
import time

import httpx
import pytest

from fake_engine import FakeEngine, running_server
from ggufile.runtime.server import limits
from ggufile.runtime.server.app import create_app
from ggufile.runtime.server.guard import is_loopback


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("host, ok", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("LOCALHOST", True), ("::1", True),
    ("127.0.0.1.evil.example", False), ("127.evil.example", False), ("localhost.evil.example", False),
    ("127.0.0.1evil", False), ("evil.example", False), ("0.0.0.0", False), ("", False),
])
def test_loopback_is_matched_exactly(host, ok):
    assert is_loopback(host) is ok


def test_rebinding_host_that_starts_with_127_is_refused():
    with running_server(create_app(FakeEngine())) as url, httpx.Client(base_url=url) as c:
        for host in ("127.0.0.1.evil.example", "127.0.0.1.evil.example:8080", "127.1.evil"):
            r = c.get("/health", headers={"host": host})
            assert r.status_code == 403, host
            assert r.json()["error"]["code"] == "invalid_host"
        assert c.get("/health", headers={"host": "127.0.0.1:1234"}).status_code == 200


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                                  b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                  b"Content-Length: 100\r\nContent-Type: application/json\r\n\r\n{\"pro"])
def test_slow_or_silent_requests_are_closed(monkeypatch, sent):
    monkeypatch.setattr(limits, "REQUEST_READ_SECONDS", 0.5)
    with running_server(create_app(FakeEngine())) as url:
        sock = _raw(url)
        sock.sendall(sent)
        assert _closed_by_server(sock, 10), "the server kept a request that never completed"
        sock.close()


def test_idle_connection_flood_leaves_health_answerable(monkeypatch):
    monkeypatch.setattr(limits, "max_connections", lambda: 8)
    with running_server(create_app(FakeEngine())) as url:
        idle = [_raw(url) for _ in range(40)]
        try:
            with httpx.Client(base_url=url, timeout=10) as c:
                assert c.get("/health").json()["status"] == "ok"
            # the flood was shed: most idle sockets were closed by the server
            closed = sum(_closed_by_server(s, 0.5) for s in idle)
            assert closed >= 40 - 8
        finally:
            for s in idle:
                s.close()


def test_connection_limit_is_below_the_descriptor_limit():
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert limits.max_connections() <= max(4, soft - limits.FD_RESERVE)


@pytest.mark.parametrize("body", [
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"prompt": "a\\udfffb"}',
    b'{"prompt": "ok", "stop": ["\\ud83d"]}',
])
def test_lone_surrogates_are_a_400(body):
    engine = FakeEngine()
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    with running_server(create_app(engine)) as url, httpx.Client(base_url=url) as c:
        r = c.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_text"
        assert "Traceback" not in r.text


def test_hang_up_during_prompt_processing_stops_it():
    engine = FakeEngine()
    engine.prefill_delay = 30.0
    with running_server(create_app(engine)) as url:
        def ask():
            try:
                with httpx.Client(base_url=url, timeout=0.5) as c:
                    c.post("/v1/completions", json={"prompt": "long prompt", "max_tokens": 4})
            except httpx.TimeoutException:
                pass  # we hang up: the client closes the connection

        t = threading.Thread(target=ask)
        t.start()
        t.join()
        assert wait_for(lambda: engine.prefills_cancelled == 1), "prompt processing went on"
        engine.prefill_delay = 0.0
        with httpx.Client(base_url=url, timeout=20) as c:
            r = c.post("/v1/completions", json={"prompt": "next", "max_tokens": 3})
            assert r.status_code == 200


def test_unexpected_errors_log_one_line_no_traceback(caplog):
    engine = FakeEngine()
    engine.fail_with = RuntimeError("boom\nsecond line")
    caplog.set_level(logging.INFO)
    with running_server(create_app(engine)) as url, httpx.Client(base_url=url) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 500 and "Traceback" not in r.text and "boom" not in r.text
        r = c.post("/v1/completions", json={"prompt": "hi", "stream": True})
        assert "Traceback" not in r.text
    assert "Traceback" not in caplog.text
    assert all(rec.exc_info is None for rec in caplog.records)
    assert any("boom" in rec.getMessage() and "\n" not in rec.getMessage() for rec in caplog.records)


def test_client_errors_are_not_logged(caplog):
    caplog.set_level(logging.INFO)
    with running_server(create_app(FakeEngine())) as url, httpx.Client(base_url=url) as c:
        for body in (b"{", b'{"messages": 3}', b'{"prompt": "\\ud800"}', b"\xff\xfe"):
            r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


def test_engine_prefill_stops_between_batches_when_cancelled(tmp_path):
    """The real engine looks at `cancelled` between 512-token batches of a long prompt."""
    import numpy as np

    import fuzz_gguf
    from ggufile.runtime import engine as engine_mod
    from ggufile.runtime.errors import Cancelled

    seed_path = tmp_path / "seed.gguf"
    fuzz_gguf.write_seed(seed_path, *fuzz_gguf.SEED_SHAPES[0], rng=np.random.default_rng(0))
    seed = fuzz_gguf.Seed(seed_path)
    path = tmp_path / "long.gguf"
    path.write_bytes(fuzz_gguf._rewrite(seed, dict(seed.metadata, **{"llama.context_length": 4096})))
    engine = engine_mod.Engine.open(path, n_ctx=4096)
    cancelled = threading.Event()
    batches = []
    real_forward = engine._forward

    def forward(ids, cancelled_too=None):
        batches.append(len(ids))
        cancelled.set()  # the client hangs up while the first batch runs
        return real_forward(ids, cancelled_too)

    engine._forward = forward
    prompt = [5 + i % 200 for i in range(3 * engine_mod.PREFILL_BATCH)]
    with pytest.raises(Cancelled):
        engine.generate(prompt, max_tokens=1, cancelled=cancelled)
    assert batches == [engine_mod.PREFILL_BATCH]
    # the processed prefix stays cached: the next request goes on from there
    engine._forward = real_forward
    assert engine._cached_ids == prompt[:engine_mod.PREFILL_BATCH]
    assert list(engine.generate(prompt, max_tokens=1))
