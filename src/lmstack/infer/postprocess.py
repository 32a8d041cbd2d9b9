"""The engine's postprocess: one step's logits -> the sequences' next tokens, one request failing alone.

After the forward, every planned sequence (step_plan.py) advances past the tokens it computed, then:
- prompt_logprobs rows are recorded;
- speculative windows are verified (speculative.py) and the accepted tokens appended;
- beam requests advance once all their live beams have logits (beam_search.py);
- every other sequence is sampled in one batch by the Sampler (sampler.py); a request with n > 1 forks
  its samples through the scheduler the first time its prompt is done.
Each new token goes through the output processor (stop checks, detokenization). A request whose
scoring, sampling, beam step or token processing raises finishes alone with finish_reason 'error' and
RequestOutput.error (`fail`), its blocks freed; a batch whose joint draw raises is redrawn row by row
so that only the failing rows' requests fail. Finally each still-running sequence offers its newly
computed full blocks to the prefix cache.

Usage (inside the engine):
    post = Postprocessor(ctx, sampler, scheduler, outputs, spec)
    post(plan, logits)                     # then outputs.collect()
    post.fail(req, " while doing X", exc)
"""
from __future__ import annotations

import logging

import torch

from lmstack.infer.beam_search import beam_step
from lmstack.infer.context import EngineContext
from lmstack.infer.output_processor import OutputProcessor
from lmstack.infer.sampler import Sampler, seeded_generator
from lmstack.infer.scheduler import Scheduler
from lmstack.infer.sequence import Request, Sequence
from lmstack.infer.speculative import SpeculativeDecoder
from lmstack.infer.step_plan import StepPlan

log = logging.getLogger(__name__)


class Postprocessor:
    def __init__(self, ctx: EngineContext, sampler: Sampler, scheduler: Scheduler, outputs: OutputProcessor,
                 spec: SpeculativeDecoder | None = None):
        self.ctx, self.sampler, self.scheduler, self.outputs, self.spec = ctx, sampler, scheduler, outputs, spec

    def __call__(self, plan: StepPlan, logits: torch.Tensor) -> None:
        """Advance every sequence past what it computed; sample, verify or beam-select its next tokens."""
        plain: list[tuple[Sequence, int]] = []
        beams: dict[str, list[tuple[Sequence, int]]] = {}
        for p in plan.seqs:
            seq, req, n = p.seq, p.seq.request, p.num_tokens
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.ctx.counters["prefill_tokens"] += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += n
            if req.error is not None:
                continue
            try:
                if p.prompt_rows:
                    self.outputs.record_prompt_logprobs(
                        req, p.prompt_rows, logits[p.first_logit:p.first_logit + len(p.prompt_rows)])
                if not p.n_sample_rows:
                    continue
                if p.lookahead and seq.spec_tokens:
                    tokens, logprobs = self.spec.verify(seq, logits[p.sample_row:p.sample_row + p.n_sample_rows])
                    self._append(seq, tokens, logprobs)
                elif req.beam is not None:
                    beams.setdefault(req.request_id, []).append((seq, p.sample_row))
                else:
                    plain.append((seq, p.sample_row))
            except Exception as e:  # noqa: BLE001 - this request fails alone, the batch carries on
                self.fail(req, " while scoring its tokens", e)
        plain = [(seq, row) for seq, row in plain if seq.request.error is None]  # a sibling failed above
        if plain:
            self._sample(plain, logits)
        for rows in beams.values():
            if rows[0][0].request.error is not None:
                continue
            try:
                beam_step(rows, logits, self.sampler, self.scheduler, self.outputs)
            except Exception as e:  # noqa: BLE001
                self.fail(rows[0][0].request, " in its beam search step", e)
        for p in plan.seqs:
            if not p.seq.is_finished:
                self.scheduler.cache_computed(p.seq)

    def _append(self, seq: Sequence, tokens: list[int], logprobs: torch.Tensor) -> None:
        """Append accepted tokens (row j of logprobs scores tokens[j]) until the sequence finishes."""
        for j, tok in enumerate(tokens):
            self.outputs.append_token(seq, tok, logprobs[j])
            if seq.is_finished:
                break

    def _sample(self, items: list[tuple[Sequence, int]], logits: torch.Tensor) -> None:
        expanded: list[tuple[Sequence, int]] = []
        for seq, row in items:
            req = seq.request
            if req.max_tokens == 0:  # prompt scoring only
                self.outputs.finish(seq, "length")
                continue
            expanded.append((seq, row))
            if not req.forked and req.params.num_sequences > 1:  # n > 1: fork once the prompt is computed
                children = self.scheduler.fork(seq, req.params.num_sequences - 1, seeded_generator)
                expanded.extend((child, row) for child in children)
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
                    self.fail(item[0].request, " while sampling", e)
        for seq, tok, logprobs in picked:
            if seq.request.error is not None:
                continue
            try:
                self.outputs.append_token(seq, tok, logprobs)
            except Exception as e:  # noqa: BLE001 - detokenizing, stop checks, the grammar
                self.fail(seq.request, " while processing its new token", e)

    def _pick(self, items: list[tuple[Sequence, int]], logits: torch.Tensor
              ) -> list[tuple[Sequence, int, torch.Tensor]]:
        """Sample one token per (sequence, logits row); returns (seq, token, that row's logprobs)."""
        rows = [r for _, r in items]
        if rows == list(range(len(rows))):
            raw = logits[:len(rows)]  # the usual step: a view, no gather (on CUDA a list index waits for the device)
        else:
            raw = logits[torch.tensor(rows, device=logits.device)]
        seqs = [seq for seq, _ in items]
        tokens, logprobs = self.sampler.sample(seqs, raw)
        return [(seq, tok, logprobs[i]) for i, (seq, tok) in enumerate(zip(seqs, tokens))]

    def fail(self, req: Request, why: str, exc: BaseException | None = None) -> None:
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
        self.ctx.counters["requests_failed"] += 1
