"""OpenAICompletionsLM: the eval interface over any OpenAI-compatible /v1/completions endpoint (ours included).

Scoring uses the legacy completions trick lm-eval's `local-completions` model uses: send context +
continuation with echo=True, max_tokens=0, logprobs=1; the server returns every prompt token's
log-probability and its top alternatives, so the continuation's log-likelihood is the sum over its tokens,
and it is greedy when each of its tokens is the top alternative.

Where the continuation starts:
  - with a local tokenizer (tokenizer=...), we tokenize by the same rules as LocalLM (TokenRules) and send
    token ids, so scores equal LocalLM's on the same model;
  - without one, we let the server tokenize: the context alone is echoed to count its tokens, then the
    whole text, which is lm-eval's split (tokenize whole, cut at the context's token count) done remotely.
Rolling log-likelihoods need the local tokenizer (windows are cut in tokens).

Usage:
    lm = OpenAICompletionsLM("http://127.0.0.1:8000", "tiny-llama", tokenizer="runs/tiny")
    lm.loglikelihood([("Question: 2+2?\\nAnswer:", " 4")])
    lm.generate_until([("Q: hi\\nA:", GenArgs(until=["\\n"], max_gen_toks=16))])
"""
from __future__ import annotations

import os
from pathlib import Path
import time
from typing import Any
import warnings

from lmstack.errors import LmstackError
from lmstack.eval.lm import (GenArgs, TokenRules, cut_at_stop, merge_pieces, model_special_ids, new_stats,
                             rolling_windows, split_long_pairs)
from lmstack.tokenizer import load_tokenizer


API_KEY_VARS = ("OPENAI_API_KEY", "LMSTACK_API_KEY")


def api_key_from_env() -> str | None:
    """The first of $OPENAI_API_KEY, $LMSTACK_API_KEY that is set (lmstack serve reads the second)."""
    for var in API_KEY_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def auth_error(url: str, sent_key: bool) -> LmstackError:
    """A 401 named as what it is: no key, or a wrong one."""
    why = "the key sent was refused (wrong key)" if sent_key else "no API key was sent"
    return LmstackError(f"{url} answered 401 Unauthorized: {why}; pass --api_key KEY or set "
                        f"{' or '.join(API_KEY_VARS)}")


