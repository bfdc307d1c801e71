"""Several sequences' KV caches stacked in one pair of arrays, so that one compiled step serves
them all (the server's parallel slots, continuous batching).

Slot s owns layers s * n_layer .. (s + 1) * n_layer - 1 of the stacked arrays: its own view is a
C-contiguous KVCache of the usual shape, so every single-sequence path works on it unchanged,
and the compiled step finds a token's layer as seq * n_layer + il (kernels/src/step.py).
Memory is lazy as for one cache (transformer._lazy_zeros): each slot costs only the positions
it has written.
"""
from __future__ import annotations

import numpy as np

from ggufile.runtime.errors import GGUFileError
from ggufile.runtime.model.transformer import KVCache, ModelConfig, lazy_zeros


class SlotCache(KVCache):
    """Slot `seq`'s view of a SlotCaches."""

    def __init__(self, pool: "SlotCaches", seq: int):  # noqa: super().__init__ would allocate
        L = pool.n_layer
        self.pool, self.seq, self.n_ctx, self.n_tokens = pool, seq, pool.n_ctx, 0
        self.k, self.v = pool.k[seq * L:(seq + 1) * L], pool.v[seq * L:(seq + 1) * L]


class SlotCaches:
    def __init__(self, cfg: ModelConfig, n_slots: int, n_ctx: int, dtype=np.float16):
        if n_slots < 1 or n_ctx < 1:
            raise GGUFileError(f"need at least one slot and one position, got {n_slots} x {n_ctx}")
        self.n_layer, self.n_ctx = cfg.n_layer, n_ctx
        self.k = lazy_zeros((n_slots * cfg.n_layer, cfg.n_head_kv, n_ctx, cfg.head_dim), dtype)
        self.v = lazy_zeros((n_slots * cfg.n_layer, cfg.n_head_kv, cfg.head_dim, n_ctx), dtype)
        self.slots = [SlotCache(self, s) for s in range(n_slots)]

    def bytes_per_token(self) -> int:
        """K and V of one position of one slot."""
        return (self.k[0, :, 0].nbytes + self.v[0, :, :, 0].nbytes) * self.n_layer
