"""Errors that reach the user as one clear line (the CLIs print str(err) and exit non-zero)."""

from contextlib import contextmanager


class GGUFileError(Exception):
    """Base class: anything the user can fix or should be told about in one line."""


class GGUFFormatError(GGUFileError):
    """The file is not a valid GGUF file (truncated, corrupted, hostile)."""


class UnsupportedModelError(GGUFileError):
    """A valid GGUF that uses an architecture, tensor type or tokenizer we do not support."""


DEBUG_ENV = "GGUFILE_DEBUG"  # set to 1 to see full tracebacks of unexpected errors


def unexpected_error_line(err: BaseException) -> str:
    """One line for a bug we did not foresee (the user still gets no traceback by default)."""
    return (f"internal error: {type(err).__name__}: {err} "
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