def completions_url(base_url: str) -> str:
    """Accept http://host:port, .../v1 or the full .../v1/completions."""
    url = base_url.rstrip("/")
    if url.endswith("/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/completions"
    return url + "/v1/completions"


class OpenAICompletionsLM:
    def __init__(self, base_url: str, model: str, api_key: str | None = None, tokenizer: Any = None,
                 batch_size: int = 8, max_length: int = 2048, add_bos: bool | None = None, timeout_s: float = 120.0,
                 max_retries: int = 2):
        """base_url: the server (http://host:port[/v1[/completions]]); model: the name the server serves;
        api_key: sent as a Bearer token (default $OPENAI_API_KEY, else $LMSTACK_API_KEY); tokenizer: a Tokenizer or its directory,
        to tokenize locally (needed for rolling log-likelihoods); batch_size: prompts per HTTP request;
        max_length: the server's context in tokens minus one (its prompts must leave room for one token)."""
        # lazy: heavy (httpx), which this module does not import at its top
        import httpx

        if not isinstance(batch_size, int) or batch_size < 1:
            raise LmstackError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(max_length, int) or max_length < 2:
            raise LmstackError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.url = completions_url(base_url)
        self.model_name = model
        self.name = f"{model} @ {self.url}"
        self.batch_size, self.max_length, self.max_retries = batch_size, max_length, max_retries
        key = api_key if api_key is not None else api_key_from_env()
        self.sent_key = bool(key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers)
        self.tokenizer = None
        self.rules = None
        if tokenizer is not None:
            self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike, Path)) else tokenizer
            # A tokenizer directory that is a model directory also offers its config's BOS/EOS as a fallback.
            fallback = model_special_ids(tokenizer) if isinstance(tokenizer, (str, os.PathLike, Path)) else (None, None)
            self.rules = TokenRules(self.tokenizer, add_bos, fallback)
        self.config = None  # no local ModelConfig: analytic FLOPs are unknown for a remote model
        self.stats = new_stats()

    def close(self) -> None:
        self.client.close()

    # -- HTTP ------------------------------------------------------------------------------------------
    def _post(self, payload: dict) -> dict:
        # lazy: heavy (httpx), which this module does not import at its top
        import httpx

        payload = {"model": self.model_name, **payload}
        for attempt in range(self.max_retries + 1):
            try:
                r = self.client.post(self.url, json=payload)
            except httpx.TransportError as e:
                if attempt == self.max_retries:
                    raise LmstackError(f"cannot reach {self.url}: {e}") from None
                time.sleep(0.5 * 2 ** attempt)
                continue
            if r.status_code >= 500 and attempt < self.max_retries:
                time.sleep(0.5 * 2 ** attempt)
                continue
            if r.status_code == 401:
                raise auth_error(self.url, self.sent_key)
            if r.status_code != 200:
                try:
                    message = r.json().get("error", {}).get("message", r.text)
                except ValueError:
                    message = r.text
                raise LmstackError(f"{self.url} answered {r.status_code}: {message}")
            body = r.json()
            usage = body.get("usage") or {}
            self.stats["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
            self.stats["generated_tokens"] += int(usage.get("completion_tokens") or 0)
            return body
        raise AssertionError("unreachable")

    def _echo(self, prompts: list) -> list[dict]:
        """Per prompt: the echoed logprobs {tokens, token_logprobs, top_logprobs}, in prompt order."""
        out: list[dict] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            body = self._post({"prompt": chunk, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0.0})
            choices = sorted(body["choices"], key=lambda c: c["index"])
            if len(choices) != len(chunk):
                raise LmstackError(f"{self.url} returned {len(choices)} choices for {len(chunk)} prompts")
            for c in choices:
                if not c.get("logprobs"):
                    raise LmstackError(f"{self.url} returned no logprobs; it must support echo with logprobs")
                out.append(c["logprobs"])
        return out

    @staticmethod
    def _tail_score(logprobs: dict, n: int) -> tuple[float, bool]:
        """Sum of the last n prompt tokens' log-probabilities, and whether each was the top alternative."""
        lps = logprobs["token_logprobs"][-n:]
        tops = logprobs["top_logprobs"][-n:]
        if len(lps) < n or any(lp is None for lp in lps):
            raise LmstackError("the server returned fewer scored tokens than the continuation has")
        greedy = all(top is not None and lp >= max(top.values()) - 1e-6 for lp, top in zip(lps, tops))
        return float(sum(lps)), greedy

    # -- scoring ---------------------------------------------------------------------------------------
    def _score_ids(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        # A scored prompt must fit in max_length with at least one token of context before the continuation.
        if any(len(cont) > self.max_length - 1 for _, cont in pairs):
            pieces, owner = split_long_pairs(pairs, self.max_length - 1)
            return merge_pieces(self._score_ids(pieces), owner, len(pairs))
        prompts, truncated = [], 0
        for k, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise LmstackError(f"request #{k}: the continuation is empty after tokenization; nothing to score")
            whole = ctx + cont
            if len(whole) > self.max_length:
                truncated += 1
                whole = whole[-self.max_length:]
            prompts.append(whole)
        if truncated:
            warnings.warn(f"{truncated} request(s) are longer than max_length={self.max_length}; truncated from "
                          "the left", stacklevel=3)
        return [self._tail_score(lp, len(cont)) for lp, (_, cont) in zip(self._echo(prompts), pairs)]

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        self.stats["requests"] += len(requests)
        if self.rules is not None:
            return self._score_ids([self.rules.pair(c, x) for c, x in requests])
        # Server-side tokenization: count each distinct context's tokens, then score the whole texts.
        moved = []
        for context, continuation in requests:
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            if not context:
                raise LmstackError("an empty context needs a local tokenizer (pass tokenizer=) to add the prefix token")
            moved.append((context, continuation))
        contexts = sorted({c for c, _ in moved})
        n_ctx = {c: len(lp["tokens"]) for c, lp in zip(contexts, self._echo(contexts))}
        wholes = self._echo([c + x for c, x in moved])
        results = []
        for k, ((context, _), lp) in enumerate(zip(moved, wholes)):
            n = len(lp["tokens"]) - n_ctx[context]
            if n < 1:
                raise LmstackError(f"request #{k}: the continuation is empty after tokenization; nothing to score")
            results.append(self._tail_score(lp, n))
        return results

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        if self.rules is None:
            raise LmstackError("loglikelihood_rolling over an API needs a local tokenizer: pass tokenizer=")
        windows, owner = [], []
        for i, text in enumerate(texts):
            # max_length - 1: a window's input plus its last predicted token must fit in max_length.
            for w in rolling_windows(self.rules.encode(text), self.rules.prefix_token_id, self.max_length - 1):
                windows.append(w)
                owner.append(i)
        totals = [0.0] * len(texts)
        self.stats["requests"] += len(texts)
        for i, (ll, _) in zip(owner, self._score_ids(windows)):
            totals[i] += ll
        return totals

    # -- generation ------------------------------------------------------------------------------------
    def generate_until(self, requests: list[tuple[str, GenArgs]]) -> list[str]:
        texts = []
        for context, args in requests:
            payload: dict[str, Any] = {"prompt": context, "max_tokens": args.max_gen_toks,
                                       "temperature": args.temperature, "top_p": args.top_p}
            if self.rules is not None:
                ids = self.rules.encode(context)
                room = self.max_length - args.max_gen_toks
                if room < 1:
                    raise LmstackError(f"max_gen_toks={args.max_gen_toks} leaves no room for a prompt in "
                                       f"max_length={self.max_length}")
                if len(ids) > room:
                    warnings.warn(f"a prompt of {len(ids)} tokens is truncated from the left to {room}", stacklevel=2)
                    ids = ids[-room:]
                payload["prompt"] = ids
            if args.until:
                payload["stop"] = list(args.until)
            if args.seed is not None:
                payload["seed"] = args.seed
            # Not streamed, so the first token arrives with the last: no TTFT is recorded for API models.
            body = self._post(payload)
            texts.append(cut_at_stop(body["choices"][0]["text"], args.until))
        self.stats["requests"] += len(requests)
        return texts

    def token_count(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        return max(1, len(text) // 4)  # the usual ~4 characters per token estimate when no tokenizer is at hand
