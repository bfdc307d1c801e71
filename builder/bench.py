"""`ggufile bench`: load time, prefill and decode speed, peak RSS — side by side with llama.cpp
and, optionally, the transformers CPU path.

Each engine runs in its own fresh subprocess (so load time and peak RSS are its own) on the
same GGUF file, the same token ids and the same thread count, and the parent prints the
figures and the ratios ggufile / each other engine — the figures llama.cpp's llama-bench
reports (pp128, pp512, tg128). llama.cpp comes from `llama-cpp-python` (the `bench` extra), a
development-only dependency; without it only ggufile's column is printed.

transformers + torch are never a dependency, not even a dev one: `--transformers-python`
names an interpreter (typically a separate venv) that has them, and the transformers worker
runs there as a standalone script assembled from this module's own worker and measuring
functions, so it needs neither ggufile nor click in that interpreter.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time

import click

import ggufile.runtime  # noqa: F401 -- first: sets one BLAS thread per pool thread before NumPy loads
import numpy as np

PREFILL_SIZES = (128, 512)
DECODE_TOKENS = 128


def _prompt_ids(n_vocab: int, n: int, seed: int = 0) -> list[int]:
    # Ordinary-text-like ids (skip the low ids, where control tokens usually sit).
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.integers(1000, min(n_vocab, 30000), size=n)]


def _peak_rss_mib() -> float:
    """This process's peak resident set since it started: Linux's VmHWM. (ru_maxrss would also
    count the parent's peak, which a fork copies in: after the bench's 1 GB bandwidth read every
    worker reported 1 GB.)"""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- workers: one engine each, in a fresh process ---------------------------------------------

def _work_ggufile(model: str, threads: int, repeats: int) -> dict:
    os.environ["GGUFILE_THREADS"] = str(threads)
    t0 = time.perf_counter()
    from ggufile.runtime import kernels
    from ggufile.runtime.engine import Engine

    from ggufile.runtime.gguf.reader import GGUFReader
    from ggufile.runtime.model.transformer import load_model

    # Like llama.cpp's load: weights mapped, vocabulary built, ready for a first prompt. A file
    # with llama.cpp's dummy vocabulary (tokenizer.ggml.model "none": synthetic models) has
    # none to build, and runs on token ids as in llama.cpp.
    reader = GGUFReader(model, scan_strings=kernels.string_scanner())
    if reader.metadata.get("tokenizer.ggml.model") == "none":
        m = load_model(reader)
    else:
        reader.close()
        m = Engine.open(model).model
    load_s = time.perf_counter() - t0
    cache = m.new_cache(max(PREFILL_SIZES) + DECODE_TOKENS + 8)
    out = {"engine": "ggufile", "backend": kernels.backend, "threads": threads, "load_s": load_s}

    def prefill(ids):
        cache.truncate(0)
        return m.forward(np.asarray(ids, dtype=np.int32), cache)

    def decode_step(token):
        return m.forward(np.asarray([token], dtype=np.int32), cache)

    out.update(_measure(prefill, decode_step, m.config.n_vocab, repeats))
    return out


def _work_llamacpp(model: str, threads: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    load_s = time.perf_counter() - t0
    out = {"engine": "llama.cpp", "backend": "llama-cpp-python", "threads": threads, "load_s": load_s}

    def prefill(ids):
        llm.reset()
        llm.eval(ids)
        return llm.scores[llm.n_tokens - 1]

    def decode_step(token):
        llm.eval([token])
        return llm.scores[llm.n_tokens - 1]

    out.update(_measure(prefill, decode_step, llm.n_vocab(), repeats))
    return out


def _work_transformers(model: str, threads: int, repeats: int) -> dict:
    # Runs in another interpreter (see _standalone_script): standard library, NumPy, torch and
    # transformers only.
    t0 = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    folder, name = os.path.split(os.path.abspath(model))
    # transformers dequantizes every GGUF tensor to float32 at load; the tokenizer is loaded
    # too, so "load" means the same as for the other engines: ready for a first prompt.
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).eval()
    AutoTokenizer.from_pretrained(folder, gguf_file=name)
    load_s = time.perf_counter() - t0
    out = {"engine": "transformers", "backend": f"transformers {transformers.__version__}, torch {torch.__version__}",
           "threads": threads, "load_s": load_s}
    state = {}

    def run(ids, past):
        with torch.inference_mode():
            o = lm(torch.tensor([ids], dtype=torch.long), past_key_values=past, use_cache=True)
        state["past"] = o.past_key_values  # the KV cache decode extends, as the other engines do
        return o.logits[0, -1].float().numpy()

    def prefill(ids):
        return run(ids, None)  # a fresh cache: like cache.truncate(0) / llm.reset()

    def decode_step(token):
        return run([token], state["past"])

    out.update(_measure(prefill, decode_step, lm.config.vocab_size, repeats))
    return out


def _measure(prefill, decode_step, n_vocab: int, repeats: int) -> dict:
    """Best-of-`repeats` tokens/s for each prefill size and for greedy decoding."""
    result = {}
    prefill(_prompt_ids(n_vocab, 16))  # warm-up: touch the weights once
    for n in PREFILL_SIZES:
        ids = _prompt_ids(n_vocab, n)
        best = min(_timed(prefill, ids) for _ in range(repeats))
        result[f"pp{n}"] = n / best
    decode_rates = []
    for _ in range(repeats):
        logits = prefill(_prompt_ids(n_vocab, 8))
        t0 = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            logits = decode_step(int(np.argmax(logits)))
        decode_rates.append(DECODE_TOKENS / (time.perf_counter() - t0))
    result[f"tg{DECODE_TOKENS}"] = max(decode_rates)
    result["peak_rss_mib"] = _peak_rss_mib()
    return result


def bandwidth_gbs(threads: int, size: int = 1 << 30, repeats: int = 3) -> float:
    """STREAM-like read bandwidth: `threads` threads each summing its slice of one 1 GB buffer
    (NumPy's reductions release the GIL), best of `repeats`, in GB/s."""
    import threading

    words = np.ones(size // 8, dtype=np.int64)  # written once, so every page is resident
    parts = np.array_split(words, threads)
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=np.add.reduce, args=(part,)) for part in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return size / best / 1e9


def decode_bytes(model: str) -> int:
    """Weight bytes one decoded token reads: every tensor but the token embedding (only one row
    of which is read), which counts when it doubles as the output matrix."""
    from ggufile.runtime.gguf.reader import GGUFReader

    tensors = GGUFReader(model).tensors
    tied = "output.weight" not in tensors
    return sum(t.nbytes for name, t in tensors.items() if name != "token_embd.weight" or tied)


def _timed(fn, arg) -> float:
    t0 = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t0


WORKERS = {"ggufile": _work_ggufile, "llama.cpp": _work_llamacpp}

# What the transformers worker needs from this module, copied into its standalone script so the
# measuring code (token ids, warm-up, best-of, decode loop) is the very same as the others'.
_STANDALONE_FUNCTIONS = (_prompt_ids, _peak_rss_mib, _timed, _measure, _work_transformers)


def _standalone_script(worker) -> str:
    """Python source that runs `worker(MODEL, THREADS, REPEATS)` and prints one JSON line."""
    head = ["from __future__ import annotations", "import json, os, sys, time", "import numpy as np",
            f"PREFILL_SIZES = {PREFILL_SIZES!r}", f"DECODE_TOKENS = {DECODE_TOKENS!r}"]
    body = [inspect.getsource(f) for f in _STANDALONE_FUNCTIONS]
    main = f"print(json.dumps({worker.__name__}(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))"
    return "\n".join(head) + "\n\n" + "\n\n".join(body) + "\n" + main + "\n"


def _worker_command(engine: str, model: str, threads: int, repeats: int,
                    transformers_python: str | None) -> tuple[list[str], dict]:
    args = [model, str(threads), str(repeats)]
    if engine != "transformers":
        return [sys.executable, "-m", "ggufile.builder.bench", engine, *args], dict(os.environ)
    # Importing ggufile.runtime here pinned the BLAS/OpenMP pools to 1 thread for ggufile's own
    # pool; torch has no pool of its own on top, so it gets the bench's thread count.
    env = dict(os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                           "OPENBLAS_NUM_THREADS")})
    return [transformers_python, "-c", _standalone_script(_work_transformers), *args], env


