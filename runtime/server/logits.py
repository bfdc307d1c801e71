"""Per-request changes to the next-token logits, and what the server records about each draw.

The engine calls every hook of a generation around each draw (engine.generate's `hooks`):
`adjust(logits) -> logits` before it (biases, bans, grammar masks), `accept(token, logits)` after
it with the model's own logits. Pure compute on numpy arrays; nothing here knows about HTTP.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


class LogitBias:
    """OpenAI's `logit_bias` / llama.cpp's: add a bias per token id; -inf bans the token."""

    def __init__(self, bias: dict[int, float]):
        self.ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self.values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    def adjust(self, logits: np.ndarray) -> np.ndarray:
        logits = logits.copy()
        logits[self.ids] += self.values
        return logits

    def accept(self, token: int, logits: np.ndarray) -> None:
        pass


def ban(ids) -> LogitBias:
    """A hook that never lets `ids` be drawn (llama.cpp's ignore_eos bans the end tokens)."""
    return LogitBias({int(i): -np.inf for i in ids})


@dataclass(frozen=True)
class TokenLogprob:
    """One drawn token: its log-probability under the model and the `top` most likely tokens
    (id, logprob), most likely first. llama.cpp reports the model's own distribution (before
    sampling's truncations), and so do we."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class Logprobs:
    """Records a TokenLogprob per draw; the server pops them as the matching chunks arrive."""

    def __init__(self, top_n: int):
        self.top_n = top_n
        self.records: deque[TokenLogprob] = deque()

    def adjust(self, logits: np.ndarray) -> np.ndarray:
        return logits

    def accept(self, token: int, logits: np.ndarray) -> None:
        x = logits.astype(np.float64)
        top = x.max()
        log_z = top + np.log(np.exp(x - top).sum())
        best: tuple[tuple[int, float], ...] = ()
        if self.top_n:
            n = min(self.top_n, x.size)
            ids = np.argpartition(-x, n - 1)[:n]
            ids = ids[np.argsort(-x[ids], kind="stable")]
            best = tuple((int(i), float(x[i] - log_z)) for i in ids)
        self.records.append(TokenLogprob(int(token), float(x[token] - log_z), best))
