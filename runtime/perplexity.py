"""`ggufile perplexity -m MODEL.gguf -f TEXT [-c 512]`: llama.cpp's perplexity method.

As tools/perplexity/perplexity.cpp does it:
- tokenize the whole text once with the vocabulary's add-BOS rule (add_special=true);
- cut it into non-overlapping chunks of n_ctx tokens (the tail that does not fill a chunk is
  dropped; at least 2*n_ctx tokens are required);
- evaluate each chunk from an empty cache, its first token replaced by BOS when the vocabulary
  adds one;
- score only the second half: logits at positions n_ctx/2 .. n_ctx-2 against the next token, so
  every scored token has at least n_ctx/2 tokens of context;
- PPL = exp(mean NLL), reported with the standard error llama.cpp prints.

The numeric part (log-softmax, NLL accumulation, standard error, chunking) is pure and kept
apart from model evaluation and I/O.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from ggufile.runtime.errors import GGUFileError


# -- pure compute ----------------------------------------------------------------------------
def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64: (n, V), (n,) -> (n,)."""
    logits = np.asarray(logits)
    rows = np.arange(logits.shape[0])
    mx = logits.max(axis=1).astype(np.float64)
    # exp in float32 like llama.cpp's expf, summed in float64 like its double accumulator.
    sum_exp = np.exp(logits - mx[:, None].astype(logits.dtype)).sum(axis=1, dtype=np.float64)
    return -(logits[rows, targets].astype(np.float64) - mx - np.log(sum_exp))


@dataclass
class NLLStats:
    """Running sums llama.cpp keeps: count, sum of NLL, sum of NLL^2."""

    count: int = 0
    nll: float = 0.0
    nll2: float = 0.0
    per_chunk: list[float] = field(default_factory=list)  # running PPL after each chunk

    def add(self, nlls: np.ndarray) -> None:
        nlls = np.asarray(nlls, dtype=np.float64)
        self.count += nlls.size
        self.nll += float(nlls.sum())
        self.nll2 += float((nlls * nlls).sum())
        self.per_chunk.append(self.ppl)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count) if self.count else float("nan")

    @property
    def stderr(self) -> float:
        """llama.cpp: PPL * sqrt(var(NLL) / (count - 1)) (the delta method on exp(mean))."""
        if self.count < 2:
            return float("nan")
        mean = self.nll / self.count
        var = self.nll2 / self.count - mean * mean
        return self.ppl * math.sqrt(var / (self.count - 1)) if var > 0 else 0.0


def n_chunks_for(n_tokens: int, n_ctx: int, max_chunks: int | None = None) -> int:
    if n_ctx < 4:
        raise GGUFileError(f"context size {n_ctx} is too small for perplexity (need at least 4)")
    if n_tokens < 2 * n_ctx:
        raise GGUFileError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a "
                           f"context of {n_ctx} (the text has {n_tokens})")
    n = n_tokens // n_ctx
    return n if max_chunks is None or max_chunks <= 0 else min(n, max_chunks)


def chunk_input(tokens: Sequence[int], i: int, n_ctx: int, bos_id: int | None) -> np.ndarray:
    """Chunk i's tokens, the first overwritten by BOS when the vocabulary adds one (as perplexity.cpp)."""
    chunk = np.asarray(tokens[i * n_ctx:(i + 1) * n_ctx], dtype=np.int32).copy()
    if bos_id is not None:
        chunk[0] = bos_id
    return chunk


def scored_targets(tokens: Sequence[int], i: int, n_ctx: int) -> np.ndarray:
    """The tokens predicted from positions n_ctx/2 .. n_ctx-2 of chunk i."""
    first = n_ctx // 2
    start = i * n_ctx
    return np.asarray(tokens[start + first + 1:start + n_ctx], dtype=np.int64)


# -- evaluation ------------------------------------------------------------------------------
@dataclass
class PerplexityResult:
    stats: NLLStats
    n_ctx: int
    n_chunks: int
    n_tokens: int  # tokens in the text
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.n_chunks * self.n_ctx / self.seconds if self.seconds > 0 else float("inf")


