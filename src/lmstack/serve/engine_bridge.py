"""What /v1/completions and /v1/chat/completions share: admission, sampling params, the engine streams.

The server talks to the engine only through AsyncLLMEngine's public facade (infer/async_engine.py):
its properties (tokenizer, max_model_len, vocab_size, max_num_seqs, generation_defaults, adapters, model
device and dtype), stats(), loop_error, prepare() and generate(); tests/test_layering.py keeps it so.

- `ServerState` holds the engine, the tokenizer, the limits and the metrics, and admits requests: more
  than max_num_seqs + max_queue generation requests in flight is a 503, checked before any work.
  `state.run(fn, ...)` runs tokenising and parameter preparation in a small worker pool, never on the
  event loop, so a heavy request cannot stall /health or anyone's stream (issue 15).
- `sampling_params` turns a request into lmstack.infer.SamplingParams (whose ValueErrors name the field).
- `check_lengths` enforces the context: a prompt that does not fit is 413, prompt + max_tokens that
  does not fit is 400 (max_tokens), as vLLM answers.
- `state.prepare` validates and tokenizes one engine request, once, in the worker pool: what only the
  engine checks (a grammar that does not compile, ...) is a 400 before any stream sends its 200.
- `run_streams` drives the prepared engine requests, merged into one stream of (prompt index, output),
  and watches the client: when it disconnects, every engine request is closed, which aborts it in the
  engine and frees its KV blocks at once (not at the next token, and not when the request would end).
  A request that fails inside the engine (RequestFailed: that request alone) becomes a 500 for it alone,
  or an SSE error event then [DONE] once its stream has started.

Usage:
    state = ServerState(aengine, ServerConfig(model_name="tiny"), metrics)
    prepared = [state.prepare(ids, params, rid) for rid, ids in zip(job_ids("cmpl-1", len(prompts)), prompts)]
    with state.admit(len(prepared)):
        async for i, out in run_streams(state, request, prepared):
            ...
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from lmstack.errors import LmstackError
from lmstack.infer import SamplingParams
from lmstack.infer.outputs import RequestFailed
from lmstack.infer.sequence import Request
from lmstack.runtime.validation import check_choice
from lmstack.safety.presets import SafetyConfig
from lmstack.serve.errors import APIError, from_value_error
from lmstack.serve.limits import RequestLimits, check_sampling_lists, prompt_byte_limit
from lmstack.serve.prompt_compression import CompressionConfig, load_scorer
from lmstack.serve.tool_calls import PARSER_CHOICES
from lmstack.tokenizer.pretokenizers import CHAR_TO_BYTE

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                    "include_stop_str_in_output", "bad_words", "banned_phrases", "skip_special_tokens", "seed",
                    "use_beam_search", "beam_width", "length_penalty", "prompt_logprobs")


@dataclass
class ServerConfig:
    model_name: str = "lmstack"
    """Name the server answers to in /v1/models and the `model` field (default: the model folder's name)."""
    api_key: str | None = None
    """When set, /v1/*, /tokenize, /detokenize and /tokenizer_info need `Authorization: Bearer <key>`; with a
    non-loopback host, so do the chat page (/) and /metrics: everything but /health."""
    host: str = "127.0.0.1"
    """The address the server binds (only read to decide whether / and /metrics need the key)."""
    max_request_bytes: int = 1 << 20
    """Largest request body accepted, in bytes (413 above)."""
    max_tokens_limit: int = 4096
    """Largest max_tokens a request may ask for (400 above); also the cap when a request gives none."""
    max_queue: int = 64
    """Engine requests (one per prompt) that may wait beyond the running batch (max_num_seqs); 503 above."""
    max_n: int = 16
    """Largest n (and best_of) a request may ask for (400 above)."""
    limits: RequestLimits = field(default_factory=RequestLimits)
    """Caps on what one request may carry (stop strings, bad words, logit_bias, messages, prompt bytes, ...)."""
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    """Prompt compression before prefill: the scorer model and the defaults requests opt into (off by default)."""
    tool_call_parser: str = "auto"
    """How replies to requests with `tools` become tool_calls: auto (from the chat template), hermes,
    llama3_json or none (serve/tool_calls.py)."""
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    """Hard phrase bans (given to the engine: no request can lift them) and the persona presets requests may
    pick (lmstack.safety.presets; serve/safety_settings.py)."""

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_tokens_limit", "max_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is not allowed; {name} must be an integer >= 1")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue={self.max_queue!r} is not allowed; max_queue must be an integer >= 0")
        check_choice("tool_call_parser", self.tool_call_parser, PARSER_CHOICES)
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key='' is not allowed; give a non-empty key or None (no auth)")
        if not isinstance(self.limits, RequestLimits):
            raise ValueError(f"limits={self.limits!r} is not allowed; give a RequestLimits")
        if not isinstance(self.compression, CompressionConfig):
            raise ValueError(f"compression={self.compression!r} is not allowed; give a CompressionConfig")
        if not isinstance(self.safety, SafetyConfig):
            raise ValueError(f"safety={self.safety!r} is not allowed; give a SafetyConfig")

    @property
    def loopback(self) -> bool:
        """Whether the host is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False  # a host name: assume others can reach it

    @property
    def key_on_everything(self) -> bool:
        """With a key on a non-loopback host, the page and /metrics need it too (only /health stays open)."""
        return self.api_key is not None and not self.loopback


class ClientDisconnected(Exception):
    """The client went away; the request was aborted."""


class ServerState:
    """The engine and everything the routes share. Lives on the event loop; no locks needed."""

    def __init__(self, aengine: Any, config: ServerConfig, metrics: Any):
        self.aengine, self.config, self.metrics = aengine, config, metrics
        self.tokenizer = aengine.tokenizer
        self.max_model_len: int = aengine.max_model_len
        self.vocab_size: int = aengine.vocab_size  # the model's real rows, cut to the tokenizer's ids
        self.capacity = aengine.max_num_seqs + config.max_queue
        self.in_flight = 0
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}
        self.limits = config.limits
        self.vision = None  # a VLM's pictures (serve/image_input.ServedImages); None: the model takes no images
        self.pool = ThreadPoolExecutor(self.limits.prep_threads, thread_name_prefix="lmstack-prep")
        self.preparing = 0
        self.bytes_per_token, self.prompt_bytes_limit = prompt_byte_limit(
            self.limits, lambda i: len(self.token_bytes(i)), self.tokenizer.vocab_size, self.max_model_len)
        # The prompt-compression scorer sits beside the served model (same device and dtype); checked at start-up.
        self.scorer = None
        if config.compression.model is not None:
            self.scorer = load_scorer(config.compression, self.tokenizer, aengine.model_device, aengine.model_dtype)

    async def run(self, fn, *args):
        """fn(*args) in the preparation pool: tokenising, chat templates and parameter preparation grow with
        the request, so they never run on the event loop (which must keep answering /health and streams).
        At most limits.max_preparing jobs wait or run at once (503 above); a job counts until its thread is
        done with it, even if its client left."""
        if self.preparing >= self.limits.max_preparing:
            self.metrics.rejected.inc(reason="busy")
            raise APIError(503, f"the server is busy preparing {self.preparing} requests (limit "
                                f"{self.limits.max_preparing}); retry later")
        loop = asyncio.get_running_loop()
        self.preparing += 1
        job = self.pool.submit(fn, *args)

        def done(_) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed (server shutdown): nothing to count
                loop.call_soon_threadsafe(self._prepared)

        job.add_done_callback(done)
        return await asyncio.wrap_future(job)

    def _prepared(self) -> None:
        self.preparing -= 1

    def check_prompt_bytes(self, n_bytes: int, param: str = "prompt") -> None:
        """413 for text that cannot fit the context whatever it encodes to, before it is encoded."""
        if n_bytes > self.prompt_bytes_limit:
            raise APIError(413, f"the prompt is {n_bytes} bytes; this model's context is {self.max_model_len} tokens, "
                                f"and no token covers more than {self.bytes_per_token} bytes, so a prompt over "
                                f"{self.prompt_bytes_limit} bytes cannot fit (it was not encoded)",
                           param=param, code="context_length_exceeded")

    @contextlib.contextmanager
    def admit(self, prompts: int = 1):
        """Count a request's engine requests (one per prompt) in flight, or refuse it with 503 when they
        would not fit. An idle server takes any request, so one large batch cannot be refused forever.
        A failed engine (a dead tensor-parallel worker: /health is 503 too) refuses every request with 503."""
        failure = getattr(self.aengine, "failure", None)
        if failure is not None:
            self.metrics.rejected.inc(reason="unhealthy")
            raise APIError(503, f"the engine is unhealthy and takes no requests: {str(failure)[:300]}")
        if self.in_flight and self.in_flight + prompts > self.capacity:
            self.metrics.rejected.inc(reason="overloaded")  # errors.error_response adds Retry-After
            raise APIError(503, f"the server is overloaded: {self.in_flight} requests in flight "
                                f"(limit {self.capacity}); retry later")
        self.in_flight += prompts
        self.metrics.in_flight.set(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= prompts
            self.metrics.in_flight.set(self.in_flight)

    # ---- models and adapters
    def adapters(self) -> list[str]:
        return self.aengine.adapters

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """The model's generation_config.json sampling settings, under every field a request sets."""
        return self.aengine.generation_defaults

    def resolve_model(self, name: str | None) -> str | None:
        """The request's `model` -> the LoRA adapter to use (None = the base model); unknown names are 404."""
        if name is None or name == self.config.model_name:
            return None
        if name in self.adapters():
            return name
        raise APIError(404, f"the model {name!r} does not exist; this server has "
                            f"{[self.config.model_name] + self.adapters()}", param="model", code="model_not_found")

    def engine_stats(self) -> dict:
        """The engine's counters. The engine steps in a worker thread, so a read can race a dict that is
        changing size; such a read is simply retried."""
        for _ in range(5):
            try:
                return self.aengine.stats()
            except RuntimeError:
                continue
        return {}

    def prepare(self, ids: list[int], params: SamplingParams, request_id: str) -> Request:
        """The engine request, validated and tokenized once (run it in the worker pool): what only the engine
        checks (a grammar that does not compile, ...) is a 400 here, before a stream has sent its 200."""
        try:
            return self.aengine.prepare(ids, params, request_id)
        except (LmstackError, ValueError) as e:
            raise from_value_error(e) from None

    # ---- tokens
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", param=param)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The token's raw bytes: byte-level BPE tokens map char -> byte; other tokens are their own UTF-8."""
        piece = self.tokenizer.id_to_token(token_id) or ""
        if piece and all(c in CHAR_TO_BYTE for c in piece) and token_id not in self.tokenizer.special_ids:
            return bytes(CHAR_TO_BYTE[c] for c in piece)
        return self.tokenizer.decode([token_id]).encode()

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens spelled out. A token that is only part of a UTF-8 character
        is written "bytes:\\xe2\\x80" (as OpenAI does), so distinct tokens never share a name (cached)."""
        s = self._token_text.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id])
            if "\ufffd" in s:
                raw = self.token_bytes(token_id)
                if raw.decode("utf-8", errors="replace") == s and "\ufffd".encode() not in raw:
                    s = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._token_text[token_id] = s
        return s

    def check_lengths(self, n_prompt: int, max_tokens: int | None, param: str = "max_tokens",
                      default: int | None = None) -> int:
        """Validate the prompt length and max_tokens against the context; returns the max_tokens to use.
        A request without max_tokens gets `default` (the model's generation_config max_new_tokens), cut to
        what the context and this server's limit leave, else all the context leaves."""
        limit, ctx = self.config.max_tokens_limit, self.max_model_len
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty; give at least one token", param="prompt")
        if n_prompt >= ctx:
            raise APIError(413, f"the prompt has {n_prompt} tokens but this model's context is {ctx} tokens "
                                "(the prompt plus at least one generated token must fit)",
                           param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            return min(limit, ctx - n_prompt, default if default is not None else limit)
        if isinstance(max_tokens, bool) or max_tokens < 0:
            raise APIError(400, f"{param}={max_tokens} is not allowed; {param} must be an integer >= 0", param=param)
        if max_tokens > limit:
            raise APIError(400, f"{param}={max_tokens} is above this server's limit of {limit}", param=param)
        if n_prompt + max_tokens > ctx:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens, but you requested "
                                f"{n_prompt + max_tokens} ({n_prompt} in the prompt, {param}={max_tokens}); lower {param}",
                           param=param, code="context_length_exceeded")
        return max_tokens


def sampling_params(state: ServerState, req: Any, *, max_tokens: int, logprobs: int | None,
                    lora: str | None) -> SamplingParams:
    """An OpenAI request -> SamplingParams. Range errors come back as 400 naming the field."""
    check_sampling_lists(state.limits, req)
    n = req.n
    best_of = getattr(req, "best_of", None)
    for name, v in (("n", n), ("best_of", best_of)):
        if v is not None and v > state.config.max_n:
            raise APIError(400, f"{name}={v} is above this server's limit of {state.config.max_n}", param=name)
    if req.stream and best_of is not None and best_of > n:
        raise APIError(400, "best_of > n cannot be streamed (the best samples are known only at the end)",
                       param="best_of")
    # The model's generation_config.json sampling defaults, under every field the request sets (max_tokens is
    # settled by check_lengths).
    kw = {k: v for k, v in state.generation_defaults.items() if k != "max_tokens"}
    kw.update({name: getattr(req, name) for name in _SAMPLING_FIELDS if getattr(req, name) is not None})
    kw.update(n=n, max_tokens=max_tokens, logprobs=logprobs, lora=lora)
    if best_of is not None:
        kw["best_of"] = best_of
    if req.stop is not None:
        kw["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
        if not kw["stop"]:
            del kw["stop"]
    if req.logit_bias:
        kw["logit_bias"] = dict(req.logit_bias)
    if req.guided_regex is not None:
        kw["regex"] = req.guided_regex
    if req.guided_json is not None:
        kw["json_schema"] = req.guided_json
    if req.guided_choice is not None:
        kw["choice"] = req.guided_choice
    if req.response_format is not None and req.response_format.type != "text":
        kw["response_format"] = req.response_format.to_sampling()
    try:
        params = SamplingParams(**kw)
    except (ValueError, TypeError) as e:
        raise from_value_error(e) from None
    if lora is not None:
        params.lora = lora
    return params


# ---------------------------------------------------------------------------------------------- streams
async def _wait_for_disconnect(request) -> None:
    """Returns when the client closes the connection (the body was read already, so only that is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


_DONE = object()


def job_ids(request_id: str, n: int) -> list[str]:
    """Engine request ids of an API request with n prompts: its own id, or id-0, id-1, ..."""
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


async def run_streams(state: ServerState, request, jobs: list[Request]) -> AsyncIterator[tuple[int, Any]]:
    """Run the prepared engine requests; yield (job index, cumulative RequestOutput).

    Raises ClientDisconnected when the client leaves. Whatever way this generator ends (finished,
    disconnected, error, or closed by the caller), every engine request still running is aborted.
    """
    queue: asyncio.Queue = asyncio.Queue()
    start = time.perf_counter()

    async def pump(i: int, job: Request) -> None:
        gen = state.aengine.generate(job)
        first = True
        try:
            async for out in gen:
                if first and any(c.token_ids for c in out.outputs):
                    state.metrics.ttft.observe(time.perf_counter() - start)
                    first = False
                queue.put_nowait((i, out))
            queue.put_nowait((i, _DONE))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it in the route
            queue.put_nowait((i, e))
        finally:
            await gen.aclose()  # aborts the engine request if it is still running: its blocks are freed now

    tasks = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(jobs)]
    watcher = asyncio.ensure_future(_wait_for_disconnect(request)) if request is not None else None
    if watcher is not None:
        watcher.add_done_callback(lambda t: t.cancelled() or queue.put_nowait((-1, ClientDisconnected())))
    remaining, failed = len(jobs), False
    try:
        while remaining:
            batch = [await queue.get()]
            while not queue.empty():  # outputs are cumulative: when the client lags, only the newest matters
                batch.append(queue.get_nowait())
            latest: dict[int, Any] = {}
            for i, item in batch:
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, ClientDisconnected):
                    raise item
                elif isinstance(item, RequestFailed):
                    # This request alone failed inside the engine: a 500 for it, the others carry on.
                    failed = True
                    raise APIError(500, f"generation failed: {item}", type="server_error",
                                   code="request_failed") from None
                elif isinstance(item, Exception):
                    failed = True
                    raise item
                else:
                    latest[i] = item
            for i, out in latest.items():
                yield i, out
        state.metrics.e2e.observe(time.perf_counter() - start)
    finally:
        if remaining and not failed:
            # Ended early without an engine error: our watcher saw the client leave, or the response was
            # cancelled / closed from outside (Starlette cancels a stream whose client disconnected).
            state.metrics.aborted.inc()
        if watcher is not None:
            watcher.cancel()
        for t in tasks:
            t.cancel()
        # The tasks clean up on their own even if this generator is itself being cancelled.
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)


async def collect(state: ServerState, request, jobs: list[Request]) -> list[Any]:
    """Run the prepared jobs to the end; the final RequestOutput of each, in job order."""
    finals: list[Any] = [None] * len(jobs)
    async for i, out in run_streams(state, request, jobs):
        finals[i] = out
    return finals
