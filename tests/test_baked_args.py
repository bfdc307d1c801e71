"""Baked default arguments (`ggufile build --args`) merged with the user's, llamafile's `...` included."""
from __future__ import annotations

import pytest

from ggufile.runtime.baked_args import merge, option_table
from ggufile.runtime.cli import run_command

TABLE = option_table(run_command)


@pytest.mark.parametrize("baked,user,want", [
    # no `...`: the user's come last
    (["--temp", "0", "-c", "1024"], ["-p", "hi"], ["--temp", "0", "-c", "1024", "-p", "hi"]),
    # a bare start still gets the baked args
    (["--temp", "0", "...", "-n", "6"], [], ["--temp", "0", "-n", "6"]),
    # `...` marks the spot
    (["--temp", "0", "...", "-n", "6"], ["-p", "hi"], ["--temp", "0", "-p", "hi", "-n", "6"]),
    # the user's flag wins even when the baked one stands after `...`, in every spelling
    (["--temp", "0", "...", "-n", "6"], ["-n", "20"], ["--temp", "0", "-n", "20"]),
    (["--temp", "0", "...", "-n", "6"], ["--n-predict=20"], ["--temp", "0", "--n-predict=20"]),
    (["--temp=0", "-n6", "..."], ["-n", "2", "--temp", "1"], ["-n", "2", "--temp", "1"]),
    # on/off pairs are one setting
    (["--no-display-prompt", "..."], ["--display-prompt"], ["--display-prompt"]),
    # a mode from the user replaces the baked mode (a baked --server does not swallow -p)
    (["--server", "--port", "9000", "..."], ["-p", "hi"], ["--port", "9000", "-p", "hi"]),
    # flags without values, repeated `...`
    (["--chat", "...", "..."], ["-v"], ["--chat", "-v"]),
])
def test_merge(baked, user, want):
    assert merge(baked, user, TABLE) == want
