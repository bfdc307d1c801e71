"""Tool calling: OpenAI's `tools` / `tool_choice` / `parallel_tool_calls` in, the model's own
tool-call syntax out, parsed back into OpenAI `tool_calls`.

- Rendering: a template that knows tools (it reads the `tools` variable) gets them, with the
  assistants' tool_calls and the tool results as data. Other templates (SmolLM2's, gemma's) get
  the Hermes convention spelled out in a system message: the tools as JSON inside <tools>, calls
  written <tool_call>{"name": ..., "arguments": ...}</tool_call>, results in <tool_response>.
- Parsing: Hermes/Qwen <tool_call> JSON, Llama 3.x bare JSON ({"name", "parameters"}, after an
  optional <|python_tag|>) and Mistral [TOOL_CALLS] (a JSON list, or name[ARGS]{...}).
- Enforcing: tool_choice "required" or a named function becomes a grammar (constrained.py) over
  the model's call syntax and each function's parameter schema, so the call always parses.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from ggufile.runtime.server.schema import Constraint, bad_param

MAX_TOOLS = 128

HERMES_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
    "about what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a JSON object with the function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-dict>}}\n"
    "</tool_call>")

# The call syntaxes: how each opens, recognised in a template's source (the first that matches).
SYNTAXES = (
    ("hermes", "<tool_call>"),
    ("mistral", "[TOOL_CALLS]"),
    ("llama3", "<|python_tag|>"),
)


@dataclass(frozen=True)
class ToolSpec:
    """The request's tools: the functions, what the model must do with them, how many at once."""

    functions: tuple[dict, ...]  # OpenAI's {"name", "description", "parameters"}
    choice: str  # "none", "auto", "required" or "named"
    named: str | None = None
    parallel: bool = True

    @property
    def names(self) -> set[str]:
        return {f["name"] for f in self.functions}

    def openai_tools(self) -> list[dict]:
        return [{"type": "function", "function": f} for f in self.functions]


# -- request parsing ---------------------------------------------------------------------------

def parse_tools(body: dict) -> ToolSpec | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools in (None, []):
        if choice not in (None, "none", "auto"):
            raise bad_param("tool_choice", "'tool_choice' needs 'tools'")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad_param("tools", f"'tools' must be a list of at most {MAX_TOOLS} functions", "invalid_type")
    functions = tuple(_function(i, t) for i, t in enumerate(tools))
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise bad_param("tools", "'tools' names must be unique")
    named = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        named = fn.get("name") if isinstance(fn, dict) else None
        if named not in names:
            raise bad_param("tool_choice", "'tool_choice' must name one of the tools")
        choice = "named"
    elif choice not in ("none", "auto", "required"):
        raise bad_param("tool_choice", "'tool_choice' must be none, auto, required or {\"type\": \"function\", ...}")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad_param("parallel_tool_calls", "'parallel_tool_calls' must be a boolean", "invalid_type")
    return ToolSpec(functions, choice, named, parallel)


_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # OpenAI's rule; also keeps markup out of templates


def _function(i: int, tool) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(
            tool.get("function"), dict):
        raise bad_param(where, f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}", "invalid_type")
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise bad_param(where, f"'{where}.function.name' must be 1-64 letters, digits, _ . -")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        raise bad_param(where, f"'{where}.function.parameters' must be a JSON schema object", "invalid_type")
    out = {"name": name, "parameters": params}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    return out


def parse_tool_calls(where: str, calls) -> list[dict]:
    """An assistant message's tool_calls, arguments decoded to objects (templates expect them so)."""
    if not isinstance(calls, list):
        raise bad_param(where, f"'{where}' must be a list", "invalid_type")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _NAME_RE.fullmatch(fn["name"]):
            raise bad_param(f"{where}[{j}]", f"'{where}[{j}]' must be a function call with a valid name",
                            "invalid_type")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise bad_param(f"{where}[{j}]", f"'{where}[{j}].function.arguments' is not JSON") from None
        out.append({"id": str(call.get("id") or new_call_id()), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# -- rendering ---------------------------------------------------------------------------------

def template_knows_tools(source: str) -> bool:
    return "tools" in source


def syntax_of(source: str) -> str:
    for name, marker in SYNTAXES:
        if marker in source:
            return name
    return "hermes"


def messages_for_template(messages: list[dict], spec: ToolSpec | None, native: bool) -> list[dict]:
    """The messages as the template should see them. Native: unchanged (the template renders
    tool_calls and tool results itself). Otherwise the Hermes convention in plain text."""
    if native:
        return messages
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                            "arguments": c["function"]["arguments"]},
                                                           ensure_ascii=False) + "\n</tool_call>"
                              for c in m["tool_calls"])
            text = (m.get("content") or "") + ("\n" if m.get("content") else "") + calls
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content")})
    if spec is not None and spec.choice != "none":
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in spec.openai_tools())
        prompt = HERMES_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# -- enforcing ---------------------------------------------------------------------------------

