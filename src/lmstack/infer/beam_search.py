"""Beam search inside the engine: beam_width hypotheses per request, sharing KV blocks copy-on-write.

Each step, when every live beam of a request has its next-token log-probabilities, the 2*W best
extensions (beam cumulative logprob + token logprob) are ranked. Walking them best first, an
extension ending in EOS becomes a finished hypothesis, any other becomes a live beam, until W live
beams are chosen. Beams are Sequences: a beam extended twice is forked (the child shares all blocks;
the shared last block is copied only when written), and a beam nobody extends is dropped, freeing
its blocks at once. Hypotheses are ranked by cumulative_logprob / length**length_penalty (length =
generated tokens, EOS included), so length_penalty > 0 favours longer outputs.

Search stops when W hypotheses finished (like HF's early_stopping=True) or max_tokens is reached (the
live beams then finish with reason 'length'); the request returns its n best hypotheses.

The engine hands beam_step what it needs, never itself: the sampler (bans and penalties), the scheduler
(fork, drop) and the output processor (append a token, finish).

Usage:
    outs = llm.generate(prompts, SamplingParams(use_beam_search=True, beam_width=4, n=2, max_tokens=16))
    beam_step(items, logits, sampler, scheduler, outputs)      # inside the engine's postprocess
"""
from __future__ import annotations

import torch

from lmstack.infer.output_processor import OutputProcessor
from lmstack.infer.sampler import Sampler, seeded_generator
from lmstack.infer.sampling_params import SamplingParams
from lmstack.infer.scheduler import Scheduler
from lmstack.infer.sequence import Sequence


class BeamState:
    def __init__(self, params: SamplingParams, max_tokens: int):
        self.width, self.n = params.beam_width, params.n
        self.length_penalty = params.length_penalty
        self.max_tokens = max_tokens
        self.finished: list[Sequence] = []
        self.pending: dict[int, torch.Tensor] = {}  # seq_id -> logprobs, until all live beams have theirs

    def score(self, seq: Sequence) -> float:
        return seq.cumulative_logprob / max(1, seq.num_output_tokens) ** self.length_penalty

    def on_finish(self, seq: Sequence) -> None:
        self.finished.append(seq)

    def best(self, n: int) -> list[Sequence]:
        return sorted(self.finished, key=self.score, reverse=True)[:n]


def beam_step(items: list[tuple[Sequence, int]], logits: torch.Tensor, sampler: Sampler, scheduler: Scheduler,
              outputs: OutputProcessor) -> None:
    """Advance every request whose live beams all have logits; others keep theirs pending."""
    by_req: dict[str, list[tuple[Sequence, int]]] = {}
    for seq, row in items:
        by_req.setdefault(seq.request.request_id, []).append((seq, row))
    for rows in by_req.values():
        req = rows[0][0].request
        st = req.beam
        srows = [sampler.row(seq) for seq, _ in rows]
        # bans, biases and penalties apply; sampling knobs do not (beam search is deterministic)
        processed = sampler.process_bans(logits[[r for _, r in rows]], srows)
        logprobs = processed.log_softmax(dim=-1)
        for i, (seq, _) in enumerate(rows):
            st.pending[seq.seq_id] = logprobs[i]
        live = [s for s in req.seqs if not s.is_finished]
        if any(s.seq_id not in st.pending for s in live):
            continue
        if req.max_tokens == 0:
            for s in live:
                outputs.finish(s, "length")
            continue
        _select(scheduler, outputs, req, st, live)


def _select(scheduler: Scheduler, outputs: OutputProcessor, req, st: BeamState, live: list[Sequence]) -> None:
    width = st.width
    cands = []  # (new cumulative logprob, beam, token, token logprob)
    for s in live:
        lpv = st.pending.pop(s.seq_id)
        vals, toks = lpv.topk(min(2 * width, lpv.shape[-1]))
        cands.extend((s.cumulative_logprob + v, s, t, lpv) for v, t in zip(vals.tolist(), toks.tolist())
                     if v > float("-inf"))
    cands.sort(key=lambda c: c[0], reverse=True)
    keep: list[tuple[Sequence, int, torch.Tensor]] = []
    ends: list[tuple[Sequence, int, torch.Tensor]] = []
    for rank, (_, s, t, lpv) in enumerate(cands):
        if t in req.eos_ids and not req.params.ignore_eos:
            if rank < width:  # only an EOS ranked among the best W ends a hypothesis
                ends.append((s, t, lpv))
            continue
        keep.append((s, t, lpv))
        if len(keep) == width:
            break
    # Realise the new beams. Fork before a parent is extended, so children copy its old state.
    users: dict[int, list[tuple[int, torch.Tensor, bool]]] = {}
    for s, t, lpv in ends:
        users.setdefault(s.seq_id, []).append((t, lpv, True))
    for s, t, lpv in keep:
        users.setdefault(s.seq_id, []).append((t, lpv, False))
    by_id = {s.seq_id: s for s in live}
    for sid, s in by_id.items():
        uses = users.get(sid)
        if not uses:
            scheduler.drop(s)
            continue
        children = scheduler.fork(s, len(uses) - 1, seeded_generator) if len(uses) > 1 else []
        for beam, (t, lpv, _) in zip([s] + children, uses):
            outputs.append_token(beam, t, lpv)  # EOS / max_tokens finish it and record the hypothesis
    if len(st.finished) >= width:  # enough hypotheses: stop the search
        for s in [s for s in req.seqs if not s.is_finished]:
            scheduler.drop(s)
