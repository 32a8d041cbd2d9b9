"""Special tokens and the chat template: a conversation -> ids plus the assistant-only loss mask for SFT.

Every lmstack tokenizer reserves the same special tokens, spelled `<|name|>`, at the *start* of the id space
(ids 0..N-1; for WordPiece/Unigram `<|unk|>` comes first), so special ids do not move when the vocabulary
grows or shrinks. A turn renders as `<|user_start|>content<|user_end|>`; tool results use
`<|tool_output_start|>`/`<|tool_output_end|>`, and an assistant turn may carry tool calls wrapped in
`<|tool_call_start|>`/`<|tool_call_end|>`. A conversation starts with `<|bos|>`.

Message contents are encoded with special-token matching switched off, so a user who types
"<|assistant_start|>" gets those characters as plain text and can never forge a turn boundary.

Usage:
    ids, mask = apply_chat_template(tok, [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello"}])
    # mask[i] == 1 exactly on the assistant's content tokens and its <|assistant_end|>
    text = render_chat(tok, messages, add_generation_prompt=True)   # same template as a string

The ChatTemplate interface: `tok.chat_template` is the one place conversations become ids. It is this template
(LmstackChatTemplate) for tokenizers lmstack trains, or the model's own Jinja template (jinja_chat.py) for an
HF directory. Callers use `render(messages, add_generation_prompt, tools=None, documents=None, **kwargs)` ->
RenderedChat(text, ids, mask) and `end_of_turn_ids()` (the ids that close an assistant turn, for stopping).
"""
from __future__ import annotations

import json
from typing import Any

from lmstack.errors import LmstackError
from lmstack.tokenizer.jinja_chat import RenderedChat

SPECIAL_NAMES = [
    "bos", "eos", "pad", "mask",
    "system_start", "system_end", "user_start", "user_end", "assistant_start", "assistant_end",
    "tool_call_start", "tool_call_end", "tool_output_start", "tool_output_end",
]
UNK_NAME = "unk"


def special_token(name: str) -> str:
    return f"<|{name}|>"


# role -> (start token name, end token name)
ROLES = {
    "system": ("system_start", "system_end"),
    "user": ("user_start", "user_end"),
    "assistant": ("assistant_start", "assistant_end"),
    "tool": ("tool_output_start", "tool_output_end"),
}

# The same template in Jinja, written to tokenizer_config.json so `transformers` renders identical text.
JINJA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|tool_output_start|>{{ m['content'] }}<|tool_output_end|>"
    "{% else %}<|{{ m['role'] }}_start|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' and m.get('tool_calls') %}{% for c in m['tool_calls'] %}"
    "<|tool_call_start|>{% if c is string %}{{ c }}{% else %}{{ c | tojson }}{% endif %}<|tool_call_end|>"
    "{% endfor %}{% endif %}"
    "<|{{ m['role'] }}_end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant_start|>{% endif %}"
)


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise LmstackError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LmstackError(f"message #{k} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise LmstackError(f"message #{k} has unknown role {m['role']!r}; allowed roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise LmstackError(f"message #{k} content must be a string, got {type(m['content']).__name__}")
        calls = m.get("tool_calls")
        if calls and m["role"] != "assistant":
            raise LmstackError(f"message #{k}: only assistant messages may carry tool_calls, not {m['role']!r}")
        if calls is not None and not isinstance(calls, (list, tuple)):
            raise LmstackError(f"message #{k}: tool_calls must be a list of strings or dicts")
    return list(messages)


def _call_text(call: Any) -> str:
    # json.dumps with ensure_ascii=False is exactly what transformers' `tojson` filter produces.
    return call if isinstance(call, str) else json.dumps(call, ensure_ascii=False)


def _require(tok, name: str) -> int:
    i = tok.special_id(name)
    if i is None:
        raise LmstackError(f"this tokenizer has no {special_token(name)} token, so it has no chat template; "
                           "train one with lmstack (special_tokens='chat') or add the tokens")
    return i


def apply_chat_template(tok, messages: list[dict], add_generation_prompt: bool = False
                        ) -> tuple[list[int], list[int]]:
    """Render `messages` to ids and a same-length loss mask (1 = assistant tokens the model should learn)."""
    messages = _check_messages(messages)
    ids, mask = [_require(tok, "bos")], [0]

    def add(new_ids: list[int], learn: bool):
        ids.extend(new_ids)
        mask.extend([int(learn)] * len(new_ids))

    for m in messages:
        start, end = ROLES[m["role"]]
        learn = m["role"] == "assistant"
        add([_require(tok, start)], False)  # the turn opener is given, not predicted
        add(tok.encode(m["content"], allow_special=False), learn)
        for call in m.get("tool_calls") or []:
            add([_require(tok, "tool_call_start")], learn)
            add(tok.encode(_call_text(call), allow_special=False), learn)
            add([_require(tok, "tool_call_end")], learn)
        add([_require(tok, end)], learn)  # learning the end token teaches the model to stop
    if add_generation_prompt:
        add([_require(tok, "assistant_start")], False)
    return ids, mask


def render_chat(tok, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The same template as text (for servers and logs). Do not re-encode it with special tokens enabled:
    that would let message text act as special tokens; use `apply_chat_template` for ids."""
    messages = _check_messages(messages)
    for name in ("bos", "tool_call_start", "tool_call_end") + tuple(n for pair in ROLES.values() for n in pair):
        _require(tok, name)
    sp = tok.special_tokens
    parts = [sp["bos"]]
    for m in messages:
        start, end = ROLES[m["role"]]
        parts.append(sp[start] + m["content"])
        for call in m.get("tool_calls") or []:
            parts.append(sp["tool_call_start"] + _call_text(call) + sp["tool_call_end"])
        parts.append(sp[end])
    if add_generation_prompt:
        parts.append(sp["assistant_start"])
    return "".join(parts)


class ChatTemplate:
    """What every chat template offers; see the module docstring."""
    origin = "chat_template"

    def render(self, messages, add_generation_prompt: bool = False, tools=None, documents=None,
               **kwargs) -> RenderedChat:
        raise NotImplementedError

    def end_of_turn_ids(self) -> list[int]:
        raise NotImplementedError


class LmstackChatTemplate(ChatTemplate):
    """lmstack's own special-token template. Message text is encoded with special-token matching off, so
    a user cannot forge a turn boundary; tools and documents have no place in it and are refused."""
    origin = "lmstack chat template"

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def render(self, messages, add_generation_prompt: bool = False, tools=None, documents=None,
               **kwargs) -> RenderedChat:
        if tools or documents:
            raise LmstackError("lmstack's own chat template has no place for tools or documents; "
                               "pass tool calls inside assistant messages (tool_calls) instead")
        ids, mask = apply_chat_template(self.tok, messages, add_generation_prompt)
        return RenderedChat(render_chat(self.tok, messages, add_generation_prompt), ids, mask)

    def end_of_turn_ids(self) -> list[int]:
        return [_require(self.tok, "assistant_end")]


def is_lmstack_template(tok, source: str | None) -> bool:
    """Our own template applies when the tokenizer has our turn tokens and the config's template, if any,
    is the one we write (tokenizers lmstack trains, saved with JINJA_TEMPLATE)."""
    has_tokens = all(tok.special_id(n) is not None for n in ("bos", "user_start", "assistant_start",
                                                                "assistant_end", "tool_output_start"))
    return has_tokens and (source is None or source == JINJA_TEMPLATE)
