"""One generation at a time, first come first served, on a worker thread.

The engine is blocking numpy code and not thread-safe, so a single worker thread runs every
generation (under `engine.lock`, in case anything else shares the engine) while the asyncio side
only waits on a queue. Requests wait in a FIFO; the FIFO is bounded so a flood of clients gets a
quick "busy" answer instead of an ever-growing backlog. A job is cancelled when its client goes
away: waiting, it is dropped; running, the worker stops after the current token.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
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
    def __init__(self, engine, max_waiting: int = 8, log: Callable[[str], None] | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.log = log or (lambda msg: None)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._count_lock = threading.Lock()
        self._pending = 0  # submitted and not yet released (waiting + running)
        self._live: set[Job] = set()  # jobs whose requests are still being answered
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int | None,
               stop: list[str]) -> Job:
        """Queue a generation; call from the event loop. Raises QueueFull."""
        with self._count_lock:
            if self._pending > self.max_waiting:  # one running plus max_waiting waiting
                raise QueueFull()
            self._pending += 1
        job = Job(prompt_ids, params, max_tokens, stop, loop=asyncio.get_running_loop(),
                  on_release=self._released)
        job.timings.queued = time.perf_counter()
        self._live.add(job)
        self._ensure_worker()
        self._jobs.put(job)
        return job

    def _released(self, job: Job) -> None:
        with self._count_lock:
            self._pending -= 1

    def forget(self, job: Job) -> None:
        """The request is answered (call from the event loop)."""
        self._live.discard(job)

    def cancel_all(self) -> None:
        """Shutting down: end every request now rather than after its generation (event loop)."""
        for job in list(self._live):
            job.cancel()

    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="ggufile-generate", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Let the worker exit once the job in hand (if any) ends."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    # -- worker thread -------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                job.release()
                continue
            job.timings.started = time.perf_counter()
            try:
                with self.engine.lock:
                    self._generate(job)
            except Cancelled:
                pass  # the client hung up while its prompt was processed: nobody to tell
            except Exception as err:  # reported to that request; the worker keeps serving
                job.post(err)
            finally:
                job.timings.finished = time.perf_counter()
                job.release()
                job.post(_DONE)

    def _generate(self, job: Job) -> None:
        chunks = self.engine.generate(job.prompt_ids, job.params, job.max_tokens, job.stop,
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
