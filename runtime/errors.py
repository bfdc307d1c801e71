"""Errors that reach the user as one clear line (the CLIs print str(err) and exit non-zero)."""

import os
import stat
from contextlib import contextmanager

MAX_ERROR_CHARS = 400  # a message quoting a hostile file's strings stays one readable line


def printable_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` as one line a terminal shows literally: control and other non-printable characters
    escaped (a hostile file cannot move the cursor or clear the screen), at most `limit` chars."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


class GGUFileError(Exception):
    """Base class: anything the user can fix or should be told about in one line.

    The message is made printable and bounded here, once, since many quote the model file."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (printable_line(args[0]),)
        super().__init__(*args)


class GGUFFormatError(GGUFileError):
    """The file is not a valid GGUF file (truncated, corrupted, hostile)."""


class UnsupportedModelError(GGUFileError):
    """A valid GGUF that uses an architecture, tensor type or tokenizer we do not support."""


class Cancelled(Exception):
    """The caller gave up (a server client hung up) while the prompt was being processed."""


DEBUG_ENV = "GGUFILE_DEBUG"  # set to 1 to see full tracebacks of unexpected errors


def unexpected_error_line(err: BaseException) -> str:
    """One line for a bug we did not foresee (the user still gets no traceback by default)."""
    return printable_line(f"internal error: {type(err).__name__}: {printable_line(str(err), 200)} "
                          f"(set {DEBUG_ENV}=1 for the traceback and please report it)")


@contextmanager
def os_errors_as(error_cls: type[GGUFileError], path, action: str = "read"):
    """Turn the OS errors of opening/reading `path` into one-line `error_cls` messages."""
    try:
        yield
    except FileNotFoundError:
        raise error_cls(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error_cls(f"{path}: is a directory, not a file") from None
    except PermissionError:
        raise error_cls(f"{path}: permission denied") from None
    except OSError as err:
        raise error_cls(f"{path}: cannot {action}: {err.strerror or err}") from None


def open_regular_file(path, error_cls: type[GGUFileError] = GGUFileError):
    """`path` opened for binary reading if it is a regular file; else a one-line `error_cls`.

    Opened non-blocking first, so a FIFO with no writer is refused instead of hanging, and a
    device (/dev/zero, /dev/stdin) is refused before a byte is read."""
    with os_errors_as(error_cls, path):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                        else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                        else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
                raise error_cls(printable_line(f"{path}: is {kind}, not a regular file"))
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
