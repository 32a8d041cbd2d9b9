"""StepPlan: the row layout of one engine step, computed once and read by the runner and the postprocess.

The scheduler says which sequences run and on how many tokens; the plan turns that into the flat batch:
for each sequence the token ids it runs (its chunk plus any speculative guesses), their first position,
their first row in the flattened (1, N) input, and which of its rows need logits (prompt positions
scored for prompt_logprobs, then the last position and the guesses, which are sampled or verified).
The runner builds its inputs and attention metadata from `seqs` (token ids, positions, rows) and
computes logits for `logit_rows` only; the postprocess finds each sequence's logits through `first_logit`.

Usage:
    plan = StepPlan.build(scheduler_output)
    logits = runner.run(plan)                      # (len(plan.logit_rows), vocab)
    for p in plan.seqs: logits[p.sample_row:p.sample_row + p.n_sample_rows]
    plan = StepPlan.of([(seq, token_ids, first_position), ...], logit_rows)   # the draft model's passes
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.infer.scheduler import SchedulerOutput
from lmstack.infer.sequence import Sequence
from lmstack.infer.spec_tree import TokenTree


@dataclass
class PlannedSeq:
    seq: Sequence
    tokens: list[int]
    """Token ids run this step: the scheduled chunk, then the speculative guesses."""
    start: int
    """Position of tokens[0] (= seq.num_computed_tokens when planned)."""
    row: int
    """First row of this sequence in the flat batch."""
    first_logit: int
    """Index of this sequence's first row in the step's logits."""
    prompt_rows: list[int]
    """Prompt positions p whose logits score prompt token p + 1 (prompt_logprobs)."""
    n_sample_rows: int
    """Rows to sample or verify: 1 + len(guesses) when the chunk reaches the sequence's end, else 0."""
    num_tokens: int
    """Known tokens computed this step (tokens without the guesses)."""
    lookahead: int = 0
    """Slots the scheduler reserved for speculative guesses."""
    tree: TokenTree | None = None
    """The guesses, when they form a token tree (spec_tree.py: parents and depths); None: a chain."""

    @property
    def sample_row(self) -> int:
        return self.first_logit + len(self.prompt_rows)


@dataclass
class StepPlan:
    seqs: list[PlannedSeq] = field(default_factory=list)
    logit_rows: list[int] = field(default_factory=list)
    num_rows: int = 0

    @classmethod
    def build(cls, out: SchedulerOutput) -> "StepPlan":
        plan = cls()
        for s in out.scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            spec = seq.spec_tokens if s.lookahead else []
            tokens = seq.token_ids[start:start + s.num_tokens] + spec
            base, first_logit = plan.num_rows, len(plan.logit_rows)
            prompt_rows = []
            if seq.request.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1 \
                    and seq.index == 0:
                stop = min(start + s.num_tokens, seq.num_prompt_tokens - 1)
                prompt_rows = list(range(start, stop))  # position p scores prompt token p + 1
                plan.logit_rows.extend(base + p - start for p in prompt_rows)
            n_sample = 0
            if start + s.num_tokens == seq.num_tokens:  # the chunk reaches the end: the next token is due
                n_sample = 1 + len(spec)
                plan.logit_rows.extend(range(base + s.num_tokens - 1, base + s.num_tokens + len(spec)))
            plan.seqs.append(PlannedSeq(seq, tokens, start, base, first_logit, prompt_rows, n_sample, s.num_tokens,
                                        s.lookahead, spec if isinstance(spec, TokenTree) else None))
            plan.num_rows += len(tokens)
        return plan

    @classmethod
    def of(cls, batch: list[tuple[Sequence, list[int], int]], logit_rows: list[int]) -> "StepPlan":
        """A plan for a plain batch of (seq, token ids, first position) with the given logit rows."""
        plan = cls(logit_rows=list(logit_rows))
        for seq, tokens, start in batch:
            plan.seqs.append(PlannedSeq(seq, list(tokens), start, plan.num_rows, 0, [], 0, len(tokens)))
            plan.num_rows += len(tokens)
        return plan
