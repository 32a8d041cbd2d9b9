"""What one request may contain: list-size caps, a prompt byte bound, valid Unicode, non-empty prompts.

Everything these checks refuse is a 400 naming the field (413 for a prompt that cannot fit the context), before
anything is tokenised, so no single request can make the server do unbounded work. The list caps cost O(cap) and
run on the event loop; the walks over the whole request (surrogates, chat text bytes) run in the worker pool:

- `RequestLimits` (ServerConfig.limits; CLI `--limits.max_stop 8`, ...) caps the lists a request may carry:
  stop strings, bad words, logit_bias entries, stop_token_ids, guided_choice options, chat messages, prompts
  per completions request (n / best_of and max_tokens: ServerConfig.max_n, max_tokens_limit).
- `prompt_byte_limit` bounds a text prompt by its UTF-8 bytes before encoding it: a prompt longer than
  context x bytes_per_token bytes cannot fit, so it is a 413 without being encoded. bytes_per_token defaults
  to the vocabulary's longest token (at least 16), which is exact for byte-level BPE: every token covers at
  most that many bytes, so no prompt that fits is refused.
- `find_lone_surrogate` / `reject_lone_surrogates`: JSON may carry "\\ud800", a lone UTF-16 surrogate that is
  no Unicode character; no tokenizer can encode it. The rule: 400 naming the field and the character position.
- Empty prompts ("" / [] / a chat whose messages are all empty) are a 400, as OpenAI answers, unless the
  request sets the lmstack extension `allow_empty_prompt: true` (then the model starts from its start token).

Usage:
    limits = RequestLimits(max_stop=8)
    check_sampling_lists(limits, req)                  # APIError(400, param="stop") past a cap
    reject_lone_surrogates(req)                        # APIError(400, param="messages.0.content")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel

from lmstack.serve.errors import APIError


@dataclass
class RequestLimits:
    max_stop: int = 64
    """Most stop strings per request (400 above)."""
    max_stop_chars: int = 256
    """Longest stop string, in characters (400 above)."""
    max_bad_words: int = 1024
    """Most bad_words per request (400 above)."""
    max_bad_word_chars: int = 256
    """Longest bad word, in characters (400 above)."""
    max_logit_bias: int = 1024
    """Most logit_bias entries per request (400 above)."""
    max_stop_token_ids: int = 1024
    """Most stop_token_ids per request (400 above)."""
    max_guided_choices: int = 1024
    """Most guided_choice options per request (400 above)."""
    max_guided_chars: int = 16384
    """Longest guided_regex / guided_choice option / JSON schema text, in characters (400 above)."""
    max_messages: int = 1024
    """Most chat messages per request (400 above)."""
    max_prompts: int = 64
    """Most prompts one /v1/completions request may batch (400 above)."""
    prompt_bytes_per_token: int | None = None
    """A text prompt over context x this many UTF-8 bytes is refused (413) before it is encoded; None = the
    vocabulary's longest token in bytes, at least 16 (exact for byte-level BPE: nothing that fits is refused)."""
    prep_threads: int = 2
    """Worker threads that tokenise prompts and prepare parameters, off the event loop."""
    max_preparing: int = 64
    """Requests that may wait for or run in those threads at once; 503 (with Retry-After) above, so a flood of
    large /tokenize calls cannot queue without bound."""

    def __post_init__(self) -> None:
        for name, v in vars(self).items():
            if name == "prompt_bytes_per_token" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"limits.{name}={v!r} is not allowed; {name} must be an integer >= 1")


def _cap_chars(values: Any, cap: int, name: str, limit_name: str) -> None:
    for i, v in enumerate(values or ()):
        if isinstance(v, str) and len(v) > cap:
            raise APIError(400, f"{name}[{i}] has {len(v)} characters; this server takes at most {cap} "
                                f"(limits.{limit_name})", param=f"{name}.{i}", code="limit_exceeded")


def check_sampling_lists(limits: RequestLimits, req: Any) -> None:
    """The request's list-valued sampling fields against the caps (each check is O(size of the list))."""
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    for name, values, cap, cap_name in (("stop", stop, limits.max_stop, "max_stop"),
                                        ("bad_words", req.bad_words, limits.max_bad_words, "max_bad_words"),
                                        ("logit_bias", req.logit_bias, limits.max_logit_bias, "max_logit_bias"),
                                        ("stop_token_ids", req.stop_token_ids, limits.max_stop_token_ids,
                                         "max_stop_token_ids"),
                                        ("guided_choice", req.guided_choice, limits.max_guided_choices,
                                         "max_guided_choices")):
        if values is not None and len(values) > cap:
            raise APIError(400, f"{name} has {len(values)} entries; this server takes at most {cap} "
                                f"(limits.{cap_name})", param=name, code="limit_exceeded")
    _cap_chars(stop, limits.max_stop_chars, "stop", "max_stop_chars")
    _cap_chars(req.bad_words, limits.max_bad_word_chars, "bad_words", "max_bad_word_chars")
    _cap_chars(req.guided_choice, limits.max_guided_chars, "guided_choice", "max_guided_chars")
    if isinstance(req.guided_regex, str) and len(req.guided_regex) > limits.max_guided_chars:
        raise APIError(400, f"guided_regex has {len(req.guided_regex)} characters; this server takes at most "
                            f"{limits.max_guided_chars} (limits.max_guided_chars)", param="guided_regex",
                       code="limit_exceeded")


def prompt_byte_limit(limits: RequestLimits, token_bytes: Callable[[int], int], vocab_size: int,
                      context: int) -> tuple[int, int]:
    """(bytes per token, byte limit) for text prompts of a model with `context` tokens; `token_bytes(id)` is
    how many input bytes token `id` covers (only read when limits.prompt_bytes_per_token is None)."""
    per_token = limits.prompt_bytes_per_token
    if per_token is None:
        per_token = max([16] + [token_bytes(i) for i in range(vocab_size)])
    return per_token, context * per_token


def utf8_len(text: str) -> int:
    """UTF-8 bytes of `text` (a lone surrogate counts 3, as 'surrogatepass' writes it)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def find_lone_surrogate(text: str) -> int | None:
    """The character position of the first lone surrogate in `text`, or None (C speed: one encode)."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def reject_lone_surrogates(value: Any, path: str = "") -> None:
    """Walk a parsed request (pydantic models, lists, dicts, strings); a string with a lone surrogate is a 400
    naming its field path and the character position."""
    if isinstance(value, str):
        pos = find_lone_surrogate(value)
        if pos is not None:
            raise APIError(400, f"{path or 'body'} has a lone UTF-16 surrogate \\u{ord(value[pos]):04x} at character "
                                f"{pos}; it is not a Unicode character, send valid UTF-8 text",
                           param=path or None, code="invalid_unicode")
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            reject_lone_surrogates(getattr(value, name), f"{path}.{name}" if path else name)
        for name, v in (value.model_extra or {}).items():
            reject_lone_surrogates(v, f"{path}.{name}" if path else name)
    elif isinstance(value, (list, tuple)):
        if value and isinstance(value[0], int) and not isinstance(value[0], bool):
            return  # token ids: nothing to check, and lists of ids can be long
        for i, v in enumerate(value):
            reject_lone_surrogates(v, f"{path}.{i}" if path else str(i))
    elif isinstance(value, dict):
        for k, v in value.items():
            reject_lone_surrogates(k, path)
            reject_lone_surrogates(v, f"{path}.{k}" if path else str(k))
