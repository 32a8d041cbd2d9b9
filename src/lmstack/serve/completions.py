"""POST /v1/completions: the legacy OpenAI completions endpoint (what lm-evaluation-harness drives).

The prompt may be a string, a list of strings, a list of token ids or a list of such lists; each prompt
becomes one engine request, and its n samples become choices prompt_index * n + sample_index.
`echo` puts the prompt in front of the text; with `logprobs` it also returns the prompt's per-token
log-probabilities, in the shape lm-eval's `local-completions` model reads for loglikelihood tasks:
choices[i].logprobs = {tokens, token_logprobs (None for the first token), top_logprobs, text_offset}.

Before anything is encoded, cheap checks on the event loop refuse what cannot be served: list-size caps (400),
an empty prompt (400 unless `allow_empty_prompt`), a text prompt too long in bytes to fit the context (413).
The lone-surrogate walk, encoding and parameter preparation then run in the server's worker pool.

Usage (server side):
    response = await create_completion(state, request, CompletionRequest(prompt="Hi", max_tokens=8))
"""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse

from lmstack.infer.sequence import Request
from lmstack.serve.engine_bridge import ServerState, collect, job_ids, sampling_params
from lmstack.serve.errors import APIError
from lmstack.serve.limits import check_sampling_lists, reject_lone_surrogates, utf8_len
from lmstack.serve.prompt_compression import Plan, compress_completion_prompts, plan
from lmstack.serve.safety_settings import check_completion_safety
from lmstack.serve.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                    Usage)
from lmstack.serve.sse_stream import EventStream, Sent, sse, stream_choices


def _prompt_items(state: ServerState, req: CompletionRequest) -> list[str | list[int]]:
    """Every prompt as given (text or token ids), after the cheap checks: count, emptiness, bytes."""
    p = req.prompt
    if isinstance(p, str):
        items: list = [p]
    elif not p:
        raise APIError(400, "prompt is an empty list; give a string, strings, token ids or lists of ids",
                       param="prompt")
    elif all(isinstance(x, int) for x in p):
        items = [list(p)]
    else:
        items = list(p)
    if len(items) > state.limits.max_prompts:
        raise APIError(400, f"{len(items)} prompts in one request; this server takes at most "
                            f"{state.limits.max_prompts} (limits.max_prompts)", param="prompt", code="limit_exceeded")
    for k, x in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt.{k}"
        if len(x) == 0 and not req.allow_empty_prompt:
            raise APIError(400, f"{param} is empty; give some text or token ids (or set allow_empty_prompt: true "
                                "to generate from the start token alone)", param=param)
        if isinstance(x, str):
            state.check_prompt_bytes(utf8_len(x), param)
    return items


def _prompts(state: ServerState, req: CompletionRequest, items: list) -> list[tuple[str, list[int]]]:
    """Every prompt as (text, token ids); runs in the worker pool (encoding grows with the prompt)."""
    out = []
    for x in items:
        if isinstance(x, str):
            out.append((x, state.encode(x, req.add_special_tokens)))
        else:
            ids = state.check_ids(list(x))
            out.append((state.tokenizer.decode(ids) if ids else "", ids))
    return out


def _logprobs(state: ServerState, token_ids: list[int], entries: list[dict[int, float] | None],
              offset: int) -> CompletionLogprobs:
    """Per-token logprobs in the legacy shape; `offset` is where the first token starts in the text."""
    lp = CompletionLogprobs()
    for tok, entry in zip(token_ids, entries):
        s = state.token_text(tok)
        lp.tokens.append(s)
        lp.text_offset.append(offset)
        offset += len(s)
        if entry is None:  # the first prompt token has no context, hence no probability
            lp.token_logprobs.append(None)
            lp.top_logprobs.append(None)
            continue
        lp.token_logprobs.append(entry.get(tok))
        # The token itself is included with its alternatives (so a greedy token equals the max, as lm-eval checks).
        top = sorted(entry.items(), key=lambda kv: -kv[1])
        lp.top_logprobs.append({state.token_text(t): v for t, v in top})
    return lp


def _choice(state: ServerState, req: CompletionRequest, prompt: tuple[str, list[int]], out: Any, c: Any,
            index: int, sent_text: int = 0, sent_tokens: int = 0, with_prompt: bool = True) -> CompletionChoice:
    """One choice; in streaming, only what is new after `sent_text` characters / `sent_tokens` tokens."""
    text, prompt_text = c.text[sent_text:], ""
    if req.echo and with_prompt:
        prompt_text = prompt[0]
    logprobs = None
    if req.logprobs is not None:
        tokens = c.token_ids[sent_tokens:]
        entries = (c.logprobs or [])[sent_tokens:]
        # Offsets run over the returned token strings; with echo the completion starts where the prompt's
        # tokens end (which is len(prompt) unless the tokenizer added special tokens such as <|bos|>).
        base = sum(len(state.token_text(t)) for t in prompt[1]) if req.echo else 0
        logprobs = _logprobs(state, tokens, entries, base + sent_text)
        if prompt_text:
            head = _logprobs(state, prompt[1], out.prompt_logprobs or [None] * len(prompt[1]), 0)
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                setattr(logprobs, name, getattr(head, name) + getattr(logprobs, name))
    prompt_logprobs = None
    if req.prompt_logprobs is not None and with_prompt and out.prompt_logprobs:
        prompt_logprobs = [None if e is None else {state.token_text(t): v for t, v in e.items()}
                           for e in out.prompt_logprobs]
    return CompletionChoice(index=index, text=prompt_text + text, logprobs=logprobs,
                            finish_reason=c.finish_reason if c.finish_reason != "abort" else None,
                            stop_reason=c.stop_reason, prompt_logprobs=prompt_logprobs)


