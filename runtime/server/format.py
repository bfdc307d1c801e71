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


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


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
class Completion:
    """Identity of one response: every chunk of a stream repeats it."""

    model: str
    chat: bool
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = self.created or int(time.time())

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    # -- whole responses -----------------------------------------------------------------------
    def response(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                 timing: dict | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": finish_reason}
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._head("text_completion")
        body.update(choices=[choice], usage=usage(prompt_tokens, completion_tokens))
        if timing:
            body["timings"] = timing
        return body

    # -- stream chunks -------------------------------------------------------------------------
    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False,
              include_usage: bool = False, timing: dict | None = None) -> dict:
        """A chunk with one choice. With include_usage every chunk says usage: null (OpenAI's
        rule) and the final usage chunk comes from usage_chunk()."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = self._head("text_completion")
        body["choices"] = [choice]
        if include_usage:
            body["usage"] = None
        if timing:
            body["timings"] = timing
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, timing: dict | None = None) -> dict:
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body.update(choices=[], usage=usage(prompt_tokens, completion_tokens))
        if timing:
            body["timings"] = timing
        return body
