"""OpenAI response objects and server-sent-event framing (pure: data in, dicts/bytes out).

Shapes follow OpenAI's API reference: `chat.completion`, `chat.completion.chunk`,
`text_completion`; streams end with `data: [DONE]`. The extra `timings` field is llama.cpp's
(ignored by OpenAI clients) and lets the web page show tokens per second.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

from ggufile.runtime.server.queue import Timings


def sse(obj) -> bytes:
    """One server-sent event carrying JSON (or the literal [DONE])."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode("utf-8")


DONE_EVENT = sse("[DONE]")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def timings(t: Timings, prompt_tokens: int) -> dict:
    """llama.cpp's field names; the prompt time includes the first token's sampling."""
    prompt_ms = max(t.first_token - t.started, 0.0) * 1000 if t.first_token else 0.0
    predicted_ms = max(t.finished - t.first_token, 0.0) * 1000 if t.first_token else 0.0
    # The first token comes out of prompt processing; the rate counts the ones after it.
    n_after_first = max(t.n_generated - 1, 0)
    return {"prompt_n": prompt_tokens, "prompt_ms": round(prompt_ms, 3),
            "predicted_n": t.n_generated, "predicted_ms": round(predicted_ms, 3),
            "predicted_per_second": round(n_after_first * 1000 / predicted_ms, 3) if predicted_ms else None,
            "queued_ms": round(max(t.started - t.queued, 0.0) * 1000, 3)}


@dataclass
class Choice:
    """One finished choice of a whole (not streamed) response."""

    index: int
    text: str
    finish_reason: str
    logprobs: dict | None = None
    tool_calls: list | None = None  # OpenAI's tool_calls (chat); the text is then what is left


@dataclass
class Completion:
    """Identity of one response: every chunk of a stream repeats it."""

    model: str
    chat: bool
    id: str = ""
    created: int = 0
    system_fingerprint: str | None = None

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = self.created or int(time.time())

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint}

    # -- whole responses -----------------------------------------------------------------------
    def response(self, choices: list[Choice], prompt_tokens: int, completion_tokens: int,
                 timing: dict | None = None, cached_tokens: int = 0) -> dict:
        if self.chat:
            body = self._head("chat.completion")
            body["choices"] = [self._chat_choice(c) for c in choices]
        else:
            body = self._head("text_completion")
            body["choices"] = [{"index": c.index, "text": c.text, "logprobs": c.logprobs,
                                "finish_reason": c.finish_reason} for c in choices]
        body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        if timing:
            body["timings"] = timing
        return body

    @staticmethod
    def _chat_choice(c: Choice) -> dict:
        message = {"role": "assistant", "content": c.text, "refusal": None}
        if c.tool_calls:
            message["content"] = c.text or None
            message["tool_calls"] = c.tool_calls
        return {"index": c.index, "message": message, "logprobs": c.logprobs, "finish_reason": c.finish_reason}

    # -- stream chunks -------------------------------------------------------------------------
    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False,
              include_usage: bool = False, timing: dict | None = None, index: int = 0,
              logprobs: dict | None = None, tool_calls: list | None = None) -> dict:
        """A chunk with one choice. With include_usage every chunk says usage: null (OpenAI's
        rule) and the final usage chunk comes from usage_chunk()."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            body = self._head("chat.completion.chunk")
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
            body = self._head("text_completion")
        body["choices"] = [choice]
        if include_usage:
            body["usage"] = None
        if timing:
            body["timings"] = timing
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, timing: dict | None = None,
                    cached_tokens: int = 0) -> dict:
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body.update(choices=[], usage=usage(prompt_tokens, completion_tokens, cached_tokens))
        if timing:
            body["timings"] = timing
        return body


# -- logprobs --------------------------------------------------------------------------------------

def _token_entry(token: str, logprob: float, raw: bytes) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(records, piece) -> dict:
    """OpenAI's chat `logprobs` object for TokenLogprob records; piece(id) -> bytes."""
    content = []
    for r in records:
        raw = piece(r.token)
        entry = _token_entry(raw.decode("utf-8", "replace"), r.logprob, raw)
        entry["top_logprobs"] = [_token_entry(piece(t).decode("utf-8", "replace"), lp, piece(t))
                                 for t, lp in r.top]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(records, piece, text_offset: int = 0) -> dict:
    """The completions API's (legacy) `logprobs` object; offsets count characters of the text."""
    tokens, lps, tops, offsets = [], [], [], []
    for r in records:
        text = piece(r.token).decode("utf-8", "replace")
        tokens.append(text)
        lps.append(r.logprob)
        tops.append({piece(t).decode("utf-8", "replace"): lp for t, lp in r.top})
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
