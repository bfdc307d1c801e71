"""`ggufile bench-server`: concurrent streaming clients against `--server`, beside llama-server.

Both servers run the same GGUF with the same threads, slots (--parallel) and per-slot context;
for each client count the engines take turns (ours, then llama-server's, each round), and every
client streams one chat completion (temperature 0, a prompt of its own, max_tokens fixed,
usage read from the final chunk). Reported per engine and client count: aggregate tokens/s
(every client's completion tokens over the wall time from the first request to the last
token), time to first token (median and p95 over the clients) and per-stream tokens/s
(median). llama-server is llama.cpp's own (built from the llama-cpp-python sdist's vendored
source with cmake, dev only); without it only ggufile runs.
"""
from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import click

PROMPTS = ["Tell me about the history of Paris.", "Explain how a bicycle works.",
           "Write a short story about a lighthouse keeper.", "Describe the water cycle.",
           "What makes a good cup of tea?", "Explain photosynthesis to a child.",
           "Describe a walk through a forest in autumn.", "How do airplanes stay in the air?",
           "Write a letter to a friend about your holiday.", "Explain how computers store numbers."]


@dataclass
class StreamResult:
    sent: float
    first: float | None
    done: float
    tokens: int
    error: str | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise click.ClickException(f"{url} did not start within {timeout:.0f} s")


def _stream(url: str, prompt: str, max_tokens: int) -> StreamResult:
    import httpx

    body = {"model": "any", "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": prompt}]}
    sent, first, tokens = time.perf_counter(), None, 0
    try:
        with httpx.Client(timeout=600) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return StreamResult(sent, None, time.perf_counter(), 0, f"{r.status_code} {r.text[:200]}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("choices") and event["choices"][0].get("delta", {}).get("content") and first is None:
                    first = time.perf_counter()
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as err:
        return StreamResult(sent, first, time.perf_counter(), tokens, str(err))
    return StreamResult(sent, first, time.perf_counter(), tokens)


def run_clients(url: str, n: int, max_tokens: int) -> list[StreamResult]:
    results: list[StreamResult | None] = [None] * n
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _stream(url, PROMPTS[i % len(PROMPTS)], max_tokens)))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def summarize(results: list[StreamResult]) -> dict:
    errors = [r.error for r in results if r.error]
    start, end = min(r.sent for r in results), max(r.done for r in results)
    ttft = sorted((r.first - r.sent) for r in results if r.first is not None)
    per_stream = [r.tokens / (r.done - r.first) for r in results if r.first is not None and r.done > r.first]
    p95 = ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))] if ttft else float("nan")
    return {"aggregate": sum(r.tokens for r in results) / (end - start),
            "ttft_median": statistics.median(ttft) if ttft else float("nan"), "ttft_p95": p95,
            "ttft_max": ttft[-1] if ttft else float("nan"),
            "per_stream": statistics.median(per_stream) if per_stream else float("nan"),
            "tokens": sum(r.tokens for r in results), "errors": errors}


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def bench_server(model: str, clients: list[int], parallel: int, threads: int, ctx: int, max_tokens: int,
                 rounds: int, llama_server: str | None, echo=click.echo) -> dict:
    engines = {}
    port = _free_port()
    engines["ggufile"] = (f"http://127.0.0.1:{port}", _start(
        [sys.executable, "-m", "ggufile.builder", "run", "-m", model, "--server", "--nobrowser", "--port", str(port),
         "-np", str(parallel), "-t", str(threads), "-c", str(ctx)]))
    if llama_server:
        port = _free_port()
        engines["llama-server"] = (f"http://127.0.0.1:{port}", _start(
            [llama_server, "-m", model, "--port", str(port), "-np", str(parallel), "-t", str(threads),
             "-tb", str(threads), "-c", str(ctx * parallel), "--no-webui", "--log-disable"]))
    table: dict = {}
    try:
        for url, proc in engines.values():
            _wait_ready(url, proc)
            run_clients(url, 1, 8)  # warm up: first-call compilation, page cache
        for n in clients:
            for r in range(rounds):
                for name, (url, _) in engines.items():
                    s = summarize(run_clients(url, n, max_tokens))
                    table.setdefault((n, name), []).append(s)
                    echo(f"  {n} clients, {name}, round {r + 1}: {s['aggregate']:.1f} tok/s aggregate, "
                         f"first token median {s['ttft_median']:.2f} s / max {s['ttft_max']:.2f} s"
                         + (f", errors: {s['errors'][:2]}" if s["errors"] else ""), err=True)
    finally:
        for _, proc in engines.values():
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return table


def format_table(table: dict, clients: list[int], engines: list[str]) -> str:
    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    lines = ["| clients | engine | aggregate tok/s | first token median (s) | p95 (s) | per-stream tok/s | "
             "aggregate / llama-server |", "|---|---|---|---|---|---|---|"]
    for n in clients:
        ref = table.get((n, "llama-server"))
        for name in engines:
            runs = table[(n, name)]
            ratio = f"{med(runs, 'aggregate') / med(ref, 'aggregate'):.2f}×" if ref else "–"
            lines.append(f"| {n} | {name} | {med(runs, 'aggregate'):.1f} | {med(runs, 'ttft_median'):.2f} | "
                         f"{med(runs, 'ttft_p95'):.2f} | {med(runs, 'per_stream'):.1f} | {ratio} |")
    return "\n".join(lines)


def find_llama_server(given: str | None) -> str | None:
    return given or shutil.which("llama-server")


def _counts(value: str) -> list[int]:
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: a comma-separated list of client counts") from None
    if not counts or min(counts) < 1 or max(counts) > 64:
        raise click.BadParameter(f"{value!r}: client counts from 1 to 64")
    return counts


@click.command("bench-server")
@click.option("-m", "--model", "model_path", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--clients", default="1,2,4,8", show_default=True, help="Concurrent streaming clients, per run.")
@click.option("-np", "--parallel", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Slots of both servers.")
@click.option("-t", "--threads", type=click.IntRange(1, 1024), default=2, show_default=True)
@click.option("-c", "--ctx-size", type=click.IntRange(64, 1 << 20), default=1024, show_default=True,
              help="Context per slot.")
@click.option("-n", "--max-tokens", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--rounds", type=click.IntRange(1, 20), default=2, show_default=True)
@click.option("--llama-server", "llama_server", type=click.Path(exists=True, dir_okay=False), default=None,
              help="llama.cpp's llama-server binary (default: on PATH; without one only ggufile runs).")
def bench_server_command(model_path, clients, parallel, threads, ctx_size, max_tokens, rounds, llama_server):
    """Concurrent streaming clients against `--server`, beside llama.cpp's llama-server: aggregate
    tokens/s, time to first token (median, p95) and per-stream tokens/s."""
    counts = _counts(clients)
    binary = find_llama_server(llama_server)
    if binary is None:
        click.echo("llama-server not found (--llama-server PATH): measuring ggufile alone", err=True)
    table = bench_server(model_path, counts, parallel, threads, ctx_size, max_tokens, rounds, binary)
    engines = ["ggufile"] + (["llama-server"] if binary else [])
    click.echo(f"model: {model_path}; slots: {parallel}; threads: {threads}; max_tokens: {max_tokens}; "
               f"rounds: {rounds} (medians)\n")
    click.echo(format_table(table, counts, engines))
