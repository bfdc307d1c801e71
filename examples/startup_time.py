"""Start-up time of a built executable, per launcher: how long until `--info` / the first token.

    python examples/startup_time.py [--model SmolLM2.gguf] [--runs 7] [--cold-runs 3]

Builds the model with both launchers (`cached`, `onefile`; stubs from the stub cache, built on
first use) into a temp dir and times whole processes, wall clock:
- first run: the cached launcher's runtime cache dir is empty (it unpacks once);
- warm: median (and best) of --runs starts, files in the OS page cache;
- cold: the OS page cache dropped before each start (`sync; echo 3 > /proc/sys/vm/drop_caches`,
  needs root; "n/a" otherwise), the cached launcher's runtime dir kept.
`python -m ggufile.runtime -m MODEL` (this Python, nothing frozen) is the reference row.
Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache/ggufile/models/SmolLM2-135M-Instruct.Q4_1.gguf"
COMMANDS = {"--info": ["--info"], "-p Hello -n 1": ["-p", "Hello", "-n", "1", "--temp", "0"]}


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-300:]}")
    return elapsed


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f} s"
    return f"{statistics.median(values):.2f} s (best {min(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--runs", type=int, default=7, help="warm starts per row")
    ap.add_argument("--cold-runs", type=int, default=3, help="starts after dropping the page cache")
    args = ap.parse_args()

    from ggufile.builder.build import build_executable
    from ggufile.builder.stub import ensure_stub

    rows = []
    with tempfile.TemporaryDirectory(prefix="ggufile-startup-") as tmp:
        tmp = Path(tmp)
        runtime_cache = tmp / "cache"
        env = dict(os.environ, GGUFILE_CACHE=str(runtime_cache))
        targets = {}
        for launcher in ("cached", "onefile"):
            stub = ensure_stub(echo=lambda m: print(m, file=sys.stderr), launcher=launcher)
            exe = tmp / f"model-{launcher}"
            build_executable(args.model, exe, stub)
            targets[launcher] = [str(exe)]
        targets["python -m ggufile.runtime"] = [sys.executable, "-m", "ggufile.runtime", "-m", str(args.model)]
        can_drop = drop_caches()
        for label, base in targets.items():
            for name, extra in COMMANDS.items():
                cmd = base + extra
                shutil.rmtree(runtime_cache / "runtime", ignore_errors=True)
                first = [timed(cmd, env)] if label != "python -m ggufile.runtime" else []
                warm = [timed(cmd, env) for _ in range(args.runs)]
                cold = []
                for _ in range(args.cold_runs if can_drop else 0):
                    drop_caches()
                    cold.append(timed(cmd, env))
                rows.append((label, name, fmt(first), fmt(warm), fmt(cold)))
                print(f"  {label} {name}: first {fmt(first)}, warm {fmt(warm)}, cold {fmt(cold)}",
                      file=sys.stderr)

    print(f"\n{os.cpu_count()} cores, model {args.model.name}; warm = median of {args.runs} "
          f"(best); cold = median of {args.cold_runs if can_drop else 0} after drop_caches\n")
    print("| launcher | command | first run (empty runtime cache) | warm | cold page cache |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
