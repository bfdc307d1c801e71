"""Entry script of a ggufile executable: find the model inside ourselves, run the runtime CLI."""
import sys

from ggufile.runtime.launch import launch

if __name__ == "__main__":
    sys.exit(launch())
