"""Constrained (guided) decoding: choice lists, regular expressions and JSON schemas as token masks.

At every step the grammar state says which tokens may come next; all others get -inf before
sampling, so the output always matches (if max_tokens leaves room to finish). We use llguidance
(Microsoft's Rust grammar engine, the one vLLM and SGLang ship): it installs as a single wheel, works
offline, builds its token trie straight from our tokenizer.json through the `tokenizers` runtime,
supports full regexes and a broad JSON-schema subset (objects with typed properties, required
fields, enums, arrays, numbers, strings, booleans, nesting), and computes a mask in microseconds.

- choice: compiled to the regex `(a|b|c)` with every choice escaped.
- regex: the whole output must match (anchored at both ends).
- json_schema: compact JSON (no free whitespace) valid under the schema; additionalProperties
  follows the schema (JSON Schema's default allows extra keys).
EOS is allowed exactly when the grammar accepts; the sequence finishes as soon as the grammar
cannot continue.

Usage:
    gd = GuidedDecoder(tokenizer, eos_ids={2}, vocab_size=model.config.vocab_size)
    m = gd.new_matcher(SamplingParams(regex=r"[0-9]{3}"))
    allowed = gd.allowed(m)          # bool (vocab,)
    gd.consume(m, token); gd.is_done(m)
"""
from __future__ import annotations

import json

import numpy as np
import torch

from lmstack.errors import LmstackError
from lmstack.infer.sampling_params import SamplingParams, SamplingParamsError

_REGEX_SPECIAL = set("\\.^$|?*+()[]{}-&~#/ \"'")


def escape_regex(text: str) -> str:
    """Escape every regex metacharacter (the Rust regex syntax llguidance parses)."""
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def choice_regex(choices: list[str]) -> str:
    return "(" + "|".join(escape_regex(c) for c in choices) + ")"


class GuidedDecoder:
    def __init__(self, tokenizer, eos_ids, vocab_size: int):
        try:
            # lazy: heavy (llguidance), which this module does not import at its top
            import llguidance
        except ImportError:
            raise LmstackError("guided decoding (regex / json_schema / choice) needs the llguidance package: "
                               "pip install llguidance") from None
        if tokenizer is None:
            raise LmstackError("guided decoding needs a tokenizer (the grammar works on text)")
        fast = tokenizer.fast()
        if fast is None:
            raise LmstackError("guided decoding needs a tokenizer the `tokenizers` runtime can load; "
                               f"{tokenizer!r} cannot be loaded there")
        self.ll = llguidance
        self.vocab_size = vocab_size
        eos = sorted(eos_ids) or [tokenizer.eos_id or 0]
        self.tokenizer = llguidance.LLTokenizer(fast.to_str(), n_vocab=vocab_size, eos_token=eos)

    def grammar(self, params: SamplingParams) -> str:
        M = self.ll.LLMatcher
        if params.choice is not None:
            return M.grammar_from_regex(choice_regex(params.choice))
        if params.regex is not None:
            return M.grammar_from_regex(params.regex)
        schema = params.json_schema
        return M.grammar_from_json_schema(json.dumps(schema) if not isinstance(schema, str) else schema,
                                          defaults={"whitespace_flexible": False})

    def new_matcher(self, params: SamplingParams):
        """A fresh grammar state for one sequence; a grammar that does not compile is a 400-style error."""
        field = "choice" if params.choice is not None else "regex" if params.regex is not None else "json_schema"
        try:
            grammar = self.grammar(params)
        except (ValueError, RuntimeError, TypeError) as e:
            raise SamplingParamsError(f"{field} is not usable for guided decoding: {e}") from None
        matcher = self.ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise SamplingParamsError(f"{field} is not usable for guided decoding: {matcher.get_error()}")
        return matcher

    def allowed(self, matcher) -> torch.Tensor:
        """Bool (vocab,) of the tokens the grammar allows next."""
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[: self.vocab_size].astype(bool))

    def consume(self, matcher, token: int) -> None:
        if not matcher.consume_token(token):
            raise LmstackError(f"guided decoding: token {token} was sampled but the grammar forbids it "
                               f"({matcher.get_error()})")

    def is_done(self, matcher) -> bool:
        """The grammar cannot continue (it accepted and has no possible extension)."""
        return matcher.is_stopped()
