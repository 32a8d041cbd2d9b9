"""The streaming skeleton /v1/completions and /v1/chat/completions share: engine outputs -> SSE chunks.

Both endpoints stream the same way and differ only in how one choice is written, so the loop lives here
once: `stream_choices` runs the prepared engine requests (run_streams), and for every sample that has
something new asks the endpoint's `render` for its choice (None: nothing to show yet, e.g. half a
character or text held back for a stop string or a tool call), remembers what was sent, stops a
sample once its finish chunk went out, and writes the usage chunks (`stream_options.include_usage`, and
`continuous_usage_stats` on every chunk). A client that leaves ends the stream silently; an error after
the 200 goes out as an SSE error event, then [DONE]; generated tokens are counted in the metrics
whatever way the stream ends.

Usage:
    def render(i, out, c, sent: Sent):  # -> a choice, or None
        ...
    body = stream_choices(state, request, prepared, n_prompt, extra, render, chunk, include_usage=True)
    return EventStream(state, body, len(prepared))
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from lmstack.infer.outputs import CompletionOutput, RequestOutput
from lmstack.infer.sequence import Request
from lmstack.serve.engine_bridge import ClientDisconnected, ServerState, run_streams
from lmstack.serve.errors import APIError, from_value_error
from lmstack.serve.protocol import Usage


def sse(payload: BaseModel | dict | str) -> str:
    """One Server-Sent Event: `data: <json>` and a blank line."""
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json()
    elif isinstance(payload, dict):
        body = json.dumps(payload, ensure_ascii=False)
    else:
        body = payload
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """An SSE response that holds an admission ticket from creation until the response is over.

    The ticket is taken here, before the 200 goes out, so an overloaded server can still answer 503;
    it is released in __call__'s finally, which runs even if the client left before the first chunk
    (when the body generator never started and so could not release anything itself).
    """

    def __init__(self, state: ServerState, content: AsyncIterator[str], prompts: int = 1,
                 on_close: Callable[[], None] | None = None):
        self._on_close = on_close  # e.g. unpin the request's pictures (serve/image_input.py)
        self._ticket = state.admit(prompts)
        self._ticket.__enter__()
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(BaseException):
                await self.body_iterator.aclose()  # type: ignore[union-attr]
            self._ticket.__exit__(None, None, None)
            if self._on_close is not None:
                self._on_close()


def stream_error(e: Exception) -> str:
    """An error that happens after the 200 and the first chunks went out: sent as an SSE error event
    (`data: {"error": ...}`, which the openai client raises as APIError), then the caller sends [DONE]."""
    err = e if isinstance(e, APIError) else from_value_error(e) if isinstance(e, ValueError) else \
        APIError(500, f"internal error: {type(e).__name__}")
    return sse(err.body())


@dataclass
class Sent:
    """What already went out for one sample: its first chunk or not, characters and tokens."""

    first: bool
    chars: int
    tokens: int


Render = Callable[[int, RequestOutput, CompletionOutput, Sent], Any]
Chunk = Callable[[list, Usage | None], str]


async def stream_choices(state: ServerState, request, jobs: list[Request], n_prompt: int, extra: dict,
                         render: Render, chunk: Chunk, include_usage: bool = False, running_usage: bool = False,
                         opening: str | None = None) -> AsyncIterator[str]:
    """SSE chunks for the prepared jobs: render(job index, output, sample, what was sent) -> a choice or None;
    chunk(choices, usage or None) -> one SSE event. `opening` goes out first (chat's role chunk)."""
    sent: dict[tuple[int, int], tuple[int, int]] = {}  # (job, sample) -> (chars, tokens) already sent
    finished: set[tuple[int, int]] = set()

    def usage() -> Usage:
        n_gen = sum(t for _, t in sent.values())
        return Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, total_tokens=n_prompt + n_gen, **extra)

    try:
        if opening is not None:
            yield opening
        async for i, out in run_streams(state, request, jobs):
            choices = []
            for c in out.outputs:
                key = (i, c.index)
                if key in finished:
                    continue
                chars, toks = sent.get(key, (0, 0))
                choice = render(i, out, c, Sent(key not in sent, chars, toks))
                if choice is None:
                    continue
                choices.append(choice)
                sent[key] = (len(c.text), len(c.token_ids))
                if c.finish_reason is not None:
                    finished.add(key)
            if choices:
                yield chunk(choices, usage() if running_usage else None)
        if include_usage:
            yield chunk([], usage())
        yield SSE_DONE
    except ClientDisconnected:
        return
    except Exception as e:  # noqa: BLE001 - the 200 is already out; report in-band, as OpenAI does
        yield stream_error(e)
        yield SSE_DONE
    finally:
        state.metrics.generation_tokens.inc(sum(t for _, t in sent.values()))
