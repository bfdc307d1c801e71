"""`python -m ggufile.builder …` is the `ggufile` command."""
import sys

from .cli import main

sys.exit(main())
