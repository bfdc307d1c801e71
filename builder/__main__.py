"""`python -m ggufile.builder …` is the `ggufile` command."""
import sys

from ggufile.builder.cli import main

sys.exit(main())
