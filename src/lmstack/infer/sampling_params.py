"""SamplingParams: everything a request says about how to pick its tokens, validated up front.

Each field has a safe default; an invalid value raises SamplingParamsError (a ValueError and an
LmstackError) whose message names the field and what is allowed, so a server can answer 400.

The ranges keep the sampler's maths finite (fp32, see logits_processors.py), so no accepted value can
give NaN probabilities or crash an engine step:
- temperature: 0 (greedy) or in [1e-5, 100]; repetition_penalty in [0.01, 100];
  frequency/presence_penalty in [-2, 2]; logit_bias values in [-100, 100]; length_penalty in [-10, 10];
- top_p in (0, 1]; min_p in [0, 1]; every number finite (NaN and inf are refused);
- integers are real ints (not bools) that fit int64: n, best_of <= 128; beam_width <= 64; top_k >= 0
  (-1 = off); max_tokens, min_tokens >= 0; logprobs, prompt_logprobs in 0..20; seed any int64;
  token ids (stop_token_ids, logit_bias keys) in [0, 2**63). Whether an id is inside the model's
  vocabulary, and whether a beam fits the KV pool, the engine checks when the request is made.

Usage:
    from lmstack.infer import SamplingParams
    greedy = SamplingParams(max_tokens=32, temperature=0.0)
    creative = SamplingParams(temperature=0.8, top_p=0.95, min_p=0.05, presence_penalty=0.5, seed=7, n=3)
    json_out = SamplingParams(json_schema={"type": "object", "properties": {"a": {"type": "integer"}}})
    beams = SamplingParams(use_beam_search=True, beam_width=4, length_penalty=1.0, max_tokens=20)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from lmstack.errors import LmstackError

OutputKind = Literal["cumulative", "delta", "final_only"]


class SamplingParamsError(LmstackError, ValueError):
    """A sampling parameter is out of range; the message names the field."""


INT64_MAX = 2**63 - 1
MIN_TEMPERATURE = 1e-5  # below this (but > 0) logits / T loses every token but the top one anyway: use 0
MIN_REPETITION_PENALTY = 0.01
MAX_BANNED_PHRASES = 1024  # each request's set is compiled to an automaton (the engine's hard bans have no cap)


def _bad(name: str, value: Any, allowed: str) -> SamplingParamsError:
    shown = repr(value)
    if len(shown) > 80:  # never echo a huge list or string back in full
        shown = shown[:77] + "..."
    return SamplingParamsError(f"{name}={shown} is not allowed; {name} must be {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    n: int = 1
    """Completions to return for the prompt (they share the prompt's KV blocks, copy-on-write)."""
    best_of: int | None = None
    """Generate this many completions and return the n with the highest cumulative log-probability."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax), else in [1e-5, 100]."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 (or -1) keeps all."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in (0, 1]."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's, in [0, 1]."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens already in the prompt or output (>1 discourages repeats), in [0.01, 100]."""
    frequency_penalty: float = 0.0
    """Subtract this times the token's count in the output so far, in [-2, 2] (OpenAI semantics)."""
    presence_penalty: float = 0.0
    """Subtract this once for every token that occurred in the output so far, in [-2, 2]."""
    logit_bias: dict[int, float] | None = None
    """Token id -> value added to its logit, each value in [-100, 100]."""
    bad_words: list[str] | None = None
    """Words that must never be generated: the last token of each word's tokenization is banned
    whenever the tokens before it have just been produced."""
    banned_phrases: list[str] | None = None
    """Phrases that must never appear in the output text, whatever the token boundaries (case and whitespace
    normalised; lmstack.safety.phrase_ban). Added to the engine's hard bans, which a request cannot lift."""
    stop: list[str] | None = None
    """Stop when any of these strings appears in the output text (found across token boundaries)."""
    stop_token_ids: list[int] | None = None
    """Stop when one of these tokens is generated (besides the tokenizer's EOS)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's context. 0 only scores the prompt."""
    min_tokens: int = 0
    """EOS and stop tokens are banned until this many tokens were generated."""
    ignore_eos: bool = False
    """Keep generating past EOS (useful for benchmarks)."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same sampled tokens whatever else is in the batch."""
    logprobs: int | None = None
    """Return the log-probability of each sampled token plus this many top alternatives (0..20)."""
    prompt_logprobs: int | None = None
    """Return the log-probability of each prompt token plus this many top alternatives (0..20)."""
    use_beam_search: bool = False
    """Beam search instead of sampling: keeps beam_width hypotheses; returns the n best."""
    beam_width: int = 4
    """Hypotheses beam search keeps at each step."""
    length_penalty: float = 1.0
    """Beam search ranks finished hypotheses by sum(logprob) / length**length_penalty."""
    regex: str | None = None
    """Guided decoding: the output must match this regular expression."""
    json_schema: dict | str | None = None
    """Guided decoding: the output must be JSON valid under this schema (dict or JSON text)."""
    choice: list[str] | None = None
    """Guided decoding: the output must be exactly one of these strings."""
    response_format: dict | None = None
    """OpenAI-style {"type": "json_object" | "json_schema" | "regex" | "text", ...}; sets json_schema/regex."""
    lora: str | None = None
    """Name of a LoRA adapter registered with the engine to apply to this request."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the output text."""
    output_kind: OutputKind = "cumulative"
    """Streaming: 'cumulative' (whole text so far), 'delta' (new text only) or 'final_only'."""
    _extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._apply_response_format()
        self._validate()

    # ---- validation
    def _validate(self) -> None:
        def integer(name: str, lo: int, hi: int = INT64_MAX, optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if not _is_int(v) or v < lo or v > hi:
                raise _bad(name, v, f"an integer >= {lo} and <= {'2**63 - 1' if hi == INT64_MAX else hi}")

        def number(name: str, ok, allowed: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _bad(name, v, allowed)
            try:
                f = float(v)
            except OverflowError:  # an int past float range
                raise _bad(name, v, allowed) from None
            if not math.isfinite(f):
                raise _bad(name, v, allowed + "; NaN and infinity are refused")
            if not ok(f):
                raise _bad(name, v, allowed)
            setattr(self, name, f)

        integer("n", 1, 128)
        integer("best_of", 1, 128, optional=True)
        if self.best_of is not None and self.best_of < self.n:
            raise _bad("best_of", self.best_of, f"None or >= n={self.n}")
        number("temperature", lambda v: v == 0.0 or MIN_TEMPERATURE <= v <= 100.0,
               f"0 (greedy) or a number in [{MIN_TEMPERATURE:g}, 100]")
        if self.top_k == -1:
            self.top_k = 0
        integer("top_k", 0)  # any k >= vocab keeps everything
        number("top_p", lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        number("min_p", lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        number("repetition_penalty", lambda v: MIN_REPETITION_PENALTY <= v <= 100.0,
               f"a number in [{MIN_REPETITION_PENALTY:g}, 100] (1 = off)")
        number("frequency_penalty", lambda v: -2.0 <= v <= 2.0, "in [-2, 2]")
        number("presence_penalty", lambda v: -2.0 <= v <= 2.0, "in [-2, 2]")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise _bad("logit_bias", self.logit_bias, "a mapping token id -> bias")
            clean = {}
            for k, v in self.logit_bias.items():
                try:
                    tid = int(k)
                except (TypeError, ValueError):
                    raise _bad("logit_bias", k, "keyed by integer token ids") from None
                if isinstance(k, (bool, float)) or not 0 <= tid <= INT64_MAX:
                    raise _bad("logit_bias", k, "keyed by integer token ids in [0, 2**63)")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100 or v != v:
                    raise _bad("logit_bias", {k: v}, "token ids >= 0 mapped to biases in [-100, 100]")
                clean[tid] = float(v)
            self.logit_bias = clean
        for name in ("bad_words", "banned_phrases", "stop", "choice"):
            v = getattr(self, name)
            if isinstance(v, str) and name == "stop":
                v = [v]
                self.stop = v
            if v is not None and (not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s for s in v)):
                raise _bad(name, v, "a list of non-empty strings")
            if v is not None:
                setattr(self, name, list(v))
        if self.banned_phrases is not None and (len(self.banned_phrases) > MAX_BANNED_PHRASES or
                                                any(len(s) > 256 for s in self.banned_phrases)):
            raise _bad("banned_phrases", self.banned_phrases, f"at most {MAX_BANNED_PHRASES} phrases of at most "
                                                              "256 characters each")
        if self.choice is not None and not self.choice:
            raise _bad("choice", self.choice, "a non-empty list of strings")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                    _is_int(t) and 0 <= t <= INT64_MAX for t in self.stop_token_ids):
                raise _bad("stop_token_ids", self.stop_token_ids, "a list of token ids in [0, 2**63)")
            self.stop_token_ids = list(self.stop_token_ids)
        integer("max_tokens", 0, optional=True)
        integer("min_tokens", 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _bad("min_tokens", self.min_tokens, f"<= max_tokens={self.max_tokens}")
        integer("seed", -(2**63), INT64_MAX, optional=True)
        integer("logprobs", 0, 20, optional=True)
        integer("prompt_logprobs", 0, 20, optional=True)
        integer("beam_width", 1, 64)
        number("length_penalty", lambda v: -10.0 <= v <= 10.0, "in [-10, 10]")
        if self.use_beam_search:
            if self.n > self.beam_width:
                raise _bad("n", self.n, f"<= beam_width={self.beam_width} with beam search")
            if self.guided:
                raise _bad("use_beam_search", True, "False when regex / json_schema / choice is set")
        if isinstance(self.json_schema, str):
            try:
                self.json_schema = json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise _bad("json_schema", self.json_schema[:40], f"valid JSON ({e.msg})") from None
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, bool)):
            raise _bad("json_schema", self.json_schema, "a JSON schema object")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise _bad("regex", self.regex, "a non-empty regular expression")
        if sum(x is not None for x in (self.regex, self.json_schema, self.choice)) > 1:
            raise _bad("regex", self.regex, "used alone: give only one of regex, json_schema, choice")
        if self.lora is not None and (not isinstance(self.lora, str) or not self.lora):
            raise _bad("lora", self.lora, "None or an adapter name")
        if self.output_kind not in ("cumulative", "delta", "final_only"):
            raise _bad("output_kind", self.output_kind, "one of 'cumulative', 'delta', 'final_only'")

    def _apply_response_format(self) -> None:
        rf = self.response_format
        if rf is None:
            return
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema", "regex"):
            raise _bad("response_format", rf, "{'type': 'text' | 'json_object' | 'json_schema' | 'regex', ...}")
        kind = rf["type"]
        if kind == "json_object":
            self.json_schema = {"type": "object"}
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            schema = spec.get("schema", spec) if isinstance(spec, dict) else spec
            if schema is None:
                raise _bad("response_format", rf, "json_schema with a 'schema' entry")
            self.json_schema = schema
        elif kind == "regex":
            self.regex = rf.get("regex") or rf.get("pattern")

    # ---- derived facts
    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def guided(self) -> bool:
        return self.regex is not None or self.json_schema is not None or self.choice is not None

    @property
    def num_sequences(self) -> int:
        """Sequences the engine runs for this request."""
        if self.use_beam_search:
            return self.beam_width
        return self.best_of or self.n

    def clone(self, **changes: Any) -> "SamplingParams":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
