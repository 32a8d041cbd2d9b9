"""User feedback in the server (`lmstack serve --feedback_db PATH`): every response is recorded; POST /v1/feedback.

With a FeedbackStore (lmstack.safety.feedback), each /v1/chat/completions and /v1/completions response the
server returns is recorded under its id (chatcmpl-... / cmpl-...): the request (messages, or prompts with n and
echo) and the reply text of every choice, as the client saw it (after the guard, when there is one).
- A non-streamed response is recorded before it is returned, off the event loop.
- A streamed one is recorded from its SSE events as they pass, once the stream is complete (just before
  `[DONE]`, so a client that reads to the end can flag the reply at once); a stream the client left is recorded
  with the text sent so far.
A failed write is logged and never reaches the client: feedback must not cost anyone their reply.

POST /v1/feedback {response_id, choice?, rating: up|down, category?, correction?} -> 200
{"id": "fb-N", "object": "feedback", ...}. An unknown response id is a 404, a bad field a 400 naming it (OpenAI's
error shape). Without --feedback_db the route answers 404 saying how to turn it on.

Usage (server side):
    app = create_app(aengine, config, feedback=FeedbackStore("feedback.db"))
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from lmstack.safety.feedback import FeedbackError, FeedbackStore, UnknownResponse
from lmstack.serve.chat_completions import message_dicts
from lmstack.serve.image_input import image_note
from lmstack.serve.engine_bridge import ServerState
from lmstack.serve.errors import APIError
from lmstack.serve.limits import reject_lone_surrogates
from lmstack.serve.protocol import ChatCompletionRequest, CompletionRequest, _Strict

log = logging.getLogger("lmstack.serve")


class FeedbackRequest(_Strict):
    """POST /v1/feedback: a flag on one choice of a response this server returned."""
    response_id: str
    choice: int = 0
    rating: str
    category: str | None = None
    correction: str | None = None


def feedback_now(store: FeedbackStore | None, body: FeedbackRequest) -> dict:
    """The /v1/feedback answer (runs in the worker pool)."""
    if store is None:
        raise APIError(404, "feedback is off on this server; start it with `lmstack serve --feedback_db PATH`")
    reject_lone_surrogates(body)
    try:
        row = store.add_feedback(body.response_id, body.rating, body.choice, body.category, body.correction)
    except UnknownResponse as e:
        raise APIError(404, str(e), param=e.field) from None
    except FeedbackError as e:
        raise APIError(400, str(e), param=e.field) from None
    return {"id": f"fb-{row['id']}", "object": "feedback", **{k: row[k] for k in
                                                               ("response_id", "choice", "rating", "category")},
            "created": int(row["created"])}


def _request_json(endpoint: str, body: Any) -> dict:
    if endpoint == "chat":
        return {"messages": message_dicts(body.messages, image_note), "n": body.n}
    return {"prompt": body.prompt, "n": body.n, "echo": bool(body.echo)}


def _write(store: FeedbackStore, rid: str, model: str, endpoint: str, request: dict, replies: list[str]) -> None:
    try:
        store.record_response(rid, model, endpoint, request, replies)
    except Exception:  # noqa: BLE001 - a lost record must never become a failed reply
        log.exception("feedback: could not record response %s", rid)


def _reply_text(choice: dict, key: str) -> str:
    part = choice.get(key) or {}
    return (part.get("content") or "") if isinstance(part, dict) else ""


async def _recorded_stream(store: FeedbackStore, upstream: AsyncIterator[str], endpoint: str, request: dict,
                           fallback_model: str) -> AsyncIterator[str]:
    """Pass the SSE events through unchanged; gather each choice's text and record it before [DONE]."""
    texts: dict[int, str] = {}
    rid, model, recorded = None, fallback_model, False
    loop = asyncio.get_running_loop()

    def replies() -> list[str]:
        return [texts.get(i, "") for i in range(max(texts) + 1)] if texts else []

    try:
        async for block in upstream:
            for event in block.split("\n\n"):
                payload = event[len("data: "):] if event.startswith("data: ") else None
                if payload == "[DONE]" and rid is not None and not recorded:
                    recorded = True
                    await loop.run_in_executor(None, _write, store, rid, model, endpoint, request, replies())
                if not payload or payload == "[DONE]":
                    continue
                try:
                    data = json.loads(payload)
                except ValueError:
                    continue
                if not isinstance(data, dict) or "choices" not in data:
                    continue  # an in-band error event: nothing to record
                rid, model = data.get("id", rid), data.get("model", model)
                for ch in data["choices"]:
                    piece = _reply_text(ch, "delta") if endpoint == "chat" else (ch.get("text") or "")
                    texts[ch.get("index", 0)] = texts.get(ch.get("index", 0), "") + piece
            yield block
    finally:
        if rid is not None and not recorded:  # the client left (or the stream failed): keep what was sent
            _write(store, rid, model, endpoint, request, replies())
        await upstream.aclose()


async def recorded(store: FeedbackStore | None, state: ServerState, body: ChatCompletionRequest | CompletionRequest,
                   response: Any) -> Any:
    """Record `response` (the route's answer to `body`) in the store, and return it (the same object)."""
    if store is None:
        return response
    endpoint = "chat" if isinstance(body, ChatCompletionRequest) else "completions"
    try:
        request = _request_json(endpoint, body)
    except Exception:  # noqa: BLE001 - the route already answered this request; recording is best effort
        log.exception("feedback: could not read the request to record")
        return response
    fallback = body.model or state.config.model_name
    if isinstance(response, StreamingResponse):
        response.body_iterator = _recorded_stream(store, response.body_iterator, endpoint, request, fallback)
        return response
    if isinstance(response, JSONResponse) and response.status_code == 200:
        try:
            data = json.loads(response.body)
            key = "message" if endpoint == "chat" else "text"
            replies = [_reply_text(c, key) if endpoint == "chat" else (c.get(key) or "") for c in data["choices"]]
            rid, model = data["id"], data.get("model", fallback)
        except (ValueError, KeyError, TypeError):
            log.exception("feedback: could not read the response to record")
            return response
        await asyncio.get_running_loop().run_in_executor(None, _write, store, rid, model, endpoint, request, replies)
    return response
