"""Tokenizers rebuilt from GGUF metadata, token for token as llama.cpp: SentencePiece (spm), GPT-2 BPE (bpe) behind llama.cpp's pre-tokenizer regexes (pretokenize), the vocabulary (vocab)."""
