"""RequestBuilder: validate and tokenize a request once, before it touches the engine's state.

It refuses what could never run (empty prompts or prompts that do not fit the context or the KV pool,
token ids outside the vocabulary, unknown LoRA adapters, beams that could never fit the pool), and
prepares what the engine needs per request: the clamped max_tokens, the bad_words index, the phrase bans
(the engine's hard bans plus the request's banned_phrases: lmstack.safety.phrase_ban), the stop
strings index, the first sequence's seeded generator and grammar matcher. It holds no engine state, so
servers call it from worker threads (async_engine.py) and hand the prepared Request to the loop.

Usage:
    builder = RequestBuilder(ctx, num_blocks=256, block_size=16)
    req = builder.make("r1", "Once upon a time", SamplingParams(max_tokens=32), adapters={"code"})
"""
from __future__ import annotations

from typing import Collection

from lmstack.errors import LmstackError
from lmstack.infer.bad_words import BadWords
from lmstack.infer.context import EngineContext
from lmstack.infer.detokenizer import StopStrings
from lmstack.infer.sampler import seeded_generator
from lmstack.infer.sampling_params import SamplingParams, SamplingParamsError
from lmstack.infer.sequence import Request
from lmstack.safety.phrase_ban import PhraseBan


class RequestBuilder:
    def __init__(self, ctx: EngineContext, num_blocks: int, block_size: int):
        self.ctx, self.num_blocks, self.block_size = ctx, num_blocks, block_size

    def make(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
             lora: str | None = None, arrival_time: float | None = None,
             adapters: Collection[str] = ()) -> Request:
        """A validated, tokenized Request; `adapters` are the LoRA names the engine has registered."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise LmstackError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise LmstackError(f"request_id must be a non-empty string, got {request_id!r}")
        lora = lora or params.lora
        if lora is not None and lora not in adapters:
            raise SamplingParamsError(f"lora={lora!r} is not a registered adapter; registered: {sorted(adapters)}")
        text = prompt if isinstance(prompt, str) else None
        ids = self.encode(prompt)
        max_len = self.ctx.max_model_len
        if len(ids) >= max_len:
            raise LmstackError(f"the prompt has {len(ids)} tokens but the context holds {max_len}; "
                               "shorten it (prompt + at least one generated token must fit)")
        room = min(max_len, self.num_blocks * self.block_size) - len(ids)
        if room < 1:
            raise LmstackError(f"the prompt has {len(ids)} tokens but the KV pool holds "
                               f"{self.num_blocks * self.block_size}; raise num_blocks")
        self.check_token_ids(params)
        req = Request(request_id, text, ids, params, lora=lora, arrival_time=arrival_time, eos_ids=self.ctx.eos_ids)
        req.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if params.use_beam_search:
            self.check_beam_fits(params, len(ids), req.max_tokens)
        if params.bad_words:
            req.bad_word_ids = self.bad_word_ids(params.bad_words)
        if params.banned_phrases or self.ctx.banned_phrases:
            req.phrase_ban = self.phrase_ban(params.banned_phrases or [])
        if params.stop:
            req.stops = StopStrings(params.stop)
        seq = req.seqs[0]
        seq.generator = seeded_generator(params.seed, 0)
        if params.guided:
            seq.matcher = self.ctx.guided_decoder().new_matcher(params)
        if params.logprobs is not None:
            seq.logprobs = []
        return req

    def encode(self, prompt: str | list[int]) -> list[int]:
        vocab = self.ctx.vocab  # a padded row is no token: it cannot be decoded, nor proposed by n-gram lookup
        if isinstance(prompt, str):
            if self.ctx.tokenizer is None:
                raise LmstackError("a text prompt needs a tokenizer; pass tokenizer= or give token ids")
            ids = self.ctx.tokenizer.encode_prompt(prompt)  # no second BOS before a rendered chat template
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad and not (self.ctx.extra_ids is not None and self.ctx.extra_ids(bad)):
                raise LmstackError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        else:
            raise LmstackError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise LmstackError("the prompt is empty; give at least one token")
        return ids

    def check_token_ids(self, params: SamplingParams) -> None:
        """Every token id a request names must be one the model can emit: 0 <= id < vocabulary."""
        vocab = self.ctx.vocab
        for name, ids in (("stop_token_ids", params.stop_token_ids or ()), ("logit_bias", params.logit_bias or ())):
            for t in ids:
                if not 0 <= t < vocab:
                    raise SamplingParamsError(f"{name}: token id {t} is outside the vocabulary [0, {vocab})")

    def check_beam_fits(self, params: SamplingParams, prompt_len: int, max_tokens: int) -> None:
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

    def phrase_ban(self, phrases: list[str]) -> PhraseBan:
        """The engine's hard bans plus the request's own phrases (a request can add bans, never remove one)."""
        if self.ctx.tokenizer is None:
            raise SamplingParamsError("banned_phrases needs a tokenizer to read the text tokens spell")
        try:
            return PhraseBan.build(self.ctx.tokenizer, phrases, self.ctx.vocab, hard=self.ctx.banned_phrases)
        except LmstackError as e:
            raise SamplingParamsError(f"banned_phrases: {e}") from None

    def bad_word_ids(self, words: list[str]) -> BadWords:
        if self.ctx.tokenizer is None:
            raise SamplingParamsError("bad_words needs a tokenizer to turn words into token ids")
        try:
            return BadWords.from_words(self.ctx.tokenizer, words, self.ctx.vocab)
        except LmstackError as e:
            raise SamplingParamsError(f"bad_words: {e}") from None
