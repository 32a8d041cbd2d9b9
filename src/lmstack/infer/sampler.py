"""The Sampler: logits rows -> one token per row, on the logits' device, for the engine, speculation and beams.

It owns what every caller of sampling shares: the default generator (the engine's seed), how a sequence
becomes a SamplingRow (its params, prompt and output so far, its own seeded generator, its request's
bans and the grammar's allowed mask), and the order of work: every processor and check runs before any
random draw, so a row that fails wastes no randomness. The processors themselves (logits_processors.py)
are batched tensor ops over the rows that ask for them: temperature, top-k/top-p/min-p, repetition and
frequency/presence penalties; only bans that depend on one row's state (bad words, min_tokens,
logit_bias, the grammar) loop over those rows alone.

- sample(seqs, logits): the common path. All-greedy rows without processing are one argmax; otherwise
  process + draw (seeded rows each from their own generator, the others together in one inverse-CDF draw).
  The sampler lives on the model's device (`device`): its default generator is there, a seeded request's
  generator is re-seeded there at its first draw, and the logits never leave it. On a GPU one step reads
  back once: the tokens, each row's dead flag and the chosen tokens' logprobs in one transfer; a row's
  whole logprob vector comes back only for requests that asked for logprobs.
- process / probabilities: what speculative decoding needs (the target's p and the draft's q).
- process_bans: what beam search scores with (bans and penalties, no temperature or truncation).

Usage:
    sampler = Sampler(seed=0, guided=lambda: guided_decoder, device="cuda")   # device: the model's
    tokens, logprobs = sampler.sample([seq_a, seq_b], logits)      # logprobs: (rows, vocab)
    gen = seeded_generator(seed=7, index=1)                        # the n-th sample of a seeded request
"""
from __future__ import annotations

from typing import Callable

import torch

from lmstack.infer import logits_processors as lp
from lmstack.infer.sequence import Sequence


def seeded_generator(seed: int | None, index: int) -> torch.Generator | None:
    """The generator of sample `index` of a request with `seed` (None: the sampler's default generator)."""
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


class Sampler:
    def __init__(self, seed: int = 0, guided: Callable[[], object] | None = None,
                 device: str | torch.device | None = None):
        self.device = torch.device(device or "cpu")
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.single_transfer = self.device.type != "cpu"
        """Sample with one read-back per step (on by default off the CPU; the CPU tests switch it on to run
        the device path's code on CPU tensors)."""
        self._guided = guided  # returns the GuidedDecoder; only called for sequences with a grammar

    def row(self, seq: Sequence, extra: list[int] | None = None) -> lp.SamplingRow:
        """seq as the processors see it; `extra` are tokens appended after its output (speculative guesses)."""
        req = seq.request
        gen = seq.generator
        if gen is not None and gen.device != self.device and self.device.type != "cpu":
            # a seeded request draws on the device from its first token on (a CUDA generator has its own
            # stream: the same seed gives the same tokens on every run on this device type, not the CPU's)
            seq.generator = torch.Generator(self.device).manual_seed(gen.initial_seed())
        out = seq.output_ids if not extra else seq.output_ids + extra
        allowed = self._guided().allowed(seq.matcher) if seq.matcher is not None else None
        if req.phrase_ban is not None:  # phrase bans are an allowed mask too: the same processor applies it
            allowed = req.phrase_ban.allowed(out, seq.seq_id, allowed, self.device)
        return lp.SamplingRow(req.params, req.prompt_token_ids, out, seq.generator, req.eos_ids,
                              req.bad_word_ids, allowed)

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """One token per (sequence, logits row); returns (tokens, the raw rows' log-probabilities).

        Log-probabilities are those of the model's distribution, before any processor (what OpenAI's
        logprobs and cumulative_logprob report)."""
        rows = [self.row(seq) for seq in seqs]
        if self.single_transfer:
            return self._sample_on_device(seqs, rows, logits)
        if all(r.params.greedy and r.allowed is None and not lp.needs_processing(r.params) for r in rows):
            tokens = logits.argmax(dim=-1).tolist()  # the hot path of greedy decoding: no processing at all
        else:
            tokens = lp.sample(lp.process(logits, rows), rows, self.generator)
        if any(seq.logprobs is not None for seq in seqs):
            return tokens, logits.log_softmax(dim=-1)
        # only the chosen token's entry is read (cumulative_logprob): that one number per row, seen at every index
        # through a stride-0 view, instead of a vocab-sized subtraction
        chosen = logits.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0] - logits.logsumexp(-1)
        return tokens, chosen[:, None].expand(len(rows), logits.shape[-1])

    def _sample_on_device(self, seqs: list[Sequence], rows: list[lp.SamplingRow], logits: torch.Tensor
                          ) -> tuple[list[int], torch.Tensor]:
        """sample() with one read-back: draw on the device, then tokens, dead flags and chosen logprobs come
        back together. Runs on any device (the CPU tests drive it with CPU tensors)."""
        if all(r.params.greedy and r.allowed is None and not lp.needs_processing(r.params) for r in rows):
            processed, tokens = logits, logits.argmax(dim=-1)
            dead = torch.zeros(len(rows), dtype=torch.bool, device=logits.device)
        else:
            processed = lp.process(logits, rows)
            dead = lp.dead_rows(processed)
            tokens = lp.draw(processed, rows, self.generator)
        chosen = logits.gather(-1, tokens[:, None])[:, 0] - logits.logsumexp(dim=-1)
        back = torch.stack([tokens.double(), dead.double(), chosen.double()]).cpu()  # the step's one transfer
        if bool(back[1].any()):
            lp.check_rows(processed, back[1].bool())  # raises NoTokenAllowed naming the row
        token_list = back[0].long().tolist()
        if any(seq.logprobs is not None for seq in seqs):  # asked for: the whole vectors come back
            return token_list, logits.log_softmax(dim=-1).cpu()
        # nobody reads more than the chosen token's entry (output_processor: cumulative_logprob), so each row
        # is that one number seen at every index: a stride-0 view, no vocab-sized copy or transfer
        return token_list, back[2].float()[:, None].expand(len(rows), logits.shape[-1])

    def process(self, logits: torch.Tensor, rows: list[lp.SamplingRow]) -> torch.Tensor:
        return lp.process(logits, rows)

    def draw(self, processed: torch.Tensor, rows: list[lp.SamplingRow]) -> list[int]:
        return lp.sample(processed, rows, self.generator)

    def probabilities(self, processed: torch.Tensor, rows: list[lp.SamplingRow]) -> torch.Tensor:
        return lp.probabilities(processed, rows)

    def process_bans(self, logits: torch.Tensor, rows: list[lp.SamplingRow]) -> torch.Tensor:
        return lp.process_bans(logits, rows)
