"""POST /v1/chat/completions: messages -> the tokenizer's chat template -> the engine -> an assistant reply.

The prompt ids come from the tokenizer's ChatTemplate (`tokenizer.apply_chat_template`): lmstack's own
template encodes message text with special tokens switched off, so a user typing "<|assistant_start|>" cannot
forge a turn; an HF directory's Jinja template renders as transformers does. Generation stops on the
tokenizer's stop set (`tokenizer.stop_ids()`: EOS, generation_config.json's eos list, the template's end of
turn); a template that fails is a 400 naming its file.
Pictures (`image_url` parts, serve/image_input.py): on a server of a VLM each becomes a marker in the text, the
template renders, then the marker's ids become the picture's placeholder ids (encoded once, keyed by its pixels,
so the prefix cache keys on the picture), pinned until the reply is over; a text-only model answers 400 "this
model does not take images". Streaming sends OpenAI's
`chat.completion.chunk` events: a first chunk per choice with the role, content deltas, a last chunk
with the finish reason, an optional usage chunk, then `data: [DONE]`.

Tools (serve/tool_calls.py): a request's `tools` go to the template; replies are parsed back into `tool_calls`
by the server's --tool_call_parser. While streaming, content stops at the first possible call start; the calls
go out as one tool_calls delta with the last chunk, once the text is complete.

Cheap checks run on the event loop first (list caps, the message count); then, in the server's worker pool,
the lone-surrogate walk, all-empty messages (400 unless `allow_empty_prompt`), message text too long in bytes
to fit (413, before the template is rendered), the chat template, the encoding and the parameter preparation.

Usage (server side):
    response = await create_chat_completion(state, request, ChatCompletionRequest(messages=[...]))
"""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi.responses import JSONResponse

from lmstack.errors import LmstackError
from lmstack.infer.sequence import Request
from lmstack.serve.engine_bridge import ServerState, collect, sampling_params
from lmstack.serve.errors import APIError, from_value_error
from lmstack.serve.image_input import NO_IMAGES, RequestImages
from lmstack.serve.limits import check_sampling_lists, reject_lone_surrogates, utf8_len
from lmstack.serve.prompt_compression import Plan, plan, rewrite_messages
from lmstack.serve.safety_settings import apply_chat_safety
from lmstack.serve.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                    ChatCompletionRequest, ChatCompletionResponse, ChatMessage, ChoiceLogprobs,
                                    DeltaMessage, DeltaToolCall, TokenLogprob, TopLogprob, Usage)
from lmstack.serve.sse_stream import EventStream, Sent, sse, stream_choices
from lmstack.serve.tool_calls import StreamedToolText, ToolPlan, check_tools, template_tool_calls, tool_plan


def message_dicts(messages: list[ChatMessage], images: Callable[[Any, str], str] | None = None) -> list[dict]:
    """OpenAI messages -> the {'role', 'content'[, 'tool_calls']} dicts our chat template renders.

    images(part, where) -> the text an image_url part becomes (a VLM's marker: serve/image_input.py); None: the
    model takes no images, and an image part is a 400 saying so."""
    out = []
    for k, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type == "image_url":
                    where = f"messages.{k}.content.{j}"
                    if images is None:
                        raise APIError(400, f"{where} is an image: {NO_IMAGES}", param=where,
                                       code="images_not_supported")
                    texts.append(images(part, where))
                    continue
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{k}] has a {part.type!r} part; only text parts are supported",
                                   param=f"messages.{k}.content")
                texts.append(part.text)
            content = "".join(texts)
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.tool_calls:  # arguments become dicts, the shape templates index into
            d["tool_calls"] = template_tool_calls(m.tool_calls, k)
        for key in ("name", "tool_call_id"):  # Jinja templates of tool-using models read these
            if getattr(m, key) is not None:
                d[key] = getattr(m, key)
        out.append(d)
    return out


def has_images(messages: list[ChatMessage]) -> bool:
    return any(isinstance(m.content, list) and any(p.type == "image_url" for p in m.content) for m in messages)


def _text_bytes(m: ChatMessage) -> int:
    if isinstance(m.content, list):
        return sum(utf8_len(p.text) for p in m.content if isinstance(p.text, str))
    return utf8_len(m.content or "")


def check_message_count(state: ServerState, messages: list) -> None:
    limit = state.limits.max_messages
    if len(messages) > limit:
        raise APIError(400, f"messages has {len(messages)} entries; this server takes at most {limit} "
                            "(limits.max_messages)", param="messages", code="limit_exceeded")


def check_messages(state: ServerState, req: ChatCompletionRequest) -> None:
    """Before rendering: no lone surrogates, not all empty, and a byte bound on the text (O(request size))."""
    reject_lone_surrogates(req)
    n_bytes = sum(_text_bytes(m) for m in req.messages)
    if req.messages and n_bytes == 0 and not req.allow_empty_prompt and not has_images(req.messages):
        raise APIError(400, "every message is empty; give some content (or set allow_empty_prompt: true to "
                            "generate from the chat template alone)", param="messages")
    state.check_prompt_bytes(n_bytes, "messages")