def _prepare(state: ServerState, req: CompletionRequest, items: list, lora: str | None, compression: Plan | None,
             rid: str):
    """(prompts as (text, ids), the prepared engine requests, prompt tokens before compression or None):
    encoding, compression, length checks, parameter and engine-request preparation all grow with the
    request, so they run in the worker pool. Each engine request is prepared once, here: what only the
    engine checks is a 400 before a stream's 200 goes out."""
    reject_lone_surrogates(req)  # a walk over every string of the request
    prompts = _prompts(state, req, items)
    n_before = None
    if compression is not None:
        prompts, n_before = compress_completion_prompts(state, items, prompts, compression, req.add_special_tokens)
    # Every prompt must fit; with no max_tokens given, generate as many as every prompt leaves room for.
    # A request silent on max_tokens gets the model's generation_config max_new_tokens, else OpenAI's 16.
    default = state.generation_defaults.get("max_tokens")
    wanted = req.max_tokens if default is None or "max_tokens" in req.model_fields_set else None
    max_tokens = min(state.check_lengths(len(ids), wanted, default=default) for _, ids in prompts)
    params = sampling_params(state, req, max_tokens=max_tokens, logprobs=req.logprobs, lora=lora)
    if req.echo and req.logprobs is not None:
        params.prompt_logprobs = max(req.logprobs, params.prompt_logprobs or 0)
    jobs = [state.prepare(ids, params, job_id) for (_, ids), job_id in zip(prompts, job_ids(rid, len(prompts)))]
    return prompts, jobs, n_before


async def create_completion(state: ServerState, request, req: CompletionRequest):
    if req.suffix is not None:
        raise APIError(400, "suffix is not supported by this server", param="suffix")
    lora = state.resolve_model(req.model)
    check_sampling_lists(state.limits, req)
    check_completion_safety(state.config.safety, req)
    items = _prompt_items(state, req)
    compression = plan(state, req.prompt_compression)
    rid = f"cmpl-{uuid.uuid4().hex}"
    prompts, jobs, n_before = await state.run(_prepare, state, req, items, lora, compression, rid)
    extra = {} if n_before is None else {"prompt_tokens_before_compression": n_before}
    created = int(time.time())
    model = req.model or state.config.model_name
    state.metrics.prompt_tokens.inc(sum(len(ids) for _, ids in prompts))
    if req.stream:
        return EventStream(state, _stream(state, request, req, prompts, jobs, rid, created, model, extra),
                           len(jobs))
    with state.admit(len(jobs)):
        finals = await collect(state, request, jobs)
    choices, completion_tokens = [], 0
    for i, out in enumerate(finals):
        for j, c in enumerate(out.outputs):  # with best_of, c.index names the kept sample, not its rank
            choices.append(_choice(state, req, prompts[i], out, c, i * req.n + j))
            completion_tokens += len(c.token_ids)
    state.metrics.generation_tokens.inc(completion_tokens)
    n_prompt = sum(len(ids) for _, ids in prompts)
    usage = Usage(prompt_tokens=n_prompt, completion_tokens=completion_tokens,
                  total_tokens=n_prompt + completion_tokens, **extra)
    body = CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage)
    return JSONResponse(body.model_dump())


async def _stream(state: ServerState, request, req: CompletionRequest, prompts, jobs: list[Request], rid: str,
                  created: int, model: str, extra: dict) -> AsyncIterator[str]:
    def render(i: int, out, c, sent: Sent) -> CompletionChoice | None:
        new_tokens = len(c.token_ids) > sent.tokens and req.logprobs is not None
        if not (sent.first and req.echo) and len(c.text) == sent.chars and not new_tokens and c.finish_reason is None:
            return None  # nothing to show yet (half a character, or text held back for a stop string)
        return _choice(state, req, prompts[i], out, c, i * req.n + c.index, sent.chars, sent.tokens,
                       with_prompt=sent.first)

    def chunk(choices: list, usage: Usage | None) -> str:
        return sse(CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage))

    opts = req.stream_options
    async for event in stream_choices(state, request, jobs, sum(len(ids) for _, ids in prompts), extra, render,
                                      chunk, include_usage=bool(opts and opts.include_usage),
                                      running_usage=bool(opts and opts.continuous_usage_stats)):
        yield event
