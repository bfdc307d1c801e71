"""The generation engine: one model, its tokenizer, chat template and KV cache.

The CLI and the HTTP server both drive an Engine. It is not thread-safe: callers serialize
generations (the server holds `engine.lock`). Between calls the engine keeps the KV cache of
the last sequence, so a chat turn only processes the tokens that are new since the last one.

    >>> engine = Engine.open("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> ids = engine.tokenize("The capital of France is")
    >>> "".join(c.text for c in engine.generate(ids, SamplingParams(temperature=0), max_tokens=8))
    ' Paris.\\n\\nThe United States has'
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ggufile.runtime.chat_template import ChatTemplate, choose_template
from ggufile.runtime.gguf.constants import Keys
from ggufile.runtime.errors import Cancelled, GGUFileError, printable_line
from ggufile.runtime.gguf.reader import GGUFReader
from ggufile.runtime.sampling import Sampler, SamplingParams

DEFAULT_CTX = 4096
PREFILL_BATCH = 512  # prompt tokens between two looks at `cancelled` (the model's own batch size)


@dataclass(frozen=True)
class Chunk:
    """One step of a generation: the token and the text it completes (may be empty while a
    multi-byte character or a possible stop string is held back)."""

    token_id: int | None
    text: str
    finish_reason: str | None = None  # "stop" (end token or stop string) or "length"


class Engine:
    def __init__(self, reader: GGUFReader, n_ctx: int | None = None, name: str | None = None):
        from ggufile.runtime.model.transformer import load_model
        from ggufile.runtime.model.validate import check_context_budget
        from ggufile.runtime.tokenizer.tokenizer import Tokenizer

        self.reader = reader
        self.tokenizer = Tokenizer.from_metadata(reader.metadata)
        self.model = load_model(reader)
        n_ctx_train = self.model.config.n_ctx_train or DEFAULT_CTX
        self.n_ctx = min(n_ctx or DEFAULT_CTX, n_ctx_train)
        if self.n_ctx < 8:
            raise GGUFileError(f"context size {self.n_ctx} is too small")
        check_context_budget(self.model.config, self.n_ctx)
        self.model_name = printable_line(name or reader.get_str(Keys.NAME) or reader.path.stem, 200)
        # compiled on first use (jinja2 is slow to import); a box the slot engines share
        self._template_box: list[ChatTemplate | None] = [None]
        self.lock = threading.Lock()
        self._cache = None
        self._cached_ids: list[int] = []  # the tokens whose keys/values are in the cache
        self.cached_prompt_tokens = 0  # of the last prompt, found in the cache
        self.last_prompt_processed = 0  # of the last prompt, run through the model
        self._run_model = None  # (ids, cache, cancelled) -> logits instead of model.forward (a slot's batcher)

    def for_slot(self, cache, run_model) -> "Engine":
        """An engine sharing this one's model, tokenizer and chat template, with a KV cache and
        prompt prefix of its own, whose model calls go through `run_model(ids, cache,
        cancelled)` (the server's batcher, which runs several slots' calls together)."""
        slot = copy.copy(self)
        slot.lock = threading.Lock()
        slot._cache, slot._cached_ids, slot.cached_prompt_tokens = cache, [], 0
        slot._run_model = run_model
        return slot

    @classmethod
    def open(cls, path: str | os.PathLike, offset: int = 0, size: int | None = None,
             n_ctx: int | None = None, name: str | None = None) -> "Engine":
        from ggufile.runtime import kernels

        reader = GGUFReader(path, offset, size, scan_strings=kernels.string_scanner())
        return cls(reader, n_ctx=n_ctx, name=name)

    @property
    def chat_template(self) -> ChatTemplate:
        """The model's chat template (or a built-in one), compiled the first time it is needed."""
        if self._template_box[0] is None:
            self._template_box[0] = self._load_template()
        return self._template_box[0]

    @chat_template.setter
    def chat_template(self, template: ChatTemplate) -> None:
        self._template_box[0] = template

    def _load_template(self) -> ChatTemplate:
        tok = self.tokenizer
        source = self.reader.get(Keys.CHAT_TEMPLATE)
        has_token = lambda text: tok.token_id(text) is not None
        piece = lambda i: tok.token_to_piece(i).decode("utf-8", "replace") if i is not None else ""
        return ChatTemplate(choose_template(source if isinstance(source, str) else None, has_token),
                            bos_token=piece(tok.bos_id), eos_token=piece(tok.eos_id))

    # -- text <-> tokens ---------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None) -> list[int]:
        """Render the chat template (with OpenAI-style `tools` for templates that take them) and
        tokenize it: control tokens are parsed in the template's own markup only, never in
        message contents."""
        segments = self.chat_template.render_segments(messages, add_generation_prompt, tools)
        tok = self.tokenizer
        ids = tok.encode_segments([(seg.text, seg.is_markup) for seg in segments], add_special=False)
        # Templates like gemma's write {{ bos_token }} themselves; add BOS only where they don't.
        if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids.insert(0, tok.bos_id)
        return ids

    # -- generation --------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                 max_tokens: int | None = None, stop: list[str] | tuple = (),
                 cancelled: threading.Event | None = None, hooks=()) -> Iterator[Chunk]:
        """Stream the continuation of `prompt_ids`. Closing the iterator stops the generation;
        `cancelled` being set stops the prompt processing (errors.Cancelled) between batches.

        hooks: objects with `adjust(logits) -> logits` (called before each draw: biases, grammar
        masks) and `accept(token, logits)` (after it, with the model's own logits: logprobs,
        grammar state); see server/logits.py."""
        params = params or SamplingParams()
        if not prompt_ids:
            raise GGUFileError("the prompt is empty")
        room = self.n_ctx - len(prompt_ids)
        if room <= 0:
            raise GGUFileError(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.n_ctx}")
        max_tokens = room if max_tokens is None or max_tokens < 0 else min(max_tokens, room)
        logits = self._prefill(prompt_ids, cancelled)
        return self._decode_loop(logits, list(prompt_ids), params, max_tokens, list(stop), tuple(hooks))

    def _decode_loop(self, logits, history, params, max_tokens, stop, hooks=()) -> Iterator[Chunk]:
        from ggufile.runtime.tokenizer.tokenizer import StreamDecoder

        sampler = Sampler(params)
        decoder = StreamDecoder(self.tokenizer)
        stopper = StopStrings(stop)
        eog = self.tokenizer.eog_ids
        for i in range(max_tokens):
            raw = logits
            for hook in hooks:
                logits = hook.adjust(logits)
            token = sampler.sample(logits, history)
            for hook in hooks:
                hook.accept(token, raw)
            if token in eog:
                yield Chunk(token, stopper.flush() + decoder.flush(), "stop")
                return
            history.append(token)
            text, hit = stopper.feed(decoder.feed(token))
            if hit:
                yield Chunk(token, text, "stop")
                return
            if i == max_tokens - 1:
                yield Chunk(token, text + stopper.flush_with(decoder.flush()), "length")
                return
            yield Chunk(token, text)
            logits = self._forward([token])
        yield Chunk(None, stopper.flush() + decoder.flush(), "length")

    def _prefill(self, prompt_ids: list[int], cancelled: threading.Event | None = None) -> np.ndarray:
        """Reuse the cached prefix, run the rest of the prompt, return the last logits."""
        if self._cache is None:
            self._cache = self.model.new_cache(self.n_ctx)
        common = _common_prefix(self._cached_ids, prompt_ids)
        common = min(common, len(prompt_ids) - 1)  # at least one token to get fresh logits
        self.cached_prompt_tokens = common  # reported as usage.prompt_tokens_details.cached_tokens
        self.last_prompt_processed = len(prompt_ids) - common
        self._cache.truncate(common)
        del self._cached_ids[common:]
        rest = prompt_ids[common:]
        if cancelled is None:
            return self._forward(rest)
        for at in range(0, len(rest), PREFILL_BATCH):  # a client that hangs up stops us here
            if cancelled.is_set():
                raise Cancelled()
            logits = self._forward(rest[at:at + PREFILL_BATCH], cancelled)
        return logits

    def _forward(self, ids: list[int], cancelled: threading.Event | None = None) -> np.ndarray:
        if self._run_model is not None:  # the batcher checks the file and the values itself
            logits = self._run_model(ids, self._cache, cancelled)
        else:
            self.reader.check_unchanged()  # a rewritten file would SIGBUS on the next page we touch
            with infinite_values_are_errors():
                logits = self.model.forward(np.asarray(ids, dtype=np.int32), self._cache)
        self._cached_ids += ids
        return logits

    def cached_prefix(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` the KV cache already holds (reused, not recomputed)."""
        return _common_prefix(self._cached_ids, ids)

    def keep_prefix(self, ids: list[int]) -> None:
        """Drop the cached tokens past the common prefix with `ids` (e.g. an undone chat turn)."""
        common = self.cached_prefix(ids)
        del self._cached_ids[common:]
        if self._cache is not None:
            self._cache.truncate(common)

    def reset(self) -> None:
        """Forget the cached sequence (the next prompt is processed from scratch)."""
        self._cached_ids = []
        if self._cache is not None:
            self._cache.truncate(0)


@contextlib.contextmanager
def infinite_values_are_errors():
    """The compiled quantizers divide by zero on inf/NaN activations: say what that means."""
    try:
        yield
    except ZeroDivisionError:
        raise GGUFileError("the model computed infinite or NaN values: its weights are probably "
                           "corrupt") from None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class StopStrings:
    """Holds back streamed text that might be the start of a stop string.

    >>> s = StopStrings(["\\nUser:"])
    >>> s.feed("Hello\\nUs"), s.feed("er: hi")
    (('Hello', False), ('', True))
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.pending + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            return buf[:cut], True
        hold = max((_suffix_prefix_overlap(buf, s) for s in self.stops), default=0)
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def flush_with(self, tail: str) -> str:
        text, hit = self.feed(tail)
        return text if hit else text + self.flush()


def _suffix_prefix_overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
