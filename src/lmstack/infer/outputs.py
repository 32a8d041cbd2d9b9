"""What the engine hands back: RequestOutput (one per request) holding CompletionOutputs (one per sample).

Outputs are cumulative by default (text and token_ids hold everything generated so far); a request
whose SamplingParams.output_kind is 'delta' gets only what is new since its last output.

A request that fails inside the engine (sampling, a logits processor, detokenizing, stop checks, or
it can never be scheduled) finishes alone: finish_reason 'error' and RequestOutput.error set; the
async engine raises RequestFailed from that request's generator only.

Usage:
    for out in llm.generate(["Hi"], SamplingParams(max_tokens=8)):
        print(out.request_id, out.outputs[0].text, out.outputs[0].finish_reason, out.metrics.ttft)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.errors import LmstackError


@dataclass
class CompletionOutput:
    index: int
    """Which of the request's n samples this is."""
    text: str
    """Generated text (the stop string removed unless include_stop_str_in_output)."""
    token_ids: list[int]
    """Generated token ids."""
    logprobs: list[dict[int, float]] | None = None
    """Per generated token: {token id: log-probability} for the sampled token and the top alternatives."""
    finish_reason: str | None = None
    """None while running, then 'stop' (EOS, stop token or stop string), 'length', 'abort', or 'error'
    (this request failed inside the engine; RequestOutput.error says why, other requests carry on)."""
    cumulative_logprob: float = 0.0
    """Sum of the sampled tokens' log-probabilities under the model."""
    stop_reason: int | str | None = None
    """The stop string or stop token id that ended the sample, if any."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    """time.perf_counter() when the request was added."""
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """Per prompt token: {token id: logprob} (the first token has no context, so None)."""
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    lora: str | None = field(default=None)
    error: str | None = None
    """One line saying why this request failed (its outputs then have finish_reason 'error'); else None."""


class RequestFailed(LmstackError):
    """Raised from AsyncLLMEngine.generate() for one request that failed inside the engine (a server
    answers 500 for it alone). `output` is its last RequestOutput, when there is one."""

    def __init__(self, message: str, request_id: str | None = None, output: RequestOutput | None = None):
        super().__init__(message)
        self.request_id, self.output = request_id, output
