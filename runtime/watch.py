"""The executable's file changing under it: said in one line, never a silent death.

The model is an mmap of the executable's own file. Overwriting that file (`cp new old` truncates
it first) makes every page past the new end unreadable: touching one raises SIGBUS, which no
Python handler can survive (returning from it re-runs the faulting read, forever). So:

- `FileIdentity` records the file's size and modification time at open; the engine compares
  them before every forward pass (one fstat) and stops with a clear GGUFileError, which catches
  the change between tokens;
- `run_watched` runs the runtime in a forked child while this process only waits: if the
  child dies of SIGBUS anyway (the file changed mid-pass), the parent says so in one line and
  exits with 128 + SIGBUS. The parent forwards SIGTERM/SIGHUP/SIGQUIT and ignores Ctrl-C
  (the terminal sends it to the child too), and the child dies with it (PR_SET_PDEATHSIG).
  Where there is no fork (Windows), the runtime runs in-process.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from ggufile.runtime.errors import GGUFileError, printable_line

FORWARDED_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, n))
WATCH_ENV = "GGUFILE_NO_WATCH"  # set to 1 to run in-process (debuggers, profilers)


class FileIdentity:
    """Size and mtime of an open file, to tell later whether it was rewritten."""

    def __init__(self, fd: int, path: Path):
        self.fd = os.dup(fd)
        self.path = path
        st = os.fstat(self.fd)
        self.size, self.mtime_ns = st.st_size, st.st_mtime_ns

    def changed(self) -> bool:
        try:
            st = os.fstat(self.fd)
        except OSError:
            return True
        return (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns)

    def check(self) -> None:
        if self.changed():
            raise GGUFileError(changed_message(self.path))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()


def changed_message(path) -> str:
    return printable_line(f"{path} changed while it was running (overwritten or truncated); "
                          "start it again")


def run_watched(main, path: Path | None) -> int:
    """main() in a child process; a SIGBUS there becomes one line here."""
    if not hasattr(os, "fork") or os.environ.get(WATCH_ENV):
        return main()
    before = _stat(path)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _die_with_parent()
        code = 1
        try:
            code = main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code if isinstance(code, int) else 1)
    return _wait(pid, path, before)


def _wait(pid: int, path: Path | None, before) -> int:
    for s in FORWARDED_SIGNALS:
        signal.signal(s, lambda signum, frame: os.kill(pid, signum))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    sig = os.WTERMSIG(status)
    if sig == signal.SIGBUS:
        changed = path is not None and _stat(path) != before
        message = changed_message(path) if changed else (
            "the model file could not be read (bus error: is it on a removable or network drive?)")
        print(f"Error: {message}", file=sys.stderr)
        return 128 + sig
    return 128 + sig


def _stat(path: Path | None):
    if path is None:
        return None
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns, st.st_ino
    except OSError:
        return None


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the parent dies (e.g. SIGKILL), so no server outlives it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
