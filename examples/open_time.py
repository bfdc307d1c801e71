"""How long `Engine.open(path)` takes, stage by stage, in fresh interpreters.

    python examples/open_time.py                       # both cached models, best of 3
    python examples/open_time.py --runs 5 PATH.gguf    # any GGUF
    python examples/open_time.py --importtime          # also the slowest imports (-X importtime)

Each run is a new `python` process (so imports and lazy caches start cold) that times what
Engine.open does: import of the runtime (engine, model, tokenizer), GGUFReader,
Tokenizer.from_metadata, load_model, and their total. "1st chat" is the chat template's
compilation (jinja2 import included), which the engine defers to the first chat request: it
is not part of the total. The OS page cache is warmed first by reading the file once, so the
numbers exclude disk I/O. The speed target is total <= 0.3 s.

Two rows per model: "src" runs with the caller's environment (with PYTHONDONTWRITEBYTECODE=1,
as in the dev sandbox, every runtime module is compiled from source in every process), "pyc"
with bytecode cached under a temporary PYTHONPYCACHEPREFIX (what a second launch of an
unpacked executable sees).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS_DIR = Path(os.environ.get("GGUFILE_MODELS", Path.home() / ".cache" / "ggufile" / "models"))
DEFAULT_MODELS = ("SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf")
STAGES = ("import", "reader", "tokenizer", "model", "total", "1st chat")

# Runs in the child: mirrors Engine.__init__ step by step.
_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from ggufile.runtime.engine import Engine
from ggufile.runtime.gguf.reader import GGUFReader
from ggufile.runtime.model.transformer import load_model
from ggufile.runtime.tokenizer.tokenizer import Tokenizer
t1 = time.perf_counter()
reader = GGUFReader(sys.argv[1])
t2 = time.perf_counter()
tokenizer = Tokenizer.from_metadata(reader.metadata)
t3 = time.perf_counter()
model = load_model(reader)
t4 = time.perf_counter()
engine = Engine.__new__(Engine)
engine.reader, engine.tokenizer = reader, tokenizer
t5 = time.perf_counter()
template = engine._load_template()
t6 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "reader": t2 - t1, "tokenizer": t3 - t2, "model": t4 - t3,
                  "total": t5 - t0, "1st chat": t6 - t5}))
"""


def _warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def time_open(path: Path, runs: int, env: dict | None = None) -> dict[str, float]:
    """Best (minimum) time of each stage over `runs` fresh processes."""
    best: dict[str, float] = {}
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], check=True,
                             capture_output=True, text=True, env=env).stdout
        for stage, seconds in json.loads(out.strip().splitlines()[-1]).items():
            best[stage] = min(best.get(stage, seconds), seconds)
    return best


def import_highlights(top: int = 16, module: str = "ggufile.runtime.engine, ggufile.runtime.model.transformer, ggufile.runtime.tokenizer.tokenizer") -> list[tuple[float, str]]:
    """The slowest imports (cumulative microseconds -> seconds) of `import module`."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                         check=True, capture_output=True, text=True).stderr
    rows = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self_us, cumulative_us, name = line[len("import time:"):].split("|", 2)
        rows.append((int(cumulative_us) / 1e6, name.rstrip()))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--importtime", action="store_true", help="also list the slowest imports")
    args = parser.parse_args()
    models = args.models or [MODELS_DIR / name for name in DEFAULT_MODELS]
    print(f"{'model':<40}" + "".join(f"{s:>10}" for s in STAGES) + "   (seconds, best of "
          f"{args.runs} fresh processes)")
    with tempfile.TemporaryDirectory(prefix="ggufile-pyc-") as pycache:
        pyc_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        pyc_env["PYTHONPYCACHEPREFIX"] = pycache
        for path in models:
            if not path.exists():
                print(f"{path.name:<40}  (missing)")
                continue
            _warm(path)
            for label, env in (("src", None), ("pyc", pyc_env)):
                if env is not None:
                    time_open(path, 1, env)  # writes the bytecode cache
                best = time_open(path, args.runs, env)
                print(f"{path.name[:34]:<35}{label:<5}" + "".join(f"{best[s]:>10.3f}" for s in STAGES))
    if args.importtime:
        print("\nslowest imports of engine + model + tokenizer (cumulative, one cold run):")
        for seconds, name in import_highlights():
            print(f"  {seconds:7.3f}  {name}")


if __name__ == "__main__":
    main()
