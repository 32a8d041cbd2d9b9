"""Tool calling in /v1/chat/completions: OpenAI `tools` into the chat template, the model's call text back out.

What vLLM does with `--tool-call-parser`, in one place:
- A request's `tools` are checked (each {"type": "function", "function": {"name", "description"?,
  "parameters"?}}) and handed to the model's Jinja template as `tools`, as transformers' apply_chat_template
  does. Assistant messages that carry `tool_calls` and "tool" messages (tool_call_id, content) pass through; a
  call's `arguments` (a JSON string in OpenAI's API) becomes a dict, the shape templates index into
  (transformers' docs; vLLM converts the same way).
- The generated text is parsed back into `tool_calls` by the server's parser (`--tool_call_parser`):
    hermes       `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, once or more (Qwen2.5, Hermes);
    llama3_json  a JSON object {"name": ..., "parameters": {...}} (optionally after `<|python_tag|>`), several
                 separated by ";" (Llama-3.1/3.2);
    none         never parse;
    auto         (default) picks from the template's text: `<tool_call>` -> hermes, `<|python_tag|>` or
                 "parameters" -> llama3_json, else none.
  Text that does not parse (bad JSON, an unclosed tag, no "name") stays plain content, never an error.
- tool_choice: "auto" (parse), "none" (the template still sees the tools, as vLLM's default, but nothing is
  parsed), "required" and {"type": "function", "function": {"name": ...}} are enforced with the guided
  decoding that exists (infer/constrained.py): the output must be JSON matching a schema built from the tools
  (named: the function's `parameters`; required: a list of {"name", "parameters"}), as vLLM does. A named
  choice answers finish_reason "stop" (OpenAI's behaviour for a forced function), the others "tool_calls".

Usage (server side, see chat_completions.py):
    plan = tool_plan(req, state.config.tool_call_parser, template_source)   # 400s for bad tools / tool_choice
    content, calls = plan.parse(text)     # calls: [{"id", "type": "function", "function": {"name", "arguments"}}]
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from lmstack.serve.errors import APIError

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's function-name rule (plus '.', as vLLM allows)


def _call(name: str, arguments: Any) -> dict:
    """One OpenAI tool call; arguments always leave as a JSON string."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}


