"""The language-model interface every eval backend speaks: lm-eval's three request types.

An evaluator only ever asks a model three things, so any backend (an in-process lmstack model, an
OpenAI-compatible HTTP endpoint, a scripted fake in tests) is interchangeable:
  - loglikelihood: log P(continuation | context) in nats, and whether greedy decoding would produce it;
  - loglikelihood_rolling: the total log-probability of a whole text (perplexity, bits-per-byte);
  - generate_until: free generation that stops at any of the given stop strings.

Usage:
    from lmstack.eval.lm import GenArgs, Loglikelihood
    lm = LocalLM("runs/tiny")                       # or OpenAICompletionsLM(url, model)
    [(ll, greedy)] = lm.loglikelihood([("Question: 2+2?\\nAnswer:", " 4")])
    [text] = lm.generate_until([("Q: hi\\nA:", GenArgs(until=["\\n"], max_gen_toks=16))])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Union, runtime_checkable

from lmstack.errors import LmstackError


@dataclass
class GenArgs:
    """How to generate for one generate_until request."""

    until: list[str] = field(default_factory=list)
    """Stop strings; generation ends at the first one, which is not included in the output."""
    max_gen_toks: int = 256
    """Most tokens to generate."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    seed: int | None = None
    """Sampling seed, so sampled chains (maj@k, pass@k) are reproducible."""

    def __post_init__(self):
        if isinstance(self.until, str):
            self.until = [self.until]
        if self.max_gen_toks < 1:
            raise ValueError(f"GenArgs.max_gen_toks must be >= 1, got {self.max_gen_toks}")
        if self.temperature < 0:
            raise ValueError(f"GenArgs.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"GenArgs.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Loglikelihood:
    """One request: log P(continuation | context)."""

    context: str
    continuation: str


@dataclass
class Rolling:
    """One request: the total log-probability of `text`."""

    text: str


@dataclass
class GenerateUntil:
    """One request: text generated from `context` with `args`, cut before the first of `args.until`."""

    context: str
    args: GenArgs = field(default_factory=GenArgs)


Request = Union[Loglikelihood, Rolling, GenerateUntil]


def new_stats() -> dict:
    """The running counters every LM keeps (the perf tracker reads deltas of these)."""
    return {"prompt_tokens": 0, "generated_tokens": 0, "requests": 0, "ttft_s": []}


@runtime_checkable
class LM(Protocol):
    max_length: int
    """Context window in tokens."""
    stats: dict
    """{"prompt_tokens": int, "generated_tokens": int, "requests": int, "ttft_s": list[float]}"""

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(sum of log-probs in nats of continuation given context, is_greedy) per request."""
        ...

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        """Total log-probability (nats) of each text, each token predicted once."""
        ...

    def generate_until(self, requests: list[tuple[str, GenArgs]]) -> list[str]:
        """Generated text per request, cut before the first stop string."""
        ...

    def token_count(self, text: str) -> int:
        """Number of tokens of `text` (for efficiency metrics)."""
        ...


def cut_at_stop(text: str, until: list[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    end = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                end = min(end, i)
    return text[:end]


def encode_pair(context: str, continuation: str, encode: Callable[[str], list[int]]) -> tuple[list[int], list[int]]:
    """lm-eval's context/continuation split: (context ids, continuation ids).

    Trailing spaces of the context move to the continuation (so " Paris" is scored as one word token), and
    the whole text is tokenized at once and split at the context's token count, so the continuation gets
    exactly the tokens the model would see in the running text."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(context + continuation)
    n_ctx = len(encode(context))
    return whole[:n_ctx], whole[n_ctx:]


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int, context_len: int = 1
                    ) -> list[tuple[list[int], list[int]]]:
    """Split a text's tokens into (input, predicted) windows so every token is predicted exactly once.

    The first window predicts the first max_len tokens from [prefix_token] + tokens; each later window
    predicts up to max_len - context_len + 1 new tokens, its input reaching back as far as max_len allows,
    so each prediction sees the longest context available (lm-eval's rolling windows with context_len=1
    give disjoint windows of max_len predictions). The input of each window is trimmed so that it ends just
    before its last predicted token: score the last len(predicted) positions of the input + predicted[-1:]."""
    if not 1 <= context_len <= max_len:
        raise ValueError(f"context_len must be in [1, max_len={max_len}], got {context_len}")
    if not tokens:
        return []
    windows = []
    first = min(max_len, len(tokens))
    windows.append(([prefix_token] + tokens[:first - 1], tokens[:first]))
    done, step = first, max_len - context_len + 1
    while done < len(tokens):
        n = min(len(tokens) - done, step)
        end = done + n
        windows.append((tokens[max(end - max_len - 1, 0):end - 1], tokens[end - n:end]))
        done = end
    # Disjoint form: input = context tokens only (the predicted tokens except the last are appended back by
    # the scorer), i.e. (context, continuation) pairs the loglikelihood path understands.
    return [(inp[:len(inp) - (len(pred) - 1)], pred) for inp, pred in windows]


