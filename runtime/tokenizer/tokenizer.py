"""Text <-> token ids, rebuilt from GGUF metadata and identical to llama.cpp token for token.

Two tokenizer families (tokenizer.ggml.model): "llama" = SentencePiece-style score merging
(spm.py) and "gpt2" = byte-level BPE behind a regex pre-tokenizer (bpe.py,
pretokenize.py). Both first cut special tokens out of the text the way llama.cpp's
tokenizer_st_partition does: control/unknown tokens only when parse_special is true, but
user-defined tokens always (gemma-3 has "\\n\\n", "<html>" ... as user-defined tokens).

    >>> tok = Tokenizer.from_metadata(GGUFReader("gemma-3-270m-q4_k_m.gguf").metadata)
    >>> tok.encode("Hello world")
    [2, 9259, 1902]
    >>> tok.encode("<start_of_turn>user\\n", parse_special=True)
    [2, 105, 2364, 107]
    >>> tok.decode([2, 9259, 1902], skip_special=True)
    'Hello world'
"""
from __future__ import annotations

import codecs
from collections.abc import Iterable, Mapping

from ggufile.runtime.tokenizer.pretokenize import CHAR_TO_BYTE, byte_level_encode, split_words
from ggufile.runtime.tokenizer.bpe import BPE
from ggufile.runtime.tokenizer.spm import spm_encode
from ggufile.runtime.tokenizer.vocab import Attr, Vocab, load_vocab

_ASCII_SPACE = " \t\n\v\f\r"  # C isspace(): what llama.cpp's lstrip/rstrip attributes strip
_RENDERED_ONLY_IF_SPECIAL = Attr.UNKNOWN | Attr.CONTROL
_SPECIAL_PREFILTER_CHARS = 3  # special tokens are pre-screened by their first few characters


