"""TRL's dataset formats, read into what lmstack's fine-tuning and alignment take.

A user arriving from TRL has JSONL rows in the shapes its docs ("Dataset formats and types") define.
One reader per format family turns a row into ours; anything else is an error that names the field
(callers put the file and line in front).

  SFT family (sft_row):
    {"text": "..."}                                              standard language modeling (loss on every token)
    {"messages": [{"role": ..., "content": ...}, ...]}          conversational language modeling
    {"prompt": "text", "completion": "text"}                     standard prompt-completion
    {"prompt": [messages], "completion": [messages]}             conversational prompt-completion
  Preference family (preference_row):
    {"prompt": "text", "chosen": "text", "rejected": "text"}     standard, explicit prompt
    {"chosen": "text", "rejected": "text"}                       standard, implicit prompt: the shared start of
                                                                 both texts, cut before the space that precedes
                                                                 the first difference (TRL's extract_prompt)
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
    {"chosen": [messages], "rejected": [messages]}               implicit prompt: the messages chosen and
                                                                 rejected share from the start are the prompt
  Unpaired preference (KTO, unpaired_row):
    {"prompt": "text", "completion": "text", "label": true}
    {"prompt": [messages], "completion": [messages], "label": false}

A conversation that is a prompt comes back as a Conversation: a tuple of (role, content) pairs, hashable,
because alignment caches log-probs by (prompt, completion).

Usage:
    from lmstack.data.trl_formats import preference_row, sft_row, to_messages
    kind, prompt, completion = sft_row({"prompt": "2+2=", "completion": "4"})     # ("prompt_completion", ...)
    prompt, chosen, rejected = preference_row({"chosen": [...], "rejected": [...]})
    tok.apply_chat_template(to_messages(prompt), add_generation_prompt=True)
"""
from __future__ import annotations

from typing import Any

from lmstack.errors import LmstackError

Conversation = tuple  # tuple[tuple[str, str], ...]: (role, content) per message


def read_messages(value: Any, field: str, allow_empty: bool = False) -> list[dict]:
    """A list of {"role": str, "content": str} messages; errors name the field and the message."""
    if not isinstance(value, list) or not (value or allow_empty):
        raise LmstackError(f"field {field!r} must be a non-empty list of messages, got {_kind(value)}")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise LmstackError(f"field {field!r}: message {i} must be an object with role and content, "
                               f"got {_kind(m)}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise LmstackError(f"field {field!r}: message {i} has no string 'role'")
        if not isinstance(m.get("content"), str) and not (m.get("content") is None and m.get("tool_calls")):
            raise LmstackError(f"field {field!r}: message {i} ({m['role']}) has no string 'content'")
    return value


def to_conversation(messages: list[dict]) -> Conversation:
    if any(m.get("content") is None for m in messages):
        raise LmstackError("a preference prompt's messages need text content (tool calls are not scored here)")
    return tuple((m["role"], m["content"]) for m in messages)


def to_messages(conversation: Conversation) -> list[dict]:
    return [{"role": role, "content": content} for role, content in conversation]


def sft_row(row: Any) -> tuple[str, Any, Any]:
    """("text", text, None) | ("messages", messages, None) | ("prompt_completion", prompt text, completion text)
    | ("chat_prompt_completion", prompt messages, completion messages)."""
    if not isinstance(row, dict):
        raise LmstackError(f"a row must be a JSON object, got {_kind(row)}")
    if "messages" in row:
        # An empty or reply-less conversation is read; SFT counts and skips it.
        return "messages", read_messages(row["messages"], "messages", allow_empty=True), None
    if "text" in row and "prompt" not in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise LmstackError(f"field 'text' must be non-empty text, got {_kind(row['text'])}")
        return "text", row["text"], None
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion:
                raise LmstackError("field 'completion' is empty: nothing to learn")
            return "prompt_completion", prompt, completion
        if isinstance(prompt, list) or isinstance(completion, list):
            p, c = read_messages(prompt, "prompt"), read_messages(completion, "completion")
            if not any(m["role"] == "assistant" for m in c):
                raise LmstackError("field 'completion' holds no assistant message: nothing to learn")
            return "chat_prompt_completion", p, c
        missing = "prompt" if prompt is None else "completion" if completion is None else None
        if missing:
            raise LmstackError(f"field {missing!r} is missing (a prompt-completion row needs both)")
        raise LmstackError(f"fields 'prompt' and 'completion' must both be text or both message lists, got "
                           f"{_kind(prompt)} and {_kind(completion)}")
    raise LmstackError(f"no 'text', 'messages' or 'prompt'/'completion' fields (keys: {sorted(row)}); TRL's SFT "
                       "formats are {\"text\": ...}, {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}")


def preference_row(row: dict) -> tuple[str | Conversation, str, str]:
    """(prompt, chosen reply, rejected reply); a conversational prompt is a Conversation."""
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise LmstackError(f"field {name!r} is missing")
    if not isinstance(chosen, list) and not isinstance(rejected, list):
        if prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
            return _split_text_prompt(chosen, rejected)
        if not isinstance(prompt, str) or not isinstance(chosen, str) or not isinstance(rejected, str):
            bad = next(n for n, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected))
                       if not isinstance(v, str))
            raise LmstackError(f"field {bad!r} must be text like the others, got {_kind(row.get(bad))}")
        return prompt, chosen, rejected
    c, r = read_messages(chosen, "chosen"), read_messages(rejected, "rejected")
    if prompt is None:  # implicit prompt: the shared start of both conversations
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        if n == 0:
            raise LmstackError("fields 'chosen' and 'rejected' share no first message, so there is no implicit "
                               "prompt; add a 'prompt' field")
        p, c, r = c[:n], c[n:], r[n:]
    else:
        p = read_messages(prompt, "prompt")
    return to_conversation(p), _reply(c, "chosen"), _reply(r, "rejected")


def unpaired_row(row: dict) -> tuple[str | Conversation, str, bool]:
    """(prompt, completion, label) of a KTO row; a conversational prompt is a Conversation."""
    prompt, completion, label = row.get("prompt"), row.get("completion"), row.get("label")
    if not isinstance(label, bool):
        raise LmstackError(f"field 'label' must be true or false, got {_kind(label)}")
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt, completion, label
    if isinstance(prompt, list) or isinstance(completion, list):
        return (to_conversation(read_messages(prompt, "prompt")),
                _reply(read_messages(completion, "completion"), "completion"), label)
    bad = "prompt" if not isinstance(prompt, str) else "completion"
    raise LmstackError(f"field {bad!r} must be text or a message list, got {_kind(row.get(bad))}")


def _split_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's implicit text prompt: the shared start, ending before the space that leads into the difference."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n and chosen[n - 1] == " ":  # " blue." vs " green.": the space belongs to the replies
        n -= 1
    if n == 0:
        raise LmstackError("fields 'chosen' and 'rejected' share no start, so there is no implicit prompt; add a "
                           "'prompt' field")
    return chosen[:n], chosen[n:], rejected[n:]


def _reply(messages: list[dict], field: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant" or not isinstance(messages[0]["content"], str):
        got = ", ".join(m["role"] for m in messages) or "nothing"
        raise LmstackError(f"field {field!r}: after the prompt it must hold one assistant message, got {got}")
    return messages[0]["content"]


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
