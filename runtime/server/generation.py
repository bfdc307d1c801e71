"""One request's generation as the worker thread runs it: n choices, each with its own hooks.

The choices run one after another on the engine, which keeps the prompt's KV cache between
them: the prompt is processed once and each further choice only re-runs its last token (the
engine always recomputes one token to get fresh logits). With a seed, choice i uses seed + i,
so the choices differ yet the whole answer is reproducible.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ggufile.runtime.sampling import SamplingParams
from ggufile.runtime.server.logits import Logprobs, TokenLogprob


@dataclass(frozen=True)
class Step:
    """A Chunk of one choice, with the drawn token's logprobs when they were asked for."""

    choice: int
    token_id: int | None
    text: str
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None
    end_of_generation: bool = False  # the token is the model's end token (not part of the text)


@dataclass
class Plan:
    """What to generate: the prompt, how to sample, how many choices and with which hooks."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int | None
    stop: list[str]
    n: int = 1
    top_logprobs: int | None = None  # None: no logprobs; else how many alternatives per token
    make_hooks: Callable[[], list] | None = None  # fresh hooks per choice (a grammar has state)
    reset_cache: bool = False  # llama.cpp's cache_prompt=false: process the prompt from scratch
    cached_tokens: int = field(default=0, init=False)  # prompt tokens found in the KV cache

    def run(self, engine, cancelled=None) -> Iterator[Step]:
        """The steps of every choice in order (runs on the worker thread, engine locked);
        `cancelled` stops a prompt's processing early (engine.generate's)."""
        eog = end_tokens(engine)
        if self.reset_cache and hasattr(engine, "reset"):
            engine.reset()
        for choice in range(self.n):
            params = self.params
            if choice and params.seed is not None:
                params = dataclasses.replace(params, seed=params.seed + choice)
            hooks = list(self.make_hooks()) if self.make_hooks else []
            recorder = Logprobs(self.top_logprobs) if self.top_logprobs is not None else None
            if recorder:
                hooks.append(recorder)
            kwargs = {"hooks": hooks} if hooks else {}
            if cancelled is not None:
                kwargs["cancelled"] = cancelled
            chunks = engine.generate(self.prompt_ids, params, self.max_tokens, self.stop, **kwargs)
            if choice == 0:
                self.cached_tokens = getattr(engine, "cached_prompt_tokens", 0)
            try:
                for chunk in chunks:
                    record = None
                    if recorder is not None and chunk.token_id is not None and recorder.records:
                        record = recorder.records.popleft()
                    is_end = chunk.token_id in eog
                    yield Step(choice, chunk.token_id, chunk.text, chunk.finish_reason,
                               None if is_end else record, is_end)
            finally:
                chunks.close()


def end_tokens(engine) -> frozenset[int]:
    tokenizer = getattr(engine, "tokenizer", None)
    return frozenset(getattr(tokenizer, "eog_ids", None) or getattr(engine, "eog_ids", ()))


def token_bytes(engine, token: int) -> bytes:
    """What `token` contributes to the text, as bytes (a token may hold part of a character)."""
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer.token_to_piece(token)
    return engine.detokenize([token]).encode("utf-8")