_TEMPLATE_OWN = {"messages", "add_generation_prompt", "tools", "documents"}


def chat_prompt_ids(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    compression: Plan | None = None, template_kwargs: dict | None = None,
                    tools: list[dict] | None = None, images: RequestImages | None = None) -> list[int]:
    """The chat template's ids; with a compression plan, message contents are compressed before rendering.
    template_kwargs: the request's chat_template_kwargs, extra variables for the template; tools: checked
    OpenAI tools, the template's `tools`; images: the request's pictures (a VLM server's chat route), whose
    placeholder ids replace their markers (the caller releases them)."""
    if not messages:
        raise APIError(400, "messages is empty; give at least one message", param="messages")
    clash = sorted(_TEMPLATE_OWN & set(template_kwargs or {}))
    if clash:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(clash)}; they have their own fields",
                       param="chat_template_kwargs")
    on_image = images.part_text if images is not None else None if state.vision is None else _images_elsewhere
    dicts = message_dicts(messages, on_image)
    if compression is not None:
        dicts = rewrite_messages(state, dicts, compression)
    try:
        ids = state.tokenizer.render_messages(dicts, add_generation_prompt, tools=check_tools(tools) if tools else None,
                                              **(template_kwargs or {})).ids  # ids only: no mask work
    except LmstackError as e:
        raise from_value_error(e) from None
    return images.expand(ids) if images is not None and images.count else ids


def _images_elsewhere(_: Any, where: str) -> str:
    raise APIError(400, f"{where} is an image; only /v1/chat/completions reads images", param=where)


def _check_image_request(req: ChatCompletionRequest) -> None:
    """What a request with pictures cannot ask for: per-prompt-token work reads placeholder ids as tokens."""
    for name, bad in (("prompt_logprobs", req.prompt_logprobs is not None),
                      ("repetition_penalty", req.repetition_penalty not in (None, 1.0)),
                      ("prompt_compression", req.prompt_compression is not None)):
        if bad:
            raise APIError(400, f"{name} is not supported with images: a picture's placeholder ids are no tokens "
                                "of the vocabulary", param=name)


def _logprobs(state: ServerState, token_ids: list[int], entries: list[dict[int, float]] | None,
              top_n: int) -> ChoiceLogprobs:
    content = []
    for tok, entry in zip(token_ids, entries or []):
        s = state.token_text(tok)
        top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
        content.append(TokenLogprob(token=s, logprob=entry.get(tok, float("-inf")),
                                    bytes=list(state.token_bytes(tok)),
                                    top_logprobs=[TopLogprob(token=state.token_text(t), logprob=v,
                                                             bytes=list(state.token_bytes(t))) for t, v in top]))
    return ChoiceLogprobs(content=content)


def _finish(reason: str | None) -> str | None:
    return None if reason == "abort" else reason


def _prepare(state: ServerState, req: ChatCompletionRequest, lora: str | None, compression: Plan | None, rid: str):
    """(prompt ids, the prepared engine request, prompt tokens before compression or None, the request's pictures
    or None): the chat template, encoding, compression, parameter and engine-request preparation grow with the
    request, so they run in the worker pool. The engine request is prepared once, here: what only the engine
    checks is a 400 before a stream's 200 goes out. Pictures are decoded and encoded here too, and stay pinned
    until the caller releases them (also when this fails)."""
    check_messages(state, req)
    images = None
    if state.vision is not None and has_images(req.messages):
        _check_image_request(req)
        images = state.vision.request()
        compression = None  # (a server-wide --compression.rate would rewrite text around the pictures' markers)
    try:
        return _prepare_ids(state, req, lora, compression, rid, images) + (images,)
    except BaseException:
        if images is not None:
            images.release()
        raise


def _prepare_ids(state: ServerState, req: ChatCompletionRequest, lora: str | None, compression: Plan | None,
                 rid: str, images: RequestImages | None):
    ids = chat_prompt_ids(state, req.messages, req.add_generation_prompt, template_kwargs=req.chat_template_kwargs,
                          tools=req.tools, images=images)
    n_before = None
    if compression is not None:
        n_before = len(ids)
        ids = chat_prompt_ids(state, req.messages, req.add_generation_prompt, compression, req.chat_template_kwargs,
                              req.tools)
    wanted = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = state.check_lengths(len(ids), wanted, param,
                                     default=state.generation_defaults.get("max_tokens"))
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(state, req, max_tokens=max_tokens, logprobs=logprobs, lora=lora)
    return ids, state.prepare(ids, params, rid), n_before