def call_grammar(spec: ToolSpec, syntax: str) -> Constraint | None:
    """For required / named: a Lark grammar (llguidance) whose every sentence is a valid call."""
    if spec.choice not in ("required", "named"):
        return None
    functions = [f for f in spec.functions if spec.choice != "named" or f["name"] == spec.named]
    args_key = "parameters" if syntax == "llama3" else "arguments"
    one_of = [{"type": "object", "additionalProperties": False, "required": ["name", args_key],
               "properties": {"name": {"const": f["name"]}, args_key: f["parameters"]}} for f in functions]
    body = json.dumps({"oneOf": one_of, "x-guidance": {"whitespace_flexible": False}})
    if syntax == "mistral":
        many = "call (\", \" call)*" if spec.parallel else "call"
        lark = f'start: "[TOOL_CALLS][" {many} "]"\ncall: %json {body}\n'
    elif syntax == "llama3":
        lark = f"start: %json {body}\n"
    else:
        many = 'call ("\\n" call)*' if spec.parallel else "call"
        lark = f'start: {many}\ncall: "<tool_call>\\n" %json {body} "\\n</tool_call>"\n'
    return Constraint("lark", lark, "tool_choice")


# -- parsing the output ------------------------------------------------------------------------

_HERMES_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_MISTRAL_ARGS_RE = re.compile(r"\s*([A-Za-z0-9_.-]+)\[ARGS\]")


def parse_output(text: str, spec: ToolSpec) -> tuple[str, list[dict]]:
    """(content, OpenAI tool_calls) from the model's text. Calls naming unknown functions, or
    that do not parse, stay in the content: nothing the model wrote is dropped."""
    candidates: list[tuple[str, dict]] = []
    content = text
    if "<tool_call>" in text:
        content = text[:text.index("<tool_call>")]
        candidates = [c for m in _HERMES_RE.finditer(text) for c in _call_objects(m.group(1))]
    elif "[TOOL_CALLS]" in text:
        content, rest = text.split("[TOOL_CALLS]", 1)
        candidates = _mistral_calls(rest)
    else:
        stripped = text.strip()
        if stripped.startswith("<|python_tag|>"):
            stripped = stripped[len("<|python_tag|>"):]
        if stripped.startswith(("{", "[")):
            candidates = _call_objects(stripped)
            content = "" if candidates else text
    calls = [_openai_call(name, args) for name, args in candidates if name in spec.names]
    if not calls or len(calls) != len(candidates):
        return text, []
    if not spec.parallel:
        calls = calls[:1]
    return content.strip(), calls


def _call_objects(raw: str) -> list[tuple[str, dict]]:
    try:
        value = json.loads(raw)
    except ValueError:
        return [("", {})]  # a call that does not parse: keeps the whole text as content
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return [("", {})]
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return [("", {})]
        out.append((item["name"], args))
    return out


def _mistral_calls(rest: str) -> list[tuple[str, dict]]:
    m = _MISTRAL_ARGS_RE.match(rest)
    if m:  # the newer form: name[ARGS]{...}
        try:
            return [(m.group(1), json.loads(rest[m.end():].strip()))]
        except ValueError:
            return [("", {})]
    return _call_objects(rest.strip())


def _openai_call(name: str, args) -> dict:
    return {"id": new_call_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


class CallSplitter:
    """Streaming: passes content through, holds back from the first sign of a tool call on
    (a marker, or output opening with JSON) so calls can be parsed whole at the end."""

    MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")

    def __init__(self):
        self.held = ""
        self.in_call = False
        self.started = False  # some content went out

    def feed(self, text: str) -> str:
        self.held += text
        if self.in_call:
            return ""
        if not self.started:
            lead = self.held.lstrip()
            if not lead:
                return ""
            if lead[0] in "{[":
                self.in_call = True
                return ""
        cut = min((i for i in (self.held.find(m) for m in self.MARKERS) if i >= 0), default=-1)
        if cut >= 0:
            out, self.held, self.in_call = self.held[:cut], self.held[cut:], True
        else:
            hold = max((_overlap(self.held, m) for m in self.MARKERS), default=0)
            out, self.held = self.held[:len(self.held) - hold], self.held[len(self.held) - hold:]
        self.started = self.started or bool(out)
        return out

    def finish(self, spec: ToolSpec) -> tuple[str, list[dict]]:
        """(content still to send, the calls)."""
        content, calls = parse_output(self.held, spec)
        return (content if calls else self.held), calls


def _overlap(text: str, marker: str) -> int:
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
