"""ggufile runtime: what runs inside the executable (reader, tokenizers, model, CLI, server)."""

__version__ = "0.1.0"
