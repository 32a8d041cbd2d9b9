"""SinkCacheChat: one endless conversation in bounded memory, on the model core's attention-sink cache.

The paged engine serves many bounded requests; a single chat that never ends needs something else:
StreamingLLM (Xiao et al. 2023) keeps the first n_sink tokens (the "attention sinks" every head
leans on) plus a rolling window of recent tokens, and re-assigns positions inside the cache, so the
model never sees a position past its window and memory stays flat however long the chat runs.
lmstack.model.kv_cache.SinkCache implements the cache; this class feeds it turn by turn (each new
message is prefilled once, nothing is recomputed) and samples replies with the engine's logits
processors, so every SamplingParams knob works here too.

Usage:
    chat = SinkCacheChat(model, tok, window=256, n_sink=4)
    reply = chat.say("Hello!", SamplingParams(max_tokens=64, temperature=0.7, seed=0))
    for piece in chat.stream("Tell me more"):
        print(piece, end="")
    chat.cache.nbytes(), chat.tokens_seen
"""
from __future__ import annotations

from typing import Iterator

import torch

from lmstack.errors import LmstackError
from lmstack.infer import logits_processors as lp
from lmstack.infer.sampling_params import SamplingParams


class SinkCacheChat:
    def __init__(self, model, tokenizer, window: int | None = None, n_sink: int | None = None, seed: int = 0,
                 system: str | None = None):
        if tokenizer is None:
            raise LmstackError("SinkCacheChat needs a tokenizer with a chat template")
        self.model, self.tok = model.eval(), tokenizer
        self.cache = model.new_cache(1, kind="sink", window=window, n_sink=n_sink)
        self.generator = torch.Generator().manual_seed(seed)
        self.end_ids = set(tokenizer.stop_ids())  # EOS, generation_config's eos list, the template's end of turn
        eot = tokenizer.end_of_turn_ids()
        self.assistant_end = eot[0] if eot else None
        self.history: list[dict] = []  # the conversation so far, as the template renders it
        self.tokens_seen = 0
        self.recent: list[int] = []  # recent tokens, for penalties and bad words
        self._logits: torch.Tensor | None = None
        self._started = False
        if system is not None:
            self._feed(self._turn("system", system, generation_prompt=False))

    def _turn(self, role: str, content: str, generation_prompt: bool = True) -> list[int]:
        # the ids this turn adds to the rendered conversation (the template opens a conversation once, with
        # BOS where it has one; later turns add only their own tokens)
        msg = {"role": role, "content": content}
        if self._started:
            ids = self.tok.append_turn_ids(self.history, [msg], generation_prompt)
        else:
            ids, _ = self.tok.apply_chat_template([msg], add_generation_prompt=generation_prompt)
        self._started = True
        self.history.append(msg)
        return ids

    @torch.no_grad()
    def _feed(self, ids: list[int]) -> None:
        """Prefill tokens into the sink cache; keeps the logits of the last one."""
        if not ids:
            return
        x = torch.tensor([ids], device=next(self.model.parameters()).device)
        self._logits = self.model(x, cache=self.cache, logits_to_keep=1)[0, -1].float().cpu()
        self.tokens_seen += len(ids)
        self.recent = (self.recent + ids)[-1024:]

    def stream(self, content: str, params: SamplingParams | None = None, role: str = "user") -> Iterator[str]:
        """Add a message and stream the assistant's reply as text pieces."""
        params = params or SamplingParams(max_tokens=128)
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else self.generator
        self._feed(self._turn(role, content))
        out: list[int] = []
        emitted = ""
        limit = params.max_tokens if params.max_tokens is not None else 1 << 30
        while len(out) < limit:
            row = lp.SamplingRow(params, self.recent, out, gen, frozenset(self.end_ids))
            token = lp.sample(lp.process(self._logits[None], [row]), [row], gen)[0]
            self._feed([token])
            if token in self.end_ids and not params.ignore_eos:
                break
            out.append(token)
            text = self.tok.decode(out, skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text
        else:
            if self.assistant_end is not None:  # close the turn so the next message starts cleanly
                self._feed([self.assistant_end])
        self.history.append({"role": "assistant", "content": self.tok.decode(out, skip_special_tokens=True)})

    def say(self, content: str, params: SamplingParams | None = None, role: str = "user") -> str:
        return "".join(self.stream(content, params, role))
