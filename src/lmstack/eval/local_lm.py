"""LocalLM: the eval interface on an in-process lmstack model (scoring in batched forwards, generation on the engine).

Scoring (loglikelihood, loglikelihood_rolling) follows lm-eval's `hf` backend so the numbers agree:
  - the context/continuation split of lm.encode_pair (trailing spaces move to the continuation);
  - the tokenizer's own special-token handling (BOS when its post-processor adds one), an empty context
    conditioned on the prefix token (BOS, else EOS);
  - input = (context + continuation)[-(max_length + 1):][:-1], left-truncated with a warning;
  - requests batched by length, longest first (few pad tokens, and the first batch hits peak memory at once);
  - requests whose inputs are identical (one-token continuations of one context, i.e. every choice of
    a single-token multiple-choice question) share one forward pass.
Generation goes through lmstack.LLM (continuous batching, paged KV cache) with stop strings.

Usage:
    lm = LocalLM("runs/tiny")                               # a model dir with tokenizer.json
    lm.loglikelihood([("The capital of France is", " Paris")])   # [(-3.2, True)]
    lm.loglikelihood_rolling(["some text to score"])        # [-41.7]
    lm.generate_until([("Q: 2+2=\\nA:", GenArgs(until=["\\n"], max_gen_toks=8))])
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any
import warnings

import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.model.vocab import check_vocab
from lmstack.runtime.device import resolve_device, resolve_dtype
from lmstack.eval.lm import (GenArgs, TokenRules, cut_at_stop, merge_pieces, model_special_ids, new_stats,
                             rolling_windows, split_long_pairs)
from lmstack.infer.llm import LLM
from lmstack.infer.sampling_params import SamplingParams
from lmstack.model.hf_io import load_model
from lmstack.tokenizer import load_tokenizer
from lmstack.tokenizer.core import has_tokenizer


class LocalLM:
    def __init__(self, model: str | Path | torch.nn.Module, tokenizer: Any = None, batch_size: int = 16,
                 max_length: int | None = None, device: str = "auto", add_bos: bool | None = None,
                 chat_template: bool = False, dtype: torch.dtype | str = torch.float32):
        """model: a model directory (ours or HF's) or a Transformer; tokenizer: a Tokenizer or a directory
        (default: the model directory). add_bos: None keeps the tokenizer's own rule (lm-eval's default),
        True/False forces a BOS at the start of every sequence or none. chat_template: prompts are wrapped
        in the tokenizer's chat template by the evaluator. dtype: fp32 by default (scores should not move
        with precision; bf16 on CPU is also very slow); a name such as "auto" or "bf16" is resolved by
        runtime.device.resolve_dtype for the device."""

        if not isinstance(batch_size, int) or batch_size < 1:
            raise LmstackError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.device = str(resolve_device(device))
        if isinstance(dtype, str):
            dtype = resolve_dtype(dtype, self.device)
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            if not path.is_dir():
                raise LmstackError(f"no model directory at {path}")
            self.model = load_model(path, dtype=dtype, device=self.device)
            if tokenizer is None:
                if not has_tokenizer(path):
                    raise LmstackError(f"{path} holds no tokenizer.json (nor tokenizer.model); pass tokenizer=")
                tokenizer = path
        elif isinstance(model, torch.nn.Module):
            self.model = model.to(device=self.device, dtype=dtype)
        else:
            raise LmstackError(f"model must be a model directory or a Transformer, got {type(model).__name__}")
        if tokenizer is None:
            raise LmstackError("LocalLM needs a tokenizer when the model is given as a module")
        tok_path = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None
        self.tokenizer = load_tokenizer(tokenizer) if tok_path is not None else tokenizer
        self.model.eval()
        # One definition with the engine (and so the server): a too-large tokenizer fails here, and scores
        # are log-softmaxes over the model's real rows cut to the tokenizer's ids.
        self.emit_vocab = check_vocab(self.model, self.tokenizer, what="eval", tokenizer_path=tok_path,
                                      model_path=model if isinstance(model, (str, os.PathLike)) else None)
        self.name = str(model) if isinstance(model, (str, os.PathLike)) else type(self.model).__name__
        self.config = getattr(self.model, "config", None)
        model_len = getattr(self.config, "max_seq_len", None) or 2048
        self.max_length = int(max_length or model_len)
        if self.max_length < 2:
            raise LmstackError(f"max_length must be >= 2, got {self.max_length}")
        self.batch_size = batch_size
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.stats = new_stats()
        self._llm = None
        # A tokenizer without BOS/EOS borrows the ids the model declares (generation_config.json, config.json).
        fallback = model_special_ids(model) if isinstance(model, (str, os.PathLike)) else (None, None)
        if fallback == (None, None):
            fallback = (getattr(self.config, "bos_token_id", None), getattr(self.config, "eos_token_id", None))
        self.rules = TokenRules(self.tokenizer, add_bos, fallback)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on (BOS, else EOS); raises only when used and unavailable."""
        return self.rules.prefix_token_id

    # -- tokenization ----------------------------------------------------------------------------------
    def encode(self, text: str, special: bool | None = None) -> list[int]:
        """Text -> ids by TokenRules (the tokenizer's BOS rule unless add_bos overrides it)."""
        return self.rules.encode(text, special)

    def token_count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def render_chat(self, messages: list[dict]) -> str:
        """The chat template as text, ending in the assistant's turn prefix."""
        return self.tokenizer.render_chat(messages, add_generation_prompt=True)

    # -- scoring ---------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        pairs = [self.rules.pair(c, x) for c, x in requests]
        self.stats["requests"] += len(pairs)
        return self._score(pairs)

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        windows, owner = [], []
        for i, text in enumerate(texts):
            for w in rolling_windows(self.encode(text), self.prefix_token_id, self.max_length):
                windows.append(w)
                owner.append(i)
        totals = [0.0] * len(texts)
        self.stats["requests"] += len(texts)
        for i, (ll, _) in zip(owner, self._score(windows)):
            totals[i] += ll
        return totals

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log P(cont | ctx), greedy?) for token pairs; a continuation longer than the context window
        is scored in windows (split_long_pairs) instead of failing the run."""
        if all(len(cont) <= self.max_length for _, cont in pairs):
            return self._score_fitting(pairs)
        pieces, owner = split_long_pairs(pairs, self.max_length)
        warnings.warn(f"{sum(len(c) > self.max_length for _, c in pairs)} continuation(s) are longer than "
                      f"max_length={self.max_length}; scored in windows", stacklevel=3)
        return merge_pieces(self._score_fitting(pieces, warn=False), owner, len(pairs))  # windows cut by design

    @torch.no_grad()
    def _score_fitting(self, pairs: list[tuple[list[int], list[int]]], warn: bool = True) -> list[tuple[float, bool]]:
        """(sum log P(cont | ctx), greedy?) for token pairs, in batches of unique inputs, longest first."""
        inputs: dict[tuple[int, ...], list[int]] = {}  # model input -> indices of the pairs it serves
        truncated = 0
        for k, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise LmstackError(f"request #{k}: the continuation is empty after tokenization; nothing to score")
            whole = ctx + cont
            if len(whole) > self.max_length + 1:
                truncated += 1
            inputs.setdefault(tuple(whole[-(self.max_length + 1):][:-1]), []).append(k)
        if truncated and warn:
            warnings.warn(f"{truncated} request(s) are longer than max_length={self.max_length}; truncated "
                          "from the left, as lm-eval does", stacklevel=3)
        # Longest first: batches hold similar lengths (little padding) and any out-of-memory shows at once.
        order = sorted(inputs, key=lambda inp: (-len(inp), inp))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = len(batch[0])
            # Right padding: a causal model's real positions never attend to later (padded) ones.
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            for row, inp in enumerate(batch):
                ids[row, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            hidden = self.model(ids.to(self.device), return_hidden=True)
            self.stats["prompt_tokens"] += sum(len(inp) for inp in batch)
            for row, inp in enumerate(batch):
                for k in inputs[inp]:
                    cont = pairs[k][1]
                    n = len(cont)
                    # Only the positions that predict the continuation go through the (vocab-wide) head.
                    logits = self.model.head(hidden[row, len(inp) - n:len(inp)]).float()[:, :self.emit_vocab]
                    logp = F.log_softmax(logits, dim=-1)
                    target = torch.tensor(cont, device=logp.device)
                    ll = logp.gather(-1, target[:, None]).sum().item()
                    greedy = bool((logp.argmax(-1) == target).all())
                    results[k] = (ll, greedy)
        return results  # type: ignore[return-value]

    # -- generation ------------------------------------------------------------------------------------
    def llm(self):
        """The inference engine on this model, built on first use."""
        if self._llm is None:
            self._llm = LLM(self.model, tokenizer=self.tokenizer, max_num_seqs=self.batch_size,
                            device=self.device, dtype=next(self.model.parameters()).dtype,
                            max_model_len=self.max_length)
        return self._llm

    def generate_until(self, requests: list[tuple[str, GenArgs]]) -> list[str]:
        if not requests:
            return []
        prompts, params = [], []
        truncated = clamped = 0
        for context, args in requests:
            ids = self.encode(context)
            gen = args.max_gen_toks
            if gen >= self.max_length:
                # A task's default budget can exceed a small model's whole window: keep half for the prompt.
                gen, clamped = max(1, self.max_length // 2), clamped + 1
            room = self.max_length - gen
            if len(ids) > room:
                truncated += 1
                ids = ids[-room:]  # keep the end of the prompt: the question sits there
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=gen, temperature=args.temperature,
                                         top_p=args.top_p, seed=args.seed, stop=list(args.until) or None))
        if clamped:
            warnings.warn(f"{clamped} request(s) asked for max_gen_toks >= max_length={self.max_length}; "
                          f"generating at most {max(1, self.max_length // 2)} tokens", stacklevel=2)
        if truncated:
            warnings.warn(f"{truncated} prompt(s) do not fit max_length={self.max_length} minus max_gen_toks; "
                          "truncated from the left", stacklevel=2)
        outs = self.llm().generate(prompts, params)
        texts = []
        for (context, args), out in zip(requests, outs):
            c = out.outputs[0]
            self.stats["prompt_tokens"] += len(out.prompt_token_ids)
            self.stats["generated_tokens"] += len(c.token_ids)
            ttft = out.metrics.ttft if out.metrics is not None else None
            if ttft is not None:
                self.stats["ttft_s"].append(ttft)
            texts.append(cut_at_stop(c.text, args.until))
        self.stats["requests"] += len(requests)
        return texts
