"""SIGTERM and SIGHUP end a builder command the way Ctrl-C does: by unwinding.

Their default action kills the process on the spot, so the `finally`/`except BaseException`
clean-ups of the writers (build.atomic_output, gguf_writer.write_gguf, temporary folders) never
ran and a hidden `.part` file stayed behind. Raised as SystemExit(128 + signal), they unwind
every `with` block and end with the exit status a shell expects from that signal.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

UNWINDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(SystemExit):
    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def _raise(signum, frame):
    raise Terminated(signum)


@contextmanager
def termination_unwinds():
    """Within this block SIGTERM/SIGHUP raise Terminated (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in UNWINDING_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
