"""The OpenAI-compatible HTTP server: a FastAPI app around one lmstack AsyncLLMEngine.

Routes:
    GET  /v1/models                 the model (and any LoRA adapters) this server answers to, and "asr", "tts",
                                    "diffusion", "video" for the modality models it was started with
    POST /v1/completions            prompt(s) -> text, logprobs, echo (+ SSE streaming)
    POST /v1/chat/completions       messages -> assistant reply (+ SSE streaming); with "rag" or a `retrieve` tool,
                                    answered from --rag_index with citations (serve/rag_routes.py)
    POST /v1/embeddings             text(s) -> vectors from the index's embedder (float or base64)
    POST /v1/moderations            text(s) -> per-category flags and scores, with --guard (serve/guard_routes.py),
                                    which also moderates chat and completions (input, streamed output, PII)
    POST /v1/feedback               a thumbs up/down, category and correction on a returned reply, with
                                    --feedback_db, which also records every chat/completions response
                                    (serve/feedback_routes.py)
    POST /v1/audio/transcriptions   an uploaded WAV/FLAC/MP3 -> its text, with --asr (serve/audio_routes.py)
    POST /v1/audio/speech           text -> speech audio, with --tts (serve/audio_routes.py)
    POST /v1/images/generations     a prompt -> base64 PNGs, with --diffusion (serve/image_routes.py)
    POST /v1/video/answers          video frames + a question -> an answer, with --video (serve/video_routes.py;
                                    an lmstack extension, OpenAI has no video API)
    POST /tokenize, /detokenize     text or messages <-> token ids (vLLM's shapes)
    GET  /tokenizer_info            special tokens and chat template (lm-eval's remote tokenizer reads it)
    GET  /health                    200 while the engine runs, 503 (with Retry-After) after it failed
    GET  /metrics                   Prometheus text
    GET  /                          the web chat page (static/chat.html + its ES modules chat.js ..., chat.css)
    GET  /static/<file>             the page's own scripts and styles (a fixed list; no other files)

Three ASGI middlewares wrap the app: the outer one counts every answer by route and status for /metrics;
the middle one refuses bodies over max_request_bytes (413) before any parsing, even chunked ones; the
inner one answers any unexpected exception with a 500 JSON error and keeps the connection.
API-key coverage: a set api_key guards /v1/*, /tokenize, /detokenize and /tokenizer_info (401 without
`Authorization: Bearer <key>`). The chat page (/) and /metrics stay open while the server binds a loopback
host; with a non-loopback host they need the key too (and /openapi.json is not served), so only /health is
ever open to the network.
Tokenising (/tokenize, /detokenize, prompts, chat templates) runs in a worker pool, off the event loop.

Usage:
    from lmstack.infer import AsyncLLMEngine
    app = create_app(AsyncLLMEngine("runs/model"), ServerConfig(model_name="tiny", api_key="sk-local"))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""
from __future__ import annotations

import html
import json
import secrets
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from lmstack.serve.audio_input import AudioLimits
from lmstack.serve.audio_routes import add_audio_routes, upload_limit
from lmstack.serve.chat_completions import chat_prompt_ids, check_message_count, create_chat_completion
from lmstack.serve.completions import create_completion
from lmstack.serve.errors import RETRY_AFTER_S, APIError, CatchAllMiddleware, error_response, install_error_handlers
from lmstack.serve.engine_bridge import ClientDisconnected, ServerConfig, ServerState
from lmstack.serve.feedback_routes import FeedbackRequest, feedback_now, recorded
from lmstack.serve.guard_routes import guarded_chat, guarded_completion, moderations_now
from lmstack.serve.image_routes import add_image_routes
from lmstack.serve.limits import reject_lone_surrogates
from lmstack.serve.metrics import CONTENT_TYPE, ServerMetrics
from lmstack.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                                    ModelCard, ModelList, ModerationRequest, TokenizeRequest)
from lmstack.serve.rag_routes import RagService, embed_now, rag_chat_completion, rag_options
from lmstack.serve.video_routes import add_video_routes

STATIC = Path(__file__).resolve().parent / "static"
# The page's assets, by name: only these are served, so no request path ever reaches the filesystem.
# chat.js is an ES module (<script type="module">) that imports the other scripts; "script-src 'self'" allows them.
STATIC_FILES = {**{name: "text/javascript" for name in ("chat.js", "dom.js", "errors.js", "markdown.js", "settings.js",
                                                         "store.js", "stream.js", "view.js")},
                "chat.css": "text/css"}
# The page loads nothing from elsewhere (no CDN, no fonts) and runs no inline script: the browser enforces it.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data: blob:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_KNOWN_ROUTES = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/moderations",
                 "/v1/feedback", "/v1/audio/transcriptions", "/v1/audio/speech", "/v1/images/generations",
                 "/v1/video/answers",
                 "/tokenize", "/detokenize",
                 "/tokenizer_info", "/health", "/metrics", "/", *(f"/static/{name}" for name in STATIC_FILES)}


class MetricsMiddleware:
    """Counts every response by route and status code (unknown paths share one label, to bound cardinality)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope["path"] if scope["path"] in _KNOWN_ROUTES else "other"
            self.metrics.requests.inc(route=route, status=str(status["code"]))


