"""The scheduler: which sequences run in the next step and on how many tokens (continuous batching).

Every step it fills a token budget (max_batched_tokens) and a sequence budget (max_num_seqs):
1. Running sequences first, oldest first: a decoding one needs 1 token (+ speculative lookahead slots);
   one still in its prompt gets the next chunk that fits the budget (chunked prefill), so a long prompt
   never stalls the others' decoding for more than one chunk.
2. If no running sequence had to be preempted, waiting ones are admitted in arrival order: each first
   takes its prefix-cache hits (those tokens cost nothing), then a prompt chunk that fits.
3. If nothing at all could run while work waits (running beams paused for their siblings hold the
   pool), paused sequences are preempted until the waiting head fits, so a step never spins idle; a
   head that cannot fit even the empty pool is reported as unschedulable.
When a running sequence needs a block and the pool is empty, the newest running sequence is preempted
by recompute: its blocks are freed and it goes back to the front of the queue with its tokens, to be
prefilled again later (often straight from the prefix cache). So requests join and leave between
steps, never waiting for a whole batch to finish (Orca, Yu et al. 2022; vLLM).

The scheduler also owns a sequence's life between steps: `finish` (keep its computed blocks in the prefix
cache, free them, forget it), `fork` (n > 1 samples and beams: children share the parent's blocks and
run right after it), `drop` (a pruned beam) and `preempt`. Nobody else frees blocks or edits the queues.

Usage:
    sched = Scheduler(block_manager, max_num_seqs=16, max_batched_tokens=2048)
    sched.add(seq)
    out = sched.schedule()      # out.scheduled: [(seq, num_tokens, lookahead)], out.copies: CoW pairs
    sched.finish(seq, "stop"); children = sched.fork(seq, 3, make_generator)
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from lmstack.infer.block_manager import BlockManager
from lmstack.infer.sequence import Sequence, Status


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int
    """Known tokens computed this step, starting at seq.num_computed_tokens."""
    lookahead: int = 0
    """Extra slots reserved for speculative tokens."""


@dataclass
class SchedulerOutput:
    scheduled: list[Scheduled] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    unschedulable: Sequence | None = None
    """A waiting sequence that does not fit even the empty pool (the engine fails its request)."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 16, max_batched_tokens: int = 2048,
                 lookahead: Callable[[Sequence], int] | None = None):
        self.bm = block_manager
        self.max_num_seqs, self.max_batched_tokens = max_num_seqs, max_batched_tokens
        self.lookahead = lookahead or (lambda seq: 0)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0
        self.prefix_queried_tokens = 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = Status.WAITING
        (self.waiting.appendleft if front else self.waiting.append)(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget a sequence (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a sequence finished, keep its computed blocks in the prefix cache, free its blocks."""
        seq.finish_reason = reason
        seq.status = Status.FINISHED
        if seq.block_table and reason != "error":  # a failed sequence's K/V is not trusted for reuse
            self.bm.register_computed(seq)
        self.remove(seq)

    def cache_computed(self, seq: Sequence) -> None:
        """Offer a running sequence's newly computed full blocks to the prefix cache."""
        if seq.block_table:
            self.bm.register_computed(seq)

    def drop(self, seq: Sequence) -> None:
        """A pruned beam: free its blocks and forget it (it is no hypothesis, so it leaves its request)."""
        seq.status = Status.FINISHED
        seq.finish_reason = "pruned"
        self.remove(seq)
        seq.request.seqs.remove(seq)

    def fork(self, seq: Sequence, count: int, generator: Callable[[int | None, int], Any]) -> list[Sequence]:
        """`count` new sequences sharing seq's history and blocks; they run right after it.
        generator(seed, index) gives each child its own random stream (sampler.seeded_generator)."""
        req = seq.request
        children = []
        for _ in range(count):
            child = seq.fork(req.next_index)
            req.next_index += 1
            child.generator = generator(req.params.seed, child.index)
            self.bm.fork(seq, child)
            req.seqs.append(child)
            children.append(child)
        at = self.running.index(seq) + 1 if seq in self.running else len(self.running)
        self.running[at:at] = children
        return children

    def preempt(self, seq: Sequence, front: bool = True) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.draft_computed = 0
        seq.request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq, front=front)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.remaining_prefill == 0:  # nothing to compute (a beam hypothesis waiting for its siblings)
                i += 1
                continue
            n = min(seq.remaining_prefill, budget)
            look = self.lookahead(seq) if seq.remaining_prefill == 1 else 0
            copies = self.bm.ensure_slots(seq, seq.num_computed_tokens + n + look)
            while copies is None:
                victim = self.running[-1]
                self.preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
                copies = self.bm.ensure_slots(seq, seq.num_computed_tokens + n + look)
            if copies is None:
                break  # seq itself was preempted, and it was the last one
            out.copies.extend(copies)
            out.scheduled.append(Scheduled(seq, n, look))
            budget -= n + look
            i += 1
        if out.preempted:
            return out  # the pool is short: admit nobody new this step
        budget = self._admit(out, budget)
        if not out.scheduled and self.waiting:
            self._unstick(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        """Move waiting sequences into the batch, in arrival order, while blocks and budgets last."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            fresh = not seq.block_table
            cached = self.bm.allocate_prefix(seq) if fresh else 0
            n = min(seq.remaining_prefill, budget)
            copies = self.bm.ensure_slots(seq, seq.num_computed_tokens + n)
            if copies is None:
                if fresh:  # give the hits back; try again when blocks free up
                    self.bm.free(seq)
                    seq.num_computed_tokens = 0
                break
            if fresh:
                self.prefix_hit_tokens += cached
                self.prefix_queried_tokens += seq.num_tokens
                if seq.request.metrics.first_scheduled_time is None:
                    seq.request.metrics.num_cached_tokens = cached
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.copies.extend(copies)
            out.scheduled.append(Scheduled(seq, n, 0))
            budget -= n
        return budget

    def _unstick(self, out: SchedulerOutput, budget: int) -> None:
        """Nothing could run although work waits: every running sequence is paused (a beam hypothesis
        whose log-probabilities are kept until its siblings have theirs) and holds the blocks or the
        slots the waiting head needs. Spinning here once starved every request for minutes, so preempt
        paused sequences, newest first, to the BACK of the queue (the head goes first, so the same one
        is not readmitted in a loop) until the head fits. A paused sequence loses only its K/V, never
        its kept log-probabilities. If nothing is left to preempt and the head still does not fit an
        empty pool, it never will: report it (the engine fails that request alone)."""
        while not out.scheduled:
            idle = [s for s in self.running if s.remaining_prefill == 0]
            if not idle:
                break
            victim = idle[-1]
            self.preempt(victim, front=False)
            out.preempted.append(victim)
            budget = self._admit(out, budget)
        if not out.scheduled and not self.running and self.waiting:
            out.unschedulable = self.waiting[0]
