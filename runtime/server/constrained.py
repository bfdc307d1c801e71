"""Constrained output: JSON schemas, JSON mode and GBNF grammars, enforced token by token with
llguidance (the grammar engine llama.cpp offers as an option; figures in the README).

Before each draw the grammar's mask leaves only tokens that keep the output a valid prefix;
once the grammar is complete only the end token remains, so the output always parses (unless
max_tokens cuts it short: finish_reason "length"). llguidance is imported on first use: a
server that never sees a grammar never loads it.
"""
from __future__ import annotations

import json
import threading

import numpy as np

from ggufile.runtime.server.schema import ApiError, Constraint

_tokenizers: dict[int, object] = {}  # id(engine tokenizer) -> LLTokenizer (built once: ~0.3 s)
_lock = threading.Lock()


def _llguidance():
    try:
        import llguidance
    except ImportError:  # only when installed without the runtime's dependencies
        raise ApiError(400, "constrained output needs the llguidance package, which is not installed",
                       code="unsupported_value") from None
    return llguidance


def lltokenizer(engine):
    """llguidance's view of the engine's vocabulary: each token's bytes, the control tokens, EOS."""
    tokenizer = engine.tokenizer
    key = id(tokenizer)
    with _lock:
        if key not in _tokenizers:
            _tokenizers[key] = _build_tokenizer(_llguidance(), engine)
        return _tokenizers[key]


class _Vocab:
    """The shape llguidance.TokenizerWrapper reads."""

    def __init__(self, engine):
        tok = engine.tokenizer
        n = vocab_size(engine)
        self.tokens = [tok.token_to_piece(i) for i in range(n)]
        is_control = getattr(tok, "is_control", lambda i: False)
        self.special_token_ids = [i for i in range(n) if is_control(i) or i in tok.eog_ids]
        self.eos_token_id = getattr(tok, "eos_id", None) or min(tok.eog_ids)
        self.bos_token_id = getattr(tok, "bos_id", None)
        self._engine = engine

    def __call__(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._engine.tokenize(text, add_special=False)


def vocab_size(engine) -> int:
    return getattr(engine, "n_vocab", None) or engine.tokenizer.vocab_size


def _build_tokenizer(llg, engine):
    vocab = _Vocab(engine)
    return llg.LLTokenizer(llg.TokenizerWrapper(vocab), n_vocab=len(vocab.tokens),
                           eos_token=sorted(engine.tokenizer.eog_ids))


def grammar_text(constraint: Constraint) -> str:
    """llguidance's grammar for the constraint; ApiError if it does not parse."""
    llg = _llguidance()
    try:
        if constraint.kind == "json_schema":
            # Compact JSON: a small model otherwise tends to fill flexible whitespace forever.
            return llg.LLMatcher.grammar_from_json_schema(
                json.dumps(constraint.source), overrides={"whitespace_flexible": False})
        if constraint.kind == "lark":  # ours (tools.call_grammar)
            return llg.LLMatcher.grammar_from_lark(constraint.source)
        return llg.grammar_from("grammar", constraint.source)
    except (ValueError, TypeError) as err:
        raise ApiError(400, f"'{constraint.param}' is not a valid grammar: {_short(err)}",
                       param=constraint.param) from None


def compile_constraint(engine, constraint: Constraint):
    """A factory of grammar hooks (one per choice: a matcher has state). Raises ApiError for a
    grammar or schema llguidance rejects. Runs the compile once up front to report errors."""
    llg = _llguidance()
    tokenizer = lltokenizer(engine)
    grammar = grammar_text(constraint)
    error = llg.LLMatcher.validate_grammar(grammar, tokenizer)
    if error:
        raise ApiError(400, f"'{constraint.param}' is not a valid grammar: {_short(error)}", param=constraint.param)
    n_vocab = vocab_size(engine)
    return lambda: [GrammarHook(llg.LLMatcher(tokenizer, grammar, log_level=0), n_vocab, engine.tokenizer.eog_ids)]


def _short(err) -> str:
    return str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__


class GrammarHook:
    """Masks the logits to what the grammar allows next; advances it with each drawn token."""

    def __init__(self, matcher, n_vocab: int, eog_ids):
        self.matcher = matcher
        self.n_vocab = n_vocab
        self.words = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        self.end = np.fromiter(eog_ids, dtype=np.int64)

    def allowed(self) -> np.ndarray:
        """A boolean per token id."""
        if self.matcher.is_error():
            allowed = np.zeros(self.n_vocab, dtype=bool)
        else:
            self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
            allowed = np.unpackbits(self.words.view(np.uint8), bitorder="little")[:self.n_vocab].astype(bool)
        if not allowed.any():  # a dead end (cannot happen with a sound grammar): end the output
            allowed[self.end] = True
        return allowed

    def adjust(self, logits: np.ndarray) -> np.ndarray:
        allowed = self.allowed()
        out = np.full_like(logits, -np.inf)
        n = min(len(allowed), len(logits))
        out[:n] = np.where(allowed[:n], logits[:n], -np.inf)
        if not np.isfinite(out).any():  # every allowed token was banned (ignore_eos, logit_bias): end
            out[self.end] = 0.0
        return out

    def accept(self, token: int, logits: np.ndarray) -> None:
        self.matcher.consume_token(token)