def _tool_plan(state: ServerState, req: ChatCompletionRequest) -> ToolPlan:
    if req.tools is None and req.tool_choice is None:
        return ToolPlan(None, "none", "none")
    try:  # the parser "auto" picks reads the template's text; a template that cannot load is a 400
        source = getattr(state.tokenizer.chat_template, "source", None) or ""
    except LmstackError as e:
        raise from_value_error(e) from None
    return tool_plan(req, state.config.tool_call_parser, source)


def _reply(plan: ToolPlan, text: str, finish: str | None) -> tuple[AssistantMessage, str | None]:
    """The assistant message for a finished text: tool_calls when the plan's parser finds calls in it."""
    parsed = plan.parse(text) if plan.active else None
    if parsed is None:
        return AssistantMessage(content=text), finish
    content, calls = parsed
    return AssistantMessage(content=content, tool_calls=calls), plan.finish_reason


async def create_chat_completion(state: ServerState, request, req: ChatCompletionRequest):
    req = apply_chat_safety(state.config.safety, req)  # the persona preset and the style caps (or a 400)
    tools = _tool_plan(state, req)
    if tools.schema is not None:  # tool_choice "required" / named: the output is forced to the tools' JSON
        req = req.model_copy(update={"guided_json": tools.schema})
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    lora = state.resolve_model(req.model)
    check_sampling_lists(state.limits, req)
    check_message_count(state, req.messages)
    compression = plan(state, req.prompt_compression)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    ids, job, n_before, images = await state.run(_prepare, state, req, lora, compression, rid)
    release = images.release if images is not None else None
    extra = {} if n_before is None else {"prompt_tokens_before_compression": n_before}
    created = int(time.time())
    model = req.model or state.config.model_name
    state.metrics.prompt_tokens.inc(len(ids))
    try:
        if req.stream:  # the stream releases the pictures when it is over (or refused: 503)
            stream = EventStream(state, _stream(state, request, req, job, len(ids), rid, created, model, extra,
                                                tools), on_close=release)
            release = None
            return stream
        with state.admit():
            (final,) = await collect(state, request, [job])
    finally:
        if release is not None:
            release()
    choices, n_gen = [], 0
    for j, c in enumerate(final.outputs):
        lp = _logprobs(state, c.token_ids, c.logprobs, req.top_logprobs or 0) if req.logprobs else None
        message, finish = _reply(tools, c.text, _finish(c.finish_reason))
        choices.append(ChatChoice(index=j, message=message, logprobs=lp, finish_reason=finish,
                                  stop_reason=c.stop_reason))
        n_gen += len(c.token_ids)
    state.metrics.generation_tokens.inc(n_gen)
    usage = Usage(prompt_tokens=len(ids), completion_tokens=n_gen, total_tokens=len(ids) + n_gen, **extra)
    return JSONResponse(ChatCompletionResponse(id=rid, created=created, model=model, choices=choices,
                                               usage=usage).model_dump())


async def _stream(state: ServerState, request, req: ChatCompletionRequest, job: Request, n_prompt: int, rid: str,
                  created: int, model: str, extra: dict, plan: ToolPlan) -> AsyncIterator[str]:
    held = {j: StreamedToolText(plan) for j in range(req.n)} if plan.active else {}

    def render(_: int, out, c, sent: Sent) -> ChatChunkChoice | None:
        new_text, new_toks = c.text[sent.chars:], c.token_ids[sent.tokens:]
        finish, calls = _finish(c.finish_reason), None
        if held:  # tools: content only up to a possible call start; the calls once the text is complete
            new_text = held[c.index].content_now(c.text)
            if c.finish_reason is not None:
                rest, found = held[c.index].finish(c.text)
                new_text += rest
                if found:
                    calls = [DeltaToolCall(index=i, **call) for i, call in enumerate(found)]
                    finish = plan.finish_reason
        if not new_text and not (req.logprobs and new_toks) and c.finish_reason is None:
            return None  # held back (half a character, maybe a stop string or a tool call): wait for more
        lp = None
        if req.logprobs and new_toks:
            lp = _logprobs(state, new_toks, (c.logprobs or [])[sent.tokens:], req.top_logprobs or 0)
        return ChatChunkChoice(index=c.index, delta=DeltaMessage(content=new_text or None, tool_calls=calls),
                               logprobs=lp, finish_reason=finish)

    def chunk(choices: list, usage: Usage | None = None) -> str:
        return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage))

    # The role goes out at once, so a client sees the reply begin even while the prompt is prefilling.
    opening = chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=""))
                     for j in range(req.n)])
    opts = req.stream_options
    async for event in stream_choices(state, request, [job], n_prompt, extra, render, chunk,
                                      include_usage=bool(opts and opts.include_usage),
                                      running_usage=bool(opts and opts.continuous_usage_stats), opening=opening):
        yield event