class Tokenizer:
    def __init__(self, vocab: Vocab):
        self._vocab = vocab
        self._bpe = BPE(vocab.token_to_id, vocab.merge_ranks, vocab.pre.ignore_merges) if vocab.kind == "bpe" else None
        self._pieces: dict[int, bytes] = {}
        specials = self._with_prefix_keys(vocab.special_ids)
        attrs = vocab.attrs
        always = [(t, key) for t, key in specials if not attrs[t] & _RENDERED_ONLY_IF_SPECIAL]
        self._specials = {False: always, True: specials}

    @classmethod
    def from_metadata(cls, metadata: Mapping) -> Tokenizer:
        """Build from GGUF metadata; UnsupportedModelError for an unknown model / pre-tokenizer."""
        return cls(load_vocab(metadata))

    # -- properties ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._vocab.texts)

    @property
    def bos_id(self) -> int | None:
        return self._vocab.bos_id

    @property
    def eos_id(self) -> int | None:
        return self._vocab.eos_id

    @property
    def add_bos(self) -> bool:
        return self._vocab.add_bos

    @property
    def add_eos(self) -> bool:
        return self._vocab.add_eos

    @property
    def eog_ids(self) -> frozenset[int]:
        return self._vocab.eog_ids

    def is_eog(self, token: int) -> bool:
        return token in self._vocab.eog_ids

    def is_control(self, token: int) -> bool:
        return bool(self._vocab.attrs[token] & Attr.CONTROL)

    def token_text(self, token: int) -> str:
        """The token as spelled in the vocabulary (e.g. '▁Hello', 'Ġworld', '<0x0A>')."""
        return self._vocab.texts[token]

    # -- encode -------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids for `text`, as llama_tokenize(add_special, parse_special) returns them."""
        fragments = self._partition(text, parse_special) if text else []
        return self._encode_fragments(fragments, add_special)

    def encode_segments(self, segments: Iterable[tuple[str, bool]], add_special: bool = True) -> list[int]:
        """Token ids for the concatenated segments, parsing control tokens only where a
        segment's flag is True.

        A rendered chat prompt is the template's own markup (flag True) interleaved with what
        users typed (flag False): typed text like "<|im_start|>" stays plain text, while the
        result equals encode(whole_text, parse_special=True) whenever the typed text holds no
        control tokens, because adjacent text fragments are joined before tokenizing.
        """
        fragments: list[str | int] = []
        for text, parse_special in segments:
            for fragment in self._partition(text, parse_special) if text else []:
                if isinstance(fragment, str) and fragments and isinstance(fragments[-1], str):
                    fragments[-1] += fragment
                else:
                    fragments.append(fragment)
        return self._encode_fragments(fragments, add_special)

    def token_id(self, text: str) -> int | None:
        """The id of the token spelled exactly `text` in the vocabulary, if any."""
        return self._vocab.token_to_id.get(text)

    def _encode_fragments(self, fragments: list[str | int], add_special: bool) -> list[int]:
        vocab = self._vocab
        ids: list[int] = []
        if add_special and vocab.add_bos:
            ids.append(vocab.bos_id)
        if vocab.kind == "spm":
            self._encode_spm(fragments, ids)
        else:
            self._encode_bpe(fragments, ids)
        if add_special and vocab.add_eos:
            ids.append(vocab.eos_id)
        return ids

    def _encode_spm(self, fragments: list[str | int], ids: list[int]) -> None:
        vocab = self._vocab
        previous_was_special = True  # so the first text fragment gets the space prefix
        for fragment in fragments:
            if isinstance(fragment, int):
                ids.append(fragment)
                previous_was_special = True
                continue
            if vocab.add_space_prefix and previous_was_special:
                fragment = " " + fragment
            ids.extend(spm_encode(fragment.replace(" ", "▁"), vocab.token_to_id, vocab.scores, vocab.byte_token))
            previous_was_special = False

    def _encode_bpe(self, fragments: list[str | int], ids: list[int]) -> None:
        regexes = self._vocab.pre.regexes
        for fragment in fragments:
            if isinstance(fragment, int):
                ids.append(fragment)
                continue
            for word in split_words(fragment, regexes):
                ids.extend(self._bpe.encode_word(byte_level_encode(word)))

    # -- special tokens in raw text -----------------------------------------------------------

    def _with_prefix_keys(self, ids: list[int]) -> list[tuple[int, str]]:
        texts = self._vocab.texts
        return [(t, texts[t][:_SPECIAL_PREFILTER_CHARS]) for t in ids]

    def _specials_in(self, text: str, parse_special: bool) -> list[int]:
        """The special tokens (in matching order) whose text occurs in `text`.

        A token absent from the whole text cannot occur in any fragment of it, so only these
        need the fragment-by-fragment pass. The prefix set makes this cheap for gemma's ~6k
        control tokens: most share no prefix with the text at all.
        """
        candidates = self._specials[parse_special]
        if not candidates:
            return []
        prefixes: set[str] = set()
        for k in range(1, _SPECIAL_PREFILTER_CHARS + 1):
            prefixes.update(text[i:i + k] for i in range(len(text) - k + 1))
        return [t for t, key in candidates if key in prefixes and self._vocab.texts[t] in text]

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split `text` into raw-text fragments (str) and special token ids (int).

        Like llama.cpp's tokenizer_st_partition: longest special token first, each one cut out
        of every remaining text fragment, leftmost occurrences first, non-overlapping.
        """
        fragments: list[str | int] = [text]
        for token in self._specials_in(text, parse_special):
            needle = self._vocab.texts[token]
            attr = self._vocab.attrs[token]
            split: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, str) and needle in fragment:
                    split.extend(_cut_out(fragment, needle, token, attr))
                else:
                    split.append(fragment)
            fragments = split
        return fragments

    # -- decode -------------------------------------------------------------------------------

    def token_to_piece(self, token: int, special: bool = True) -> bytes:
        """The bytes `token` contributes to the text (llama_token_to_piece).

        Byte tokens give their byte (<0x0A> -> b"\\n"); SPM pieces turn ▁ into spaces; GPT-2
        pieces are mapped back from the byte-level alphabet ('Ġworld' -> b" world"). Control
        and unknown tokens render their text only when `special` is true.
        """
        if not 0 <= token < len(self._vocab.texts):
            raise ValueError(f"token id {token} is outside the vocabulary (0..{len(self._vocab.texts) - 1})")
        if not special and self._vocab.attrs[token] & _RENDERED_ONLY_IF_SPECIAL:
            return b""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._piece(token)
        return piece

    def _piece(self, token: int) -> bytes:
        vocab = self._vocab
        text, attr = vocab.texts[token], vocab.attrs[token]
        if attr & (_RENDERED_ONLY_IF_SPECIAL | Attr.USER_DEFINED):
            return text.encode("utf-8")
        if attr & Attr.NORMAL:
            if vocab.kind == "spm":
                return text.replace("▁", " ").encode("utf-8")
            return _byte_level_decode(text)
        if attr & Attr.BYTE:
            return bytes([int(text[3:5], 16)])
        return b""  # unused / undefined tokens contribute nothing

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text for `ids`, as llama_detokenize(remove_special=skip_special,
        unparse_special=not skip_special) produces it; invalid UTF-8 becomes U+FFFD."""
        vocab = self._vocab
        ids = list(ids)
        strip_leading_space = vocab.add_space_prefix
        if skip_special and vocab.add_bos and ids and ids[0] == vocab.bos_id:
            strip_leading_space = False  # (sic) llama.cpp keeps the space after a removed BOS
            ids = ids[1:]
        if skip_special and vocab.add_eos and ids and ids[-1] == vocab.eos_id:
            ids = ids[:-1]
        out = bytearray()
        for token in ids:
            piece = self.token_to_piece(token, special=not skip_special)
            if strip_leading_space and piece.startswith(b" "):
                piece = piece[1:]
            strip_leading_space = False
            out += piece
        if vocab.clean_spaces:
            out = _clean_up_spaces(out)
        return out.decode("utf-8", errors="replace")