def model_special_ids(path) -> tuple[int | None, int | None]:
    """(bos, eos) ids a model directory declares: generation_config.json first, then config.json (and our
    lmstack_config.json); a list of eos ids gives its first. (None, None) when the path holds none of them.
    The precedence lives in tokenizer/special_tokens.py."""
    # lazy: eval.lm stays stdlib-only, so the code sandbox's campaign (which imports it through humaneval) runs
    # on a bare interpreter as an unprivileged caller (tests/eval/test_sandbox_attacks.py)
    from lmstack.tokenizer import special_tokens

    found = special_tokens.model_special_ids(path)
    return found["bos"], found["eos"][0] if found["eos"] else None


class TokenRules:
    """How eval backends tokenize, shared so LocalLM and OpenAICompletionsLM agree token for token.

    add_bos=None keeps the tokenizer's own post-processing (a BOS when it adds one; lm-eval's default),
    except for text that already starts with the BOS string (a rendered chat); True/False forces it.
    An empty context is conditioned on the prefix token: BOS, else EOS (lm-eval's prefix_token_id).
    A tokenizer that names neither falls back to `fallback` = (bos, eos) from the model's config.json /
    generation_config.json (model_special_ids); only an empty context with no id anywhere is an error."""

    def __init__(self, tokenizer, add_bos: bool | None = None,
                 fallback: tuple[int | None, int | None] = (None, None)):
        self.tokenizer, self.add_bos = tokenizer, add_bos
        self.bos_id, self.eos_id = tokenizer.special_id("bos"), tokenizer.special_id("eos")
        if self.bos_id is None and self.eos_id is None:
            self.bos_id, self.eos_id = fallback
        self._prefix = self.bos_id if self.bos_id is not None else self.eos_id
        self.bos_text = tokenizer.id_to_token(self.bos_id) if self.bos_id is not None else None

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is conditioned on; an error only when one is needed and none exists."""
        if self._prefix is None:
            raise LmstackError("an empty context must be conditioned on a BOS or EOS token, but neither the "
                               "tokenizer nor the model's config.json / generation_config.json names one; add "
                               "bos_token_id or eos_token_id to the model's config.json")
        return self._prefix

    def encode(self, text: str, special: bool | None = None) -> list[int]:
        if special is not None:
            return self.tokenizer.encode(text, add_special_tokens=special)
        special = self.add_bos is None and not (self.bos_text and text.startswith(self.bos_text))
        ids = self.tokenizer.encode(text, add_special_tokens=special)
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) by lm-eval's rules (see encode_pair)."""
        if context == "":
            cont = self.encode(continuation, special=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        return encode_pair(context, continuation, self.encode)


def split_long_pairs(pairs: list[tuple[list[int], list[int]]], max_cont: int
                     ) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """Split token pairs whose continuation exceeds `max_cont` tokens into pieces of at most max_cont.

    Piece i is (context + continuation[:a], continuation[a:b]), so each continuation token is still predicted
    once, from as much preceding text as the window holds (rolling windows over the continuation). A pair
    that fits is unchanged, which is exactly lm-eval's scoring. Returns (pieces, owner pair index per piece):
    sum the log-likelihoods and AND the greedy flags of a pair's pieces."""
    pieces, owner = [], []
    for k, (ctx, cont) in enumerate(pairs):
        for a in range(0, max(len(cont), 1), max_cont):
            pieces.append((ctx + cont[:a], cont[a:a + max_cont]))
            owner.append(k)
    return pieces, owner


def merge_pieces(scores: list[tuple[float, bool]], owner: list[int], n: int) -> list[tuple[float, bool]]:
    """Sum the pieces' log-likelihoods per pair and AND their greedy flags (inverse of split_long_pairs)."""
    out = [(0.0, True)] * n
    for (ll, greedy), k in zip(scores, owner):
        out[k] = (out[k][0] + ll, out[k][1] and greedy)
    return out
