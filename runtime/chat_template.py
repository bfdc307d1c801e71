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

# Bounds on an untrusted template (far above any real prompt: a million-token context is ~4M chars).
RENDER_SECONDS = 5.0
MAX_OUTPUT_CHARS = 8 << 20
MAX_ARG_INT = MAX_OUTPUT_CHARS  # widths, counts, repeats a template may ask a function for


@dataclass(frozen=True)
class Segment:
    text: str
    is_markup: bool  # True: the template's own text (control tokens allowed); False: user content


def _raise(message: str):
    from jinja2 import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Contents:
    """The message texts of one render; each is shown to the template as a Content."""

    def __init__(self):
        self.texts: list[str] = []

    def wrap(self, text: str) -> "Content":
        self.texts.append(text)
        return Content(_PLACEHOLDER.format(len(self.texts) - 1), text, self)


def _rewrap(method: str):
    """A str method applied to the real text; string results become Contents again."""
    def apply(self, *args, **kwargs):
        result = getattr(self.text, method)(*(_real(a) for a in args), **kwargs)
        if isinstance(result, str):
            return self.contents.wrap(result)
        if isinstance(result, (list, tuple)):
            return type(result)(self.contents.wrap(r) if isinstance(r, str) else r for r in result)
        return result
    return apply


def _real(value):
    return value.text if isinstance(value, Content) else value


