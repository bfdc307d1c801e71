"""The terminal chat (`./model --chat`, and a bare start on a terminal).

The conversation and its KV cache are kept across turns: each turn only processes the tokens
that are new. Lines starting with `/` are commands (COMMANDS below), never sent to the model.
Input: readline editing and history on a terminal; a paste keeps its newlines (bracketed
paste) and `\"\"\"` opens and closes a multi-line message anywhere, piped stdin included.
When the conversation nears the context size the oldest turns are dropped (the system prompt
stays) down to half the context, so the next turns reuse the cached prefix instead of each
one dropping and recomputing again.

Replies go to stdout; everything the REPL says itself goes to stderr, so `--chat < questions.txt
> answers.txt` keeps only the answers.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ggufile.runtime.gguf.constants import Keys
from ggufile.runtime.sampling import SamplingParams

DEFAULT_REPLY_LIMIT = 512  # tokens; a base model would otherwise run on until the context is full
MULTILINE = '"""'
MAX_SAVED_BYTES = 16 << 20
ROLES = ("system", "user", "assistant")
COMMAND_RE = re.compile(r"^/([A-Za-z?]+)(?:\s+(.*))?$", re.S)


@dataclass
class ReplyStats:
    """Figures of the last reply, for /stats."""

    prompt_tokens: int = 0
    reused_tokens: int = 0  # of prompt_tokens, found in the KV cache
    reply_tokens: int = 0
    seconds: float = 0.0  # first token to last

    @property
    def tokens_per_second(self) -> float:
        return (self.reply_tokens - 1) / self.seconds if self.seconds > 0 and self.reply_tokens > 1 else 0.0


