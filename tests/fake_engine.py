"""Test support for the server: a tiny engine that honours Engine's contract, and a helper that
runs an app under uvicorn on a free localhost port in a background thread.

FakeEngine tokenizes to UTF-8 bytes (id = byte + 3; 0 = BOS, 1 = EOS, 2 = unused) and answers
every prompt with `reply`, one character per token, then EOS. It records what it was asked and
whether generations ever overlapped, so tests can check the server's side of the contract.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from ggufile.runtime.engine import Chunk, StopStrings
from ggufile.runtime.errors import Cancelled, GGUFileError
from ggufile.runtime.sampling import SamplingParams

BOS, EOS, OFFSET = 0, 1, 3


class FakeEngine:
    def __init__(self, reply: str = "Hello from the fake engine.", n_ctx: int = 256,
                 token_delay: float = 0.0, model_name: str = "fake-model"):
        self.model_name = model_name
        self.n_ctx = n_ctx
        self.n_vocab = 256 + OFFSET
        self.reply = reply
        self.token_delay = token_delay
        self.lock = threading.Lock()
        # what the server did to us
        self.calls: list[dict] = []
        self.tokens_generated = 0
        self.closed_early = 0  # generations stopped before their natural end
        self.active = 0
        self.max_active = 0
        self.fail_with: Exception | None = None
        self.gate: threading.Event | None = None  # when set, generations wait for it before token 1
        self.prefill_delay = 0.0  # seconds of "prompt processing" inside generate()
        self.prefills_cancelled = 0

    # -- text <-> tokens ---------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return ([BOS] if add_special else []) + [b + OFFSET for b in text.encode("utf-8")]

    def detokenize(self, ids: list[int]) -> str:
        if any(not 0 <= i < self.n_vocab for i in ids):
            raise IndexError("token id out of range")
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode("utf-8", "replace")

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        return self.tokenize(text)

    # -- generation --------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                 max_tokens: int | None = None, stop=(), cancelled=None) -> Iterator[Chunk]:
        if not prompt_ids:
            raise GGUFileError("the prompt is empty")
        room = self.n_ctx - len(prompt_ids)
        if room <= 0:
            raise GGUFileError(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.n_ctx}")
        self.calls.append({"prompt_ids": list(prompt_ids), "params": params, "max_tokens": max_tokens,
                           "stop": list(stop)})
        if self.fail_with:
            raise self.fail_with
        if self.prefill_delay:  # "prompt processing": polls `cancelled` like Engine._prefill
            deadline = time.monotonic() + self.prefill_delay
            while time.monotonic() < deadline:
                if cancelled is not None and cancelled.is_set():
                    self.prefills_cancelled += 1
                    raise Cancelled()
                time.sleep(0.01)
        limit = room if max_tokens is None or max_tokens < 0 else min(max_tokens, room)
        return self._run(limit, list(stop))

    def _run(self, limit: int, stop: list[str]) -> Iterator[Chunk]:
        """Engine._decode_loop's structure, with `reply` standing in for the model."""
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        stopper = StopStrings(stop)
        finished = False
        try:
            if self.gate is not None:
                self.gate.wait(30)
            for i in range(limit):
                if self.token_delay:
                    time.sleep(self.token_delay)
                self.tokens_generated += 1
                if i >= len(self.reply):
                    finished = True
                    yield Chunk(EOS, stopper.flush(), "stop")
                    return
                ch = self.reply[i]
                token = ch.encode("utf-8")[0] + OFFSET
                text, hit = stopper.feed(ch)
                if hit or i == limit - 1:
                    finished = True
                    yield Chunk(token, text if hit else text + stopper.flush(), "stop" if hit else "length")
                    return
                yield Chunk(token, text)
        finally:
            self.active -= 1
            if not finished:
                self.closed_early += 1


# -- a real server in a thread -----------------------------------------------------------------

@contextlib.contextmanager
def running_server(app, timeout: float = 15.0) -> Iterator[str]:
    """Serve `app` on 127.0.0.1:<free port>; yields the base URL; always stops the server."""
    from ggufile.runtime.server.app import bind_socket, make_server

    sock = bind_socket("127.0.0.1", 0)
    server = make_server(app, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
