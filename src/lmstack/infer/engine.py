"""LLMEngine: requests in, one scheduler step at a time, RequestOutputs out (what servers drive).

One step = schedule (scheduler.py) -> copy-on-write block copies -> speculative proposals
(speculative.py) -> one forward over the flattened batch (model_runner.py) -> sample / verify /
beam-select -> stop checks and incremental detokenization (output_processor.py) -> prefix-cache
registration and freeing of finished sequences.

One request never hurts another: make_request refuses token ids outside the vocabulary and beams that
could never fit the KV pool; a request whose sampling, logits processing, beam step, detokenizing or
stop check raises finishes alone with finish_reason 'error' and RequestOutput.error (fail_request),
its blocks freed, while the rest of the batch carries on; a step never spins idle (scheduler.py).

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
from pathlib import Path
import threading
import time
from typing import Any

import torch
from tqdm import tqdm

from lmstack.errors import LmstackError
from lmstack.infer import logits_processors as lp
from lmstack.infer.bad_words import BadWords
from lmstack.infer.beam_search import BeamState, beam_step
from lmstack.infer.block_manager import BlockManager
from lmstack.infer.constrained import GuidedDecoder
from lmstack.infer.detokenizer import StopStrings
from lmstack.infer.generation_defaults import load_generation_defaults
from lmstack.infer.lora_hook import LoraManager
from lmstack.infer.model_runner import ModelRunner
from lmstack.infer.output_processor import OutputProcessor
from lmstack.infer.outputs import RequestOutput
from lmstack.infer.sampling_params import SamplingParams, SamplingParamsError
from lmstack.infer.scheduler import Scheduler
from lmstack.infer.sequence import Request, Sequence
from lmstack.infer.speculative import SpeculativeDecoder
from lmstack.infer.threads import engine_threads
from lmstack.model.counting import kv_bytes_per_token
from lmstack.model.hf_io import load_model
from lmstack.model.load_guard import check_kv_pool
from lmstack.model.vocab import check_vocab
from lmstack.tokenizer import load_tokenizer
from lmstack.tokenizer.core import has_tokenizer

log = logging.getLogger(__name__)
_POOL_BYTES_DEFAULT = 1 << 30  # the KV pool is sized to at most 1 GiB unless num_blocks is given


def load_model_and_tokenizer(model: Any, tokenizer: Any, dtype: torch.dtype, device: str):
    """A path or a module -> (eval-mode model, tokenizer or None)."""

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        model = load_model(path, dtype=dtype, device=device)
        if tokenizer is None and has_tokenizer(path):  # tokenizer.json, or a SentencePiece tokenizer.model
            tokenizer = load_tokenizer(path)
    elif isinstance(model, torch.nn.Module):
        model = model.to(device=device, dtype=dtype)
    else:
        raise LmstackError(f"model must be a model directory or a Transformer, got {type(model).__name__}")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    return model.eval(), tokenizer


class LLMEngine:
    def __init__(self, model: Any, tokenizer: Any = None, max_num_seqs: int = 16, max_batched_tokens: int = 2048,
                 block_size: int = 16, num_blocks: int | None = None, enable_prefix_caching: bool = True,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                 max_model_len: int | None = None, speculative: Any = None, lora_adapters: dict | None = None,
                 fast_decode: bool = True):
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
        cfg = self.model.config
        self.max_model_len = max_model_len or cfg.max_seq_len
        if num_blocks is None:
            per_block = kv_bytes_per_token(cfg, torch.finfo(dtype).bits // 8) * block_size
            wanted = -(-max_num_seqs * self.max_model_len // block_size)
            num_blocks = max(min(wanted, _POOL_BYTES_DEFAULT // per_block), -(-self.max_model_len // block_size))
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise LmstackError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")

        # the pool holds one max_model_len sequence, so a config's max_position_embeddings alone could size
        # it without bound: refuse past --max_model_gib before allocating (issue 15)
        check_kv_pool(cfg, num_blocks, block_size, dtype, self.max_model_len)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.runner = ModelRunner(self.model, num_blocks, block_size, device, fast_decode=fast_decode,
                                  share_weights=owned)
        self.generator = torch.Generator().manual_seed(seed)
        self.eos_ids = self._eos_ids()
        # The checkpoint's generation_config.json sampling settings: what generate/serve/chat start from.
        self.generation_defaults = load_generation_defaults(model if owned else None)
        self.spec = None
        if speculative is not None:
            self.spec = SpeculativeDecoder(self, speculative)
        self.scheduler = Scheduler(self.bm, max_num_seqs, max_batched_tokens,
                                   lookahead=self.spec.lookahead if self.spec else None)
        self.lora = None
        if lora_adapters:
            self.lora = LoraManager(self.model, lora_adapters)
            self.runner.lora_context = self.lora
        self.guided = None  # built on first use (constrained.py)
        self._lock = threading.Lock()
        self.outputs = OutputProcessor(self)
        self.requests: dict[str, Request] = {}
        self.counters = dict(prompt_tokens=0, prefill_tokens=0, generation_tokens=0, steps=0,
                             requests_finished=0, requests_aborted=0, requests_failed=0)
        self._idle_steps = 0  # consecutive steps that scheduled nothing (see _step: never spin)

    def _eos_ids(self) -> frozenset[int]:
        # the model's eos (one id or a list) plus the tokenizer's stop set: its EOS, generation_config.json's
        # eos_token_id list and the chat template's end-of-turn token (the template owns that policy)
        eos = self.model.config.eos_token_id
        ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        if self.tokenizer is not None:
            ids.update(self.tokenizer.stop_ids())
        return frozenset(ids)

    # ---- requests
    def make_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                     lora: str | None = None, arrival_time: float | None = None) -> Request:
        """Validate and tokenize a request without touching the engine's state (thread-safe)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise LmstackError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise LmstackError(f"request_id must be a non-empty string, got {request_id!r}")
        lora = lora or params.lora
        if lora is not None and (self.lora is None or lora not in self.lora.adapters):
            known = sorted(self.lora.adapters) if self.lora else []
            raise SamplingParamsError(f"lora={lora!r} is not a registered adapter; registered: {known}")
        text = prompt if isinstance(prompt, str) else None
        ids = self.encode(prompt)
        if len(ids) >= self.max_model_len:
            raise LmstackError(f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len}; "
                               "shorten it (prompt + at least one generated token must fit)")
        room = min(self.max_model_len, self.num_blocks * self.block_size) - len(ids)
        if room < 1:
            raise LmstackError(f"the prompt has {len(ids)} tokens but the KV pool holds "
                               f"{self.num_blocks * self.block_size}; raise num_blocks")
        self._check_token_ids(params)
        req = Request(request_id, text, ids, params, lora=lora, arrival_time=arrival_time, eos_ids=self.eos_ids)
        req.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if params.use_beam_search:
            self._check_beam_fits(params, len(ids), req.max_tokens)
        if params.bad_words:
            req.bad_word_ids = self._bad_word_ids(params.bad_words)
        if params.stop:
            req.stops = StopStrings(params.stop)
        seq = req.seqs[0]
        seq.generator = self._generator(params.seed, 0)
        if params.guided:
            seq.matcher = self.guided_decoder().new_matcher(params)
        if params.logprobs is not None:
            seq.logprobs = []
        return req

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    lora: str | None = None, arrival_time: float | None = None) -> None:
        """Queue a request; it joins the running batch at the next step."""
        self.add_prepared(self.make_request(request_id, prompt, params, lora, arrival_time))

    def add_prepared(self, req: Request) -> None:
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
        if self.lora is None:
            self.lora = LoraManager(self.model)
            self.runner.lora_context = self.lora
        self.lora.register(name, adapter)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def encode(self, prompt: str | list[int]) -> list[int]:
        vocab = self.emit_vocab  # a padded row is no token: it cannot be decoded, nor proposed by n-gram lookup
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise LmstackError("a text prompt needs a tokenizer; pass tokenizer= or give token ids")
            ids = self.tokenizer.encode_prompt(prompt)  # no second BOS before a rendered chat template
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise LmstackError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        else:
            raise LmstackError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise LmstackError("the prompt is empty; give at least one token")
        return ids

    def _check_token_ids(self, params: SamplingParams) -> None:
        """Every token id a request names must be one the model can emit: 0 <= id < vocabulary."""
        vocab = self.emit_vocab
        for name, ids in (("stop_token_ids", params.stop_token_ids or ()), ("logit_bias", params.logit_bias or ())):
            for t in ids:
                if not 0 <= t < vocab:
                    raise SamplingParamsError(f"{name}: token id {t} is outside the vocabulary [0, {vocab})")

    def _check_beam_fits(self, params: SamplingParams, prompt_len: int, max_tokens: int) -> None:
        """Refuse a beam search that could never fit the KV pool (it would preempt itself forever).

        Worst case: the prompt's full blocks are shared by every beam, everything after them is each
        beam's own. A beam search also needs beam_width sequences at once."""
        bs, width = self.block_size, params.beam_width
        shared = prompt_len // bs
        need = shared + width * (-(-(prompt_len + max_tokens) // bs) - shared)
        if need > self.num_blocks:
            per_beam = -(-(prompt_len + max_tokens) // bs) - shared
            fits = max(0, (self.num_blocks - shared) // max(1, per_beam))
            raise SamplingParamsError(
                f"beam_width={width} with max_tokens={max_tokens} may need {need} KV blocks but the pool has "
                f"{self.num_blocks}; use beam_width <= {fits} or fewer max_tokens")

    def _bad_word_ids(self, words: list[str]):
        if self.tokenizer is None:
            raise SamplingParamsError("bad_words needs a tokenizer to turn words into token ids")
        try:
            return BadWords.from_words(self.tokenizer, words, self.emit_vocab)
        except LmstackError as e:
            raise SamplingParamsError(f"bad_words: {e}") from None

    def _generator(self, seed: int | None, index: int) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))

    def guided_decoder(self):
        if self.guided is None:
            with self._lock:  # make_request may run in several worker threads at once (async_engine.py)
                if self.guided is None:
                    self.guided = GuidedDecoder(self.tokenizer, self.eos_ids, self.emit_vocab)
        return self.guided

    # ---- the step
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns the outputs of every request that changed."""
        with engine_threads():  # bookkeeping and sampling ops are tiny: one thread (see threads.py)
            return self._step()

    def _step(self) -> list[RequestOutput]:
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
            return self.outputs.collect()
        self._idle_steps = 0
        self.counters["steps"] += 1
        if sched.copies:
            self.runner.cache.copy_blocks(sched.copies)
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
        batch, logit_rows, plans = [], [], []
        base = 0  # first row of the next sequence in the flat batch
        for s in sched.scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            tokens = seq.token_ids[start:start + s.num_tokens]
            spec = seq.spec_tokens if s.lookahead else []
            first_row = len(logit_rows)
            req = seq.request
            prompt_rows = []
            if req.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1 and seq.index == 0:
                stop = min(start + s.num_tokens, seq.num_prompt_tokens - 1)
                prompt_rows = list(range(start, stop))  # position p scores prompt token p + 1
                logit_rows.extend(base + p - start for p in prompt_rows)
            ends = start + s.num_tokens == seq.num_tokens
            n_sample_rows = 0
            if ends:
                n_sample_rows = 1 + len(spec)
                logit_rows.extend(range(base + s.num_tokens - 1, base + s.num_tokens + len(spec)))
            batch.append((seq, tokens + spec, start))
            plans.append((s, first_row, prompt_rows, n_sample_rows))
            if self.lora is not None:
                self.lora.add_segment(base, len(tokens) + len(spec), req.lora)
            base += len(tokens) + len(spec)
        try:
            logits = self.runner.run(batch, logit_rows)
        finally:
            if self.lora is not None:
                self.lora.clear_segments()
        return self._after_forward(sched, plans, logits)

    def _after_forward(self, sched, plans, logits: torch.Tensor) -> list[RequestOutput]:
        if logits.shape[-1] > self.emit_vocab:
            logits = logits[..., :self.emit_vocab]
        to_sample: list[tuple[Sequence, int]] = []
        for s, first_row, prompt_rows, n_rows in plans:
            seq, req = s.seq, s.seq.request
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.counters["prefill_tokens"] += min(s.num_tokens, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += s.num_tokens
            if req.error is not None:
                continue
            try:
                if prompt_rows:
                    self.outputs.record_prompt_logprobs(req, prompt_rows,
                                                        logits[first_row:first_row + len(prompt_rows)])
                if n_rows:
                    row = first_row + len(prompt_rows)
                    if s.lookahead and seq.spec_tokens:
                        self.spec.verify(seq, logits[row:row + n_rows])
                    else:
                        to_sample.append((seq, row))
            except Exception as e:  # noqa: BLE001 - this request fails alone, the batch carries on
                self.fail_request(req, " while scoring its tokens", e)
        beams: dict[str, list[tuple[Sequence, int]]] = {}
        plain = []
        for seq, row in to_sample:
            if seq.request.error is not None:  # a sibling sequence failed above: nothing more for this request
                continue
            if seq.request.beam is not None:
                beams.setdefault(seq.request.request_id, []).append((seq, row))
            else:
                plain.append((seq, row))
        if plain:
            self._sample(plain, logits)
        if beams:
            for rows in beams.values():
                try:
                    beam_step(self, rows, logits)
                except Exception as e:  # noqa: BLE001
                    self.fail_request(rows[0][0].request, " in its beam search step", e)
        for s in sched.scheduled:
            if not s.seq.is_finished and s.seq.block_table:
                self.bm.register_computed(s.seq)
        return self.outputs.collect()

    def fail_request(self, req: Request, why: str, exc: BaseException | None = None) -> None:
        """Finish one request with finish_reason 'error' and a one-line reason, freeing its blocks; the
        other requests of the step carry on (a server answers 500 for this one alone)."""
        if req.error is not None:
            return
        detail = "" if exc is None else f": {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        req.error = f"request {req.request_id!r} failed{why}{detail}"[:300]
        if exc is not None:
            log.warning("%s", req.error, exc_info=exc)
        for seq in list(req.seqs):
            if not seq.is_finished:
                self.outputs.finish(seq, "error")
        self.outputs.changed.add(req.request_id)
        self.counters["requests_failed"] += 1

    def _sample(self, items: list[tuple[Sequence, int]], logits: torch.Tensor) -> None:
        expanded: list[tuple[Sequence, int]] = []
        for seq, row in items:
            req = seq.request
            if req.max_tokens == 0:  # prompt scoring only
                self.outputs.finish(seq, "length")
                continue
            expanded.append((seq, row))
            if not req.forked and req.params.num_sequences > 1:
                expanded.extend((child, row) for child in self.fork(seq, req.params.num_sequences - 1))
            req.forked = True
        if not expanded:
            return
        try:
            picked = self._pick(expanded, logits)
        except Exception:  # noqa: BLE001 - one row failed: redo each row alone, failing only its request
            picked = []
            for item in expanded:
                if item[0].request.error is not None:
                    continue
                try:
                    picked.extend(self._pick([item], logits))
                except Exception as e:  # noqa: BLE001
                    self.fail_request(item[0].request, " while sampling", e)
        for seq, tok, logprobs in picked:
            if seq.request.error is not None:
                continue
            try:
                self.outputs.append_token(seq, tok, logprobs)
            except Exception as e:  # noqa: BLE001 - detokenizing, stop checks, the grammar
                self.fail_request(seq.request, " while processing its new token", e)

    def _pick(self, items: list[tuple[Sequence, int]], logits: torch.Tensor
              ) -> list[tuple[Sequence, int, torch.Tensor]]:
        """Sample one token per (sequence, logits row); returns (seq, token, that row's logprobs)."""
        rows = [self.sampling_row(seq) for seq, _ in items]
        raw = logits[[r for _, r in items]] if len(items) > 1 or items[0][1] else logits[:1]
        if all(r.params.greedy and r.allowed is None and not lp.needs_processing(r.params) for r in rows):
            tokens = raw.argmax(dim=-1).tolist()  # the hot path of greedy decoding: no processing at all
        else:  # processing and every check run before any random draw, so a failed row wastes none
            tokens = lp.sample(lp.process(raw, rows), rows, self.generator)
        if any(seq.logprobs is not None for seq, _ in items):
            logprobs = raw.log_softmax(dim=-1)
        else:  # only the sampled tokens' log-probabilities are needed (cumulative_logprob)
            logprobs = raw - raw.logsumexp(dim=-1, keepdim=True)
        return [(seq, tok, logprobs[i]) for i, ((seq, _), tok) in enumerate(zip(items, tokens))]

    def sampling_row(self, seq: Sequence, extra: list[int] | None = None) -> lp.SamplingRow:
        req = seq.request
        out = seq.output_ids if not extra else seq.output_ids + extra
        allowed = None
        if seq.matcher is not None:
            allowed = self.guided.allowed(seq.matcher)
        return lp.SamplingRow(req.params, req.prompt_token_ids, out, seq.generator, req.eos_ids,
                              req.bad_word_ids, allowed)

    def fork(self, seq: Sequence, count: int) -> list[Sequence]:
        """New sequences sharing seq's history and blocks; they run right after it."""
        req = seq.request
        children = []
        for _ in range(count):
            child = seq.fork(req.next_index)
            req.next_index += 1
            child.generator = self._generator(req.params.seed, child.index)
            self.bm.fork(seq, child)
            req.seqs.append(child)
            children.append(child)
        running = self.scheduler.running
        at = running.index(seq) + 1 if seq in running else len(running)
        running[at:at] = children
        return children

    # ---- facts
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
        bar = None
        if show_progress:
            bar = tqdm(total=len(self.requests), desc="generate", unit="req")
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