class BodyLimitMiddleware:
    """Reads the body up front (at most max_bytes + 1) and answers 413 when it is too large.

    Content-Length is trusted only to refuse early; a chunked body is counted as it arrives. The body
    read is then replayed to the app, and later receive() calls go to the server (for disconnects).
    """

    def __init__(self, app, max_bytes: int, path_limits: dict[str, int] | None = None):
        self.app, self.max_bytes, self.path_limits = app, max_bytes, path_limits or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        max_bytes = self.path_limits.get(scope["path"], self.max_bytes)  # an upload route has its own limit
        too_large = APIError(413, f"the request body is larger than this server's limit of {max_bytes} bytes",
                             code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return await error_response(too_large)(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                return await error_response(too_large)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(aengine: Any, config: ServerConfig | None = None, rag: RagService | None = None,
               guard: Any = None, feedback: Any = None, asr: Any = None, tts: Any = None, images: Any = None,
               audio_limits: AudioLimits | None = None, video: Any = None) -> FastAPI:
    """A FastAPI app serving `aengine` (an lmstack.infer.AsyncLLMEngine) with the limits in `config`; `rag`
    (a retriever and its embedder) enables RAG chat and /v1/embeddings; `guard` (lmstack.safety.guard.Guard)
    moderates chat and completions and enables /v1/moderations; `feedback` (lmstack.safety.feedback.FeedbackStore)
    records every chat and completions response and enables /v1/feedback; `asr` (a SpeechRecognizer), `tts` (a
    SpeechSynthesizer) and `images` (an ImageGenerator) enable /v1/audio/transcriptions (uploads checked
    against `audio_limits`), /v1/audio/speech and /v1/images/generations; `video` (a serve.video_routes
    VideoAnswerer) enables /v1/video/answers (an lmstack extension)."""
    audio_limits = audio_limits or AudioLimits()
    config = config or ServerConfig()
    metrics = ServerMetrics(config.model_name)
    state = ServerState(aengine, config, metrics)
    # The OpenAPI schema is served only where the page is open: with a key on a network host, only /health is.
    app = FastAPI(title="lmstack", description="OpenAI-compatible lmstack server", docs_url=None, redoc_url=None,
                  openapi_url=None if config.key_on_everything else "/openapi.json")
    app.state.lmstack = state
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, __: ClientDisconnected):
        return PlainTextResponse("", status_code=499)  # nginx's "client closed request"; nobody reads it

    async def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'")

    auth = [Depends(check_key)]
    # The page and /metrics reveal nothing a loopback user could not read anyway; on a network they need the key.
    page_auth = auth if config.key_on_everything else []

    @app.get("/v1/models", dependencies=auth)
    async def models():
        cards = [ModelCard(id=config.model_name, created=state.created, max_model_len=state.max_model_len)]
        cards += [ModelCard(id=name, created=state.created, root=name, parent=config.model_name,
                            max_model_len=state.max_model_len) for name in state.adapters()]
        # the speech, image and video models behind their flags; their routes take any `model` name (there is one
        # model per route), so these ids are labels a client can discover, not a routing key
        cards += [ModelCard(id=name, created=state.created) for name, served in
                  (("asr", asr), ("tts", tts), ("diffusion", images), ("video", video)) if served is not None]
        return ModelList(data=cards).model_dump()

    async def completion(request: Request, body: CompletionRequest):
        return await create_completion(state, request, body)

    async def chat(request: Request, body: ChatCompletionRequest):
        if rag_options(body) is not None:
            return await rag_chat_completion(state, rag, request, body, create_chat_completion)
        return await create_chat_completion(state, request, body)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        if guard is not None:
            return await recorded(feedback, state, body, await guarded_completion(state, guard, request, body,
                                                                                  completion))
        return await recorded(feedback, state, body, await completion(request, body))

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if guard is not None:
            return await recorded(feedback, state, body, await guarded_chat(state, guard, request, body, chat))
        return await recorded(feedback, state, body, await chat(request, body))

    @app.post("/v1/feedback", dependencies=auth)
    async def user_feedback(body: FeedbackRequest):
        return await state.run(feedback_now, feedback, body)

    @app.post("/v1/moderations", dependencies=auth)
    async def moderations(body: ModerationRequest):
        return await state.run(moderations_now, state, guard, body)

    @app.post("/v1/embeddings", dependencies=auth)
    async def embeddings(body: EmbeddingRequest):
        return await state.run(embed_now, state, rag, body)

    def json_bytes(payload: dict) -> Response:
        return Response(json.dumps(payload, ensure_ascii=False).encode(), media_type="application/json")

    def tokenize_now(body: TokenizeRequest) -> Response:
        reject_lone_surrogates(body)
        if body.messages is not None:
            ids = chat_prompt_ids(state, body.messages, body.add_generation_prompt,
                                  template_kwargs=body.chat_template_kwargs, tools=body.tools)
        else:
            ids = state.encode(body.prompt, body.add_special_tokens)
        # Rendered here, in slices: json.dumps of 0.6M ids is one ~0.1 s C call that holds the GIL, and
        # so would stall the event loop's thread even from this worker thread.
        parts = []
        for i in range(0, len(ids), 16384):
            parts.append(",".join(map(str, ids[i:i + 16384])))
        text = f'{{"tokens":[{",".join(parts)}],"count":{len(ids)},"max_model_len":{state.max_model_len}}}'
        return Response(text.encode(), media_type="application/json")

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest):
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            check_message_count(state, body.messages)
        return await state.run(tokenize_now, body)

    def detokenize_now(tokens: list[int]) -> Response:
        ids = state.check_ids(tokens, param="tokens")
        return json_bytes({"prompt": state.tokenizer.decode(ids)})

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest):
        return await state.run(detokenize_now, body.tokens)

    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info():
        tok = state.tokenizer
        cfg = tok.tokenizer_config() if hasattr(tok, "tokenizer_config") else {}
        names = {k: cfg.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template")}
        return {**names, "model_max_length": state.max_model_len, "vocab_size": tok.vocab_size,
                "tokenizer_class": type(tok).__name__}

    add_audio_routes(app, state, auth, asr, tts, audio_limits, guard)
    add_image_routes(app, state, auth, images, guard)
    add_video_routes(app, state, auth, video)

    @app.get("/health")
    async def health():
        # The engine's step loop is a background task; if it died, nothing will ever be generated again.
        error = aengine.loop_error
        if error is not None:
            return JSONResponse({"status": "error", "error": repr(error)}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ok", "model": config.model_name, "step_errors": aengine.errors}

    @app.get("/metrics", dependencies=page_auth)
    async def prometheus():
        return PlainTextResponse(metrics.render(state.engine_stats()), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, dependencies=page_auth)
    async def web_chat():
        page = (STATIC / "chat.html").read_text(encoding="utf-8")
        # The name lands in an HTML attribute (data-model): escape it, quotes included.
        page = page.replace('"__MODEL_NAME__"', '"' + html.escape(config.model_name, quote=True) + '"')
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    @app.get("/static/{name}", dependencies=page_auth)
    async def web_asset(name: str):
        if name not in STATIC_FILES:
            raise APIError(404, f"no static file {name!r}; the page's files are {sorted(STATIC_FILES)}")
        return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name],
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    app.add_middleware(CatchAllMiddleware)  # added first = innermost: catches what the handlers did not
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes,
                       path_limits={"/v1/audio/transcriptions": upload_limit(config.max_request_bytes, audio_limits)})
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last = outermost: sees every status
    return app
