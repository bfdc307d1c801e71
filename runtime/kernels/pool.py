"""A persistent thread pool that splits the rows of a matmul across cores.

The kernels release the GIL, so worker threads run them truly in parallel. One round hands
each thread one job and waits for all; the calling thread runs job 0 itself, so a round
costs one queue hand-off per worker. Size: os.cpu_count(), or GGUFILE_THREADS.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Callable


def default_threads() -> int:
    env = os.environ.get("GGUFILE_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    return max(1, os.cpu_count() or 1)


class RowPool:
    def __init__(self, n_threads: int | None = None):
        self.n_threads = n_threads or default_threads()
        self._inboxes: list[queue.SimpleQueue] = []
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # one round at a time (callers may be multi-threaded)
        for i in range(1, self.n_threads):
            inbox: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=self._work, args=(inbox,), name=f"ggufile-kernels-{i}",
                             daemon=True).start()
            self._inboxes.append(inbox)

    def _work(self, inbox: queue.SimpleQueue) -> None:
        while True:
            job = inbox.get()
            try:
                job()
                self._done.put(None)
            except BaseException as err:  # handed back to the caller, never lost
                self._done.put(err)

    def run(self, jobs: list[Callable[[], None]]) -> None:
        """Run jobs[i] on thread i (len(jobs) <= n_threads); return when all are done."""
        if len(jobs) == 1:
            jobs[0]()
            return
        with self._lock:
            for inbox, job in zip(self._inboxes, jobs[1:]):
                inbox.put(job)
            first_error = None
            try:
                jobs[0]()
            except BaseException as err:
                first_error = err
            for _ in range(len(jobs) - 1):
                err = self._done.get()
                if err is not None and first_error is None:
                    first_error = err
            if first_error is not None:
                raise first_error


def split_rows(rows: int, parts: int, align: int = 1, first: float | None = None) -> list[tuple[int, int]]:
    """[r0, r1) ranges covering rows in `parts` pieces (boundaries multiple of align): equal, or
    the first piece a fraction `first` of the rows and the others equal."""
    if first is None or parts == 1:
        cuts = [rows * i / parts for i in range(parts)]
    else:
        head = rows * first
        cuts = [0.0] + [head + (rows - head) * i / (parts - 1) for i in range(parts - 1)]
    bounds = [min(rows, (int(c) + align - 1) // align * align) for c in cuts] + [rows]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
