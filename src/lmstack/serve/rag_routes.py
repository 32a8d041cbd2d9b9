"""Retrieval in the server: RAG chat with citations, and /v1/embeddings (`lmstack serve --rag_index IDX`).

RAG chat: a /v1/chat/completions request that carries `"rag": {"k": 5, "mode": "hybrid"}` (an lmstack extension
body field; with the openai client, `extra_body={"rag": {...}}`), or that offers a tool named `retrieve`, is
answered from the index. The server searches for the last user message (or `rag.query`), rewrites that message
as the numbered context plus the question (rag/prompt.py, trimmed to fit the context), adds the
cite-your-sources system instruction, and generates as for any chat. The `retrieve` tool is run by the server
itself, so it is taken out of the tools the template sees. The response gains two fields:
- `citations`: the chunks the prompt numbered, `[{"n", "chunk_id", "doc_id", "source", "text", "score",
  "cited"}]` (in the first chunk of a stream);
- `citation_checks` on each choice: for every [n] its reply cites, whether chunk n exists and supports the
  sentence, and the supporting span in the source document (in a stream: on the chunk that finishes the choice);
- `rag_trimmed`, when chunks, a chunk's text or the question were cut to fit the context (the warnings).

/v1/embeddings serves the index's embedder (or --embedder): `input` a string or a list of strings,
`encoding_format` float or base64 (little-endian float32, what the openai client asks for by default),
`usage.prompt_tokens` the tokens embedded. Inputs are capped in count and bytes (400 above); an empty string is
a 400 naming its index.

Usage (server side):
    rag = RagService(Index.open("idx"))                 # or RagService(None, embedder=load_embedder("minilm"))
    app = create_app(aengine, config, rag=rag)
"""
from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse

from lmstack.errors import LmstackError
from lmstack.rag.prompt import SYSTEM_PROMPT, build_prompt, check_citations
from lmstack.rag.types import Hit
from lmstack.serve.engine_bridge import ServerState
from lmstack.serve.errors import APIError
from lmstack.serve.limits import reject_lone_surrogates
from lmstack.serve.protocol import ChatCompletionRequest, ChatMessage, EmbeddingRequest, RagOptions

RETRIEVE_TOOL = "retrieve"
MAX_QUERY_CHARS = 4096
"""A longer search query is cut to this (the prompt's question is trimmed to the context separately)."""
MAX_EMBEDDING_INPUTS = 2048
"""Most texts one /v1/embeddings request may carry (OpenAI's limit)."""


class RagService:
    """What the server retrieves with: a Retriever (the Index) and the embedder /v1/embeddings serves."""

    def __init__(self, retriever: Any = None, embedder: Any = None, k: int = 5):
        self.retriever, self.k = retriever, k
        if embedder is None and retriever is not None and hasattr(retriever, "_embedder"):
            try:
                embedder = retriever._embedder()
            except LmstackError:
                embedder = None  # an index of an embedder that cannot be loaded by name: no /v1/embeddings
        self.embedder = embedder

    @property
    def embedder_name(self) -> str:
        return getattr(self.embedder, "name", "") or ""


def _text(m: ChatMessage) -> str:
    if isinstance(m.content, list):
        return "".join(p.text or "" for p in m.content if p.type == "text")
    return m.content or ""


def _tool_name(tool: Any) -> str | None:
    fn = tool.get("function") if isinstance(tool, dict) else None
    return fn.get("name") if isinstance(fn, dict) else None


def rag_options(req: ChatCompletionRequest) -> RagOptions | None:
    """The request's RAG options: its `rag` field, or defaults when it offers a tool named `retrieve`."""
    if req.rag is not None:
        return req.rag
    if isinstance(req.tools, list) and any(_tool_name(t) == RETRIEVE_TOOL for t in req.tools):
        return RagOptions()
    return None


def _without_retrieve(req: ChatCompletionRequest) -> dict:
    """tools / tool_choice with the retrieve tool taken out (the server runs it)."""
    if not isinstance(req.tools, list):
        return {}
    tools = [t for t in req.tools if _tool_name(t) != RETRIEVE_TOOL] or None
    choice = req.tool_choice
    if isinstance(choice, dict) and _tool_name(choice) == RETRIEVE_TOOL or (tools is None and choice is not None):
        choice = None
    return {"tools": tools, "tool_choice": choice}


def _hit_json(n: int, h: Hit, cited: set[int]) -> dict:
    c = h.chunk
    return {"n": n, "chunk_id": c.chunk_id, "doc_id": c.doc_id, "source": c.source, "text": c.text,
            "start": c.start, "end": c.end, "score": h.score, "cited": n in cited}


