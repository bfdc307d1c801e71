"""Hostile GGUF files (issue 19): a bounded mutation campaign through every stage that reads a
model (reader/--info, tokenizer, load + chat template + two decode steps, build validation,
inspect), in workers under an address-space limit. tests/fuzz_gguf.py runs longer campaigns."""
from __future__ import annotations

from collections import Counter

import pytest

import fuzz_gguf

N_FILES = 2000


@pytest.fixture(scope="module")
def campaign():
    return fuzz_gguf.campaign(N_FILES, seed=0, jobs=2, log=None)


def test_no_crash_hang_exception_or_huge_allocation(campaign):
    failures = campaign["failures"]
    assert not failures, "\n".join(map(str, failures[:20]))


def test_every_stage_was_reached(campaign):
    outcomes: Counter = campaign["outcomes"]
    for stage in fuzz_gguf.STAGES:
        # each stage both succeeded on some mutated files and refused others with one line
        assert outcomes[f"{stage}:ok"] > 0 and outcomes[f"{stage}:error"] > 0, (stage, outcomes)
    assert outcomes["generate:ok"] >= N_FILES // 20
