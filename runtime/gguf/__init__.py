"""The GGUF format: its constants, the zero-copy reader, a model summary (info)."""
