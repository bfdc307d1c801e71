"""Tokenizer: identical ids to llama.cpp on the real models, plus behaviour on tiny hand-built vocabularies."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import load_reference

from ggufile.runtime.gguf.constants import Keys, TokenType
from ggufile.runtime.errors import UnsupportedModelError
from ggufile.runtime.tokenizer.pretokenize import BYTE_TO_CHAR, PRE_TOKENIZERS, byte_level_encode, split_words
from ggufile.runtime.tokenizer.tokenizer import StreamDecoder, Tokenizer

MODELS = ("smollm2", "gemma3")
REFERENCES = {name: load_reference(name) for name in MODELS}


def _reference_cases(kind: str):
    return [
        pytest.param(name, i, id=f"{name}-{kind}-{i}")
        for name in MODELS
        for i in range(len(REFERENCES[name][kind]))
    ]


@pytest.fixture(scope="session")
def real_tokenizers(smollm2_path, gemma3_path) -> dict[str, Tokenizer]:
    from ggufile.runtime.gguf.reader import GGUFReader

    return {name: Tokenizer.from_metadata(GGUFReader(path).metadata)
            for name, path in (("smollm2", smollm2_path), ("gemma3", gemma3_path))}


# -- llama.cpp reference ids ---------------------------------------------------------------------

@pytest.mark.real_model
@pytest.mark.parametrize("name, index", _reference_cases("tokenize") + _reference_cases("tokenize_special"))
def test_encode_matches_llama_cpp(real_tokenizers, name, index):
    ref = REFERENCES[name]
    case = (ref["tokenize"] + ref["tokenize_special"])[index]
    tok = real_tokenizers[name]
    assert tok.encode(case["text"], add_special=case["add_bos"], parse_special=case["parse_special"]) == case["ids"]


@pytest.mark.real_model
@pytest.mark.parametrize("name", MODELS)
def test_generation_prompts_and_texts_match_llama_cpp(real_tokenizers, name):
    tok = real_tokenizers[name]
    for case in REFERENCES[name]["generate"]:
        assert tok.encode(case["prompt"], parse_special=True) == case["prompt_ids"]
        assert tok.decode(case["greedy_ids"], skip_special=True) == case["greedy_text"]
        assert tok.decode(case["greedy_ids"][:8], skip_special=True) == case["greedy_text_8"]


@pytest.mark.real_model
@pytest.mark.parametrize("name", MODELS)
def test_reference_ids_decode_back_to_their_text(real_tokenizers, name):
    tok = real_tokenizers[name]
    ref = REFERENCES[name]
    for case in ref["tokenize"]:
        assert tok.decode(case["ids"], skip_special=True) == case["text"]
    for case in ref["tokenize_special"]:
        assert tok.decode(case["ids"]) == case["text"]


@pytest.mark.real_model
def test_real_model_special_ids(real_tokenizers):
    smollm, gemma = real_tokenizers["smollm2"], real_tokenizers["gemma3"]
    assert (smollm.bos_id, smollm.eos_id, smollm.add_bos, smollm.vocab_size) == (1, 2, False, 49152)
    assert (gemma.bos_id, gemma.eos_id, gemma.add_bos, gemma.vocab_size) == (2, 1, True, 262144)
    # <|endoftext|>, <|im_end|>, and <reponame>, which llama.cpp takes for a FIM repo token
    assert smollm.eog_ids == {0, 2, 4}
    # <eos>, <end_of_turn>, and </s> (on llama.cpp's list of end-of-generation texts)
    assert gemma.eog_ids == {1, 106, 212}
    assert gemma.is_control(106) and not gemma.is_control(9259)
    assert gemma.token_to_piece(248) == b"\n"  # <0x0A>
    assert smollm.token_to_piece(905) == b" world"


@pytest.mark.real_model
def test_real_stream_decoder_holds_back_split_emoji(real_tokenizers):
    tok = real_tokenizers["smollm2"]
    ids = tok.encode("👋!")  # byte-level BPE splits the emoji across tokens
    decoder = StreamDecoder(tok)
    pieces = [decoder.feed(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == "👋!"
    assert all("\ufffd" not in p for p in pieces)


# -- tiny SentencePiece vocabulary ---------------------------------------------------------------

def spm_metadata(extra_tokens: list[tuple[str, float, TokenType]], **metadata) -> dict:
    """<unk> <s> </s>, 256 byte tokens, then `extra_tokens` (text, score, type)."""
    entries = [("<unk>", 0.0, TokenType.UNKNOWN), ("<s>", 0.0, TokenType.CONTROL), ("</s>", 0.0, TokenType.CONTROL)]
    entries += [(f"<0x{b:02X}>", 0.0, TokenType.BYTE) for b in range(256)]
    entries += extra_tokens
    return {
        Keys.TOKENIZER_MODEL: "llama",
        Keys.TOKENS: [t for t, _, _ in entries],
        Keys.SCORES: np.array([s for _, s, _ in entries], dtype=np.float32),
        Keys.TOKEN_TYPE: np.array([int(k) for _, _, k in entries], dtype=np.int32),
        **metadata,
    }


N = TokenType.NORMAL
SPM_WORDS = [("▁", -1.0, N), ("h", -2.0, N), ("e", -2.0, N), ("l", -2.0, N), ("o", -2.0, N), ("he", -3.0, N),
             ("ll", -3.0, N), ("llo", -4.0, N), ("hello", -5.0, N), ("▁hello", -6.0, N),
             ("a", -2.0, N), ("b", -2.0, N), ("c", -2.0, N), ("ab", -1.5, N), ("bc", -1.0, N), ("aa", -1.0, N),
             ("<start>", 0.0, TokenType.CONTROL), ("<user>", 0.0, TokenType.USER_DEFINED)]


@pytest.fixture
def spm() -> Tokenizer:
    return Tokenizer.from_metadata(spm_metadata(SPM_WORDS))


def ids_of(tok: Tokenizer, *texts: str) -> list[int]:
    index = {tok.token_text(i): i for i in range(tok.vocab_size)}
    return [index[t] for t in texts]


def test_spm_defaults_add_bos_and_space_prefix(spm):
    assert spm.add_bos and spm.bos_id == 1 and spm.eos_id == 2
    assert spm.encode("hello") == [1] + ids_of(spm, "▁hello")
    assert spm.encode("hello", add_special=False) == ids_of(spm, "▁hello")


def test_spm_add_space_prefix_off():
    tok = Tokenizer.from_metadata(spm_metadata(SPM_WORDS, **{Keys.ADD_SPACE_PREFIX: False}))
    assert tok.encode("hello", add_special=False) == ids_of(tok, "hello")


def test_spm_merges_highest_score_first_not_leftmost(spm):
    # "bc" (-1.0) beats "ab" (-1.5) although "ab" comes first.
    assert spm.encode("abc", add_special=False)[1:] == ids_of(spm, "a", "bc")


def test_spm_equal_scores_merge_leftmost_first(spm):
    assert spm.encode("aaa", add_special=False)[1:] == ids_of(spm, "aa", "a")


def test_spm_byte_fallback_for_unknown_characters(spm):
    assert spm.encode("é", add_special=False) == ids_of(spm, "▁", "<0xC3>", "<0xA9>")
    assert spm.decode(spm.encode("é", add_special=False)) == "é"  # the prefix space is stripped


def test_spm_decode_strips_the_prefix_space_like_llama_cpp(spm):
    # llama.cpp strips one leading space from the first piece only, and (sic) not at all when
    # it removed a leading BOS.
    ids = spm.encode("hello")
    assert spm.decode(ids) == "<s> hello"
    assert spm.decode(ids, skip_special=True) == " hello"
    assert spm.decode(ids[1:]) == "hello"


def test_spm_empty_text(spm):
    assert spm.encode("") == [1]
    assert spm.encode("", add_special=False) == []
    assert spm.decode([]) == ""


def test_spm_parse_special_on_and_off(spm):
    start = ids_of(spm, "<start>")[0]
    as_text = spm.encode("<start>hello", add_special=False, parse_special=False)
    assert start not in as_text and spm.decode(as_text) == "<start>hello"
    # As a control token it splits the text, and the text after it gets the space prefix again.
    assert spm.encode("<start>hello", add_special=False, parse_special=True) == [start] + ids_of(spm, "▁hello")


def test_spm_user_defined_tokens_match_even_without_parse_special(spm):
    user = ids_of(spm, "<user>")[0]
    # Any token cut out of the text counts as special: the text after it gets the prefix space.
    assert spm.encode("hello<user>hello", add_special=False) == ids_of(spm, "▁hello") + [user] + ids_of(spm, "▁hello")


def test_token_to_piece_and_control_rendering(spm):
    assert spm.token_to_piece(ids_of(spm, "▁hello")[0]) == b" hello"
    assert spm.token_to_piece(3 + 0x0A) == b"\n"
    start = ids_of(spm, "<start>")[0]
    assert spm.token_to_piece(start) == b"<start>"
    assert spm.token_to_piece(start, special=False) == b""
    assert spm.is_control(start) and not spm.is_control(ids_of(spm, "hello")[0])


def test_stream_decoder_holds_back_partial_utf8(spm):
    emoji_bytes = [3 + b for b in "😀".encode()]
    decoder = StreamDecoder(spm)
    assert [decoder.feed(t) for t in emoji_bytes] == ["", "", "", "😀"]
    e_acute = [3 + b for b in "é".encode()]
    assert decoder.feed(e_acute[0]) == ""
    assert decoder.feed(ids_of(spm, "▁hello")[0]) == "\ufffd hello"  # a broken sequence is not swallowed
    assert decoder.flush() == ""


def test_stream_decoder_flush_reports_an_incomplete_character(spm):
    decoder = StreamDecoder(spm)
    assert decoder.feed(3 + 0xF0) == "" and decoder.feed(3 + 0x9F) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.feed(ids_of(spm, "hello")[0]) == "hello"


# -- tiny GPT-2 byte-level BPE vocabulary ----------------------------------------------------------

def bpe_metadata(pre: str, merges: list[str], extra: list[str] = (), special: list[str] = (), **metadata) -> dict:
    """All 256 byte-level characters, the merge results, `extra` normal tokens, then control `special`."""
    tokens = list(BYTE_TO_CHAR)
    for merge in merges:
        left, right = merge.split(" ")
        if left + right not in tokens:
            tokens.append(left + right)
    tokens += [t for t in extra if t not in tokens]
    types = [TokenType.NORMAL] * len(tokens) + [TokenType.CONTROL] * len(special)
    tokens += special
    return {
        Keys.TOKENIZER_MODEL: "gpt2",
        Keys.TOKENIZER_PRE: pre,
        Keys.TOKENS: tokens,
        Keys.TOKEN_TYPE: np.array([int(t) for t in types], dtype=np.int32),
        Keys.MERGES: merges,
        **metadata,
    }


HELLO_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]


def bpe(pre="gpt-2", merges=HELLO_MERGES, **kw) -> Tokenizer:
    return Tokenizer.from_metadata(bpe_metadata(pre, merges, **kw))


def test_bpe_merges_by_rank_over_byte_level_words():
    tok = bpe()
    assert tok.encode("hello world") == ids_of(tok, "hello", "Ġworld")
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_bpe_lowest_rank_merges_first():
    # "b c" outranks "a b": abc -> a + bc, although "ab" is leftmost.
    tok = bpe(merges=["b c", "a b"])
    assert tok.encode("abc") == ids_of(tok, "a", "bc")


def test_bpe_characters_outside_merges_stay_as_byte_level_tokens():
    tok = bpe()
    assert tok.encode("é") == ids_of(tok, *byte_level_encode("é"))
    assert tok.decode(tok.encode("é!")) == "é!"


def test_bpe_llama3_ignore_merges_takes_whole_word_tokens_and_adds_bos():
    # "Ġhello" is a token but no merge builds it: llama3 takes it whole, gpt-2 cannot.
    kw = dict(merges=["h e"], extra=["Ġhello"], special=["<|begin_of_text|>"])
    plain = Tokenizer.from_metadata(bpe_metadata("gpt-2", **kw))
    bos = plain.vocab_size - 1
    llama3 = Tokenizer.from_metadata(bpe_metadata("llama3", **kw, **{Keys.BOS_ID: bos}))
    assert llama3.add_bos and llama3.encode(" hello") == [bos] + ids_of(llama3, "Ġhello")
    assert not plain.add_bos and plain.encode(" hello") == ids_of(plain, "Ġ", "he", "l", "l", "o")


def test_bpe_parse_special_and_eog_detection():
    tok = bpe(special=["<|im_start|>"], extra=["<|im_end|>"], **{Keys.EOS_ID: 0})
    start, end = ids_of(tok, "<|im_start|>", "<|im_end|>")
    assert tok.encode("<|im_start|>hi<|im_end|>", parse_special=True) == [start] + ids_of(tok, "h", "i") + [end]
    assert start not in tok.encode("<|im_start|>hi", parse_special=False)
    # <|im_end|> is typed NORMAL here: llama.cpp still makes it a control, end-of-generation token.
    assert end in tok.eog_ids and tok.is_control(end) and 0 in tok.eog_ids


def test_bpe_decode_cleans_up_spaces_for_gpt2_but_not_smollm():
    text = "a , b ' c 's"
    gpt2, smollm = bpe("gpt-2"), bpe("smollm")
    assert gpt2.decode(gpt2.encode(text)) == "a, b'c's"
    assert smollm.decode(smollm.encode(text)) == text


def test_unknown_tokenizer_or_pre_tokenizer_is_unsupported():
    with pytest.raises(UnsupportedModelError):
        Tokenizer.from_metadata(bpe_metadata("no-such-pre", HELLO_MERGES))
    with pytest.raises(UnsupportedModelError):
        Tokenizer.from_metadata({**spm_metadata([]), Keys.TOKENIZER_MODEL: "t5"})


# -- pre-tokenizer regexes -------------------------------------------------------------------------

def test_gpt2_split_keeps_one_space_for_the_next_word():
    assert split_words("Hello  world!!  \n", PRE_TOKENIZERS["gpt-2"].regexes) == \
        ["Hello", " ", " world", "!!", "  \n"]
    assert split_words("I'm  ok", PRE_TOKENIZERS["gpt-2"].regexes) == ["I", "'m", " ", " ok"]


def test_smollm_splits_every_digit():
    assert split_words("abc 1234", PRE_TOKENIZERS["smollm"].regexes) == ["abc", " ", "1", "2", "3", "4"]


def test_llama3_groups_digits_by_three_and_keeps_newlines_together():
    words = split_words("x 1234567\n\n  y", PRE_TOKENIZERS["llama3"].regexes)
    assert words == ["x", " ", "123", "456", "7", "\n\n", " ", " y"]


def test_qwen2_splits_single_digits_via_the_collapsed_regex():
    assert split_words("Año 2024", PRE_TOKENIZERS["qwen2"].regexes) == ["Año", " ", "2", "0", "2", "4"]


def test_default_pre_tokenizer_groups_punctuation_first():
    assert split_words("hi!!? 12345", PRE_TOKENIZERS["default"].regexes) == ["hi", "!!?", " ", "123", "45"]


def test_opening_imports_and_compiles_no_regex_or_jinja2():
    """Engine.open's imports and an SPM tokenizer build need neither `regex` nor jinja2: they
    load (and their patterns / templates compile) on first use."""
    import subprocess
    import sys

    code = ("import sys; import ggufile.runtime.engine, ggufile.runtime.tokenizer.tokenizer, ggufile.runtime.model.transformer; "
            "print(sorted(m for m in ('regex', 'jinja2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
