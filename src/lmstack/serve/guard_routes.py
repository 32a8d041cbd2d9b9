"""Guardrails in the server (`lmstack serve --guard CONFIG`): moderated chat and completions, /v1/moderations.

With a Guard (lmstack.safety.guard), the chat and completions routes run through it:
- input: the messages (rendered as one conversation, or the last one: the config's input_context) or the prompts
  are judged in the worker pool before anything is tokenised; a blocked request never reaches the engine and
  is answered as OpenAI does, with a normal completion whose content is the refusal and whose finish_reason is
  "content_filter" (streamed too, when the request streams);
- output: a streamed reply passes through one OutputMonitor per choice. The SSE events the route produces are
  rewritten: each choice's text is replaced by what the monitor releases (checked windows, PII redacted); when
  a window is blocked, that choice gets the refusal and finish_reason "content_filter" and sends nothing more,
  and once every choice is done the upstream stream is closed, which aborts the engine request. A
  non-streamed reply is checked whole, window by window, and redacted.
  Not moderated: tool-call arguments, and the token strings inside logprobs (they may show text the monitor
  still holds back).

/v1/images/generations and /v1/audio/speech judge their prompt / input the same way (`refuse_flagged`); a
blocked one is a 400 with code content_policy_violation, as OpenAI's image API answers. Transcripts and video
answers are not moderated.

/v1/moderations is OpenAI's: `input` a string or a list of strings; each result has `flagged` (any category over
its threshold), `categories` ({name: bool}) and `category_scores` ({name: probability}). Without --guard it is
a 404 that says so.

Usage (server side):
    app = create_app(aengine, config, guard=Guard(load_guard_config("guard.yaml")))
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi.responses import JSONResponse, StreamingResponse

from lmstack.safety.guard import CONTENT_FILTER, Guard, OutputMonitor
from lmstack.serve.chat_completions import message_dicts
from lmstack.serve.image_input import image_note
from lmstack.serve.engine_bridge import ServerState
from lmstack.serve.errors import APIError
from lmstack.serve.limits import reject_lone_surrogates
from lmstack.serve.protocol import ChatCompletionRequest, CompletionRequest, ModerationRequest
from lmstack.serve.sse_stream import SSE_DONE, sse

MAX_MODERATION_INPUTS = 2048
"""Most texts one /v1/moderations request may carry."""
Handler = Callable[[Any, Any], Awaitable[Any]]


def moderations_now(state: ServerState, guard: Guard | None, body: ModerationRequest) -> dict:
    """The /v1/moderations answer (runs in the worker pool)."""
    if guard is None:
        raise APIError(404, "this server has no moderator; start it with `lmstack serve --guard CONFIG`")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise APIError(400, "input is empty; give a string or a non-empty list of strings", param="input")
    if len(texts) > MAX_MODERATION_INPUTS:
        raise APIError(400, f"input has {len(texts)} texts; at most {MAX_MODERATION_INPUTS} per request",
                       param="input", code="limit_exceeded")
    reject_lone_surrogates(body)  # the body limit (max_request_bytes) already bounds the texts' total size
    results = [{"flagged": v.flagged, "categories": v.categories, "category_scores": v.scores}
               for v in guard.moderator.classify(texts)]
    return {"id": f"modr-{uuid.uuid4().hex}", "model": body.model or f"lmstack-moderation-{guard.moderator.tier}",
            "results": results}


def refuse_flagged(guard: Guard | None, text: str, param: str, action: str) -> None:
    """A 400 (OpenAI's `content_policy_violation`) when the guard blocks `text`, the input of a route that makes
    something from it (a picture to draw, speech to say); nothing without a guard or with input checks off.
    Runs in the worker pool: the moderator is a model call."""
    if guard is None or not guard.cfg.check_input:
        return
    verdict = guard.check_texts([text])
    if verdict is not None:
        over = ", ".join(c for c in guard.cfg.block if verdict.categories.get(c, False))
        raise APIError(400, f"{param} was flagged by the moderator ({over}); this server will not {action} it",
                       param=param, code="content_policy_violation")


def _refusal_chat(guard: Guard, body: ChatCompletionRequest, model: str):
    rid, created, n = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.n
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if not body.stream:
        choices = [{"index": j, "message": {"role": "assistant", "content": guard.cfg.refusal},
                    "logprobs": None, "finish_reason": CONTENT_FILTER} for j in range(n)]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                             "choices": choices, "usage": usage})

    def chunk(choices: list, with_usage: bool = False) -> str:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, **({"usage": usage} if with_usage else {})})

    events = [chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for j in range(n)]),
              chunk([{"index": j, "delta": {"content": guard.cfg.refusal}, "finish_reason": CONTENT_FILTER}
                     for j in range(n)])]
    if body.stream_options is not None and body.stream_options.include_usage:
        events.append(chunk([], with_usage=True))
    return _events(events + [SSE_DONE])


def _refusal_completion(guard: Guard, body: CompletionRequest, model: str, n_prompts: int):
    rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.n * n_prompts
    choices = [{"index": j, "text": guard.cfg.refusal, "logprobs": None, "finish_reason": CONTENT_FILTER}
               for j in range(n)]
    payload = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if not body.stream:
        return JSONResponse({**payload, "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})
    return _events([sse(payload), SSE_DONE])


def _events(events: list[str]) -> StreamingResponse:
    async def gen():
        for e in events:
            yield e
    return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _chat_text(choice: dict, value: str | None = None, write: bool = False) -> str | None:
    delta = choice.setdefault("delta", {}) if "delta" in choice else choice.setdefault("message", {})
    if write:
        delta["content"] = value
        if choice.get("finish_reason") == CONTENT_FILTER:  # a cut reply calls no tools
            delta.pop("tool_calls", None)
    return delta.get("content")


def _completion_text(choice: dict, value: str | None = None, write: bool = False) -> str | None:
    if write:
        choice["text"] = value if value is not None else ""
    return choice.get("text")


async def _guard_stream(guard: Guard, upstream: AsyncIterator[str], n_choices: int,
                        text: Callable) -> AsyncIterator[str]:
    """Rewrite an SSE stream's choices through one OutputMonitor each (see the module docstring)."""
    raw: dict[int, str] = {}
    monitors: dict[int, OutputMonitor] = {}
    done: set[int] = set()
    any_cut = stopped = False
    loop = asyncio.get_running_loop()
    try:
        async for block in upstream:
            for event in block.split("\n\n"):
                if not event.strip():
                    continue
                payload = event[len("data: "):] if event.startswith("data: ") else None
                if payload is None or payload == "[DONE]":
                    yield event + "\n\n"
                    continue
                data = json.loads(payload)
                if not isinstance(data, dict) or not data.get("choices"):
                    yield event + "\n\n"  # usage-only chunks and error events pass unchanged
                    continue
                kept = []
                for ch in data["choices"]:
                    i = ch.get("index", 0)
                    if i in done:
                        continue
                    original = text(ch)
                    raw[i] = raw.get(i, "") + (original or "")
                    final = ch.get("finish_reason") is not None
                    mon = monitors.setdefault(i, guard.monitor())
                    # the moderator runs off the event loop (a tier-2 encoder takes ~20 ms per window on a CPU)
                    piece, cut = await loop.run_in_executor(None, mon.feed, raw[i], final)
                    if cut:
                        ch["finish_reason"] = CONTENT_FILTER
                        ch.pop("logprobs", None)
                        text(ch, mon.refusal_piece(), write=True)
                        done.add(i)
                        any_cut = True
                        kept.append(ch)
                        continue
                    if final:
                        done.add(i)
                    text(ch, piece if piece or original is not None else None, write=True)
                    delta = ch.get("delta", {})
                    others = delta.get("role") or delta.get("tool_calls") or ch.get("logprobs")
                    if piece or final or others:
                        kept.append(ch)
                if kept or data.get("usage"):
                    yield sse({**data, "choices": kept})
            if any_cut and len(done) >= n_choices:
                stopped = True
                break  # every choice is over: stop here; closing the upstream aborts the engine request
        if stopped:
            yield SSE_DONE
    finally:
        await upstream.aclose()


def _filter_json(guard: Guard, response: JSONResponse, text: Callable) -> JSONResponse:
    data = json.loads(response.body)
    for ch in data.get("choices", []):
        content = text(ch)
        if content is None:
            continue
        new, cut = guard.filter_output(content)
        text(ch, new, write=True)
        if cut:
            ch["finish_reason"] = CONTENT_FILTER
            text(ch, new, write=True)  # again, now that the finish reason says the reply was cut
    return JSONResponse(data, status_code=response.status_code)


def _wrap(guard: Guard, response: Any, n_choices: int, text: Callable) -> Any:
    if not guard.cfg.check_output and not guard.cfg.redact_pii:
        return response
    if isinstance(response, StreamingResponse):
        response.body_iterator = _guard_stream(guard, response.body_iterator, n_choices, text)
        return response
    if isinstance(response, JSONResponse):
        return _filter_json(guard, response, text)
    return response


async def guarded_chat(state: ServerState, guard: Guard, request, body: ChatCompletionRequest, handler: Handler):
    """/v1/chat/completions through the guard: `handler(request, body)` is the unguarded route."""
    if guard.cfg.check_input:
        verdict = await state.run(lambda: guard.check_messages(message_dicts(body.messages, image_note))
                                  if body.messages else None)
        if verdict is not None:
            return _refusal_chat(guard, body, body.model or state.config.model_name)
    return _wrap(guard, await handler(request, body), body.n, _chat_text)


def _prompt_texts(state: ServerState, prompt: Any) -> list[str]:
    """The prompts as text: strings as they are, token ids decoded (an invalid id is the usual 400)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    return [state.tokenizer.decode(state.check_ids(list(p), param="prompt")) for p in prompt] if prompt else []


async def guarded_completion(state: ServerState, guard: Guard, request, body: CompletionRequest, handler: Handler):
    """/v1/completions through the guard (token-id prompts are judged as their decoded text)."""
    texts = await state.run(_prompt_texts, state, body.prompt)
    if guard.cfg.check_input and texts:
        if await state.run(guard.check_texts, texts) is not None:
            return _refusal_completion(guard, body, body.model or state.config.model_name, len(texts))
    return _wrap(guard, await handler(request, body), body.n * max(1, len(texts)), _completion_text)
