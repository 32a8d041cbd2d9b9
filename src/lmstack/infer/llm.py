"""LLM: the offline entry point. Give it prompts, get every completion back (batched by the engine).

Usage:
    import lmstack
    llm = lmstack.LLM("runs/model")                          # a model directory with tokenizer.json
    outs = llm.generate(["Hello", "The sky is"], lmstack.SamplingParams(max_tokens=32, temperature=0.0))
    print(outs[0].outputs[0].text)
    outs = llm.generate([[1, 2, 3]], lmstack.SamplingParams(max_tokens=8))          # token ids
    outs = llm.generate(["Hi", {"prompt_token_ids": [1, 2]}], sampling_params=sp)   # vLLM's shapes
    reply = llm.chat([{"role": "user", "content": "hi"}], lmstack.SamplingParams(max_tokens=32))
    llm = lmstack.LLM(model, tokenizer=tok, speculative={"method": "ngram", "num_tokens": 4})
    llm = lmstack.LLM("runs/model", tensor_parallel_size=2)   # sharded over 2 processes (infer/tp_group.py)
    llm = lmstack.LLM("runs/model", kv_cache_dtype="int8")   # KV cache in int8 + scales (infer/kv_quant.py)
"""
from __future__ import annotations

import itertools
from typing import Any

import torch

from lmstack.errors import LmstackError
from lmstack.infer.engine import LLMEngine
from lmstack.infer.outputs import RequestOutput
from lmstack.infer.sampling_params import SamplingParams

_counter = itertools.count()


def _prompt_from_dict(prompt: dict, index: int) -> str | list[int]:
    """vLLM's TextPrompt {"prompt": str} or TokensPrompt {"prompt_token_ids": [int, ...]} -> text or ids."""
    keys = set(prompt)
    if keys == {"prompt_token_ids"}:
        ids = prompt["prompt_token_ids"]
        if (isinstance(ids, (list, tuple)) and ids
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
            return list(ids)
        raise LmstackError(f"prompt {index}: prompt_token_ids must be a non-empty list of token ids (ints >= 0)")
    if keys == {"prompt"}:
        if isinstance(prompt["prompt"], str):
            return prompt["prompt"]
        raise LmstackError(f"prompt {index}: 'prompt' must be a string, got {type(prompt['prompt']).__name__}")
    raise LmstackError(f"prompt {index}: a prompt dict takes exactly one of 'prompt' (text) or 'prompt_token_ids' "
                       f"(token ids); got keys {sorted(keys)}")


def normalize_prompts(prompts: Any) -> list[str | list[int]]:
    """A prompt or a list of prompts -> a list of prompts (each text or token ids), as vLLM takes them.

    A prompt is a string, a list of token ids, {"prompt": text} or {"prompt_token_ids": ids}; a list may
    mix them."""
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise LmstackError("prompts is empty; give at least one prompt")
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
            return [list(prompts)]
        if all(isinstance(p, (str, list, tuple, dict)) for p in prompts):
            return [p if isinstance(p, str) else _prompt_from_dict(p, i) if isinstance(p, dict) else list(p)
                    for i, p in enumerate(prompts)]
    raise LmstackError(f"prompts must be a string, token ids, a {{'prompt_token_ids': [...]}} dict, or a list of "
                       f"those; got {type(prompts).__name__}")


class LLM:
    def __init__(self, model: Any, tokenizer: Any = None, max_num_seqs: int = 16, max_batched_tokens: int = 2048,
                 block_size: int = 16, num_blocks: int | None = None, enable_prefix_caching: bool = True,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0, **engine_kwargs: Any):
        """model: a model directory (ours or HF's) or a Transformer; tokenizer: a Tokenizer or its directory
        (default: the model directory's tokenizer.json). Other keywords go to LLMEngine (max_model_len,
        speculative, lora_adapters, tensor_parallel_size, kv_cache_dtype: 'auto' or 'int8')."""
        self.engine = LLMEngine(model, tokenizer, max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens,
                                block_size=block_size, num_blocks=num_blocks,
                                enable_prefix_caching=enable_prefix_caching, dtype=dtype, device=device, seed=seed,
                                **engine_kwargs)
        self.tokenizer = self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams from the model directory's generation_config.json (vLLM's name); used when a call
        gives none. SamplingParams' own defaults where the file is silent or absent."""
        return SamplingParams(**self.engine.generation_defaults)

    def generate(self, prompts: Any, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 lora: str | list[str | None] | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete every prompt; returns one RequestOutput per prompt, in prompt order.

        prompts: as vLLM takes them (see normalize_prompts); sampling_params: one for all, or one per prompt."""
        params = sampling_params
        prompts = normalize_prompts(prompts)
        plist = params if isinstance(params, list) else [params or self.get_default_sampling_params()] * len(prompts)
        loras = lora if isinstance(lora, list) else [lora] * len(prompts)
        if len(plist) != len(prompts) or len(loras) != len(prompts):
            raise LmstackError(f"got {len(prompts)} prompts but {len(plist)} params and {len(loras)} adapters")
        ids = []
        try:
            for prompt, p, a in zip(prompts, plist, loras):
                rid = f"llm-{next(_counter)}"
                self.engine.add_request(rid, prompt, p, lora=a)
                ids.append(rid)
        except Exception:
            for rid in ids:  # leave the engine as we found it
                self.engine.abort_request(rid)
            raise
        finals = {o.request_id: o for o in self.engine.run_to_completion(show_progress=use_tqdm)}
        return [finals[r] for r in ids]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             lora: str | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """One conversation (a list of {'role', 'content'} dicts) or several; applies the chat template."""
        if self.tokenizer is None:
            raise LmstackError("chat needs a tokenizer with a chat template")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.render_messages(c, add_generation_prompt=True).ids for c in convs]  # no mask
        return self.generate(prompts, sampling_params, lora=lora, use_tqdm=use_tqdm)
