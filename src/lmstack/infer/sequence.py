"""Sequence (one token stream with its KV block table) and Request (the sequences of one prompt).

A Sequence is the unit the scheduler and block manager see: its tokens (prompt + output), how many
of them already have K/V in the cache (num_computed_tokens), and its block table. Chunked prefill,
decode, preemption and speculative verification are all just "compute tokens
[num_computed_tokens, num_computed_tokens + n)". A Request groups the n (or best_of, or beam_width)
sequences of one prompt and owns what they share: params, prompt, metrics, output bookkeeping.

Usage:
    req = Request("r1", prompt="hi", prompt_token_ids=[5, 6], params=SamplingParams(n=2))
    seq = req.seqs[0]; seq.num_tokens, seq.remaining_prefill
"""
from __future__ import annotations

import enum
import itertools
import time
from typing import Any

import torch

from lmstack.infer.outputs import RequestMetrics
from lmstack.infer.sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    __slots__ = ("seq_id", "request", "index", "token_ids", "num_prompt_tokens", "num_computed_tokens",
                 "block_table", "status", "generator", "logprobs", "cumulative_logprob", "finish_reason",
                 "stop_reason", "text", "detok_offset", "read_offset", "tokens_text", "matcher",
                 "draft_computed", "spec_tokens", "spec_probs", "num_cached_tokens", "hashed_blocks",
                 "block_hashes", "sent_text_len", "sent_tokens", "stop_hold")

    def __init__(self, request: "Request", index: int, token_ids: list[int], num_prompt_tokens: int):
        self.seq_id = next(_ids)
        self.request, self.index = request, index
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = num_prompt_tokens
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hash of each full, computed block (prefix cache keys)
        self.hashed_blocks = 0
        self.status = Status.WAITING
        self.generator: torch.Generator | None = None
        self.logprobs: list[dict[int, float]] | None = None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""  # detokenized output so far (stop strings already cut)
        self.detok_offset = 0  # incremental detokenization state (see detokenizer.py)
        self.read_offset = 0
        self.tokens_text = ""
        self.matcher: Any = None  # guided-decoding state
        self.draft_computed = 0  # speculative decoding: tokens with K/V in the draft model's cache
        self.spec_tokens: list[int] = []  # this step's proposals
        self.spec_probs: torch.Tensor | None = None  # the draft's distributions for them (None = point mass)
        self.num_cached_tokens = 0
        self.sent_text_len = 0  # for delta outputs
        self.sent_tokens = 0
        self.stop_hold = 0  # characters at the end of text that may still begin a stop string

    # ---- facts
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def remaining_prefill(self) -> int:
        """Known tokens without K/V yet (the whole prompt at first, 1 while decoding)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    def fork(self, index: int) -> "Sequence":
        """A copy sharing this sequence's history (the caller shares the blocks via the block manager)."""
        child = Sequence(self.request, index, self.token_ids, self.num_prompt_tokens)
        child.num_computed_tokens = self.num_computed_tokens
        child.block_hashes = list(self.block_hashes)
        child.hashed_blocks = self.hashed_blocks
        child.status = self.status
        child.cumulative_logprob = self.cumulative_logprob
        child.logprobs = None if self.logprobs is None else list(self.logprobs)
        child.text, child.detok_offset, child.read_offset = self.text, self.detok_offset, self.read_offset
        child.tokens_text = self.tokens_text
        child.stop_hold = self.stop_hold
        child.num_cached_tokens = self.num_cached_tokens
        child.draft_computed = self.draft_computed  # the draft's K/V sits in the shared blocks too
        child.matcher = self.matcher.deep_copy() if self.matcher is not None else None
        return child

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table}, {self.status.value})")


class Request:
    """The sequences of one prompt plus what they share."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 lora: str | None = None, arrival_time: float | None = None, eos_ids: frozenset[int] = frozenset()):
        self.request_id, self.prompt, self.params = request_id, prompt, params
        self.prompt_token_ids = list(prompt_token_ids)
        self.lora = lora
        self.eos_ids = eos_ids
        self.metrics = RequestMetrics(arrival_time if arrival_time is not None else time.perf_counter())
        first = Sequence(self, 0, prompt_token_ids, len(prompt_token_ids))
        self.seqs: list[Sequence] = [first]
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.finished_seqs: list[Sequence] = []  # beam search: finished hypotheses
        self.beam: Any = None  # beam search state (beam_search.py)
        self.forked = False  # n > 1: the sequences were forked after the prompt's prefill
        self.aborted = False
        self.bad_word_ids: Any = []  # a BadWords index (bad_words.py), or lists of ids
        self.phrase_ban: Any = None  # a PhraseBan (lmstack.safety.phrase_ban): engine hard bans + the request's
        self.stops: Any = None  # a StopStrings index of params.stop (detokenizer.py), built by the engine
        self.error: str | None = None  # why the request failed, when it did (finish_reason 'error')
        self.next_index = 1
        self.max_tokens = params.max_tokens if params.max_tokens is not None else 1 << 30  # the engine clamps it

    @property
    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    @property
    def finished(self) -> bool:
        return self.aborted or all(s.is_finished for s in self.seqs)
