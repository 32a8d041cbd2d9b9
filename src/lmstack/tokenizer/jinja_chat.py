"""A model's own chat template: the Jinja `chat_template` of an HF tokenizer directory, rendered as transformers does.

Where the template comes from (transformers' order): `chat_template.jinja`, then `chat_template.json`
({"chat_template": ...}), then tokenizer_config.json's "chat_template". The value is a string, or named
templates (a dict, or a list of {"name", "template"}); of several we use "default" and refuse a set without one.

Rendering runs in jinja2's ImmutableSandboxedEnvironment (templates from the Hub are untrusted code) with
transformers' settings and globals: trim_blocks + lstrip_blocks, loopcontrols, `raise_exception`, `strftime_now`,
its own `tojson` filter (ensure_ascii=False, indent/separators/sort_keys), `dict` and a `namespace` that refuses
underscore names. Variables are `messages`, `add_generation_prompt`, `tools`, `documents`, the special tokens
as strings (bos_token, eos_token, ...) and the caller's extra kwargs. Undefined variables behave as in
transformers (jinja's default Undefined: `{{ x }}` renders empty, `x.y` or `x + 1` fails); every failure
becomes one LmstackError naming the template's file and field.

Ids are the rendered text encoded with special tokens matched and no post-processor (transformers'
apply_chat_template(tokenize=True) does the same). Assistant masks come from `{% generation %}` blocks when the
template has them (a token is masked when it overlaps a block's characters, as transformers'
return_assistant_tokens_mask does), else from rendering growing prefixes of the conversation: the characters
that each assistant turn adds to the text.

Usage:
    t = JinjaChatTemplate(source, tokenizer, origin="out/model/tokenizer_config.json:chat_template")
    r = t.render(messages, add_generation_prompt=True)      # r.text, r.ids, r.mask
    t.end_of_turn_ids()                                      # e.g. [<|eot_id|>] for Llama-3
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
import json
from pathlib import Path
import re
from typing import Any, Callable

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmstack.errors import LmstackError

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


class RenderedChat:
    """text, ids and `mask` (1 on the tokens the assistant wrote, what SFT learns; same length as ids). The mask
    may be computed on first use: serving needs only ids, and prefix-rendered masks cost a render per turn."""

    def __init__(self, text: str, ids: list[int], mask: list[int] | Callable[[], list[int]]):
        self.text, self.ids, self._mask = text, ids, mask

    @property
    def mask(self) -> list[int]:
        if callable(self._mask):
            self._mask = self._mask()
        return self._mask


# -- the sandbox --------------------------------------------------------------------------------------------
class _GenerationBlocks(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged and, while a recorder is active,
    records the body's character span in the output (the blocks rendered so far give the start)."""
    tags = {"generation"}

    def __init__(self, environment):
        super().__init__(environment)
        self._recording: ContextVar = ContextVar("lmstack_generation_spans", default=None)
        environment.extend(record_generation=self._record)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_span", []), [], [], body).set_lineno(lineno)

    def _span(self, caller):
        text = caller()
        rec = self._recording.get()
        if rec is not None:
            blocks, spans = rec
            start = sum(map(len, blocks))
            spans.append((start, start + len(text)))
        return text

    @contextmanager
    def _record(self, blocks: list[str], spans: list[tuple[int, int]]):
        token = self._recording.set((blocks, spans))
        try:
            yield
        finally:
            self._recording.reset(token)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' own filter: jinja's built-in tojson would HTML-escape '<', '>' and '&' inside the JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace(), refusing underscore attributes (no reaching CPython internals through a template)."""

    def __init__(*args, **kwargs):  # noqa: N805 - same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore attributes ({name!r})")


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` in templates, without handing out the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    return env


# -- where a directory's template lives -----------------------------------------------------------------------
def pick_named(value: Any, origin: str) -> str:
    """A chat_template value -> the template string: a string as is; named templates -> their "default"."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # tokenizer_config.json's list form: [{"name": ..., "template": ...}]
        named = {}
        for k, item in enumerate(value):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) \
                    or not isinstance(item.get("template"), str):
                raise LmstackError(f"{origin}[{k}] must be an object with string 'name' and 'template'")
            named[item["name"]] = item["template"]
        value = named
    if isinstance(value, dict):
        if "default" not in value:
            raise LmstackError(f"{origin} holds named templates {sorted(value)} but none is called 'default'; "
                               "name the one to use 'default'")
        if not isinstance(value["default"], str):
            raise LmstackError(f"{origin}['default'] must be a template string, got {type(value['default']).__name__}")
        return value["default"]
    raise LmstackError(f"{origin} must be a template string or named templates, got {type(value).__name__}")


