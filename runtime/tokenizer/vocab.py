"""The vocabulary as llama.cpp's llama_vocab::impl::load builds it from GGUF metadata.

Besides the token list this settles everything llama.cpp derives at load time: per-token
attributes (from tokenizer.ggml.token_type, then patched by token text), the special ids with
their per-model-type defaults, the add_bos / add_eos / add_space_prefix flags, the set of
end-of-generation ids, and the special tokens matched in raw text, longest first.

    >>> v = load_vocab(metadata)
    >>> v.kind, v.bos_id, v.add_bos, sorted(v.eog_ids)
    ('spm', 2, True, [1, 106, 212])       # gemma-3: <eos>, <end_of_turn>, </s>
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ggufile.runtime.gguf.constants import Keys, TokenType
from ggufile.runtime.errors import GGUFFormatError, UnsupportedModelError
from ggufile.runtime.tokenizer.pretokenize import PreTokenizer, pre_tokenizer_for
from ggufile.runtime.tokenizer.bpe import parse_merges
from ggufile.runtime.model.validate import check_tokenizer_metadata

class Attr:
    """llama.cpp's llama_token_attr bits (a token can gain CONTROL/UNUSED from its text).

    Plain ints rather than an enum.IntFlag: they are tested per token in hot loops.
    """

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    NORMALIZED = 1 << 6
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8
    SINGLE_WORD = 1 << 9


_ATTR_OF_TYPE = np.zeros(max(TokenType) + 1, dtype=np.int32)
_ATTR_OF_TYPE[TokenType.NORMAL] = Attr.NORMAL
_ATTR_OF_TYPE[TokenType.UNKNOWN] = Attr.UNKNOWN
_ATTR_OF_TYPE[TokenType.CONTROL] = Attr.CONTROL
_ATTR_OF_TYPE[TokenType.USER_DEFINED] = Attr.USER_DEFINED
_ATTR_OF_TYPE[TokenType.UNUSED] = Attr.UNUSED
_ATTR_OF_TYPE[TokenType.BYTE] = Attr.BYTE

# Texts llama.cpp recognises when the metadata does not name the token (load(), "auto-detect").
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PRE_TEXTS = ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                  "<|code_prefix|>", "<|prefix|>")
_FIM_SUF_TEXTS = ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                  "<|code_suffix|>", "<|suffix|>")
_FIM_MID_TEXTS = ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                  "<|code_middle|>", "<|middle|>")
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~[")
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss


@dataclass
class Vocab:
    kind: str  # "spm" (tokenizer.ggml.model = llama) or "bpe" (gpt2)
    texts: list[str]
    token_to_id: dict[str, int]
    scores: list[float]
    attrs: list[int]
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    eom_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    clean_spaces: bool = False
    pre: PreTokenizer | None = None
    merge_ranks: dict[tuple[str, str], int] | None = None
    eog_ids: frozenset[int] = frozenset()
    # control / user-defined / unknown tokens, longest text first (tokenizer_st_partition order)
    special_ids: list[int] = field(default_factory=list)

    def byte_token(self, byte: int) -> int:
        """The token for one raw byte in an SPM vocabulary: <0xXX>, else the byte itself, else
        <unk> (where llama.cpp would throw)."""
        token = self.token_to_id.get(f"<0x{byte:02X}>")
        if token is None and byte < 0x80:
            token = self.token_to_id.get(chr(byte))
        if token is None:
            token = self.unk_id
        if token is None:
            raise GGUFFormatError(f"vocabulary has no token for byte 0x{byte:02X}")
        return token


def load_vocab(metadata: Mapping) -> Vocab:
    check_tokenizer_metadata(metadata)
    model = metadata.get(Keys.TOKENIZER_MODEL)
    texts = _token_texts(metadata)
    n = len(texts)
    token_to_id = _index_tokens(texts)
    # attrs stay an int32 array while loading (the passes below select tokens by attribute,
    # vectorised) and become a list at the end (per-token lookups are faster on a list).
    vocab = Vocab(kind="", texts=texts, token_to_id=token_to_id, scores=_scores(metadata, n),
                  attrs=_attrs(metadata, n))
    if model == "llama":
        _configure_spm(vocab)
    elif model == "gpt2":
        _configure_bpe(vocab, metadata)
    else:
        raise UnsupportedModelError(f"unsupported tokenizer tokenizer.ggml.model = {model!r}")
    vocab.add_space_prefix = bool(metadata.get(Keys.ADD_SPACE_PREFIX, vocab.add_space_prefix))
    _read_special_ids(vocab, metadata)
    _detect_by_text(vocab, metadata)
    vocab.special_ids = _special_tokens_longest_first(vocab)
    _apply_model_specific_attrs(vocab, metadata)
    vocab.attrs = vocab.attrs.tolist()
    return vocab


# -- token table ------------------------------------------------------------------------------

def _token_texts(metadata: Mapping) -> list[str]:
    tokens = metadata.get(Keys.TOKENS)
    if tokens is None:
        raise GGUFFormatError(f"missing {Keys.TOKENS}")
    texts = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
    if "" in texts:  # llama.cpp renames empty tokens so they can never match text
        texts = [text or f"[EMPTY_{i}]" for i, text in enumerate(texts)]
    return texts


def _index_tokens(texts: list[str]) -> dict[str, int]:
    token_to_id = dict(zip(texts, range(len(texts))))
    if len(token_to_id) != len(texts):
        seen: dict[str, int] = {}
        for i, text in enumerate(texts):
            if text in seen:
                raise GGUFFormatError(f"duplicate token in vocabulary: {text!r} has ids {seen[text]} and {i}")
            seen[text] = i
    return token_to_id


def _per_token_array(metadata: Mapping, key: str, n: int) -> np.ndarray | None:
    values = metadata.get(key)
    if values is None:
        return None
    values = np.asarray(values)
    if values.ndim != 1 or len(values) < n:
        raise GGUFFormatError(f"{key} has {values.size} entries for {n} tokens")
    return values[:n]


def _scores(metadata: Mapping, n: int) -> list[float]:
    scores = _per_token_array(metadata, Keys.SCORES, n)
    if scores is None:
        return [0.0] * n
    return scores.astype(np.float32).tolist()


def _attrs(metadata: Mapping, n: int) -> np.ndarray:
    types = _per_token_array(metadata, Keys.TOKEN_TYPE, n)
    if types is None:
        return np.full(n, Attr.NORMAL, dtype=np.int32)
    types = types.astype(np.int64)
    known = (types >= 0) & (types < len(_ATTR_OF_TYPE))
    return np.where(known, _ATTR_OF_TYPE[np.where(known, types, 0)], Attr.UNDEFINED).astype(np.int32)


# -- per model type defaults -------------------------------------------------------------------

def _configure_spm(vocab: Vocab) -> None:
    vocab.kind = "spm"
    vocab.bos_id, vocab.eos_id, vocab.unk_id = 1, 2, 0
    vocab.add_space_prefix = True
    vocab.add_bos = True


def _configure_bpe(vocab: Vocab, metadata: Mapping) -> None:
    vocab.kind = "bpe"
    merges = metadata.get(Keys.MERGES)
    if merges is None:
        raise GGUFFormatError(f"missing {Keys.MERGES}")
    vocab.merge_ranks = parse_merges(merges)
    pre = pre_tokenizer_for(metadata.get(Keys.TOKENIZER_PRE))
    vocab.pre = pre
    vocab.bos_id = None if pre.no_bos_token else 11
    vocab.eos_id = 11
    vocab.clean_spaces = pre.clean_spaces
    vocab.add_bos = pre.add_bos


def _read_special_ids(vocab: Vocab, metadata: Mapping) -> None:
    n = len(vocab.texts)
    for attr, key in (("bos_id", Keys.BOS_ID), ("eos_id", Keys.EOS_ID), ("eot_id", Keys.EOT_ID),
                      ("eom_id", Keys.EOM_ID), ("unk_id", Keys.UNK_ID), ("pad_id", Keys.PAD_ID)):
        default = getattr(vocab, attr)
        if default is not None and default >= n:
            default = None  # llama.cpp disables an out-of-range default
        value = metadata.get(key)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < n:
            default = int(value)
        setattr(vocab, attr, default)
    if Keys.ADD_BOS in metadata:
        vocab.add_bos = bool(metadata[Keys.ADD_BOS])
    if Keys.ADD_EOS in metadata:
        vocab.add_eos = bool(metadata[Keys.ADD_EOS])
    if vocab.add_bos and vocab.bos_id is None:
        raise GGUFFormatError(f"{Keys.ADD_BOS} is true, but {Keys.BOS_ID} is not set")
    if vocab.add_eos and vocab.eos_id is None:
        raise GGUFFormatError(f"{Keys.ADD_EOS} is true, but {Keys.EOS_ID} is not set")


# -- what llama.cpp infers from token texts ------------------------------------------------------

def _find_text(vocab: Vocab, candidates: tuple[str, ...]) -> int | None:
    """The lowest id among tokens spelled like one of `candidates` (llama.cpp takes whichever its
    hash map yields first; the lowest id makes our choice deterministic)."""
    ids = [vocab.token_to_id[t] for t in candidates if t in vocab.token_to_id]
    return min(ids) if ids else None


def _force_control(vocab: Vocab, token: int) -> None:
    vocab.attrs[token] |= Attr.CONTROL


def _detect_by_text(vocab: Vocab, metadata: Mapping) -> None:
    n = len(vocab.texts)

    def metadata_id(key: str) -> int | None:
        value = metadata.get(key)
        return int(value) if isinstance(value, (int, np.integer)) and 0 <= value < n else None

    if vocab.eot_id is None and (found := _find_text(vocab, _EOT_TEXTS)) is not None:
        vocab.eot_id = found
        _force_control(vocab, found)
    if vocab.eom_id is None and (found := _find_text(vocab, _EOM_TEXTS)) is not None:
        vocab.eom_id = found
        _force_control(vocab, found)
    # FIM tokens found by text become control tokens; pad/repo/file-sep also end generation.
    for keys, candidates in ((Keys.FIM_PRE_IDS, _FIM_PRE_TEXTS), (Keys.FIM_SUF_IDS, _FIM_SUF_TEXTS),
                             (Keys.FIM_MID_IDS, _FIM_MID_TEXTS)):
        if all(metadata_id(k) is None for k in keys) and (found := _find_text(vocab, candidates)) is not None:
            _force_control(vocab, found)
    fim_ids = []
    for key, candidates in ((Keys.FIM_PAD_ID, _FIM_PAD_TEXTS), (Keys.FIM_REP_ID, _FIM_REP_TEXTS),
                            (Keys.FIM_SEP_ID, _FIM_SEP_TEXTS)):
        token = metadata_id(key)
        if token is None and (token := _find_text(vocab, candidates)) is not None:
            _force_control(vocab, token)
        if token is not None:
            fim_ids.append(token)

    # Control tokens named "...unused..." are unused (reserved slots, e.g. gemma's <unused12>).
    for token in _ids_with(vocab, Attr.CONTROL):
        if "unused" in vocab.texts[token]:
            vocab.attrs[token] |= Attr.UNUSED

    eog = set(fim_ids)
    for text in _EOG_TEXTS:
        token = vocab.token_to_id.get(text)
        if token is not None:
            eog.add(token)
            _force_control(vocab, token)
    for text in _ALWAYS_RENDERED:
        token = vocab.token_to_id.get(text)
        if token is not None:
            vocab.attrs[token] = Attr.USER_DEFINED
    eog.update(t for t in (vocab.eos_id, vocab.eot_id, vocab.eom_id) if t is not None)
    _apply_eog_workarounds(vocab, eog)
    vocab.eog_ids = frozenset(eog)


def _apply_eog_workarounds(vocab: Vocab, eog: set[int]) -> None:
    """llama.cpp's two exceptions: harmony/solar-open's <|end|> and gemma4's </s> are not EOG."""
    texts = {vocab.texts[t]: t for t in eog}
    has_call = "<|call|>" in texts or "<|calls|>" in texts
    if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
        end = texts["<|end|>"]
        eog.discard(end)
        vocab.attrs[end] = Attr.USER_DEFINED
    if "<|tool_response>" in texts and "</s>" in texts:
        eos_text = texts["</s>"]
        eog.discard(eos_text)
        vocab.attrs[eos_text] = Attr.NORMAL


def _ids_with(vocab: Vocab, bits: int) -> list[int]:
    """Ids whose attributes have any of `bits` (vectorised: vocabularies reach 262k tokens)."""
    return np.flatnonzero(np.asarray(vocab.attrs) & bits).tolist()


def _special_tokens_longest_first(vocab: Vocab) -> list[int]:
    ids = _ids_with(vocab, Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN)
    # llama.cpp's std::sort leaves equal lengths in unspecified order; we keep ids ascending.
    ids.sort(key=lambda t: -len(vocab.texts[t].encode("utf-8")))
    return ids


def _apply_model_specific_attrs(vocab: Vocab, metadata: Mapping) -> None:
    """Phi-3 strips whitespace to the right of its special tokens (llama.cpp keys this on the name)."""
    name = str(metadata.get(Keys.NAME, "")).lower()
    if "phi-3" not in name and "phi3" not in name:
        return
    for token in vocab.special_ids:
        vocab.attrs[token] |= Attr.RSTRIP
    for text, strip in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
        token = vocab.token_to_id.get(text)
        if token is not None:
            vocab.attrs[token] = vocab.attrs[token] | Attr.RSTRIP if strip else vocab.attrs[token] & ~Attr.RSTRIP
