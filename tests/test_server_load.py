"""Bounded load on localhost: 8 concurrent streaming clients, a few rounds, against serve() running
in its own process (so its RSS is measurable and its Ctrl-C shutdown is exercised too).

Every request must complete or be cleanly refused (503 in OpenAI's error shape), no client may
hang (every client has a timeout), and the server's memory must not grow round over round.
"""
from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx2")

TESTS = Path(__file__).parent
CLIENTS = 8
CLIENT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)

FAKE_SERVER = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from fake_engine import FakeEngine
from ggufile.runtime.server.app import serve
# max_waiting=4: a round of 8 both queues work and refuses some (503), exercising both answers.
serve(FakeEngine(reply="streaming " * 8, n_ctx=512, token_delay=0.002), port=0, open_browser=False,
      max_waiting=4,
      log=lambda m: print(m, flush=True))
"""

REAL_SERVER = """
import sys
from ggufile.runtime.engine import Engine
from ggufile.runtime.server.app import serve
serve(Engine.open(sys.argv[1], n_ctx=512), port=0, open_browser=False, log=lambda m: print(m, flush=True))
"""


class ServerProcess:
    """serve() in a child process; finds its URL in the announcement line."""

    def __init__(self, code: str, *args: str, start_timeout: float = 120.0):
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self._wait_for_url(start_timeout)

    def _pump(self):
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _wait_for_url(self, timeout: float) -> str:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise RuntimeError("the server did not announce itself") from None
            if line is None:
                raise RuntimeError("the server exited:\n" + "".join(self.output))
            if line.startswith("serving "):
                return line.split(" at ", 1)[1].split()[0].rstrip("/")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> int:
        """Ctrl-C, as a user would; kill only if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def stream_once(url: str, max_tokens: int, hang_up_after: int | None = None) -> str:
    """One streaming chat request -> "ok", "rejected", "hung-up" (ours, on purpose) or an error."""
    body = {"messages": [{"role": "user", "content": "Say something."}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0}
    try:
        with httpx.Client(timeout=CLIENT_TIMEOUT) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code == 503:
                r.read()
                err = json.loads(r.text)["error"]
                return "rejected" if err["code"] == "server_busy" else f"bad 503: {err}"
            if r.status_code != 200:
                r.read()
                return f"status {r.status_code}: {r.text[:200]}"
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if hang_up_after is not None and len(events) >= hang_up_after:
                        return "hung-up"
            if events[-1] != "[DONE]":
                return "stream ended without [DONE]"
            finish = json.loads(events[-2])["choices"][0]["finish_reason"]
            return "ok" if finish in ("stop", "length") else f"finish_reason {finish}"
    except httpx.TimeoutException:
        return "timeout"
    except httpx.HTTPError as err:
        return f"transport error: {err!r}"


def run_round(url: str, max_tokens: int) -> list[str]:
    """CLIENTS concurrent streams; the last one hangs up early (disconnect under load)."""
    results: list[str | None] = [None] * CLIENTS
    barrier = threading.Barrier(CLIENTS)

    def client(i):
        barrier.wait(30)
        results[i] = stream_once(url, max_tokens, hang_up_after=3 if i == CLIENTS - 1 else None)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CLIENT_TIMEOUT.read + 30)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return results


def load_test(server: ServerProcess, rounds: int, max_tokens: int, rss_growth_kib: int) -> dict:
    results = run_round(server.url, max_tokens)  # warm-up: imports, caches, first allocations
    rss_before = server.rss_kib()
    for _ in range(rounds):
        results += run_round(server.url, max_tokens)
    rss_after = server.rss_kib()
    bad = [r for r in results if r not in ("ok", "rejected", "hung-up")]
    assert not bad, bad
    assert results.count("ok") >= rounds  # the queue admits work, it does not just refuse
    # The server becomes idle again (a job whose client just hung up ends after its current
    # token), and it still answers.
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/health", timeout=10).json()["queued"]:
        assert time.monotonic() < deadline, "the queue never drained"
        time.sleep(0.05)
    assert stream_once(server.url, max_tokens) == "ok"
    assert rss_after - rss_before < rss_growth_kib, (rss_before, rss_after)
    return {"ok": results.count("ok"), "rejected": results.count("rejected"), "rss_kib": (rss_before, rss_after)}


def test_load_fake_engine():
    server = ServerProcess(FAKE_SERVER)
    try:
        figures = load_test(server, rounds=3, max_tokens=64, rss_growth_kib=16 * 1024)
        print("load (fake engine):", figures)
    finally:
        code = server.stop()
    assert code == 0, "".join(server.output)
    assert "server stopped" in "".join(server.output)
    assert "Traceback" not in "".join(server.output)


@pytest.mark.slow
@pytest.mark.real_model
def test_load_real_model(smollm2_path):
    server = ServerProcess(REAL_SERVER, str(smollm2_path))
    try:
        figures = load_test(server, rounds=2, max_tokens=6, rss_growth_kib=48 * 1024)
        print("load (SmolLM2):", figures)
    finally:
        code = server.stop()
    assert code == 0, "".join(server.output)
    assert "Traceback" not in "".join(server.output)
