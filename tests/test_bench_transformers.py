"""`ggufile bench --transformers-python`: the transformers CPU path as a third engine.

torch and transformers are never installed by the project (CI has neither): the tests that need
them run only when GGUFILE_BENCH_TRANSFORMERS_PYTHON names an interpreter that has them, and
skip otherwise. No timing is asserted — only that the figures are there.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from ggufile.builder import bench

TRANSFORMERS_PYTHON = os.environ.get("GGUFILE_BENCH_TRANSFORMERS_PYTHON")


def _fake(engine: str, scale: float) -> dict:
    return {"engine": engine, "backend": engine, "threads": 2, "load_s": 0.2 * scale, "pp128": 100 * scale,
            "pp512": 90 * scale, "tg128": 10 * scale, "peak_rss_mib": 200 * scale}


def test_table_has_a_ratio_column_per_other_engine():
    table = bench.format_table("m.gguf", [[_fake("ggufile", 1), _fake("llama.cpp", 2), _fake("transformers", 4)]])
    header = table.splitlines()[2]
    assert header == "| metric | ggufile | llama.cpp | transformers | ggufile/llama.cpp | ggufile/transformers |"
    assert "| prefill 128 (tok/s) | 100.0 | 200.0 | 400.0 | 0.50× | 0.25× |" in table


def test_rounds_give_medians_and_the_ratios_range():
    rounds = [[_fake("ggufile", 1), _fake("llama.cpp", s)] for s in (1, 2, 4)]
    assert "| prefill 128 (tok/s) | 100.0 | 200.0 | 0.50× (0.25-1.00) |" in bench.format_table("m.gguf", rounds)


def test_each_rounds_decode_is_a_share_of_its_own_bandwidth_reading(monkeypatch):
    monkeypatch.setattr(bench, "decode_bytes", lambda model: 2 * 10**9)  # 2 GB a token
    rounds = [[_fake("ggufile", s), _fake("llama.cpp", 1)] for s in (1, 2)]  # ggufile 10, 20 tok/s
    line = bench.format_table("m.gguf", rounds, [40.0, 20.0]).splitlines()[-1]
    assert line == ("memory bandwidth (2 threads, 1 GB read, after each round): 20.0-40.0 GB/s; weights read "
                    "per token: 2.000 GB; decode at ggufile 125% (50%-200%), llama.cpp 75% (50%-100%) of its "
                    "round's reading")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux's VmHWM")
def test_a_workers_peak_rss_is_its_own_not_its_parents():
    """The bench's 1 GB bandwidth read must not show in the workers it starts after it."""
    big = np.ones(300 << 17, dtype=np.int64)  # 300 MiB, touched
    del big
    code = "from ggufile.builder import bench; print(bench._peak_rss_mib())"
    peak = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < peak < 200


def test_no_ratio_without_ggufile():
    table = bench.format_table("m.gguf", [[_fake("llama.cpp", 1), _fake("transformers", 2)]])
    assert "ggufile/" not in table


def test_standalone_worker_needs_neither_ggufile_nor_click():
    # It runs in another interpreter, which has only torch, transformers and NumPy.
    script = bench._standalone_script(bench._work_transformers)
    imported = set()
    for node in ast.walk(ast.parse(script)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "json", "os", "sys", "time", "resource", "numpy", "torch", "transformers"}


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="this interpreter has torch")
def test_an_interpreter_without_torch_gives_a_one_line_note(smollm2_path, capsys):
    assert bench._run_worker("transformers", str(smollm2_path), 1, 1, sys.executable) is None
    err = capsys.readouterr().err.strip()
    assert err.startswith("transformers: failed (") and "torch" in err and "\n" not in err


@pytest.mark.skipif(not TRANSFORMERS_PYTHON, reason="GGUFILE_BENCH_TRANSFORMERS_PYTHON not set (torch + transformers)")
def test_bench_with_transformers(smollm2_path):
    proc = subprocess.run([sys.executable, "-m", "ggufile.builder", "bench", "-m", str(smollm2_path), "-r", "1",
                           "-t", "2", "--no-compare", "--transformers-python", TRANSFORMERS_PYTHON],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert rows["metric"] == "| metric | ggufile | transformers | ggufile/transformers |"
    for label in ("load (s)", "prefill 128 (tok/s)", "prefill 512 (tok/s)", "decode 128 (tok/s)", "peak RSS (MiB)"):
        cells = [c.strip() for c in rows[label].strip("|").split("|")]
        assert float(cells[2]) > 0 and cells[3].endswith("×")
