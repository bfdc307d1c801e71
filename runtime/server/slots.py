"""The server's parallel slots: each an engine view with its own KV cache and worker thread.

With `--parallel N` (N > 1) the slots' caches are one SlotCaches (model/slots.py) and their
model calls meet in a Batcher (continuous batching); with one slot, or an engine that cannot
make views (the tests' fakes), the engine itself is the only slot, as before slots existed.
"""
from __future__ import annotations

import queue
import threading
import time

DEFAULT_PARALLEL = 4  # llama-server's default for its unified cache; 2 cores keep up with it


class Slot:
    def __init__(self, index: int, engine):
        self.index, self.engine = index, engine
        self.job = None  # the Job running here
        self.last_used = 0.0  # monotonic time its last job started or ended
        self.n_jobs = 0
        self.last_decoded = 0  # tokens its last finished job generated
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def engine_prefix(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` this slot's cache holds."""
        cached = getattr(self.engine, "cached_prefix", None)
        return cached(ids) if cached else 0

    def start(self, job, work) -> None:
        """Run work(self, job) on this slot's thread (the queue's lock is held)."""
        self.job, self.last_used = job, time.monotonic()
        self.n_jobs += 1
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=f"ggufile-slot-{self.index}", daemon=True)
            self._thread.start()
        self._inbox.put((job, work))

    def finish(self) -> None:
        if self.job is not None:
            self.last_decoded = self.job.timings.n_generated
        self.job, self.last_used = None, time.monotonic()

    def stop(self) -> None:
        """Let the thread exit after the job in hand."""
        if self._thread is not None:
            self._inbox.put(None)
            self._thread = None

    def _loop(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            job, work = item
            work(self, job)

    def describe(self, n_ctx: int) -> dict:
        """llama-server's /slots entry, the fields that apply."""
        job = self.job
        cache = getattr(self.engine, "_cache", None)
        return {"id": self.index, "n_ctx": n_ctx, "is_processing": job is not None,
                "n_cached_tokens": getattr(cache, "n_tokens", 0),
                "next_token": {"n_decoded": job.timings.n_generated if job is not None else self.last_decoded},
                "n_requests": self.n_jobs}


def make_slots(engine, parallel: int):
    """(slots, batcher or None) for `engine`."""
    if parallel <= 1 or not hasattr(engine, "for_slot"):
        return [Slot(0, engine)], None
    from ggufile.runtime.model.slots import SlotCaches
    from ggufile.runtime.server.batcher import Batcher

    pool = SlotCaches(engine.model.config, parallel, engine.n_ctx)
    batcher = Batcher(engine.model, check=engine.reader.check_unchanged)
    return [Slot(i, engine.for_slot(cache, batcher.forward)) for i, cache in enumerate(pool.slots)], batcher
