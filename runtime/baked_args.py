"""The default arguments baked into an executable (`ggufile build --args`), merged with the user's.

llamafile's `.args` (cosmopolitan's LoadZipArgs): one argument per item, and a `...` item marks
where the user's own arguments go. We differ in two ways the users of a double-clicked file
expect: the baked arguments apply on every start (cosmopolitan drops them when the user passes
any and there is no `...`), and a flag the user gives always wins over the baked one, wherever
`...` stands: baked `--temp 0 ... -n 6` run as `./model -n 20 -p hi` becomes
`--temp 0 -n 20 -p hi`.
"""
from __future__ import annotations

import click

USER_ARGS = "..."

# What the run does: one of these from the user replaces all of them from the baked args,
# so a baked `--server` does not swallow the user's `-p "..."`.
MODE_PARAMS = frozenset({"prompt", "prompt_file", "chat", "server", "info", "perplexity"})


def option_table(command: click.Command) -> dict[str, tuple[str, int]]:
    """Every option string of `command` -> (the parameter it sets, how many values follow it)."""
    table = {}
    for param in command.params:
        if isinstance(param, click.Option):
            n_values = 0 if param.is_flag or param.count else param.nargs
            group = "mode" if param.name in MODE_PARAMS else param.name
            for opt in (*param.opts, *param.secondary_opts):
                table[opt] = (group, n_values)
    return table


def split_options(args: list[str], table: dict[str, tuple[str, int]]) -> list[tuple[str | None, list[str]]]:
    """Group `args` into (parameter, its tokens); tokens that are no known option stand alone."""
    groups, i = [], 0
    while i < len(args):
        token = args[i]
        name, attached = _option_name(token, table)
        if name is None:
            groups.append((None, [token]))
            i += 1
            continue
        group, n_values = table[name]
        take = 0 if attached else n_values
        groups.append((group, args[i:i + 1 + take]))
        i += 1 + take
    return groups


def _option_name(token: str, table) -> tuple[str | None, bool]:
    """(the option string `token` names, whether its value is attached: --opt=V or -nV)."""
    if token in table:
        return token, False
    if token.startswith("--") and "=" in token and token.split("=", 1)[0] in table:
        return token.split("=", 1)[0], True
    if len(token) > 2 and token[0] == "-" and token[1] != "-" and table.get(token[:2], (None, 0))[1]:
        return token[:2], True
    return None, False


def merge(baked: list[str], user: list[str], table: dict[str, tuple[str, int]]) -> list[str]:
    """The argument list a start runs with: baked args with the user's inserted at `...`
    (appended when there is none), minus the baked options the user sets himself."""
    if USER_ARGS in baked:
        cut = baked.index(USER_ARGS)
        before, after = baked[:cut], [a for a in baked[cut + 1:] if a != USER_ARGS]
    else:
        before, after = baked, []
    overridden = {group for group, _ in split_options(user, table) if group is not None}
    keep = lambda part: [tok for group, toks in split_options(part, table)
                         if group is None or group not in overridden for tok in toks]
    return keep(before) + list(user) + keep(after)
