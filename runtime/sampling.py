"""Next-token sampling: penalties, top-k, top-p, min-p, temperature, seeded draw.

The chain follows llama.cpp's default order (penalties -> top_k -> top_p -> min_p -> temperature
-> draw). Temperature <= 0 means greedy (argmax), which is deterministic.
Pure compute: logits in, token id out.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ggufile.runtime.errors import GGUFileError


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # >= 1: off
    min_p: float = 0.05  # <= 0: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64  # how many recent tokens the penalties look at
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class Sampler:
    """Stateful sampler: owns the RNG so a seed reproduces a whole generation."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray, recent: list[int]) -> int:
        p = self.params
        logits = finite_logits(logits)
        logits = apply_penalties(logits, recent[-p.repeat_last_n:] if p.repeat_last_n > 0 else [], p)
        if p.greedy:
            return int(np.argmax(logits))
        ids, probs = candidate_probs(logits, p)
        return int(ids[self.rng.choice(len(ids), p=probs)])


def finite_logits(logits: np.ndarray) -> np.ndarray:
    """Logits every step below can rank: NaN is never chosen, +inf is the largest float.
    GGUFileError when nothing is left (a corrupt model computes NaN everywhere)."""
    if np.isfinite(logits).all():
        return logits
    logits = np.nan_to_num(logits, nan=-np.inf, posinf=np.finfo(np.float32).max, neginf=-np.inf)
    if not np.isfinite(logits).any():
        raise GGUFileError("the model computed no usable next-token scores (all NaN or -inf): "
                           "its weights are probably corrupt")
    return logits


def apply_penalties(logits: np.ndarray, recent: list[int], p: SamplingParams) -> np.ndarray:
    """llama.cpp's repeat (divide positive / multiply negative logits), presence and frequency
    penalties over the recent tokens. Returns the input untouched when all are off."""
    if not recent or (p.repeat_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0):
        return logits
    logits = logits.copy()
    counts = Counter(recent)
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    freq = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    vals = logits[ids]
    vals = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
    vals -= freq * p.frequency_penalty + p.presence_penalty
    logits[ids] = vals
    return logits


def candidate_probs(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The surviving candidate ids and their renormalized probabilities (sum to 1)."""
    k = p.top_k if 0 < p.top_k < logits.size else logits.size
    ids = _top_k(logits, k) if k < logits.size else np.arange(logits.size)
    ids = ids[np.argsort(-logits[ids], kind="stable")]  # sorted by logit, descending
    vals = logits[ids].astype(np.float64)
    probs = _softmax(vals)
    if p.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
        ids, vals, probs = ids[:keep], vals[:keep], probs[:keep]
    if p.min_p > 0.0:
        keep = probs >= p.min_p * probs[0]
        ids, vals = ids[keep], vals[keep]
    return ids, _softmax(vals / p.temperature)


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits, in no order. Whenever k logits lie within a margin of the
    maximum, the k largest are among them: one comparison pass over the vocabulary, then a
    partition of a few hundred, instead of a partition of all of it (gemma3's 262k: 4.4 ms)."""
    top = logits.max()
    for margin in (8.0, 32.0):
        near = np.flatnonzero(logits >= top - margin)
        if len(near) >= k:
            return near[np.argpartition(-logits[near], k - 1)[:k]]
    return np.argpartition(-logits, k - 1)[:k]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()
