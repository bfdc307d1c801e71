"""Chat templates from GGUF metadata, rendered in a jinja2 sandbox.

A template inside a model file is untrusted code: it renders in jinja2's ImmutableSandboxedEnvironment
(no attribute access to internals, no mutation of the inputs). Message contents never reach the
tokenizer as control tokens: the template is rendered with opaque placeholders where the contents go,
so the caller can tokenize the template's own markup with special tokens parsed and the user's text
without (see `render_segments`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from ggufile.runtime.errors import GGUFileError

# ChatML, the fallback for models whose metadata carries no template but whose vocab has its markup.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turn format (its GGUFs often carry no template); a system prompt joins the first user turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system.text = message['content'] + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if role == 'user' and system.text %}{{ system.text }}{% set system.text = '' %}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# The fallback when nothing better is known: plain text turns.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Private-use code points: cannot come from a template's own text, mark where contents go.
_PLACEHOLDER = "\U000F0000{}\U000F0001"
_PLACEHOLDER_RE = re.compile("\U000F0000(\\d+)\U000F0001")


@dataclass(frozen=True)
class Segment:
    text: str
    is_markup: bool  # True: the template's own text (control tokens allowed); False: user content


def _raise(message: str):
    from jinja2 import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        # jinja2 is imported here, not with this module: opening a model does not need it.
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=_raise, strftime_now=_strftime_now)
        try:
            self._template = env.from_string(source)
        except TemplateError as err:
            raise GGUFileError(f"the model's chat template does not parse: {err}") from None
        self.source = source
        # Templates that `| trim` the contents get trimmed contents in our placeholders too.
        self._trims_content = "trim" in source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None) -> str:
        """The whole prompt as text (for display and for templates with no placeholders)."""
        return "".join(s.text for s in self.render_segments(messages, add_generation_prompt, tools))

    def render_segments(self, messages: list[dict], add_generation_prompt: bool = True,
                        tools: list | None = None) -> list[Segment]:
        """The prompt split into template markup and message contents, in order."""
        contents = [_content_text(m) for m in messages]
        if self._trims_content:
            contents = [c.strip() for c in contents]
        masked = [dict(m, content=_PLACEHOLDER.format(i)) for i, m in enumerate(messages)]
        rendered = self._render(masked, add_generation_prompt, tools)
        segments: list[Segment] = []
        pos = 0
        for match in _PLACEHOLDER_RE.finditer(rendered):
            segments.append(Segment(rendered[pos:match.start()], True))
            segments.append(Segment(contents[int(match.group(1))], False))
            pos = match.end()
        segments.append(Segment(rendered[pos:], True))
        return [s for s in segments if s.text]

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: list | None = None) -> str:
        from jinja2 import TemplateError

        extra = {"tools": tools} if tools else {}  # templates test `tools is defined` / `if tools`
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except TemplateError as err:
            raise GGUFileError(f"chat template error: {err}") from None
        except RecursionError:
            raise GGUFileError("chat template error: recursion too deep") from None


def _content_text(message: dict) -> str:
    """Contents as text; OpenAI-style lists of parts are joined with newlines, as llama.cpp
    joins them (text parts only)."""
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise GGUFileError("message content must be a string")
    return content


# Built-in templates for models without one, recognized by the markup tokens in their vocab.
_BUILTIN_BY_MARKUP = (
    (("<|im_start|>", "<|im_end|>"), CHATML_TEMPLATE),
    (("<start_of_turn>", "<end_of_turn>"), GEMMA_TEMPLATE),
)


def choose_template(source: str | None, has_token) -> str:
    """The model's own template, else a built-in one its vocabulary's markup tokens fit.

    `has_token(text)` tells whether the vocabulary has a token spelled `text`."""
    if source:
        return source
    for markup, template in _BUILTIN_BY_MARKUP:
        if all(has_token(t) for t in markup):
            return template
    return PLAIN_TEMPLATE