def find_template(directory: Path | None, config: dict, config_name: str = "tokenizer_config.json"
                  ) -> tuple[str, str] | None:
    """(template source, origin) for a tokenizer directory, or None when it has no template."""
    # lazy: heavy (torch), which the tokenizer package does not import at its top
    from lmstack.model.load_guard import read_json_file, resolve_inside

    if directory is not None:
        jinja_file = resolve_inside(directory, "chat_template.jinja", "chat template")
        if jinja_file.is_file():
            text = jinja_file.read_text(encoding="utf-8")
            return text, str(jinja_file)
        json_file = resolve_inside(directory, "chat_template.json", "chat template")
        if json_file.is_file():
            data = read_json_file(json_file, "chat template", want_object=True)
            if "chat_template" not in data:
                raise LmstackError(f"{json_file} has no 'chat_template' field")
            origin = f"{json_file}:chat_template"
            return pick_named(data["chat_template"], origin), origin
    if config.get("chat_template") is not None:
        where = f"{directory / config_name}" if directory is not None else config_name
        origin = f"{where}:chat_template"
        return pick_named(config["chat_template"], origin), origin
    return None


# -- the template ---------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """What a template may see: JSON-like data only (rich objects could expose methods to the sandbox)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "model_dump"):  # pydantic messages (the server's)
        return _plain(value.model_dump())
    for t in (str, int, float):
        if isinstance(value, t):
            return t(value)
    return f"<{type(value).__name__}>"


