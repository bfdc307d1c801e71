"""Entry point of an executable or .pyz: find the model inside ourselves, then run the runtime CLI.

Where the model lives (the trailer format) is container.py's business; whether we are frozen is
asked here and nowhere else.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ggufile.runtime.container import CONTAINER_ENV, read_container
from ggufile.runtime.errors import GGUFileError
from ggufile.runtime.watch import run_watched


def frozen_executable() -> Path | None:
    """The ggufile executable we run from if we are a frozen ggufile runtime (the ONE place that
    asks): sys.executable for a onefile stub; for the cached launcher's unpacked one-dir runtime,
    the executable its prologue names in CONTAINER_ENV."""
    if getattr(sys, "frozen", False) and hasattr(sys, "_MEIPASS"):
        container = os.environ.get(CONTAINER_ENV, "")
        return Path(container) if container else Path(sys.executable)
    return None


def launch(argv: list[str] | None = None, container: Path | None = None) -> int:
    """Entry point of an executable / .pyz: find the model in ourselves and run the runtime CLI."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        path = container or frozen_executable()
        os.environ.pop(CONTAINER_ENV, None)  # children (e.g. server workers) must not inherit it
        if path is None:
            raise GGUFileError("not running from a ggufile executable; use `ggufile run -m MODEL`")
        embedded = read_container(path)
        embedded.quick_check()
        from ggufile.runtime.cli import main  # lazily: the model is located (and errors reported) first

        # in a child process, so that a SIGBUS (our file rewritten under the mapping) is reported
        return run_watched(lambda: main(argv, embedded=embedded), embedded.path)
    except GGUFileError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
