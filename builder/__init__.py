"""ggufile builder: the `ggufile` command that packs a GGUF model into one executable."""
