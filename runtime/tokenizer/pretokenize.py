"""Pre-tokenizers for GPT-2 style BPE vocabularies, chosen by `tokenizer.ggml.pre`.

Before BPE merges run, llama.cpp cuts the text into "words" with a list of regexes, applied one
after the other: each regex re-splits every piece the previous one produced, and the text a
regex does not match stays behind as pieces of its own. We reproduce that exactly:

* The two regexes llama.cpp hand-codes (the GPT-2 one and the Llama-3 one) are run with the
  `regex` package, whose \\p{L} / \\p{N} / \\s are what llama.cpp's Unicode tables were
  generated from, so "letter", "number" and "whitespace" mean the same thing on both sides.
* Every other regex llama.cpp runs through std::regex on a "collapsed" copy of the text, where
  each non-ASCII character is replaced by one stand-in byte for its Unicode category and
  \\p{X} by a class of that byte plus its ASCII members. We do the same collapse and run
  Python's `re` in ASCII mode (whose \\s is C's isspace, like std::regex's). The collapse has
  quirks -- e.g. llama.cpp's \\p{S} leaves out '~' -- which we keep on purpose.

    >>> split_words("Hello world 123", PRE_TOKENIZERS["smollm"].regexes)
    ['Hello', ' world', ' ', '1', '2', '3']
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ggufile.runtime.errors import UnsupportedModelError

# -- the regexes, spelled as in llama.cpp's llm_tokenizer_bpe (after C unescaping) ----------

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SEED_CODER = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
    r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
MINICPM5 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+"
    r"((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTRACTION = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?((?=[\p{{L}}])([^a-z]))*((?=[\p{{L}}])([^A-Z]))+{_CONTRACTION}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?((?=[\p{{L}}])([^a-z]))+((?=[\p{{L}}])([^A-Z]))*{_CONTRACTION}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PUNCT_RUN = r"[\p{P}\$\+<=>\^~\|]+"
PORO = " ?[^(\\s|.,!?…。，、।۔،)]+"
CJK = "[一-龥ࠀ-一가-퟿]+"


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp's vocab loader configures one `tokenizer.ggml.pre` value."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is already a token skips BPE
    clean_spaces: bool = True  # detokenize removes " ." " ," " 's" ... (clean_up_tokenization_spaces)
    add_bos: bool = False  # default for tokenizer.ggml.add_bos_token
    no_bos_token: bool = False  # chatglm: the default BOS id is dropped


def _pre(regexes, **flags) -> PreTokenizer:
    return PreTokenizer(tuple(regexes), **flags)


_DEFAULT = _pre([PUNCT_RUN, GPT2, r"\p{N}+", "[0-9][0-9][0-9]"])
_LLAMA3 = _pre([LLAMA3], ignore_merges=True, add_bos=True)
_GPT2 = _pre([GPT2])
_STARCODER = _pre([r"\p{N}", GPT2])
_QWEN2 = _pre([QWEN2], clean_spaces=False)

# name -> configuration, following llama_vocab::impl::load and llm_tokenizer_bpe's constructor.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"],
        _LLAMA3,
    ),
    "dbrx": _pre([LLAMA3]),
    "smaug-bpe": _pre([LLAMA3]),
    **dict.fromkeys(
        ["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
         "mpt", "olmo", "jais", "exaone4"],
        _GPT2,
    ),
    "trillion": _pre([GPT2], clean_spaces=False),
    "granite-docling": _pre([GPT2], clean_spaces=False),
    **dict.fromkeys(["starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"], _STARCODER),
    "smollm": _pre([r"\p{N}", GPT2], clean_spaces=False),
    "command-r": _pre([r"\p{N}", GPT2], clean_spaces=False),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open"], _QWEN2),
    "megrez": _pre([QWEN2]),
    "stablelm2": _pre([QWEN2]),
    "qwen35": _pre([QWEN35], clean_spaces=False),
    "falcon": _pre([PUNCT_RUN, GPT2, "[0-9][0-9][0-9]"]),
    "deepseek-coder": _pre(["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK, r"\p{N}"], clean_spaces=False),
    "poro-chat": _pre([PORO], clean_spaces=False),
    "bloom": _pre([PORO]),
    "gpt3-finnish": _pre([PORO]),
    "viking": _pre([PORO, r"\p{N}"], clean_spaces=False),
    "glm4": _pre([LLAMA3], no_bos_token=True),
    "chatglm-bpe": _pre([LLAMA3], no_bos_token=True),
    "tekken": _pre([TEKKEN], ignore_merges=True, add_bos=True, clean_spaces=False),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie"], _pre([GPT4O], clean_spaces=False)),
    "seed-coder": _pre([SEED_CODER], clean_spaces=False),
    "grok-2": _pre([QWEN2], clean_spaces=False),
    "ufakzeka": _pre([UFAKZEKA], clean_spaces=False),
    "minicpm5": _pre([r"\p{N}{1,3}", MINICPM5], ignore_merges=True),
}


def pre_tokenizer_for(name: str | None) -> PreTokenizer:
    """The configuration for a `tokenizer.ggml.pre` value (missing -> 'default', as llama.cpp)."""
    if not name:
        return _DEFAULT
    try:
        return PRE_TOKENIZERS[name]
    except KeyError:
        raise UnsupportedModelError(f"unsupported pre-tokenizer tokenizer.ggml.pre = {name!r}") from None


# -- the hand-coded splitters --------------------------------------------------------------
# llama.cpp's unicode_regex_split_custom_gpt2/_llama3 behave like the regex plus a final
# "\s+" (GPT-2's custom code takes a lone whitespace char that the regex would leave unmatched).
# Compiled (and the `regex` package imported) on first use: opening a model compiles nothing.
_CUSTOM = {
    GPT2: GPT2 + r"|\s+",
    LLAMA3: LLAMA3,
}

# -- the std::regex fallback on collapsed text ----------------------------------------------
_UCAT_CHAR = {"N": "\xd1", "L": "\xd2", "P": "\xd3", "M": "\xd4", "S": "\xd5"}
_UCAT_ASCII = {  # the ASCII members llama.cpp adds to each collapsed class (k_ucat_map)
    "N": "0-9",
    "L": "A-Za-z",
    "P": r"!-#%-*,-/:-;?-@\[-\]_\{\}",
    "M": "",
    "S": r"\$\+<->\^`\|",
}
_UCATS = {r"\p{N}": "N", r"\p{L}": "L", r"\p{P}": "P", r"\p{M}": "M", r"\p{S}": "S",
          r"\p{Lu}": "L", r"\p{Ll}": "L", r"\p{Lt}": "L", r"\p{Lm}": "L", r"\p{Lo}": "L"}
_COLLAPSE_WS = "\x0b"  # llama.cpp's stand-in for non-ASCII whitespace (matches \s)
_COLLAPSE_OTHER = "\xd0"


@lru_cache(maxsize=None)
def _category_tests() -> list[tuple[object, str]]:
    import regex

    return [(regex.compile(r"\s"), _COLLAPSE_WS)] + [
        (regex.compile(rf"\p{{{cat}}}"), ch) for cat, ch in _UCAT_CHAR.items()
    ]


_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _uses_categories(expr: str) -> bool:
    return any(ucat in expr for ucat in _UCATS)


@lru_cache(maxsize=4096)
def _collapse_char(ch: str) -> str:
    for test, stand_in in _category_tests():
        if test.match(ch):
            return stand_in
    return _COLLAPSE_OTHER


def _collapse_text(text: str) -> str:
    """One stand-in character per non-ASCII codepoint, so indices line up with `text`."""
    return _NON_ASCII.sub(lambda m: _collapse_char(m.group()), text)


def _whitespace_stand_ins(text: str) -> str:
    """What llama.cpp feeds std::wregex: non-ASCII whitespace replaced by \\x0b."""
    return _NON_ASCII.sub(lambda m: _COLLAPSE_WS if _collapse_char(m.group()) == _COLLAPSE_WS else m.group(), text)


def _translate_std_regex(expr: str, collapse: bool) -> str:
    """llama.cpp's regex collapse (\\p{X} -> [stand-in + ASCII members]) in Python `re` syntax.

    Also turns an unescaped '$' outside classes into '\\Z': ECMAScript's '$' is end of input
    only, Python's also matches before a final newline.
    """
    out = []
    inside = False
    i = 0
    while i < len(expr):
        ch = expr[i]
        escaped = i > 0 and expr[i - 1] == "\\"
        if ch == "[" and not escaped:
            inside = True
        elif inside and ch == "]" and not escaped:
            inside = False
        elif collapse and expr.startswith("\\p{", i):
            close = expr.find("}", i + 3)
            name = expr[i:close + 1] if close != -1 else ""
            if name in _UCATS:
                cat = _UCATS[name]
                body = _UCAT_CHAR[cat] + _UCAT_ASCII[cat]
                out.append(body if inside else f"[{body}]")
                i = close + 1
                continue
        elif ch == "$" and not inside and not escaped:
            out.append(r"\Z")
            i += 1
            continue
        out.append(ch)
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class _Splitter:
    pattern: object  # compiled re / regex pattern
    text_kind: str  # "raw" | "collapsed" | "wide"


@lru_cache(maxsize=None)
def _splitter(expr: str) -> _Splitter:
    if expr in _CUSTOM:
        import regex

        return _Splitter(regex.compile(_CUSTOM[expr]), "raw")
    if _uses_categories(expr):
        if any(ord(c) >= 128 for c in expr):
            raise UnsupportedModelError("pre-tokenizer regex mixes unicode categories and non-ASCII characters")
        return _Splitter(re.compile(_translate_std_regex(expr, collapse=True), re.ASCII), "collapsed")
    return _Splitter(re.compile(_translate_std_regex(expr, collapse=False), re.ASCII), "wide")


def _split_spans(spans: list[tuple[int, int]], pattern, subject: str) -> list[tuple[int, int]]:
    """Re-split each (start, end) span: matches and the gaps between them all become pieces."""
    out = []
    for start, end in spans:
        pos = start
        for m in pattern.finditer(subject, start, end):
            s, e = m.span()
            if s == e:
                continue
            if s > pos:
                out.append((pos, s))
            out.append((s, e))
            pos = e
        if pos < end:
            out.append((pos, end))
    return out


def split_words(text: str, regexes: tuple[str, ...]) -> list[str]:
    """Cut `text` into pre-tokenizer words the way llama.cpp's unicode_regex_split does."""
    if not text:
        return []
    subjects = {"raw": text}
    spans = [(0, len(text))]
    for expr in regexes:
        splitter = _splitter(expr)
        kind = splitter.text_kind
        if kind not in subjects:
            subjects[kind] = _collapse_text(text) if kind == "collapsed" else _whitespace_stand_ins(text)
        spans = _split_spans(spans, splitter.pattern, subjects[kind])
    return [text[s:e] for s, e in spans]


# -- GPT-2 byte-level mapping ----------------------------------------------------------------

def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table (unicode_byte_to_utf8_map)."""
    printable = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


BYTE_TO_CHAR: list[str] = _bytes_to_unicode()
CHAR_TO_BYTE: dict[str, int] = {ch: b for b, ch in enumerate(BYTE_TO_CHAR)}
# str.translate table taking a latin-1 decoded byte string to its byte-level spelling.
_LATIN1_TO_BYTE_LEVEL = {b: ch for b, ch in enumerate(BYTE_TO_CHAR)}


def byte_level_encode(word: str) -> str:
    """'Ġ'-style spelling of a word's UTF-8 bytes: byte_level_encode(' é') == 'ĠÃ©'."""
    return word.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_BYTE_LEVEL)