def prepare_rag(state: ServerState, service: RagService, req: ChatCompletionRequest,
                opts: RagOptions) -> tuple[ChatCompletionRequest, list[Hit], list[str]]:
    """(the request rewritten with numbered context, the hits it numbers, what was trimmed to fit): runs in the
    worker pool."""
    reject_lone_surrogates(req)
    users = [i for i, m in enumerate(req.messages) if m.role == "user"]
    if not users:
        raise APIError(400, "a rag request needs a user message to answer", param="messages")
    last = users[-1]
    question = _text(req.messages[last])
    query = opts.query or question
    if not query.strip():
        raise APIError(400, "the rag query is empty (the last user message has no text)", param="rag.query")
    query = query[:MAX_QUERY_CHARS]  # a longer query is cut for search; the prompt below trims the question itself
    systems = [_text(m) for m in req.messages if m.role in ("system", "developer")]
    system = " ".join(systems + [SYSTEM_PROMPT])
    history = [m for i, m in enumerate(req.messages) if i != last and m.role not in ("system", "developer")]
    try:
        hits = list(service.retriever.search(query, k=opts.k, mode=opts.mode))
        # the earlier turns stay as they are: their tokens come off the room the context and question may use
        held = len(state.tokenizer.render_messages([{"role": m.role, "content": _text(m)} for m in history]).ids) \
            if history else 0
        max_tokens = req.max_completion_tokens or req.max_tokens or state.generation_defaults.get("max_tokens") or 64
        prompt = build_prompt(question, hits, tokenizer=state.tokenizer, max_model_len=state.max_model_len,
                              max_tokens=min(max_tokens, state.max_model_len - 1) + held, system=system)
    except LmstackError as e:
        raise APIError(400, f"rag: {e}", param="rag") from None
    messages = ([ChatMessage(role="system", content=system)] + history
                + [ChatMessage(role="user", content=prompt.messages[-1]["content"])])
    update = {"messages": messages, "rag": None, **_without_retrieve(req)}
    return req.model_copy(update=update), prompt.hits, prompt.trimmed


async def rag_chat_completion(state: ServerState, service: RagService, request: Any, req: ChatCompletionRequest,
                              create) -> Any:
    """A chat completion answered from the index; `create` is the plain chat handler."""
    if service is None or service.retriever is None:
        raise APIError(400, "this server has no retrieval index; start it with --rag_index IDX to use rag or the "
                            "retrieve tool", param="rag")
    opts = rag_options(req)
    new_req, hits, trimmed = await state.run(prepare_rag, state, service, req, opts)
    resp = await create(state, request, new_req)
    if new_req.stream:
        resp.body_iterator = _with_citations(resp.body_iterator, hits)
        return resp
    body = json.loads(resp.body)
    cited: set[int] = set()
    for choice in body.get("choices", []):
        choice["citation_checks"], numbers = _checks_json((choice.get("message") or {}).get("content") or "", hits)
        cited |= numbers
    body["citations"] = [_hit_json(n, h, cited) for n, h in enumerate(hits, 1)]
    if trimmed:
        body["rag_trimmed"] = trimmed  # the warnings: what was cut so the prompt fits the context
    return JSONResponse(body, status_code=resp.status_code)


def _checks_json(text: str, hits: list[Hit]) -> tuple[list[dict], set[int]]:
    """(the citation_checks of one reply, the numbers it cites)."""
    checks = check_citations(text, hits)
    return ([{"n": c.n, "ok": c.ok, "exists": c.exists, "supported": c.supported, "overlap": round(c.overlap, 3),
              "doc_id": c.doc_id, "span": list(c.span) if c.span else None, "span_text": c.span_text}
             for c in checks], {c.n for c in checks})


async def _with_citations(events, hits: list[Hit]):
    """The stream's events, with `citations` added to its first chunk and, on the chunk that finishes a choice,
    that choice's `citation_checks` (its whole reply is known only then)."""
    first = True
    replies: dict[int, list[str]] = {}
    async for event in events:
        if not event.startswith("data: {"):
            yield event
            continue
        payload = json.loads(event[len("data: "):])
        changed = first
        if first:
            first = False
            payload["citations"] = [_hit_json(n, h, set()) for n, h in enumerate(hits, 1)]
        for choice in payload.get("choices") or []:
            i = choice.get("index", 0)
            replies.setdefault(i, []).append((choice.get("delta") or {}).get("content") or "")
            if choice.get("finish_reason"):
                choice["citation_checks"] = _checks_json("".join(replies[i]), hits)[0]
                changed = True
        yield f"data: {json.dumps(payload, ensure_ascii=False)}\n\n" if changed else event


def embed_now(state: ServerState, service: RagService, req: EmbeddingRequest) -> dict:
    """The /v1/embeddings response body (runs in the worker pool)."""
    emb = service.embedder if service is not None else None
    if emb is None:
        raise APIError(404, "this server serves no embedder; start it with --rag_index IDX or --embedder minilm|DIR")
    reject_lone_surrogates(req)
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    if not texts:
        raise APIError(400, "input is empty; give a string or a non-empty list of strings", param="input")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise APIError(400, f"input has {len(texts)} texts; at most {MAX_EMBEDDING_INPUTS} per request", param="input")
    for i, t in enumerate(texts):
        if not t.strip():
            raise APIError(400, f"input[{i}] is empty; every text must have some content", param="input")
    if req.dimensions is not None and req.dimensions != emb.dim:
        raise APIError(400, f"dimensions={req.dimensions} is not supported; {emb.name} embeds into {emb.dim}",
                       param="dimensions")
    if req.model is not None and req.model not in (emb.name, state.config.model_name):
        raise APIError(404, f"model {req.model!r} is not served for embeddings; use {emb.name!r}", param="model")
    vectors = np.asarray(emb.embed(texts), dtype="<f4")
    n_tokens = sum(len(ids) for ids in emb.tokenize(texts)) if hasattr(emb, "tokenize") else 0
    data = []
    for i, v in enumerate(vectors):
        value: Any = base64.b64encode(v.tobytes()).decode() if req.encoding_format == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": emb.name,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
