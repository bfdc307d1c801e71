"""Errors that reach the user as one clear line (the CLIs print str(err) and exit non-zero)."""


class GGUFileError(Exception):
    """Base class: anything the user can fix or should be told about in one line."""


class GGUFFormatError(GGUFileError):
    """The file is not a valid GGUF file (truncated, corrupted, hostile)."""


class UnsupportedModelError(GGUFileError):
    """A valid GGUF that uses an architecture, tensor type or tokenizer we do not support."""
