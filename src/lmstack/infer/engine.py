"""LLMEngine: requests in, one scheduler step at a time, RequestOutputs out (what servers drive).

One step = schedule -> run -> postprocess:
- schedule (here): the scheduler picks the batch (scheduler.py), copy-on-write block copies are made,
  the speculative decoder proposes guesses (speculative.py); the row layout is planned once (step_plan.py).
- run (here): one forward over the flattened batch (model_runner.py), logits for the planned rows only.
- postprocess (postprocess.py): sample (sampler.py), verify guesses or advance beams (beam_search.py);
  every new token goes through the output processor (stop checks, detokenization: output_processor.py).
The engine wires the parts and owns the request table; the parts get what they need (the sampler, the
scheduler, the output processor, an EngineContext: context.py), never the engine. Requests are validated
and tokenized by request_builder.py, the model is loaded by loading.py.

One request never hurts another: a request whose sampling, logits processing, beam step, detokenizing or
stop check raises finishes alone with finish_reason 'error' and RequestOutput.error (fail_request), its
blocks freed, while the rest of the batch carries on; a step never spins idle (scheduler.py).

Usage:
    engine = LLMEngine("runs/model", max_num_seqs=16)
    engine.add_request("r1", "Once upon a time", SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.request_id, out.outputs[0].text)
    engine.stats()   # running, waiting, blocks, prefix-cache hits, token counters, ...
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from tqdm import tqdm

from lmstack.errors import LmstackError
from lmstack.infer.beam_search import BeamState
from lmstack.infer.block_manager import BlockManager
from lmstack.infer.context import EngineContext
from lmstack.infer.cuda_graphs import graphable
from lmstack.infer.generation_defaults import load_generation_defaults
from lmstack.infer.kv_pool_sizing import profile_kv_blocks
from lmstack.infer.kv_quant import check_kv_cache_dtype, kv_cache_bytes_per_token
from lmstack.infer.loading import load_model_and_tokenizer
from lmstack.infer.lora_hook import LoraManager
from lmstack.infer.model_runner import ModelRunner
from lmstack.infer.output_processor import OutputProcessor
from lmstack.infer.outputs import RequestOutput
from lmstack.infer.postprocess import Postprocessor
from lmstack.infer.request_builder import RequestBuilder
from lmstack.infer.sampler import Sampler
from lmstack.infer.sampling_params import SamplingParams
from lmstack.infer.scheduler import Scheduler, SchedulerOutput
from lmstack.infer.sequence import Request
from lmstack.infer.speculative import SpeculativeDecoder
from lmstack.infer.step_plan import StepPlan
from lmstack.infer.threads import engine_threads
from lmstack.infer.tp_group import TensorParallelGroup
from lmstack.infer.tp_shard import check_shardable, shard_model
from lmstack.model.load_guard import check_kv_pool
from lmstack.model.vocab import check_vocab
from lmstack.safety.phrase_ban import check_phrases

log = logging.getLogger(__name__)
_POOL_BYTES_DEFAULT = 1 << 30  # the KV pool is sized to at most 1 GiB unless num_blocks is given


def _eos_ids(model, tokenizer) -> frozenset[int]:
    # the model's eos (one id or a list) plus the tokenizer's stop set: its EOS, generation_config.json's
    # eos_token_id list and the chat template's end-of-turn token (the template owns that policy)
    eos = model.config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if tokenizer is not None:
        ids.update(tokenizer.stop_ids())
    return frozenset(ids)


class LLMEngine:
    def __init__(self, model: Any, tokenizer: Any = None, max_num_seqs: int = 16, max_batched_tokens: int = 2048,
                 block_size: int = 16, num_blocks: int | None = None, enable_prefix_caching: bool = True,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                 max_model_len: int | None = None, speculative: Any = None, lora_adapters: dict | None = None,
                 cuda_graphs: bool | None = None, attention_backend: str = "sdpa",
                 gpu_memory_utilization: float = 0.9, compile_decode: bool = False, tensor_parallel_size: int = 1,
                 kv_cache_dtype: str = "auto", banned_phrases: list[str] | None = None):
        """cuda_graphs: replay pure decode steps as CUDA graphs per batch bucket (None: on for CUDA, off
        elsewhere; True on a CPU runs the same static-buffer path uncaptured). attention_backend: the paged
        decode attention, 'sdpa' or 'flex'. gpu_memory_utilization: on CUDA with num_blocks=None, the KV
        pool fills this fraction of device memory left after weights and a profiling forward (kv_pool_sizing.py).
        compile_decode: torch.compile the static decode step of cuda_graphs (switches that path on; off by
        default: benchmarks/decode_compile_cpu.py has what it buys). kv_cache_dtype: 'auto' (the KV pool in the
        model's dtype) or 'int8' (int8 numbers with per-token, per-head fp32 scales: ~4x the tokens of an fp32
        pool in the same bytes; kv_quant.py). banned_phrases: hard bans on the output text of every request,
        across token boundaries; requests may add their own but never lift these (lmstack.safety.phrase_ban)."""
        check_kv_cache_dtype(kv_cache_dtype)  # before loading anything
        hard_bans = tuple(check_phrases(banned_phrases))
        for name, v, lo in (("max_num_seqs", max_num_seqs, 1), ("max_batched_tokens", max_batched_tokens, 1),
                            ("block_size", block_size, 1)):
            if not isinstance(v, int) or v < lo:
                raise LmstackError(f"{name} must be an integer >= {lo}, got {v!r}")
        owned = isinstance(model, (str, os.PathLike))  # loaded here, so nobody else holds its weights
        self.model, self.tokenizer = load_model_and_tokenizer(model, tokenizer, dtype, device)
        # A tokenizer larger than the model fails here, once, instead of as an IndexError in the embedding.
        # Its result is what the sampler may see: the model's real rows, cut to the tokenizer's ids. The head
        # already gives padded rows zero probability; cutting them keeps sampled ids valid token ids and makes
        # every log-probability here the same number LocalLM computes (both use this one definition).
        self.emit_vocab = check_vocab(
            self.model, self.tokenizer, model_path=model if owned else None,
            tokenizer_path=tokenizer if isinstance(tokenizer, (str, os.PathLike)) else
            (model if owned and tokenizer is None else None))
        # tensor_parallel_size N > 1: this process (rank 0) keeps 1/N of every block's heads and MLP, N-1
        # workers the rest (tp_shard.py, tp_group.py); model.config becomes the shard's, so the KV pool
        # below is sized and allocated for this rank's KV heads only
        self.tp = None
        if tensor_parallel_size != 1:
            check_shardable(self.model.config, tensor_parallel_size)
            if cuda_graphs or compile_decode:  # None (the default) just leaves graphs off
                raise LmstackError("cuda_graphs and compile_decode are not supported with tensor_parallel_size > 1: "
                                   "a replayed graph would skip the step inputs the workers follow")
            if lora_adapters:
                raise LmstackError("LoRA adapters are not supported with tensor_parallel_size > 1")
            if not owned:
                raise LmstackError("tensor_parallel_size > 1 needs a model directory (every worker loads it), "
                                   "not a model object")
            tp_reduce = shard_model(self.model, 0, tensor_parallel_size)
        cfg = self.model.config
        self.max_model_len = max_model_len or cfg.max_seq_len
        on_cuda = next(self.model.parameters()).device.type == "cuda"
        measured = num_blocks is None and on_cuda
        if measured:  # bounded by the device itself, so load_guard's host-memory check does not apply
            full = -(-max_num_seqs * self.max_model_len // block_size)  # every sequence at max_model_len
            num_blocks = profile_kv_blocks(self.model, block_size, max_batched_tokens, gpu_memory_utilization, dtype,
                                           max_blocks=4 * full, kv_cache_dtype=kv_cache_dtype)
        token_bytes = kv_cache_bytes_per_token(cfg, dtype, kv_cache_dtype)
        if num_blocks is None:
            per_block = token_bytes * block_size
            wanted = -(-max_num_seqs * self.max_model_len // block_size)
            num_blocks = max(min(wanted, _POOL_BYTES_DEFAULT // per_block), -(-self.max_model_len // block_size))
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise LmstackError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        # the pool holds one max_model_len sequence, so a config's max_position_embeddings alone could size
        # it without bound: refuse past --max_model_gib before allocating (issue 15)
        if not measured:
            check_kv_pool(cfg, num_blocks, block_size, dtype, self.max_model_len, bytes_per_token=token_bytes)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.ctx = EngineContext(self.tokenizer, self.eos_ids, self.emit_vocab, self.max_model_len, hard_bans)
        # a VLM adapter (multimodal/engine_adapter.py) takes its pictures' placeholder ids past the vocabulary
        self.ctx.extra_ids = getattr(self.model, "check_prompt_ids", None)
        self.counters = self.ctx.counters
        # The checkpoint's generation_config.json sampling settings: what generate/serve/chat start from.
        self.generation_defaults = load_generation_defaults(model if owned else None)

        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
        graphs = (on_cuda and graphable(cfg) is None) if cuda_graphs is None else cuda_graphs
        if compile_decode and not graphs:
            if cuda_graphs is False:
                raise LmstackError("compile_decode compiles the static decode step of cuda_graphs; "
                                   "leave cuda_graphs on (or unset) to use it")
            graphs = True
        self.runner = ModelRunner(self.model, num_blocks, block_size, device, owns_model=owned,
                                  attention_backend=attention_backend, cuda_graphs=graphs,
                                  max_num_seqs=max_num_seqs, max_model_len=self.max_model_len,
                                  compile_decode=compile_decode, kv_cache_dtype=kv_cache_dtype)
        if tensor_parallel_size != 1:  # the workers load the same directory and follow every step
            self.runner.graphs = None  # cuda_graphs=None chose graphs on CUDA: a replay would skip the workers' feed
            self.tp = self.runner.tp = TensorParallelGroup(
                model, tensor_parallel_size, tp_reduce, num_blocks=num_blocks, block_size=block_size, dtype=dtype,
                device=self.runner.device, kv_cache_dtype=kv_cache_dtype)
        self.sampler = Sampler(seed, guided=self.ctx.guided_decoder, device=self.runner.device)
        self.spec = None if speculative is None else SpeculativeDecoder(
            speculative, self.model, num_blocks, block_size, self.ctx, self.sampler)
        if self.spec is not None:
            self.spec.attach(self.runner)  # draft heads (medusa/eagle) read the target's hidden rows
        self.scheduler = Scheduler(self.bm, max_num_seqs, max_batched_tokens,
                                   lookahead=self.spec.lookahead if self.spec else None)
        self.lora = None
        if lora_adapters:
            self.lora = LoraManager(self.model, lora_adapters)
            self.runner.lora_context = self.lora
        self.requests: dict[str, Request] = {}
        self.outputs = OutputProcessor(self.ctx, self.scheduler, self.requests)
        self.post = Postprocessor(self.ctx, self.sampler, self.scheduler, self.outputs, self.spec)
        self.builder = RequestBuilder(self.ctx, num_blocks, block_size)
        if hard_bans:  # compiled (and cached) now: no tokenizer or a bad phrase fails at start-up, not per request
            self.builder.phrase_ban([])
        self._idle_steps = 0  # consecutive steps that scheduled nothing (see _schedule: never spin)

    # ---- requests
    def make_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                     lora: str | None = None, arrival_time: float | None = None) -> Request:
        """Validate and tokenize a request without touching the engine's state (thread-safe)."""
        adapters = self.lora.adapters if self.lora is not None else ()
        return self.builder.make(request_id, prompt, params, lora, arrival_time, adapters)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    lora: str | None = None, arrival_time: float | None = None) -> None:
        """Queue a request; it joins the running batch at the next step."""
        self.add_prepared(self.make_request(request_id, prompt, params, lora, arrival_time))

    def add_prepared(self, req: Request) -> None:
        """Queue a request built by make_request (e.g. in a worker thread)."""
        if req.request_id in self.requests:
            raise LmstackError(f"request_id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.counters["prompt_tokens"] += len(req.prompt_token_ids)
        if req.params.use_beam_search:
            req.beam = BeamState(req.params, req.max_tokens)
        self.scheduler.add(req.seqs[0])

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks at once; returns its final output (finish_reason 'abort')."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        req.aborted = True
        for seq in req.seqs:
            if not seq.is_finished:
                self.outputs.finish(seq, "abort")
            self.scheduler.remove(seq)
        self.counters["requests_aborted"] += 1
        return self.outputs.request_output(req, final=True)

    def add_lora(self, name: str, adapter: Any) -> None:
        """Register a LoRA adapter (an object with apply(module_name, x, base_out)); requests name it."""
        if self.tp is not None:
            raise LmstackError("LoRA adapters are not supported with tensor_parallel_size > 1")
        if self.lora is None:
            self.lora = LoraManager(self.model)
            self.runner.lora_context = self.lora
        self.lora.register(name, adapter)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.builder.encode(prompt)

    # ---- the step
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns the outputs of every request that changed."""
        if self.tp is not None:
            self.tp.check()  # a dead tensor-parallel worker: refuse at once, never wait in a collective
        with engine_threads():  # bookkeeping and sampling ops are tiny: one thread (see threads.py)
            sched = self._schedule()
            if sched is None:
                return self.outputs.collect()
            plan = StepPlan.build(sched)
            logits = self._run(plan)
            self.post(plan, logits)
            return self.outputs.collect()

    def _schedule(self) -> SchedulerOutput | None:
        """Pick the batch, copy shared blocks about to be written, propose guesses. None: nothing runs."""
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            stuck = sched.unschedulable
            if stuck is not None:
                self.fail_request(stuck.request, f": it does not fit the KV pool ({self.num_blocks} blocks of "
                                                 f"{self.block_size} tokens); raise num_blocks")
            elif not sched.preempted and self.requests:
                self._idle_steps += 1
                if self._idle_steps > 1:  # never spin: a step that can do nothing fails the oldest request
                    self.fail_request(next(iter(self.requests.values())), ": the scheduler could not make progress")
            return None
        self._idle_steps = 0
        self.counters["steps"] += 1
        if sched.copies:
            self.runner.cache.copy_blocks(sched.copies)
            if self.tp is not None:
                self.tp.copy_blocks(sched.copies)  # every rank's pool holds its heads of the same blocks
            if self.spec is not None:
                self.spec.copy_blocks(sched.copies)
        spec_items = [s.seq for s in sched.scheduled if s.lookahead]
        if spec_items:
            try:
                self.spec.propose(spec_items)
            except Exception as e:  # noqa: BLE001 - guesses are optional: decode this step without them
                log.warning("speculative proposal failed, decoding this step without it: %s", e, exc_info=e)
                for seq in spec_items:  # the draft's cache position only advances after a finished pass
                    seq.spec_tokens, seq.spec_probs = [], None
        return sched

    def _run(self, plan: StepPlan) -> torch.Tensor:
        """One forward over the planned batch; logits (len(plan.logit_rows), emit_vocab)."""
        if self.lora is not None:
            for p in plan.seqs:
                self.lora.add_segment(p.row, len(p.tokens), p.seq.request.lora)
        try:
            logits = self.runner.run(plan)
        finally:
            if self.lora is not None:
                self.lora.clear_segments()
        return logits[..., :self.emit_vocab] if logits.shape[-1] > self.emit_vocab else logits

    def fail_request(self, req: Request, why: str, exc: BaseException | None = None) -> None:
        """Finish one request with finish_reason 'error' and a one-line reason, freeing its blocks; the
        other requests of the step carry on (a server answers 500 for this one alone)."""
        self.post.fail(req, why, exc)

    @property
    def failure(self) -> LmstackError | None:
        """Why this engine can run no more steps (a tensor-parallel worker died or was closed); None if it can."""
        return self.tp.failure if self.tp is not None else None

    def close(self) -> None:
        """Stop what outlives this object: the tensor-parallel worker processes (if any)."""
        if self.tp is not None:
            self.tp.close()

    # ---- facts
    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.max_num_seqs

    @property
    def generator(self) -> torch.Generator:
        """The default generator of unseeded sampling (seeded requests draw from their own)."""
        return self.sampler.generator

    def stats(self) -> dict[str, Any]:
        running = {s.request.request_id for s in self.scheduler.running}
        c = self.counters
        out = {
            "running": len(running),
            "waiting": len(self.requests) - len(running & set(self.requests)),
            "running_seqs": len(self.scheduler.running),
            "waiting_seqs": len(self.scheduler.waiting),
            "num_blocks_total": self.num_blocks,
            "num_blocks_free": self.bm.num_free_blocks,
            "num_blocks_used": self.num_blocks - self.bm.num_free_blocks,
            "block_size": self.block_size,
            "kv_cache_bytes": self.runner.cache.nbytes(),
            "kv_cache_dtype": self.runner.cache.kv_cache_dtype,
            "prefix_cache_hit_tokens": self.scheduler.prefix_hit_tokens,
            "prefix_cache_queried_tokens": self.scheduler.prefix_queried_tokens,
            "prompt_tokens": c["prompt_tokens"],
            "prefill_tokens": c["prefill_tokens"],
            "generation_tokens": c["generation_tokens"],
            "num_preemptions": self.scheduler.num_preemptions,
            "requests_finished": c["requests_finished"],
            "requests_aborted": c["requests_aborted"],
            "requests_failed": c["requests_failed"],
            "steps": c["steps"],
        }
        if self.spec is not None:
            out.update(self.spec.stats())
        return out

    def run_to_completion(self, show_progress: bool = False) -> list[RequestOutput]:
        """Step until every request finished; returns the final outputs in finishing order."""
        done = []
        bar = tqdm(total=len(self.requests), desc="generate", unit="req") if show_progress else None
        start = time.perf_counter()
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    done.append(out)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.set_postfix(s=f"{time.perf_counter() - start:.1f}")
            bar.close()
        return done
