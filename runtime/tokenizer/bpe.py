"""GPT-2 byte-level BPE, merge for merge the way llama.cpp's llm_tokenizer_bpe_session does it.

Each pre-tokenizer word is spelled in GPT-2's byte-level alphabet, cut into characters, and
the adjacent pair with the lowest merge rank is merged until none is left (ties: leftmost
first). A min-heap of candidate pairs keeps this O(n log n); a popped pair is skipped when
either side has changed since it was queued.

    >>> bpe = BPE({"Ġ": 0, "w": 1, "o": 2, "Ġw": 3, "Ġwo": 4}, {("Ġ", "w"): 0, ("Ġw", "o"): 1}, False)
    >>> bpe.encode_word("Ġwo"), bpe.encode_word("woo")
    ([4], [1, 2, 2])
"""
from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

_WORD_CACHE_LIMIT = 1 << 16


def parse_merges(merges: Sequence[str]) -> dict[tuple[str, str], int]:
    """`tokenizer.ggml.merges` ("a b" per line) -> {(a, b): rank}; the first occurrence wins.

    The split is at the first space after position 0, as llama.cpp does, so a merge whose
    left side is itself a space still parses: parse_merges(["Ġ t", "  x"]) ==
    {("Ġ", "t"): 0, (" ", "x"): 1}.
    """
    pairs = []
    for line in merges:
        left, _, right = line[1:].partition(" ")
        pairs.append((line[:1] + left, right))
    # Built back to front so the first occurrence of a duplicated pair keeps its rank.
    return dict(zip(reversed(pairs), range(len(pairs) - 1, -1, -1)))


class BPE:
    def __init__(self, token_to_id: Mapping[str, int], ranks: Mapping[tuple[str, str], int], ignore_merges: bool):
        self.token_to_id = token_to_id
        self.ranks = ranks
        self.ignore_merges = ignore_merges
        self._cache: dict[str, list[int]] = {}

    def encode_word(self, word: str) -> list[int]:
        """Token ids of one byte-level-encoded word (cached: the result depends on the word only)."""
        ids = self._cache.get(word)
        if ids is None:
            if len(self._cache) >= _WORD_CACHE_LIMIT:
                self._cache.clear()
            ids = self._cache[word] = self._ids_for(self._merge(word))
        return ids

    def _merge(self, word: str) -> list[str]:
        if self.ignore_merges and word in self.token_to_id:
            return [word]
        n = len(word)
        if n < 2:
            return [word] if word else []
        pieces = list(word)  # the text of each symbol; "" once merged into its left neighbour
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        ranks = self.ranks
        heap: list[tuple[int, int, int, str]] = []

        def push(left: int, right: int) -> None:
            if left == -1 or right == -1:
                return
            rank = ranks.get((pieces[left], pieces[right]))
            if rank is not None:
                heap.append((rank, left, right, pieces[left] + pieces[right]))

        for i in range(1, n):
            push(i - 1, i)
        heapq.heapify(heap)

        while heap:
            rank, left, right, text = heapq.heappop(heap)
            left_text, right_text = pieces[left], pieces[right]
            if not left_text or not right_text or left_text + right_text != text:
                continue  # stale: one side changed since this pair was queued
            pieces[left] = text
            pieces[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] != -1:
                prv[nxt[right]] = left
            for a, b in ((prv[left], left), (left, nxt[left])):
                if a != -1 and b != -1:
                    r = ranks.get((pieces[a], pieces[b]))
                    if r is not None:
                        heapq.heappush(heap, (r, a, b, pieces[a] + pieces[b]))
        return [p for p in pieces if p]

    def _ids_for(self, symbols: list[str]) -> list[int]:
        ids = []
        for symbol in symbols:
            token = self.token_to_id.get(symbol)
            if token is not None:
                ids.append(token)
                continue
            # Not a token: llama.cpp looks up each UTF-8 byte as a one-byte string, which only
            # ever finds ASCII characters; the other bytes are dropped.
            for byte in symbol.encode("utf-8"):
                if byte < 0x80:
                    token = self.token_to_id.get(chr(byte))
                    if token is not None:
                        ids.append(token)
        return ids