class Conversation:
    """The system prompt and the user/assistant turns: what the chat template renders."""

    def __init__(self, system: str | None = None):
        self.system = system or None
        self.turns: list[dict] = []

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def undo(self) -> int:
        """Drop the last exchange (the last user message and what followed it); how many messages."""
        last_user = max((i for i, m in enumerate(self.turns) if m["role"] == "user"), default=None)
        if last_user is None:
            return 0
        dropped = len(self.turns) - last_user
        del self.turns[last_user:]
        return dropped

    def drop_oldest(self) -> int:
        """Drop the oldest user turn and the replies to it; how many messages went."""
        end = 1
        while end < len(self.turns) and self.turns[end]["role"] != "user":
            end += 1
        del self.turns[:end]
        return end

    def to_json(self, model: str) -> str:
        return json.dumps({"model": model, "messages": self.messages()}, ensure_ascii=False, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Conversation":
        """A saved conversation: {"messages": [...]} (what /save writes) or a bare messages list."""
        data = json.loads(text)
        messages = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError("expected {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}")
        convo = cls()
        for m in messages:
            if m["role"] == "system":
                convo.system = m["content"] or None
            else:
                convo.turns.append({"role": m["role"], "content": m["content"]})
        return convo


def has_chat_template(engine) -> bool:
    reader = getattr(engine, "reader", None)
    return reader is None or isinstance(reader.get(Keys.CHAT_TEMPLATE), str)


class ChatRepl:
    def __init__(self, engine, params: SamplingParams, system: str | None = None, n_predict: int = -1,
                 interactive: bool | None = None, stdin=None, stdout=None, stderr=None):
        self.engine = engine
        self.params = params
        self.reply_limit = n_predict if n_predict > 0 else DEFAULT_REPLY_LIMIT
        self.convo = Conversation(system)
        self.stdin = stdin or sys.stdin
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self.interactive = self.stdin.isatty() if interactive is None else interactive
        self.last = ReplyStats()
        self.running = True
        self._input = _line_editor() if self.interactive else None

    # -- the loop ----------------------------------------------------------------------------
    def run(self, banner_extra: str = "") -> None:
        if self.interactive:
            self.say(f"Chatting with {self.engine.model_name} (context {self.engine.n_ctx} tokens, replies up "
                     f"to {self.reply_limit}). /help lists the commands; Ctrl-C stops a reply, Ctrl-D quits.")
            if banner_extra:
                self.say(banner_extra)
        if not has_chat_template(self.engine):
            self.say("note: this model has no chat template (likely a base model, not tuned to chat); "
                     "its answers may ramble. -p \"text\" completes text instead.")
        while self.running:
            try:
                text = self.read_message()
            except KeyboardInterrupt:
                self.say("")
                break
            if text is None:
                break
            if not text.strip():
                continue
            command = COMMAND_RE.match(text.strip())
            if command and not text.strip().startswith("//"):
                self.command(command.group(1).lower(), (command.group(2) or "").strip())
            else:
                self.turn(text[1:] if text.startswith("//") else text)

    def say(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    # -- input -------------------------------------------------------------------------------
    def read_line(self, prompt: str) -> str | None:
        if self._input is not None:
            try:
                return self._input(prompt)
            except EOFError:
                self.say("")
                return None
        line = self.stdin.readline()
        return line.rstrip("\n") if line else None

    def read_message(self) -> str | None:
        """One message: a line (a paste may hold several), or a \"\"\"-delimited block."""
        line = self.read_line("> ")
        if line is None or not line.lstrip().startswith(MULTILINE):
            return line
        first = line.lstrip()[len(MULTILINE):]
        if first.rstrip().endswith(MULTILINE):
            return first.rstrip()[:-len(MULTILINE)]
        lines = [first] if first.strip() else []
        while True:
            more = self.read_line("... ")
            if more is None:  # EOF inside the block: send what there is
                break
            if more.rstrip().endswith(MULTILINE):
                lines.append(more.rstrip()[:-len(MULTILINE)])
                break
            lines.append(more)
        return "\n".join(lines).strip("\n")

    # -- a turn ------------------------------------------------------------------------------
    def turn(self, text: str) -> None:
        self.convo.turns.append({"role": "user", "content": text})
        ids = self.fit_context()
        if ids is None:
            self.convo.turns.pop()
            return
        reply, finish = self.generate(ids)
        self.convo.turns.append({"role": "assistant", "content": reply.strip()})
        if finish == "length":
            if len(ids) + self.last.reply_tokens >= self.engine.n_ctx:
                self.say("(the reply filled the context; older turns make room next time)")
            else:
                self.say(f"(reply stopped at {self.reply_limit} tokens; -n sets the limit)")

    def reply_room(self) -> int:
        """Tokens kept free for a reply when fitting the conversation into the context."""
        return min(self.reply_limit, self.engine.n_ctx // 4)

    def fit_context(self) -> list[int] | None:
        """Token ids of the conversation; the oldest turns are dropped if it would not fit."""
        engine, n_ctx = self.engine, self.engine.n_ctx
        ids = engine.chat_ids(self.convo.messages())
        if len(ids) + self.reply_room() <= n_ctx:
            return ids
        dropped = 0
        while len(self.convo.turns) > 1 and (len(ids) + self.reply_room() > n_ctx or len(ids) > n_ctx // 2):
            dropped += self.convo.drop_oldest()
            ids = engine.chat_ids(self.convo.messages())
        if dropped:
            kept = "; the system prompt is kept" if self.convo.system else ""
            self.say(f"(the context is nearly full: dropped the {dropped} oldest message"
                     f"{'s' if dropped > 1 else ''}{kept}; {len(ids)} of {n_ctx} tokens now in use)")
        if len(ids) >= n_ctx - 1:
            self.say(f"(this message is too long: {len(ids)} tokens with the conversation, the context holds "
                     f"{n_ctx}; start the program with a larger -c, or /reset)")
            return None
        return ids

    def generate(self, ids: list[int]) -> tuple[str, str | None]:
        """Stream the reply to stdout; returns its text and finish reason (None if interrupted)."""
        engine, parts, finish = self.engine, [], None
        stats = ReplyStats(prompt_tokens=len(ids))
        with engine.lock:  # a background server may share the engine
            stats.reused_tokens = _cached_prefix(engine, ids)
            stream = engine.generate(ids, self.params, max_tokens=self.reply_limit)
            first = None
            try:
                for chunk in stream:
                    if first is None:
                        first = time.perf_counter()
                    stats.reply_tokens += chunk.token_id is not None and chunk.finish_reason != "stop"
                    finish = chunk.finish_reason or finish
                    parts.append(chunk.text)
                    self.out.write(chunk.text)
                    self.out.flush()
            except KeyboardInterrupt:
                stream.close()
                self.say("\n(stopped)")
            if first is not None:
                stats.seconds = time.perf_counter() - first
        self.out.write("\n")
        self.out.flush()
        self.last = stats
        return "".join(parts), finish

    # -- commands ----------------------------------------------------------------------------
    def command(self, name: str, arg: str) -> None:
        entry = COMMANDS.get(ALIASES.get(name, name))
        if entry is None:
            self.say(f"unknown command /{name}; /help lists the commands (start a message with // to send a /)")
            return
        entry[0](self, arg)

    def cmd_help(self, arg: str) -> None:
        width = max(len(usage) for _, usage, _ in COMMANDS.values())
        lines = [f"  {usage:<{width}}  {text}" for _, usage, text in COMMANDS.values()]
        self.say("\n".join(["Commands:", *lines,
                            f'Multi-line: paste it, or type {MULTILINE} on a line, then the lines, then {MULTILINE}.',
                            "Up/Down browse the history; Ctrl-C stops a reply; Ctrl-D quits."]))

    def cmd_exit(self, arg: str) -> None:
        self.running = False

    def cmd_reset(self, arg: str) -> None:
        self.convo.turns = []
        self.say("(conversation cleared" + ("; the system prompt is kept)" if self.convo.system else ")"))

    def cmd_undo(self, arg: str) -> None:
        dropped = self.convo.undo()
        if not dropped:
            self.say("(nothing to undo)")
            return
        with self.engine.lock:  # the undone turn's keys/values leave the cache too
            keep = getattr(self.engine, "keep_prefix", None)
            if keep is not None:
                keep(self.engine.chat_ids(self.convo.messages()))
        self.say(f"(removed the last exchange: {dropped} message{'s' if dropped > 1 else ''})")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            self.say(f"system prompt: {self.convo.system}" if self.convo.system
                     else "(no system prompt; /system TEXT sets one)")
            return
        self.convo.system = arg
        self.say("(system prompt set; it applies from the next reply)")

    def cmd_stats(self, arg: str) -> None:
        s = self.last
        in_context = len(self.engine.chat_ids(self.convo.messages())) if self.convo.turns or self.convo.system else 0
        self.say(f"context: {in_context} of {self.engine.n_ctx} tokens in use")
        if s.prompt_tokens:
            self.say(f"last reply: {s.reply_tokens} tokens in {s.seconds:.2f} s, {s.tokens_per_second:.1f} tokens/s; "
                     f"prompt {s.prompt_tokens} tokens ({s.reused_tokens} reused from the cache)")

    def cmd_context(self, arg: str) -> None:
        messages = self.convo.messages()
        used = len(self.engine.chat_ids(messages)) if messages else 0
        self.say(f"context: {used} of {self.engine.n_ctx} tokens in use by {len(messages)} message"
                 f"{'' if len(messages) == 1 else 's'}; replies take up to {self.reply_limit} tokens")
        for m in messages:
            n = len(self.engine.tokenize(m["content"], add_special=False))
            preview = " ".join(m["content"].split())
            preview = preview if len(preview) <= 60 else preview[:57] + "..."
            self.say(f"  {m['role']:<9} {n:>5} tokens  {preview}")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            self.say("usage: /save FILE")
            return
        try:
            Path(arg).expanduser().write_text(self.convo.to_json(self.engine.model_name) + "\n", encoding="utf-8")
        except OSError as err:
            self.say(f"cannot write {arg}: {err.strerror or err}")
            return
        self.say(f"(saved {len(self.convo.messages())} messages to {arg})")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            self.say("usage: /load FILE")
            return
        path = Path(arg).expanduser()
        try:
            if path.stat().st_size > MAX_SAVED_BYTES:
                raise ValueError(f"larger than {MAX_SAVED_BYTES >> 20} MiB")
            convo = Conversation.from_json(path.read_text(encoding="utf-8"))
        except OSError as err:
            self.say(f"cannot read {arg}: {err.strerror or err}")
            return
        except (ValueError, UnicodeDecodeError) as err:  # json errors are ValueErrors
            self.say(f"{arg} is not a saved conversation: {err}")
            return
        self.convo = convo
        self.say(f"(loaded {len(convo.messages())} messages from {arg})")


# name -> (handler, usage, what it does): /help prints them in this order.
COMMANDS = {
    "help": (ChatRepl.cmd_help, "/help", "this list"),
    "undo": (ChatRepl.cmd_undo, "/undo", "remove the last question and its answer"),
    "reset": (ChatRepl.cmd_reset, "/reset", "start over (keeps the system prompt)"),
    "system": (ChatRepl.cmd_system, "/system TEXT", "set the system prompt (without TEXT: show it)"),
    "stats": (ChatRepl.cmd_stats, "/stats", "tokens in the context, speed of the last reply"),
    "context": (ChatRepl.cmd_context, "/context", "what the context holds, message by message"),
    "save": (ChatRepl.cmd_save, "/save FILE", "write the conversation to FILE (JSON)"),
    "load": (ChatRepl.cmd_load, "/load FILE", "read a conversation written by /save"),
    "exit": (ChatRepl.cmd_exit, "/exit", "quit (also /quit, Ctrl-D)"),
}
ALIASES = {"quit": "exit", "q": "exit", "?": "help", "clear": "reset"}


def _cached_prefix(engine, ids: list[int]) -> int:
    probe = getattr(engine, "cached_prefix", None)
    return probe(ids) if probe is not None else 0


def _line_editor():
    """input() with GNU readline's editing and history where the platform has it; a paste keeps
    its newlines in one message (bracketed paste, which CPython switches off by default)."""
    try:
        import readline
    except ImportError:  # e.g. Windows: plain input()
        return input
    if "libedit" not in (getattr(readline, "__doc__", "") or ""):
        readline.parse_and_bind("set enable-bracketed-paste on")
    return input


def chat(engine, params: SamplingParams, system: str | None, n_predict: int, banner_extra: str = "") -> None:
    ChatRepl(engine, params, system, n_predict).run(banner_extra)
