"""AsyncLLMEngine: the engine behind an asyncio server, streaming each request's outputs as they come.

One background task drives engine.step() in a worker thread, so the event loop stays free to accept
requests while the model runs; each request is also prepared (tokenized, its bad_words / stop lists
indexed) in a worker thread, so a heavy one cannot stall the loop. New requests and aborts are queued
and applied between steps (the engine's state is never changed by two threads at once). Each request
gets an asyncio queue its generator reads from; leaving the `async for` early (client disconnect,
task cancelled) aborts the request, which frees its KV blocks before the next step. A request that
fails inside the engine raises RequestFailed from its own generator; the others carry on.

It is also the one facade a server uses: what it needs to know about the engine (tokenizer, context
length, vocabulary, capacity, generation defaults, adapters, the model's device and dtype, counters,
the health of the step loop) are public properties and methods here, and `prepare` validates and
tokenizes a request exactly once: a server calls it before answering 200 (so a bad grammar is a 400)
and hands the prepared request to `generate`, which does not prepare it again.

Usage:
    aengine = AsyncLLMEngine("runs/model", max_num_seqs=16)
    async for out in aengine.generate("Hello", SamplingParams(max_tokens=32), request_id="r1"):
        print(out.outputs[0].text)                 # cumulative text so far (output_kind='delta': new text)
    req = aengine.prepare([5, 6, 7], SamplingParams(max_tokens=8), "r2")   # LmstackError when invalid
    async for out in aengine.generate(req): ...
    aengine.stats(); aengine.max_model_len; aengine.loop_error
"""
from __future__ import annotations

import asyncio
import itertools
from typing import Any, AsyncIterator

import torch

from lmstack.errors import LmstackError
from lmstack.infer.engine import LLMEngine
from lmstack.infer.outputs import RequestFailed, RequestOutput
from lmstack.infer.sampling_params import SamplingParams
from lmstack.infer.sequence import Request

_counter = itertools.count()


class AsyncLLMEngine:
    def __init__(self, model: Any, **engine_kwargs: Any):
        """Same arguments as LLMEngine (model path or module, tokenizer, max_num_seqs, ...)."""
        self.engine = engine_kwargs.pop("engine", None) or LLMEngine(model, **engine_kwargs)
        self.tokenizer = self.engine.tokenizer
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending_add: list = []
        self._pending_abort: list[str] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stepping = False
        self.errors = 0

    # ---- what a server needs to know
    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        """Token ids a request may use and the sampler may emit: [0, vocab_size)."""
        return self.engine.emit_vocab

    @property
    def max_num_seqs(self) -> int:
        """Sequences in the running batch at most (requests beyond it wait in the engine's queue)."""
        return self.engine.max_num_seqs

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """The checkpoint's generation_config.json sampling settings (generation_defaults.py)."""
        return self.engine.generation_defaults

    @property
    def adapters(self) -> list[str]:
        """Names of the registered LoRA adapters."""
        return sorted(self.engine.lora.adapters) if self.engine.lora is not None else []

    @property
    def model_device(self) -> torch.device:
        return next(self.engine.model.parameters()).device

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.engine.model.parameters()).dtype

    @property
    def failure(self) -> BaseException | None:
        """Why the engine can run no more steps (a tensor-parallel worker died): new requests are refused."""
        return getattr(self.engine, "failure", None)  # (a stand-in engine in a test may not have one)

    @property
    def loop_error(self) -> BaseException | None:
        """Why the step loop died, if it did (then nothing is generated until a new request restarts it), or
        why the engine itself can run no more steps (a tensor-parallel worker died: LLMEngine.failure)."""
        failure = self.failure
        if failure is not None:
            return failure
        task = self._task
        if task is not None and task.done() and not task.cancelled():
            return task.exception()
        return None

    def stats(self) -> dict:
        """The engine's counters (running, waiting, KV blocks, prefix-cache hits, tokens, ...)."""
        return self.engine.stats()

    # ---- requests
    def prepare(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
                lora: str | None = None) -> Request:
        """Validate and tokenize a request (thread-safe: servers call it in a worker pool); LmstackError
        names what is wrong. Give the result to generate(), which runs it as prepared."""
        return self.engine.make_request(request_id or f"async-{next(_counter)}", prompt, params or SamplingParams(),
                                        lora=lora)

    async def generate(self, prompt: str | list[int] | Request, params: SamplingParams | None = None,
                       request_id: str | None = None, lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs for one request (a prompt, or a Request from prepare()); validation errors
        (LmstackError) raise here, before anything runs; a failure inside the engine raises RequestFailed
        for this request alone."""
        prepared = prompt if isinstance(prompt, Request) else None
        if prepared is not None and (params is not None or lora is not None):
            raise LmstackError("a prepared request carries its own params and lora; give neither with it")
        request_id = prepared.request_id if prepared is not None else request_id or f"async-{next(_counter)}"
        if request_id in self._queues:
            raise LmstackError(f"request_id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue  # reserve the id while the request is prepared
        if prepared is None:
            try:  # tokenizing and bad_words / stop / grammar preparation can be heavy: never on the event loop
                prepared = await asyncio.to_thread(self.prepare, prompt, params, request_id, lora)
            except BaseException:
                self._queues.pop(request_id, None)
                raise
            if self._queues.get(request_id) is not queue:  # aborted while it was being prepared
                return
        self._pending_add.append(prepared)
        self._ensure_loop()
        finished = False
        try:
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed now if the engine is idle, else right after this step."""
        self._queues.pop(request_id, None)
        if self._stepping:
            self._pending_abort.append(request_id)
        else:
            self._pending_add = [r for r in self._pending_add if r.request_id != request_id]
            self.engine.abort_request(request_id)

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    # ---- the loop
    def _ensure_loop(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _apply_pending(self) -> None:
        adds, self._pending_add = self._pending_add, []
        for req in adds:
            if req.request_id in self._queues:
                self.engine.add_prepared(req)
        aborts, self._pending_abort = self._pending_abort, []
        for rid in aborts:
            self.engine.abort_request(rid)

    async def _run(self) -> None:
        while True:
            self._apply_pending()
            if not self.engine.has_unfinished_requests():
                self._wake.clear()
                if self._pending_add or self._pending_abort:
                    continue
                await self._wake.wait()
                continue
            self._stepping = True
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as e:  # noqa: BLE001 - not one request's fault (e.g. the forward): fail those in it
                self.errors += 1
                message = f"the engine step failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                for rid in list(self.engine.requests):
                    self.engine.abort_request(rid)
                    q = self._queues.get(rid)
                    if q is not None:
                        q.put_nowait(RequestFailed(message[:300], rid))
                continue
            finally:
                self._stepping = False
            for out in outputs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    # a request that failed alone (finish_reason 'error') raises from its own generator
                    q.put_nowait(out if out.error is None else RequestFailed(out.error, out.request_id, out))
                elif not out.finished:
                    self.engine.abort_request(out.request_id)  # nobody listens any more
