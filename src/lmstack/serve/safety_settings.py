"""The server's safety and persona settings (lmstack.safety.presets) applied to one request, before the engine.

The hard bans never pass through here: build_app gives them to the engine (LLMEngine(banned_phrases=...)),
which applies them to every request, so no request field can reach them. What a request may change is style:
- chat: `safety_preset` picks a persona (its system prompt goes first; its temperature / top_p fill in what
  the request leaves unset), a request's own system message follows it unless the config locks it;
- chat and completions: temperature up to the config's max_temperature, and up to max_request_phrases
  `banned_phrases` of its own, added to the hard bans.
A setting the config does not allow is a 400 naming the field.

Usage:
    req = apply_chat_safety(state.config.safety, req)        # in the chat route, before preparing the prompt
    check_completion_safety(state.config.safety, req)        # in the completions route
"""
from __future__ import annotations

from typing import Any

from lmstack.safety.presets import PresetError, SafetyConfig
from lmstack.serve.errors import APIError
from lmstack.serve.protocol import ChatCompletionRequest, ChatMessage


def apply_chat_safety(config: SafetyConfig, req: ChatCompletionRequest) -> ChatCompletionRequest:
    """The request as the server's safety config shapes it (a copy when anything changes), or a 400."""
    has_system = any(m.role in ("system", "developer") for m in req.messages)
    try:
        choice = config.choose(req.safety_preset, req.temperature, has_system, len(req.banned_phrases or ()))
    except PresetError as e:
        raise APIError(400, str(e), param=e.param) from None
    update: dict[str, Any] = {}
    if choice.preset.system_prompt:
        update["messages"] = [ChatMessage(role="system", content=choice.preset.system_prompt), *req.messages]
    if req.temperature is None and choice.temperature is not None:
        update["temperature"] = choice.temperature
    if req.top_p is None and choice.preset.top_p is not None:
        update["top_p"] = choice.preset.top_p
    return req.model_copy(update=update) if update else req


def check_completion_safety(config: SafetyConfig, req: Any) -> None:
    """Completions carry no persona: only the caps on temperature and the request's own bans apply."""
    try:
        config.choose(None, req.temperature, False, len(req.banned_phrases or ()))
    except PresetError as e:
        raise APIError(400, str(e), param=e.param) from None
