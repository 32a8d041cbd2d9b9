"""From sampled tokens to RequestOutputs: stop checks, incremental text, logprobs, finishing.

Every new token goes through `append_token`: it is added to the sequence, its log-probability is
recorded, the grammar state advances, and the stop rules run in order (EOS, stop token ids, stop
strings in the new text, max_tokens, the context limit, a finished grammar). A finished sequence is
handed to the scheduler, which registers its computed blocks in the prefix cache and frees them at once.

While a sequence streams, the tail of its text that could still turn into a stop string is held
back, so a client never sees text that is later cut.

Usage (inside the engine):
    proc = OutputProcessor(ctx, scheduler, requests)     # context.py; requests: the engine's {id: Request}
    proc.append_token(seq, token, logprob_row)
    outputs = proc.collect()
"""
from __future__ import annotations

import time

import torch

from lmstack.infer.context import EngineContext
from lmstack.infer.detokenizer import StopStrings, detokenize_step
from lmstack.infer.outputs import CompletionOutput, RequestOutput
from lmstack.infer.scheduler import Scheduler
from lmstack.infer.sequence import Request, Sequence


def top_dict(logprobs: torch.Tensor, token: int, k: int) -> dict[int, float]:
    """{token: logprob} plus the k most likely tokens of one row."""
    d = {token: float(logprobs[token])}
    if k:
        v, i = logprobs.topk(k)
        for t, x in zip(i.tolist(), v.tolist()):
            d.setdefault(t, x)
    return d


class OutputProcessor:
    def __init__(self, ctx: EngineContext, scheduler: Scheduler, requests: dict[str, Request]):
        self.ctx, self.scheduler, self.requests = ctx, scheduler, requests
        self.changed: set[str] = set()

    # ---- per token
    def append_token(self, seq: Sequence, token: int, logprobs: torch.Tensor) -> None:
        ctx, req = self.ctx, seq.request
        p = req.params
        seq.token_ids.append(token)
        seq.cumulative_logprob += float(logprobs[token])
        if seq.logprobs is not None:
            seq.logprobs.append(top_dict(logprobs, token, p.logprobs or 0))
        ctx.counters["generation_tokens"] += 1
        now = time.perf_counter()
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now
        self.changed.add(req.request_id)
        if seq.matcher is not None:
            ctx.guided_decoder().consume(seq.matcher, token)
        if token in req.eos_ids and not p.ignore_eos:
            return self.finish(seq, "stop")
        if p.stop_token_ids and token in p.stop_token_ids:
            seq.stop_reason = token
            return self.finish(seq, "stop")
        if ctx.tokenizer is not None:
            new = detokenize_step(ctx.tokenizer, seq, p.skip_special_tokens)
            if new:
                old = len(seq.text)
                seq.text += new
                if p.stop:
                    if req.stops is None:
                        req.stops = StopStrings(p.stop)
                    hit, seq.stop_hold = req.stops.scan(seq.text, old, seq.stop_hold)
                    if hit is not None:
                        cut, stop = hit
                        seq.text = seq.text[:cut + len(stop) if p.include_stop_str_in_output else cut]
                        seq.stop_reason = stop
                        return self.finish(seq, "stop")
        if seq.num_output_tokens >= req.max_tokens or seq.num_tokens >= ctx.max_model_len:
            return self.finish(seq, "length")
        if seq.matcher is not None and ctx.guided_decoder().is_done(seq.matcher):
            return self.finish(seq, "stop")

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish a sequence (the scheduler frees its blocks) and note its request changed."""
        self.scheduler.finish(seq, reason)
        self.changed.add(seq.request.request_id)
        if seq.request.beam is not None and reason not in ("abort", "error"):
            seq.request.beam.on_finish(seq)

    def record_prompt_logprobs(self, req: Request, positions: list[int], logits: torch.Tensor) -> None:
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None] * len(req.prompt_token_ids)
        lps = logits.float().log_softmax(dim=-1)
        k = req.params.prompt_logprobs or 0
        for i, p in enumerate(positions):
            req.prompt_logprobs[p + 1] = top_dict(lps[i], req.prompt_token_ids[p + 1], k)

    # ---- per step
    def collect(self) -> list[RequestOutput]:
        """Outputs of the requests that got tokens or finished since the last call."""
        outs = []
        for rid in list(self.changed):
            req = self.requests.get(rid)
            if req is None:
                continue
            final = req.finished
            if final:
                self.requests.pop(rid, None)
                self.ctx.counters["requests_finished"] += 1
                req.metrics.finished_time = time.perf_counter()
            out = self.request_output(req, final)
            if out is not None:
                outs.append(out)
        self.changed.clear()
        return outs

    def request_output(self, req: Request, final: bool) -> RequestOutput | None:
        p = req.params
        streaming_ok = p.output_kind != "final_only" and req.beam is None and not (p.best_of and p.best_of > p.n)
        if not final and not streaming_ok:
            return None
        if req.error is not None:
            seqs = sorted(req.seqs, key=lambda s: s.index)[:p.n]  # what each sample had when it failed
        elif req.beam is not None:
            seqs = req.beam.best(p.n) if final else []
        elif final and p.best_of and p.best_of > p.n:
            seqs = sorted(req.seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:p.n]
        else:
            seqs = sorted(req.seqs, key=lambda s: s.index)
        delta = p.output_kind == "delta"
        completions = []
        for i, seq in enumerate(seqs):
            text = seq.text
            if not seq.is_finished and seq.stop_hold:
                text = text[:len(text) - seq.stop_hold]
            ids = seq.output_ids
            logprobs = seq.logprobs
            if delta:
                text, ids = text[seq.sent_text_len:], ids[seq.sent_tokens:]
                logprobs = None if logprobs is None else logprobs[seq.sent_tokens:]
                seq.sent_text_len += len(text)
                seq.sent_tokens += len(ids)
            completions.append(CompletionOutput(i, text, list(ids), None if logprobs is None else list(logprobs),
                                                seq.finish_reason, seq.cumulative_logprob, seq.stop_reason))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, completions, final,
                             req.prompt_logprobs, req.metrics, req.metrics.num_cached_tokens, req.lora,
                             error=req.error)