class StreamDecoder:
    """Turns generated ids into text as they arrive, one complete character at a time.

    A character split across byte tokens (an emoji as <0xF0><0x9F><0x98><0x80>) is held back
    until its last byte arrives; invalid UTF-8 comes out as U+FFFD.

        >>> d = StreamDecoder(tok)
        >>> [d.feed(t) for t in ids_of_emoji_bytes] + [d.flush()]
        ['', '', '', '😀', '']
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._special = not skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(self._tokenizer.token_to_piece(token, special=self._special))

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def _cut_out(fragment: str, needle: str, token: int, attr: int) -> list[str | int]:
    """`fragment` with every occurrence of `needle` replaced by `token`, honouring the token's
    LSTRIP / RSTRIP attributes (eat whitespace to its left / right); empty text is dropped."""
    out: list[str | int] = []
    pos = 0
    while (match := fragment.find(needle, pos)) != -1:
        left_end = match
        if attr & Attr.LSTRIP:
            while left_end > pos and fragment[left_end - 1] in _ASCII_SPACE:
                left_end -= 1
        if left_end > pos:
            out.append(fragment[pos:left_end])
        out.append(token)
        pos = match + len(needle)
        if attr & Attr.RSTRIP:
            while pos < len(fragment) and fragment[pos] in _ASCII_SPACE:
                pos += 1
    if pos < len(fragment):
        out.append(fragment[pos:])
    return out


def _byte_level_decode(text: str) -> bytes:
    out = bytearray()
    for ch in text:
        byte = CHAR_TO_BYTE.get(ch)
        if byte is not None:
            out.append(byte)
        else:  # llama.cpp's marker for a character outside the byte-level alphabet
            out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
    return bytes(out)


def _clean_up_spaces(text: bytearray) -> bytearray:
    """llama.cpp's clean_spaces passes: " ." -> ".", " ' " -> "'", " 's" -> "'s" (and 'm 're 've)."""
    return _join_contractions(_drop_spaces_around_quote(_drop_space_before_punct(text)))


def _drop_space_before_punct(src: bytearray) -> bytearray:
    out = bytearray(src[:1])
    for i in range(1, len(src)):
        if src[i - 1] == 0x20 and src[i] in b"?!.,":
            out.pop()
        out.append(src[i])
    return out


def _drop_spaces_around_quote(src: bytearray) -> bytearray:
    src = bytearray(src)
    out = bytearray(src[:1])
    i = 1
    while i < len(src):
        x = src[i]
        if x == 0x27 and i + 1 < len(src) and src[i - 1] == 0x20 and src[i + 1] == 0x20:
            out.pop()
            src[i + 1] = 0  # llama.cpp blanks the skipped space, so it never counts as "previous"
            i += 1
        out.append(x)
        i += 1
    return out


def _join_contractions(src: bytearray) -> bytearray:
    out = bytearray(src[:1])
    n = len(src)
    for i in range(1, n):
        x = src[i]
        if src[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = src[i + 1]
            if x1 in b"sm":
                out.pop()
            elif x1 not in b"td" and i + 2 < n and (x1, src[i + 2]) in ((0x72, 0x65), (0x76, 0x65)):  # 're 've
                out.pop()
        out.append(x)
    return out
