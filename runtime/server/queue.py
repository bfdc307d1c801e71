"""Generations on parallel slots, first come first served.

The engine is blocking numpy code and not thread-safe, so each slot (server/slots.py: an engine
view with its own KV cache) runs one generation at a time on its own worker thread, under the
slot's `lock`; with several slots their model calls meet in one batched step (server/batcher.py).
Requests wait in a FIFO for a free slot, the one holding the longest prefix of their prompt
(else the least recently used); the FIFO is bounded so a flood of clients gets a quick "busy"
answer instead of an ever-growing backlog. A job is cancelled when its client goes away:
waiting, it is dropped; running, its slot stops after the current token (or prompt chunk) and
takes the next job.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ggufile.runtime.errors import Cancelled
from ggufile.runtime.sampling import SamplingParams

_DONE = object()  # end of a job's output


class QueueFull(Exception):
    """Too many requests are already waiting."""


@dataclass
class Timings:
    """When the job ran (perf_counter seconds), for usage reports and tokens/s."""

    queued: float = 0.0
    started: float = 0.0  # the worker picked the job up
    first_token: float = 0.0  # the prompt was processed and the first token sampled
    finished: float = 0.0
    n_generated: int = 0


@dataclass(eq=False)  # identity equality: jobs live in sets
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int | None
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    timings: Timings = field(default_factory=Timings)
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_release: Callable[["Job"], None] | None = None
    # What to run instead of one plain engine.generate (several choices, hooks):
    # (engine, cancelled event) -> chunks.
    work: Callable | None = None
    done: bool = False  # the request side has read the whole output
    _released: bool = False
    _release_lock: threading.Lock = field(default_factory=threading.Lock)

    # -- worker side ---------------------------------------------------------------------------
    def post(self, item) -> None:
        """Hand an item to the waiting request; fails silently once the loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop was closed: the server is shutting down
            self.cancelled.set()

    def release(self) -> None:
        """Free the job's place in the queue (exactly once, whoever gets there first)."""
        with self._release_lock:
            if self._released:
                return
            self._released = True
        if self.on_release:
            self.on_release(self)

    # -- request side (event loop) -------------------------------------------------------------
    def cancel(self) -> None:
        """The client went away: stop generating and wake whoever is reading the output."""
        if self.cancelled.is_set() or self.done:
            return
        self.cancelled.set()
        if not self.timings.started:
            self.release()  # still waiting: its place frees at once
        self.out.put_nowait(_DONE)

    async def chunks(self) -> AsyncIterator:
        """The engine's Chunks as they come; re-raises an error the generation hit."""
        try:
            while True:
                item = await self.out.get()
                if item is _DONE:
                    self.done = not self.cancelled.is_set()
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Leaving early (client gone, task cancelled) must stop the worker too.
            self.cancel()


class GenerationQueue:
    def __init__(self, engine, max_waiting: int = 8, log: Callable[[str], None] | None = None,
                 parallel: int = 1):
        from ggufile.runtime.server.slots import make_slots

        self.engine = engine
        self.max_waiting = max_waiting
        self.log = log or (lambda msg: None)
        self.slots, self.batcher = make_slots(engine, parallel)
        self._lock = threading.RLock()  # a job released while dispatching comes back through _released
        self._waiting: deque[Job] = deque()
        self._pending = 0  # submitted and not yet released (waiting + running)
        self._live: set[Job] = set()  # jobs whose requests are still being answered
        self.metrics = Metrics()

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> int:
        """Slots running a job."""
        return sum(slot.job is not None for slot in self.slots)

    def submit(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int | None,
               stop: list[str], work: Callable | None = None) -> Job:
        """Queue a generation; call from the event loop. Raises QueueFull."""
        with self._lock:
            if self._pending >= len(self.slots) + self.max_waiting:  # every slot busy, the FIFO full
                raise QueueFull()
            self._pending += 1
        job = Job(prompt_ids, params, max_tokens, stop, loop=asyncio.get_running_loop(),
                  on_release=self._released, work=work)
        job.timings.queued = time.perf_counter()
        self._live.add(job)
        with self._lock:
            self._waiting.append(job)
            self._dispatch()
        return job

    def _released(self, job: Job) -> None:
        with self._lock:
            self._pending -= 1
            if job in self._waiting:
                self._waiting.remove(job)

    def forget(self, job: Job) -> None:
        """The request is answered (call from the event loop)."""
        self._live.discard(job)

    def cancel_all(self) -> None:
        """Shutting down: end every request now rather than after its generation (event loop)."""
        for job in list(self._live):
            job.cancel()

    def stop(self) -> None:
        """Let the workers exit once the jobs in hand (if any) end."""
        with self._lock:
            for slot in self.slots:
                slot.stop()

    def _dispatch(self) -> None:
        """Hand waiting jobs to free slots (with self._lock held)."""
        while self._waiting:
            free = [slot for slot in self.slots if slot.job is None]
            if not free:
                return
            job = self._waiting.popleft()
            if job.cancelled.is_set():
                job.release()
                continue
            best = max(free, key=lambda slot: (slot.engine_prefix(job.prompt_ids), -slot.last_used))
            best.start(job, self._work)

    # -- worker threads ------------------------------------------------------------------------
    def _work(self, slot, job: Job) -> None:
        """Run `job` on `slot` (its worker thread), then take the next waiting job."""
        job.timings.started = time.perf_counter()
        try:
            with slot.engine.lock:
                if self.batcher is not None:
                    self.batcher.enter()
                try:
                    self._generate(slot.engine, job)
                finally:
                    if self.batcher is not None:
                        self.batcher.leave()
        except Cancelled:
            pass  # the client hung up while its prompt was processed: nobody to tell
        except Exception as err:  # reported to that request; the worker keeps serving
            job.post(err)
        finally:
            job.timings.finished = time.perf_counter()
            self.metrics.record(job.timings, slot.engine)
            with self._lock:  # free before the client hears the end: its next turn finds this slot
                slot.finish()
            job.release()
            job.post(_DONE)
            with self._lock:
                self._dispatch()

    def _generate(self, engine, job: Job) -> None:
        if job.work is not None:
            chunks = job.work(engine, job.cancelled)
        else:
            chunks = engine.generate(job.prompt_ids, job.params, job.max_tokens, job.stop,
                                     cancelled=job.cancelled)
        try:
            for chunk in chunks:
                if not job.timings.first_token:
                    job.timings.first_token = time.perf_counter()
                if chunk.token_id is not None:
                    job.timings.n_generated += 1
                job.post(chunk)
                # Checked between tokens: a gone client costs at most the token in progress.
                if job.cancelled.is_set():
                    return
        finally:
            close = getattr(chunks, "close", None)
            if close:
                close()


class Metrics:
    """Totals for /metrics (llama-server's names): requests, tokens and the time they took."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = 0
        self.prompt_tokens = 0  # processed (not found in a slot's cache)
        self.prompt_seconds = 0.0
        self.predicted_tokens = 0
        self.predicted_seconds = 0.0

    def record(self, t: Timings, engine) -> None:
        with self._lock:
            self.requests += 1
            if t.first_token:
                self.prompt_seconds += max(t.first_token - t.started, 0.0)
                self.predicted_seconds += max(t.finished - t.first_token, 0.0)
            self.prompt_tokens += getattr(engine, "last_prompt_processed", 0)
            self.predicted_tokens += t.n_generated