class JinjaChatTemplate:
    def __init__(self, source: str, tokenizer, origin: str = "chat_template"):
        self.source, self.tok, self.origin = source, tokenizer, origin
        try:
            self.template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise LmstackError(f"{origin}: the chat template does not parse: {e.message} (line {e.lineno})") from None
        self.has_generation_blocks = bool(_GENERATION_RE.search(source))
        self._end_of_turn: list[int] | None = None
        self._fast = None  # built on first render

    def special_strings(self) -> dict[str, str]:
        out = {}
        for key in _SPECIAL_KEYS:
            v = self.tok.config.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                out[key] = v
        # tokens the tokenizer knows by role (ours or found in the config) fill what the config leaves out
        for name in ("bos", "eos", "unk", "pad", "mask"):
            if name in self.tok.special_tokens:
                out.setdefault(f"{name}_token", self.tok.special_tokens[name])
        return out

    def render_text(self, messages, add_generation_prompt: bool = False, tools=None, documents=None,
                    spans: list | None = None, **kwargs) -> str:
        messages = check_messages(messages)
        context = {**self.special_strings(), **_plain(kwargs)}
        context.update(messages=_plain(messages), tools=_plain(tools), documents=_plain(documents),
                       add_generation_prompt=bool(add_generation_prompt))
        try:
            if spans is None:
                return self.template.render(**context)
            blocks: list[str] = []
            with self.template.environment.record_generation(blocks, spans):
                for block in self.template.generate(**context):
                    blocks.append(block)
            return "".join(blocks)
        except jinja2.exceptions.UndefinedError as e:
            raise LmstackError(f"{self.origin}: the chat template uses an undefined value: {e.message}") from None
        except jinja2.exceptions.TemplateError as e:
            raise LmstackError(f"{self.origin}: the chat template raised: {e.message or e}") from None
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError) as e:
            raise LmstackError(f"{self.origin}: the chat template failed: {type(e).__name__}: {e}") from None

    def _ids_and_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        if self._fast is None:
            # our own copy of the Rust tokenizer: the shared one's encode_special_tokens flag is set per call
            # by encode_batch, which another server thread may be running right now
            base = self.tok.fast()
            self._fast = type(base).from_str(base.to_str()) if base is not None else False
            if self._fast:
                self._fast.encode_special_tokens = False
        if not self._fast:
            return self.tok.encode(text, allow_special=True), None
        enc = self._fast.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)

    def render(self, messages, add_generation_prompt: bool = False, tools=None, documents=None,
               **kwargs) -> RenderedChat:
        spans: list[tuple[int, int]] = []
        text = self.render_text(messages, add_generation_prompt, tools, documents,
                                spans=spans if self.has_generation_blocks else None, **kwargs)
        ids, offsets = self._ids_and_offsets(text)

        def mask() -> list[int]:
            found = spans if self.has_generation_blocks else self._prefix_spans(messages, text, tools, documents,
                                                                                  **kwargs)
            return _mask_from_spans(offsets if offsets is not None else _offsets_by_prefix(self.tok, text, ids),
                                    found)
        return RenderedChat(text, ids, mask)

    def _prefix_spans(self, messages, text: str, tools, documents, **kwargs) -> list[tuple[int, int]]:
        """Each assistant turn's characters: what rendering messages[:k+1] adds after messages[:k] plus the
        generation prompt, up to where it stops agreeing with the whole conversation's text (a template may
        close a conversation differently, e.g. Phi-3 appends eos_token without a generation prompt).
        Templates whose earlier text changes as turns are added cannot be split this way."""
        spans = []
        messages = check_messages(messages)
        for k, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = self.render_text(messages[:k], True, tools, documents, **kwargs)
            after = self.render_text(messages[:k + 1], False, tools, documents, **kwargs)
            if not after.startswith(before) or not text.startswith(before):
                raise LmstackError(f"{self.origin}: cannot find assistant turn #{k} by rendering prefixes (the "
                                   "template rewrites earlier text as turns are added); give the template "
                                   "{% generation %} blocks around assistant content")
            end = len(before)
            limit = min(len(after), len(text))
            while end < limit and after[end] == text[end]:
                end += 1
            if end > len(before):
                spans.append((len(before), end))
        return spans

    def end_of_turn_ids(self) -> list[int]:
        """The special token the template writes right after an assistant's text (Llama-3 <|eot_id|>,
        ChatML <|im_end|>, Gemma <end_of_turn>, Phi-3 <|end|>, Mistral </s>), found by rendering a probe."""
        if self._end_of_turn is None:
            probe = "lmstack probe reply"
            try:
                text = self.render_text([{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": probe}], False)
            except LmstackError:
                text = ""
            self._end_of_turn = []
            at = text.rfind(probe)
            if at >= 0:
                rest = text[at + len(probe):].lstrip(" ")
                for content in sorted(self.tok.added_specials(), key=len, reverse=True):
                    if rest.startswith(content):
                        self._end_of_turn = [self.tok.token_to_id(content)]
                        break
        return list(self._end_of_turn)


def check_messages(messages: Any) -> list[dict]:
    """The shape every template may rely on: a list of dicts, each with a string 'role'."""
    if hasattr(messages, "messages"):
        messages = messages.messages
    if not isinstance(messages, (list, tuple)):
        raise LmstackError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for k, m in enumerate(messages):
        if hasattr(m, "model_dump"):
            m = m.model_dump()
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise LmstackError(f"message #{k} must be a dict with a string 'role', got {m!r}")
        out.append({key: v for key, v in m.items() if v is not None})  # as transformers: None means absent
    return out


def _offsets_by_prefix(tok, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character offsets without the fast runtime: decode growing id prefixes (exact for byte-level BPE)."""
    offsets, prev = [], 0
    for k in range(len(ids)):
        end = min(len(tok.decode(ids[:k + 1])), len(text))
        offsets.append((prev, end))
        prev = end
    return offsets


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    # a token is the assistant's when it overlaps a span (transformers' rule; spans and offsets are in order)
    mask, s = [0] * len(offsets), 0
    for i, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if end > spans[s][0]:
            mask[i] = 1
    return mask