class Content(str):
    """A message's text as the template sees it: rendered (printed, concatenated) it is an opaque
    placeholder, so the user's text never becomes markup; but tests and string operations see the
    real text (`'</think>' in content`, `content.split('</think>')[-1]`, `| trim`, `| length`), and
    their string results are placeholders again."""

    def __new__(cls, placeholder: str, text: str, contents: _Contents):
        self = super().__new__(cls, placeholder)
        self.text, self.contents = text, contents
        return self

    def __str__(self):
        return self  # filters call str(value) before a str method: keep the real text reachable

    def __contains__(self, item):
        return _real(item) in self.text

    def __len__(self):
        return len(self.text)

    def __iter__(self):
        return (self.contents.wrap(c) for c in self.text)

    def __getitem__(self, key):
        return self.contents.wrap(self.text[key])

    def __eq__(self, other):
        return self.text == _real(other)

    def __ne__(self, other):
        return self.text != _real(other)

    def __hash__(self):
        return hash(self.text)

    def __bool__(self):
        return bool(self.text)

    for _name in ("split", "rsplit", "splitlines", "partition", "rpartition", "strip", "lstrip", "rstrip",
                  "lower", "upper", "title", "capitalize", "casefold", "swapcase", "replace", "removeprefix",
                  "removesuffix", "startswith", "endswith", "find", "rfind", "index", "rindex", "count",
                  "isspace", "isdigit", "isalpha", "isalnum", "islower", "isupper", "center", "ljust", "rjust",
                  "zfill", "expandtabs"):
        locals()[_name] = _rewrap(_name)
    del _name


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """|tojson as Hugging Face's chat templates define it, seeing message texts: each is
    JSON-escaped and stays user content (a placeholder of its own)."""
    import json

    found: list[Content] = []

    def plain(v):
        if isinstance(v, Content):
            found.append(v)
            return f"@@ggufile-content-{len(found) - 1}@@"
        if isinstance(v, dict):
            return {plain(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    text = json.dumps(plain(value), ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)
    for i, c in enumerate(found):
        escaped = json.dumps(c.text, ensure_ascii=ensure_ascii)[1:-1]
        text = text.replace(f"@@ggufile-content-{i}@@", c.contents.wrap(escaped), 1)
    return text


def _bounded_environment():
    """A jinja2 sandbox with no loader (include/import/extends fail), and no call, filter or
    operator that builds a huge string or list for a template."""
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def check_args(args, kwargs) -> None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_ARG_INT:
                raise SecurityError(f"argument {a} is too large")

    def check_result(result):
        if isinstance(result, (str, list, tuple)) and len(result) > MAX_OUTPUT_CHARS:
            raise SecurityError("the template builds too large a value")
        return result

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise SecurityError("exponent too large")
            if operator == "*":
                sizes = [len(x) for x in (left, right) if isinstance(x, (str, list, tuple))]
                counts = [x for x in (left, right) if isinstance(x, int)]
                if sizes and counts and sizes[0] * max(counts[0], 0) > MAX_OUTPUT_CHARS:
                    raise SecurityError("the template builds too large a value")
            if operator == "+" and all(isinstance(x, (str, list, tuple)) for x in (left, right)):
                if len(left) + len(right) > MAX_OUTPUT_CHARS:
                    raise SecurityError("the template builds too large a value")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 -- jinja2's signature
            check_args(args, kwargs)
            return check_result(super().call(__context, __obj, *args, **kwargs))

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def bounded(f):
        def wrapper(*args, **kwargs):
            check_args(args, kwargs)
            return check_result(f(*args, **kwargs))
        for attr in ("jinja_pass_arg",):  # jinja2 passes context/eval_ctx/environment by this mark
            if hasattr(f, attr):
                setattr(wrapper, attr, getattr(f, attr))
        return wrapper

    env.filters["tojson"] = _tojson
    env.filters = {name: bounded(f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=_raise, strftime_now=_strftime_now)
    return env


class _Deadline:
    """Stops a render that runs past `seconds`: a trace function on the template's own frames
    (compiled templates are Python code named '<template>'), so the rest runs untraced."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        import sys
        import time

        end = time.monotonic() + self.seconds
        self._previous = sys.gettrace()
        counter = [0]

        def local(frame, event, arg):
            counter[0] += 1
            if counter[0] & 255 == 0 and time.monotonic() > end:
                raise TimeoutError
            return local

        def trace(frame, event, arg):
            return local if frame.f_code.co_filename == "<template>" else None

        sys.settrace(trace)
        return self

    def __exit__(self, *exc):
        import sys

        sys.settrace(self._previous)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        # jinja2 is imported here, not with this module: opening a model does not need it.
        from jinja2 import TemplateError

        self._env = _bounded_environment()
        try:
            self._template = self._env.from_string(source)
        except (TemplateError, RecursionError, MemoryError, ValueError, OverflowError) as err:
            raise GGUFileError(f"the model's chat template does not parse: {err}") from None
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The whole prompt as text (for display and for templates with no placeholders)."""
        return "".join(s.text for s in self.render_segments(messages, add_generation_prompt))

    def render_segments(self, messages: list[dict], add_generation_prompt: bool = True) -> list[Segment]:
        """The prompt split into template markup and message contents, in order."""
        contents = _Contents()
        masked = [dict(m, content=contents.wrap(_content_text(m))) for m in messages]
        rendered = self._render(masked, add_generation_prompt)
        segments: list[Segment] = []
        pos = 0
        for match in _PLACEHOLDER_RE.finditer(rendered):
            segments.append(Segment(rendered[pos:match.start()], True))
            segments.append(Segment(contents.texts[int(match.group(1))], False))
            pos = match.end()
        segments.append(Segment(rendered[pos:], True))
        return [s for s in segments if s.text]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        parts, size = [], 0
        try:
            with _Deadline(RENDER_SECONDS):
                for part in self._template.generate(
                        messages=messages, add_generation_prompt=add_generation_prompt,
                        bos_token=self.bos_token, eos_token=self.eos_token):
                    size += len(part)
                    if size > MAX_OUTPUT_CHARS:
                        raise GGUFileError(f"chat template error: the prompt exceeds {MAX_OUTPUT_CHARS} characters")
                    parts.append(part)
        except GGUFileError:
            raise
        except TimeoutError:
            raise GGUFileError(f"chat template error: rendering took longer than {RENDER_SECONDS:g} s") from None
        except RecursionError:
            raise GGUFileError("chat template error: recursion too deep") from None
        except MemoryError:
            raise GGUFileError("chat template error: out of memory") from None
        except Exception as err:  # noqa: BLE001 -- the template is untrusted code: any failure is its own
            raise GGUFileError(f"chat template error: {_template_error_text(err)}") from None
        return "".join(parts)


def _template_error_text(err: Exception) -> str:
    from jinja2 import TemplateError

    if isinstance(err, TypeError) and "no loader" in str(err):
        return "templates cannot include, import or extend other templates"
    return str(err) if isinstance(err, TemplateError) else f"{type(err).__name__}: {err}"


def _content_text(message: dict) -> str:
    """Contents as text; OpenAI-style lists of parts are joined (text parts only)."""
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
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
