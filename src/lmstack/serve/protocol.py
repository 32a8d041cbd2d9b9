"""The OpenAI wire format as pydantic models: what clients send and what the server answers.

Requests forbid unknown fields, as OpenAI does, so a typo ("max_token") is a 400 that names it instead
of being silently ignored. Beyond OpenAI's fields we accept the vLLM-style extensions our engine
supports (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids, bad_words,
include_stop_str_in_output, prompt_logprobs, guided_regex / guided_json / guided_choice, ...).
Ranges are checked once, by lmstack.infer.SamplingParams, whose errors name the field (-> 400).

Usage:
    req = CompletionRequest.model_validate({"prompt": "Hi", "max_tokens": 8})
    resp = CompletionResponse(id="cmpl-1", created=0, model="m", choices=[...], usage=Usage(...))
    body = resp.model_dump()
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send one last chunk with token usage (and no choices) before [DONE]."""
    continuous_usage_stats: bool = False
    """Put the usage so far into every chunk."""


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = "output"
    description: str | None = None
    json_schema: dict | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema", "regex"]
    json_schema: JsonSchemaFormat | None = None
    regex: str | None = None
    """lmstack extension: the output must match this regular expression."""

    def to_sampling(self) -> dict:
        """The dict lmstack.infer.SamplingParams.response_format understands."""
        out: dict[str, Any] = {"type": self.type}
        if self.type == "json_schema":
            out["json_schema"] = {"schema": self.json_schema.json_schema if self.json_schema else None}
        if self.type == "regex":
            out["regex"] = self.regex
        return out


class PromptCompressionOptions(_Strict):
    """lmstack extension: compress this request's prompt before prefill (see lmstack.serve.prompt_compression);
    a missing key takes the server's --compression.* setting."""
    rate: float | None = Field(default=None, gt=0, le=1)
    """Fraction of the compressible tokens to keep, in (0, 1]; 1 = no compression."""
    keep_last_tokens: int | None = Field(default=None, ge=0)
    """Tokens at the end of the prompt (of the last user message, in chat) that are never dropped."""
    unit: Literal["word", "token"] | None = None
    canonicalize: bool | None = None
    """Canonically reformat the text first (NFKC, one kind of quotes, collapsed spaces); needs no scorer."""


class RagOptions(_Strict):
    """lmstack extension (`lmstack serve --rag_index IDX`): answer from retrieved chunks, numbered [1]..[k]
    before the last user message; the response carries them as `citations`."""
    k: int = Field(default=5, ge=1, le=50)
    """How many chunks to retrieve (fewer go in when they would not fit the context)."""
    mode: Literal["bm25", "dense", "hybrid"] = "hybrid"
    """Sparse, dense, or both fused."""
    query: str | None = None
    """What to search for (default: the last user message)."""


class EmbeddingRequest(_Strict):
    """POST /v1/embeddings, OpenAI's shape: text or a list of texts."""
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class ModerationRequest(_Strict):
    """POST /v1/moderations, OpenAI's shape: text or a list of texts (served with --guard)."""
    input: str | list[str]
    model: str | None = None


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # ---- extensions (vLLM names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    bad_words: list[str] | None = None
    banned_phrases: list[str] | None = None
    """lmstack extension: phrases the reply must not contain, across token boundaries; added to the server's
    hard bans (`lmstack serve --safety`), which no request can lift."""
    skip_special_tokens: bool | None = None
    prompt_logprobs: int | None = None
    use_beam_search: bool | None = None
    beam_width: int | None = None
    length_penalty: float | None = None
    guided_regex: str | None = None
    guided_json: dict | str | None = None
    guided_choice: list[str] | None = None
    prompt_compression: PromptCompressionOptions | None = None
    """lmstack extension: drop the prompt's predictable words before prefill (needs the server's scorer model)."""
    allow_empty_prompt: bool = False
    """lmstack extension: accept an empty prompt ("" / [[]] / only empty messages) and generate from the start
    token (or the bare chat template) alone; without it an empty prompt is a 400, as OpenAI answers."""


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    max_tokens: int | None = 16
    logprobs: int | None = None
    """Log-probabilities of the sampled token plus this many top alternatives per position."""
    echo: bool = False
    """Return the prompt before the completion (with its logprobs when logprobs is set)."""
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True
    """Whether string prompts get the tokenizer's special tokens (e.g. BOS) added."""


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # Clients round-trip assistant messages with fields like `refusal` or `audio`; keep them out of the way.
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    """lmstack extension: end the prompt with the assistant-turn opener (the usual case)."""
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM's extension: extra variables for the model's Jinja chat template (e.g. {"enable_thinking": false})."""
    rag: RagOptions | None = None
    """lmstack extension: retrieval-augmented answer with citations (needs a server started with --rag_index)."""
    safety_preset: str | None = None
    """lmstack extension: a persona preset of the server's safety config (default, concise, friendly, strict, ...):
    its system prompt goes first, its temperature fills in an unset one (lmstack.safety.presets)."""


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Any] | None = None
    """With messages: the tools the chat template renders (as in /v1/chat/completions)."""
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------------------------------------- responses
class Usage(BaseModel):
    # Extra fields pass through: a compressed request adds prompt_tokens_before_compression (the prompt as sent).
    model_config = ConfigDict(extra="allow")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    """The legacy completions shape (what lm-evaluation-harness's local-completions reads)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, float] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None
    """A JSON string, as OpenAI sends it."""


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaToolCall(BaseModel):
    """A streamed tool call (OpenAI's chunk shape): `index` says which call of the reply it belongs to."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmstack"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
