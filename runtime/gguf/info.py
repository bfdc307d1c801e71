"""A short description of a GGUF model (what `--info` and `ggufile inspect` print)."""
from __future__ import annotations

from collections import Counter

from ggufile.runtime.errors import printable_line
from ggufile.runtime.gguf.constants import Keys
from ggufile.runtime.gguf.reader import GGUFReader


def describe_gguf(reader: GGUFReader) -> dict[str, str]:
    """Name, architecture, parameter count, quant mix and context length, as display strings."""
    n_params = sum(t.n_elements for t in reader.tensors.values())
    by_type = Counter()
    for t in reader.tensors.values():
        by_type[t.ggml_type.name] += t.nbytes
    total = sum(by_type.values()) or 1
    mix = ", ".join(f"{name} {100 * nbytes / total:.0f}%" for name, nbytes in by_type.most_common())
    ctx = reader.get(Keys.CONTEXT_LENGTH) if isinstance(reader.metadata.get(Keys.ARCHITECTURE), str) else None
    facts = {
        "model": reader.get_str(Keys.NAME) or reader.path.stem,
        "architecture": reader.architecture,
        "parameters": _human_count(n_params),
        "quantization": mix,
        "context length": str(ctx) if isinstance(ctx, int) else "unknown",
        "size": f"{reader.size / 2**20:.1f} MiB",
        "tensors": str(len(reader.tensors)),
    }
    # The values quote the file: printable, bounded (a name must not clear the terminal).
    return {key: printable_line(value, 200) for key, value in facts.items()}


def _human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit} ({n:,})"
    return str(n)
