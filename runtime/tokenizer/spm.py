"""SentencePiece-style BPE over token scores, as llama.cpp's llm_tokenizer_spm_session does it.

The (already ▁-escaped) text is cut into characters; every adjacent pair whose concatenation
is a token is queued by that token's score, and the best pair (highest score, then leftmost)
is merged until nothing merges. Characters that never became part of a token fall back to
their UTF-8 bytes as <0xXX> tokens.

    >>> spm_encode("▁hi😀", token_to_id, scores, byte_token)
    [id('▁hi'), id('<0xF0>'), id('<0x9F>'), id('<0x98>'), id('<0x80>')]   # if 😀 is not a token
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence


def spm_encode(
    text: str,
    token_to_id: Mapping[str, int],
    scores: Sequence[float],
    byte_token: Callable[[int], int],
) -> list[int]:
    n = len(text)
    if n == 0:
        return []
    start = list(range(n))  # symbol i covers text[start[i]:start[i] + length[i]]
    length = [1] * n  # 0 once merged into its left neighbour
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap: list[tuple[float, int, int, int]] = []

    def queue_pair(left: int, right: int) -> None:
        if left == -1 or right == -1:
            return
        size = length[left] + length[right]
        token = token_to_id.get(text[start[left]:start[left] + size])
        if token is not None:
            # heapq is a min-heap: negate the score so the best pair pops first, leftmost on ties.
            heapq.heappush(heap, (-scores[token], left, right, size))

    for i in range(1, n):
        queue_pair(i - 1, i)

    while heap:
        _, left, right, size = heapq.heappop(heap)
        # Skip pairs where either side has merged with something else since being queued.
        if length[left] == 0 or length[right] == 0 or length[left] + length[right] != size:
            continue
        length[left] = size
        length[right] = 0
        nxt[left] = nxt[right]
        if nxt[right] != -1:
            prv[nxt[right]] = left
        queue_pair(prv[left], left)
        queue_pair(left, nxt[left])

    ids: list[int] = []
    i = 0
    while i != -1:
        piece = text[start[i]:start[i] + length[i]]
        token = token_to_id.get(piece)
        if token is not None:
            ids.append(token)
        else:
            ids.extend(byte_token(b) for b in piece.encode("utf-8"))
        i = nxt[i]
    return ids