def _named_call(obj: Any, arg_keys: tuple[str, ...]) -> dict | None:
    """{"name": str, <one of arg_keys>: object} -> a call; anything else -> None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in arg_keys if k in obj), {})
    return _call(obj["name"], args) if isinstance(args, dict) else None


# -- parsers: text -> (content, calls), or None when the text holds no (well-formed) call -------------------
Parsed = tuple[str | None, list[dict]]
PARSERS: dict[str, Callable[[str], Parsed | None]] = {}
# Where a call may begin: streaming holds text back from here on (a regex over the text so far).
CALL_STARTS: dict[str, re.Pattern] = {}


def parser(name: str, call_start: str):
    def register(fn):
        PARSERS[name], CALL_STARTS[name] = fn, re.compile(call_start)
        return fn
    return register


_HERMES_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


@parser("hermes", r"<tool_call>")
def parse_hermes(text: str) -> Parsed | None:
    """`<tool_call>{json}</tool_call>` blocks; the text between and around them is the content."""
    blocks = list(_HERMES_RE.finditer(text))
    if not blocks:
        return None
    calls = []
    for m in blocks:
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            return None
        call = _named_call(obj, ("arguments", "parameters"))
        if call is None:
            return None
        calls.append(call)
    outside = _HERMES_RE.sub("", text)
    if "<tool_call>" in outside:  # an unclosed call after the good ones: not something we can return half of
        return None
    return outside.strip() or None, calls


@parser("llama3_json", r"^\s*(<\|python_tag\|>|\{)")
def parse_llama3_json(text: str) -> Parsed | None:
    """The whole reply is one or more {"name", "parameters"} objects joined by ';' (after an optional
    <|python_tag|>), as Llama-3.1's template asks; nothing else may be there."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return None
    decoder, calls, i = json.JSONDecoder(), [], 0
    while i < len(body):
        try:
            obj, i = decoder.raw_decode(body, i)
        except ValueError:
            return None
        call = _named_call(obj, ("parameters", "arguments"))
        if call is None:
            return None
        calls.append(call)
        rest = body[i:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        elif rest:
            return None
        i = len(body) - len(rest)
    return None, calls


@parser("none", r"(?!)")
def parse_none(text: str) -> Parsed | None:
    return None


PARSER_CHOICES = ("auto", *PARSERS)


def pick_parser(choice: str, template_source: str) -> str:
    """--tool_call_parser auto -> a parser from the template's text; any other name is itself."""
    if choice != "auto":
        return choice
    if "<tool_call>" in template_source:
        return "hermes"
    if "<|python_tag|>" in template_source or '"parameters"' in template_source:
        return "llama3_json"
    return "none"


# -- the request side ---------------------------------------------------------------------------------------
def check_tools(tools: Any) -> list[dict]:
    """OpenAI tools -> plain dicts for the template; a 400 naming the first bad field."""
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list of {'type': 'function', 'function': {...}} objects", param="tools")
    names = set()
    for i, t in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(t, dict) or t.get("type") != "function":
            raise APIError(400, f"{where} must be an object with type 'function'", param=f"{where}.type")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise APIError(400, f"{where}.function must be an object with a name", param=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise APIError(400, f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.', "
                                f"got {name!r:.40}", param=f"{where}.function.name")
        if name in names:
            raise APIError(400, f"{where}.function.name {name!r} is given twice", param=f"{where}.function.name")
        names.add(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise APIError(400, f"{where}.function.description must be a string", param=f"{where}.function.description")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise APIError(400, f"{where}.function.parameters must be a JSON Schema object",
                           param=f"{where}.function.parameters")
    return tools


def template_tool_calls(calls: Any, k: int) -> list[dict]:
    """An assistant message's OpenAI tool_calls -> the template's shape (arguments as a dict)."""
    if not isinstance(calls, list):
        raise APIError(400, f"messages[{k}].tool_calls must be a list", param=f"messages.{k}.tool_calls")
    out = []
    for j, c in enumerate(calls):
        where = f"messages.{k}.tool_calls.{j}"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}",
                           param=f"{where}.function")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise APIError(400, f"{where}.function.arguments is not valid JSON", param=f"{where}.function.arguments"
                               ) from None
        out.append({**c, "type": c.get("type", "function"), "function": {**fn, "arguments": args}})
    return out


def _schema(fn: dict) -> dict:
    return fn.get("parameters") or {"type": "object"}


@dataclass
class ToolPlan:
    """What one request does with tools: the parser for its replies, and a forced schema if tool_choice forces."""
    tools: list[dict] | None
    choice: str                      # "none" | "auto" | "required" | "named"
    parser: str                      # a PARSERS name
    named: str | None = None
    schema: dict | None = None       # guided-decoding JSON schema for "required" / "named"

    @property
    def active(self) -> bool:
        return self.choice != "none" and (self.schema is not None or self.parser != "none")

    @property
    def call_start(self) -> re.Pattern:
        """Where streaming stops sending content: a forced call is all call, from the first character."""
        return re.compile(r"^") if self.schema is not None else CALL_STARTS[self.parser]

    @property
    def finish_reason(self) -> str:
        return "stop" if self.choice == "named" else "tool_calls"

    def parse(self, text: str) -> Parsed | None:
        """(content, calls) when the text holds calls, else None (then the text is plain content)."""
        if self.choice == "none":
            return None
        if self.choice == "named":
            try:
                args = json.loads(text)
            except ValueError:
                return None
            return (None, [_call(self.named, args)]) if isinstance(args, dict) else None
        if self.choice == "required":
            try:
                items = json.loads(text)
            except ValueError:
                return None
            calls = [_named_call(x, ("parameters", "arguments")) for x in items] if isinstance(items, list) else []
            return (None, calls) if calls and all(calls) else None
        return PARSERS[self.parser](text)


def tool_plan(req: Any, parser_choice: str, template_source: str) -> ToolPlan:
    """Check the request's tools / tool_choice (400s name the field) and decide how its replies are read."""
    tools = check_tools(req.tools) if req.tools is not None else None
    tc = req.tool_choice
    if tc is None:
        tc = "auto" if tools else "none"
    parser_name = pick_parser(parser_choice, template_source)
    if isinstance(tc, str):
        if tc not in ("none", "auto", "required"):
            raise APIError(400, f"tool_choice={tc!r} is not allowed; give 'none', 'auto', 'required' or "
                                "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
        if tc != "none" and not tools:
            raise APIError(400, f"tool_choice={tc!r} needs tools", param="tool_choice")
        if tc != "required":
            return ToolPlan(tools, tc, parser_name)
        items = [{"type": "object", "properties": {"name": {"enum": [t["function"]["name"]]},
                                                   "parameters": _schema(t["function"])},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
        schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if req.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return _forced(req, ToolPlan(tools, "required", parser_name, schema=schema))
    fn = tc.get("function") if isinstance(tc, dict) and tc.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                            "{'name': ...}}", param="tool_choice")
    chosen = next((t["function"] for t in tools or [] if t["function"]["name"] == name), None)
    if chosen is None:
        raise APIError(400, f"tool_choice names the function {name!r}, which is not among tools "
                            f"({', '.join(t['function']['name'] for t in tools or []) or 'none given'})",
                       param="tool_choice.function.name")
    return _forced(req, ToolPlan(tools, "named", parser_name, named=name, schema=_schema(chosen)))


def _forced(req: Any, plan: ToolPlan) -> ToolPlan:
    """A forced call uses guided decoding, which a request can only ask for once."""
    taken = [f for f in ("guided_regex", "guided_json", "guided_choice") if getattr(req, f, None) is not None]
    if req.response_format is not None and req.response_format.type != "text":
        taken.append("response_format")
    if taken:
        raise APIError(400, f"tool_choice={plan.choice!r} constrains the output itself, so it cannot be combined "
                            f"with {taken[0]}", param="tool_choice")
    return plan


class StreamedToolText:
    """Per choice, while streaming: which part of the text so far may go out as content now.
    Content runs up to where a call may start; a suffix that could still grow into a call start is held too.
    The calls themselves are parsed once the text is complete (finish)."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.sent = plan, 0

    def content_now(self, text: str) -> str:
        m = self.plan.call_start.search(text)
        end = m.start() if m else len(text) - _partial_start(text, self.plan.parser)
        if self.plan.schema is None and self.plan.parser == "llama3_json" and not text.strip():
            end = 0  # the reply may still begin with "{"
        out, self.sent = text[self.sent:max(end, self.sent)], max(end, self.sent)
        return out

    def finish(self, text: str) -> tuple[str, list[dict]]:
        """(content not yet sent, calls) for the complete text."""
        parsed = self.plan.parse(text)
        if parsed is None:
            return text[self.sent:], []
        content, calls = parsed
        outside = _HERMES_RE.sub("", text) if self.plan.parser == "hermes" and self.plan.schema is None else ""
        return outside[self.sent:].rstrip() if content else "", calls


def _partial_start(text: str, parser_name: str) -> int:
    """How many trailing characters could be the beginning of the parser's call tag (held back)."""
    tag = {"hermes": "<tool_call>", "llama3_json": "<|python_tag|>"}.get(parser_name)
    if not tag:
        return 0
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