def chunk_nll(model, chunk: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """NLL of `targets` from one chunk. The first half only fills the cache (its logits are
    never scored), so the model is asked for all logits of the second half only."""
    n_ctx = len(chunk)
    first = n_ctx // 2
    cache = model.new_cache(n_ctx)
    model.forward(chunk[:first], cache, all_logits=False)
    logits = model.forward(chunk[first:], cache, all_logits=True)  # positions first .. n_ctx-1
    return token_nll(logits[:-1], targets)


def evaluate(model, tokens: Sequence[int], n_ctx: int, bos_id: int | None, max_chunks: int | None = None,
             on_chunk: Callable[[int, NLLStats], None] | None = None) -> PerplexityResult:
    n_chunks = n_chunks_for(len(tokens), n_ctx, max_chunks)
    stats = NLLStats()
    t0 = time.perf_counter()
    for i in range(n_chunks):
        stats.add(chunk_nll(model, chunk_input(tokens, i, n_ctx, bos_id), scored_targets(tokens, i, n_ctx)))
        if on_chunk is not None:
            on_chunk(i, stats)
    return PerplexityResult(stats, n_ctx, n_chunks, len(tokens), time.perf_counter() - t0)


def load_for_perplexity(model_path: str | Path):
    """(model, tokenizer) for a GGUF path."""
    from ggufile.runtime import kernels
    from ggufile.runtime.gguf.reader import GGUFReader
    from ggufile.runtime.model.transformer import load_model
    from ggufile.runtime.tokenizer.tokenizer import Tokenizer

    reader = GGUFReader(model_path, scan_strings=kernels.string_scanner())
    return load_model(reader), Tokenizer.from_metadata(reader.metadata)


def format_result(res: PerplexityResult) -> str:
    return (f"PPL = {res.stats.ppl:.4f} ± {res.stats.stderr:.5f}  ({res.n_chunks} chunks x {res.n_ctx} tokens, "
            f"{res.stats.count} scored, {res.tokens_per_second:.1f} tokens/s)")


@click.command("perplexity")
@click.option("-m", "--model", "model_path", required=True, type=click.Path(dir_okay=False), help="GGUF model")
@click.option("-f", "--file", "text_path", required=True, type=click.Path(dir_okay=False), help="UTF-8 text")
@click.option("-c", "--ctx-size", "n_ctx", type=click.IntRange(4, 1 << 20), default=512, show_default=True,
              help="tokens per chunk")
@click.option("--chunks", "max_chunks", default=-1, help="evaluate at most this many chunks (-1: all)")
def perplexity_command(model_path: str, text_path: str, n_ctx: int, max_chunks: int) -> None:
    """Perplexity of MODEL on a text, computed the way llama.cpp's llama-perplexity does."""
    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise click.ClickException(f"{text_path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise click.ClickException(f"{text_path}: cannot read as UTF-8 text ({err})") from None
    try:
        model, tok = load_for_perplexity(model_path)
        report_perplexity(model, tok, text, n_ctx, max_chunks)
    except GGUFileError as err:
        raise click.ClickException(str(err)) from None


def report_perplexity(model, tok, text: str, n_ctx: int, max_chunks: int | None) -> PerplexityResult:
    """Evaluate with a progress bar on stderr; print the per-chunk figures and the result.

    Shared by `ggufile perplexity` and an executable's `--perplexity`."""
    tokens = tok.encode(text, add_special=True)
    n_chunks = n_chunks_for(len(tokens), n_ctx, max_chunks)
    click.echo(f"{len(tokens)} tokens, {n_chunks} chunks of {n_ctx}", err=True)
    bos = tok.bos_id if tok.add_bos else None
    with click.progressbar(length=n_chunks, label="perplexity", file=sys.stderr,
                           item_show_func=lambda s: s or "") as bar:
        def step(i: int, stats: NLLStats) -> None:
            bar.update(1, f"[{i + 1}] {stats.ppl:.4f}")
        res = evaluate(model, tokens, n_ctx, bos, n_chunks, step)
    click.echo(" ".join(f"[{i + 1}]{p:.4f}," for i, p in enumerate(res.stats.per_chunk)).rstrip(","), err=True)
    click.echo(format_result(res))
    return res
