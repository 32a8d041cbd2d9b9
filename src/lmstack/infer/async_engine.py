"""AsyncLLMEngine: the engine behind an asyncio server, streaming each request's outputs as they come.

One background task drives engine.step() in a worker thread, so the event loop stays free to accept
requests while the model runs; each request is also prepared (tokenized, its bad_words / stop lists
indexed) in a worker thread, so a heavy one cannot stall the loop. New requests and aborts are queued
and applied between steps (the engine's state is never changed by two threads at once). Each request
gets an asyncio queue its generator reads from; leaving the `async for` early (client disconnect,
task cancelled) aborts the request, which frees its KV blocks before the next step. A request that
fails inside the engine raises RequestFailed from its own generator; the others carry on.

Usage:
    aengine = AsyncLLMEngine("runs/model", max_num_seqs=16)
    async for out in aengine.generate("Hello", SamplingParams(max_tokens=32), request_id="r1"):
        print(out.outputs[0].text)                 # cumulative text so far (output_kind='delta': new text)
    aengine.engine.stats()
"""
from __future__ import annotations

import asyncio
import itertools
from typing import Any, AsyncIterator

from lmstack.errors import LmstackError
from lmstack.infer.engine import LLMEngine
from lmstack.infer.outputs import RequestFailed, RequestOutput
from lmstack.infer.sampling_params import SamplingParams

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

    # ---- public
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs for one request; validation errors (LmstackError) raise here, before anything
        runs; a failure inside the engine raises RequestFailed for this request alone."""
        request_id = request_id or f"async-{next(_counter)}"
        if request_id in self._queues:
            raise LmstackError(f"request_id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue  # reserve the id while the request is prepared
        try:  # tokenizing and bad_words / stop / grammar preparation can be heavy: never on the event loop
            req = await asyncio.to_thread(self.engine.make_request, request_id, prompt,
                                          params or SamplingParams(), lora=lora)
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        if self._queues.get(request_id) is not queue:  # aborted while it was being prepared
            return
        self._pending_add.append(req)
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

    def stats(self) -> dict:
        return self.engine.stats()

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
