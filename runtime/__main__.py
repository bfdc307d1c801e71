"""`python -m ggufile.runtime -m MODEL.gguf -p "..."`: the runtime CLI without the builder."""
import sys

from ggufile.runtime.cli import main

sys.exit(main())