def _run_worker(engine: str, model: str, threads: int, repeats: int,
                transformers_python: str | None = None) -> dict | None:
    cmd, env = _worker_command(engine, model, threads, repeats, transformers_python)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        click.echo(f"{engine}: failed ({tail})", err=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# -- the command -------------------------------------------------------------------------------

METRICS = [("load_s", "load (s)", ".2f"), ("pp128", "prefill 128 (tok/s)", ".1f"),
           ("pp512", "prefill 512 (tok/s)", ".1f"), (f"tg{DECODE_TOKENS}", f"decode {DECODE_TOKENS} (tok/s)", ".1f"),
           ("peak_rss_mib", "peak RSS (MiB)", ".0f")]


def format_table(model: str, rounds: list[list[dict]], bandwidths: list[float] | None = None) -> str:
    """A Markdown table, one column per engine (the median over rounds), plus one ratio column
    ggufile / each other engine: the median of the rounds' ratios, and their range when there
    are several rounds (each round runs the engines one after the other, so a ratio compares
    figures measured under the same load). bandwidths: one read bandwidth per round, taken
    right after it (a shared VM's moves from minute to minute)."""
    results = [_median_result([r[i] for r in rounds]) for i in range(len(rounds[0]))]
    names = [r["engine"] for r in results]
    n_others = len(results) - 1 if names[0] == "ggufile" else 0
    ratio_heads = [f"ggufile/{r['engine']}" for r in results[1:n_others + 1]]
    lines = [f"model: {os.path.basename(model)}; threads: {results[0]['threads']}; rounds: {len(rounds)}; "
             + "; ".join(f"{r['engine']}: {r.get('backend')}" for r in results), "",
             "| metric | " + " | ".join(names + ratio_heads) + " |",
             "|---" * (len(names) + len(ratio_heads) + 1) + "|"]
    for key, label, fmt in METRICS:
        row = [format(r[key], fmt) for r in results]
        for i in range(1, n_others + 1):
            ratios = sorted(r[0][key] / r[i][key] for r in rounds)
            spread = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
            row.append(f"{float(np.median(ratios)):.2f}×{spread}")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    if bandwidths:
        lines += ["", _bandwidth_line(model, rounds, bandwidths)]
    return "\n".join(lines)


def _bandwidth_line(model: str, rounds: list[list[dict]], bandwidths: list[float]) -> str:
    """The rounds' read bandwidths and each engine's decode as a share of its round's reading:
    the median share, and the range over the rounds."""
    per_token, tg = decode_bytes(model), f"tg{DECODE_TOKENS}"
    read = f"{min(bandwidths):.1f}-{max(bandwidths):.1f}" if len(bandwidths) > 1 else f"{bandwidths[0]:.1f}"
    shares = []
    for i, r in enumerate(rounds[0]):
        share = sorted(rnd[i][tg] * per_token / 1e9 / gbs for rnd, gbs in zip(rounds, bandwidths))
        spread = f" ({share[0]:.0%}-{share[-1]:.0%})" if len(share) > 1 else ""
        shares.append(f"{r['engine']} {float(np.median(share)):.0%}{spread}")
    return (f"memory bandwidth ({rounds[0][0]['threads']} threads, 1 GB read, after each round): {read} GB/s; "
            f"weights read per token: {per_token / 1e9:.3f} GB; decode at " + ", ".join(shares)
            + " of its round's reading")


def _median_result(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for key, _, _ in METRICS:
        out[key] = float(np.median([r[key] for r in runs]))
    return out


@click.command("bench")
@click.option("-m", "--model", "model_path", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("-t", "--threads", type=click.IntRange(1, 1024), default=os.cpu_count() or 1, show_default=True)
@click.option("-r", "--repeats", type=click.IntRange(1, 20), default=2, show_default=True,
              help="Best of this many runs per figure.")
@click.option("--compare/--no-compare", default=True, show_default=True,
              help="Run llama.cpp (llama-cpp-python) side by side when it is installed.")
@click.option("--transformers-python", type=click.Path(exists=True, dir_okay=False),
              envvar="GGUFILE_BENCH_TRANSFORMERS_PYTHON",
              help="A Python interpreter with torch + transformers (e.g. a separate venv): also run "
                   "the transformers CPU path, which dequantizes the GGUF to float32 at load.")
@click.option("--rounds", type=click.IntRange(1, 20), default=1, show_default=True,
              help="Run the engines this many times, interleaved; report medians and the ratios' range.")
@click.option("--bandwidth/--no-bandwidth", default=False, show_default=True,
              help="Also measure the memory read bandwidth and the share of it decoding reaches.")
def bench_command(model_path, threads, repeats, compare, transformers_python, rounds, bandwidth):
    """Benchmark MODEL: load time, prefill 128/512 and decode 128 tokens/s, peak RSS.

    With llama-cpp-python installed, llama.cpp runs on the same file and thread count in the
    same run and a column gives the ratio ggufile / llama.cpp; likewise transformers with
    --transformers-python (ratio ggufile / transformers).
    """
    engines = ["ggufile"] + (["llama.cpp"] if compare and _llama_cpp_available() else [])
    if compare and len(engines) == 1:
        click.echo("llama-cpp-python is not installed: measuring ggufile without llama.cpp "
                   "(pip install 'ggufile[bench]' for the side-by-side run)", err=True)
    if transformers_python:
        engines.append("transformers")
    all_rounds, readings = [], []
    for _ in range(rounds):
        results = [r for r in (_run_worker(e, model_path, threads, repeats, transformers_python)
                               for e in engines) if r]
        if not results:
            raise click.ClickException("no engine could be measured")
        if all_rounds and len(results) != len(all_rounds[0]):
            continue  # an engine failed this round: its ratios would not be comparable
        all_rounds.append(results)
        if bandwidth:
            readings.append(bandwidth_gbs(threads))
    click.echo(format_table(model_path, all_rounds, readings))


if __name__ == "__main__":
    # Worker mode: python -m ggufile.builder.bench ENGINE MODEL THREADS REPEATS -> one JSON line.
    engine_name, model_arg, threads_arg, repeats_arg = sys.argv[1:5]
    print(json.dumps(WORKERS[engine_name](model_arg, int(threads_arg), int(repeats_arg))))
