"""Continuous batching: the model runs once per step for every slot that needs it.

Each slot's generation runs on its own thread (server/queue.py) and calls `forward` wherever
a single engine would call the model: a prompt, then one token at a time. The batcher thread
gathers those calls and runs them together in one model.forward_batch — the next token of
every decoding slot plus up to STEP_TOKENS of waiting prompts — so the weights are read once
per step for all slots (one N-column matmul per weight). A long prompt goes in chunks,
interleaved with the others' decode steps, instead of freezing them. A step starts when every
generating slot has asked (they move in lockstep), or LINGER after the first ask, so a slot
busy elsewhere (a grammar, a slow hook) delays nobody for long.

Results do not depend on the batching: the compiled step computes each token's logits with
the same operations whatever else is in the call (model/step.py), so a request's
temperature-0 text is the same alone or beside seven others.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ggufile.runtime.engine import infinite_values_are_errors
from ggufile.runtime.errors import Cancelled

STEP_TOKENS = 64  # prompt tokens per step beside the decoding slots' (the step's chunk size)
LINGER = 0.005  # seconds a step waits for the slots still sampling


@dataclass(eq=False)
class _Ask:
    """One slot's call: tokens to run through its cache, the logits after the last."""

    ids: list[int]
    cache: object
    cancelled: threading.Event | None
    done: threading.Event = field(default_factory=threading.Event)
    at: int = 0  # tokens already run
    logits: np.ndarray | None = None
    error: BaseException | None = None


class Batcher:
    def __init__(self, model, check=None):
        self.model = model
        self._check = check or (lambda: None)  # before each step: has the mapped file changed?
        self._cond = threading.Condition()
        self._asks: list[_Ask] = []
        self._generating = 0  # slots inside a job (each will ask again soon)
        self._thread: threading.Thread | None = None
        self.steps = 0  # for /metrics
        self.step_tokens = 0

    # -- slot side -----------------------------------------------------------------------------
    def enter(self) -> None:
        """A slot starts a job: steps wait (up to LINGER) for its asks."""
        with self._cond:
            self._generating += 1
            self._ensure_thread()

    def leave(self) -> None:
        with self._cond:
            self._generating -= 1
            self._cond.notify_all()

    def forward(self, ids, cache, cancelled: threading.Event | None = None) -> np.ndarray:
        """Run `ids` through `cache` with the other slots' tokens; the last token's logits.
        Raises Cancelled if `cancelled` is set while its prompt still has chunks to go."""
        ask = _Ask([int(i) for i in ids], cache, cancelled)
        with self._cond:
            self._ensure_thread()
            self._asks.append(ask)
            self._cond.notify_all()
        ask.done.wait()
        if ask.error is not None:
            raise ask.error
        return ask.logits

    # -- batcher thread --------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="ggufile-batcher", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            self._step(batch)

    def _next_batch(self) -> list[tuple[_Ask, int]]:
        """Wait for asks; then (ask, n tokens) for this step: every decode, prompts FIFO."""
        with self._cond:
            while not self._asks:
                self._cond.wait()
            deadline = time.monotonic() + LINGER
            while len(self._asks) < self._generating and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            for ask in [a for a in self._asks if a.cancelled is not None and a.cancelled.is_set()]:
                self._asks.remove(ask)
                ask.error = Cancelled()
                ask.done.set()
            budget = STEP_TOKENS
            batch = []
            for ask in sorted(self._asks, key=lambda a: len(a.ids) - a.at > 1):  # decodes first
                n = min(len(ask.ids) - ask.at, max(budget, 1 if len(ask.ids) - ask.at == 1 else 0))
                if n > 0:
                    batch.append((ask, n))
                    budget -= n
            return batch

    def _step(self, batch: list[tuple[_Ask, int]]) -> None:
        if not batch:
            return
        try:
            self._check()
            with infinite_values_are_errors():
                rows = self.model.forward_batch(
                    [(np.asarray(ask.ids[ask.at:ask.at + n], dtype=np.int32), ask.cache) for ask, n in batch])
        except BaseException as err:  # each slot in the step reports it to its own request
            with self._cond:
                for ask, _ in batch:
                    self._finish(ask, error=err)
            return
        with self._cond:
            self.steps += 1
            self.step_tokens += sum(n for _, n in batch)
            for (ask, n), logits in zip(batch, rows):
                ask.at += n
                if ask.at == len(ask.ids):
                    self._finish(ask, logits=logits)

    def _finish(self, ask: _Ask, logits=None, error=None) -> None:
        if ask in self._asks:
            self._asks.remove(ask)
        ask.logits, ask.error = logits, error
        ask.done.set()
