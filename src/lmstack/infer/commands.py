"""`lmstack generate`: complete prompts with the inference engine from the command line.

Usage:
    lmstack generate --model runs/tiny --prompt "Once upon a time" --max_tokens 32
    lmstack generate --model runs/tiny --prompt "hi" --chat true --temperature 0.8 --top_p 0.95 --seed 1 --n 2
    lmstack generate --model runs/tiny --prompts_file prompts.txt --max_num_seqs 16     # one prompt per line
    lmstack generate --model runs/tiny --prompt "Age:" --regex "[0-9]{1,3}"
    lmstack generate --model runs/tiny --prompt "x" --speculative ngram --num_speculative_tokens 4
    lmstack generate --model runs/tiny --prompt_ids "[1, 2, 3]" --beam_width 4 --max_tokens 8
    lmstack generate --model runs/tiny --tokenizer tok/ --prompt "hi" --threads 1
    lmstack generate --model runs/tiny --prompt "hi" --tensor_parallel_size 2     # sharded over 2 processes
    lmstack generate --model runs/tiny --prompt "hi" --kv_cache_dtype int8        # int8 KV cache (kv_quant.py)
"""
from __future__ import annotations

import json
from pathlib import Path
import time
from typing import Literal

from lmstack.errors import LmstackError
from lmstack.infer.generation_defaults import merge_sampling
from lmstack.infer.llm import LLM
from lmstack.infer.sampling_params import SamplingParams
from lmstack.model.load_guard import set_max_model_gib
from lmstack.runtime.device import pick_device
from lmstack.threads import set_threads


def generate(model: str, prompt: str | None = None, prompts_file: str | None = None,
             prompt_ids: list[int] | None = None, chat: bool = False, max_tokens: int | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             min_p: float = 0.0, repetition_penalty: float | None = None, presence_penalty: float = 0.0,
             frequency_penalty: float = 0.0,
             seed: int | None = None, n: int = 1, stop: list[str] | None = None, ignore_eos: bool = False,
             regex: str | None = None, json_schema: str | None = None, choice: list[str] | None = None,
             beam_width: int = 0, length_penalty: float = 1.0,
             speculative: Literal["none", "ngram", "draft"] = "none", draft_model: str | None = None,
             num_speculative_tokens: int = 4, max_num_seqs: int = 16, max_batched_tokens: int = 2048,
             json_output: bool = False, tokenizer: str | None = None, threads: int = 0,
             max_model_gib: float | None = None, device: str = "auto", dtype: str = "auto",
             tensor_parallel_size: int = 1, kv_cache_dtype: Literal["auto", "int8"] = "auto") -> list[dict]:
    """Generate completions with the paged, continuously batched engine and print them.

    Args:
        model: model directory (config.json + safetensors, tokenizer.json for text prompts).
        prompt: one text prompt.
        prompts_file: a text file with one prompt per line (batched together).
        prompt_ids: token ids instead of text, e.g. '[1, 2, 3]'.
        chat: wrap each prompt as a user turn with the tokenizer's chat template.
        max_tokens: most tokens to generate per completion (default: the model's generation_config.json
            max_new_tokens, else 64).
        temperature: 0 for greedy decoding (default: the model's generation_config.json, where do_sample false
            means 0, else 0).
        top_k: keep the k most likely tokens, 0 = off (default: generation_config.json, else 0).
        top_p: nucleus sampling mass, 1 = off (default: generation_config.json, else 1).
        min_p: drop tokens below min_p times the top probability.
        repetition_penalty: >1 discourages tokens already present (default: generation_config.json, else 1).
        presence_penalty: OpenAI presence penalty in [-2, 2].
        frequency_penalty: OpenAI frequency penalty in [-2, 2].
        seed: per-request sampling seed.
        n: completions per prompt.
        stop: stop strings.
        ignore_eos: keep going past EOS.
        regex: constrain the output to this regular expression.
        json_schema: constrain the output to JSON valid under this schema (JSON text).
        choice: constrain the output to one of these strings.
        beam_width: > 0 runs beam search with this many beams.
        length_penalty: beam search length penalty exponent.
        speculative: none, ngram (prompt lookup) or draft (needs --draft_model).
        draft_model: draft model directory for --speculative draft.
        num_speculative_tokens: tokens proposed per step.
        max_num_seqs: most sequences decoded together.
        max_batched_tokens: token budget of one engine step.
        json_output: print one JSON object per prompt instead of plain text.
        tokenizer: tokenizer directory or tokenizer.json (default: the model directory's tokenizer.json).
        threads: CPU threads for torch: 0 = auto (the cores this process may use, minus those other processes keep busy
            right now; at least 1), N = exactly N.
        max_model_gib: refuse a model whose config.json (weights, and the KV pool the context implies) needs more
            memory than this many GiB, estimated before allocating; default: 64 or this machine's RAM, the smaller.
        device: auto (CUDA when a GPU is visible, else CPU), cpu, cuda or cuda:N.
        dtype: weights' dtype: auto (bf16 on CUDA, fp32 on CPU, whatever the checkpoint holds), float32, bfloat16
            or float16.
        tensor_parallel_size: shard the model over this many processes (see `lmstack serve`).
        kv_cache_dtype: auto (the KV cache in the model's dtype) or int8 (int8 with a per-token, per-head fp32 scale:
            ~3.8x the tokens of an fp32 cache in the same memory; see lmstack.infer.kv_quant).
    """

    set_max_model_gib(max_model_gib)
    set_threads(threads)

    sources = sum(x is not None for x in (prompt, prompts_file, prompt_ids))
    if sources != 1:
        raise LmstackError("give exactly one of --prompt, --prompts_file or --prompt_ids")
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise LmstackError(f"prompts file not found: {path}")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise LmstackError(f"{path} holds no prompts")
    else:
        prompts = [prompt] if prompt is not None else [list(prompt_ids)]
    spec = None
    if speculative != "none":
        spec = {"method": speculative, "num_tokens": num_speculative_tokens, "draft_model": draft_model}
    dev, torch_dtype = pick_device(device, dtype)
    llm = LLM(model, tokenizer=tokenizer, max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens,
              speculative=spec, device=dev, dtype=torch_dtype, tensor_parallel_size=tensor_parallel_size,
              kv_cache_dtype=kv_cache_dtype)
    if llm.tokenizer is None and any(isinstance(p, str) for p in prompts):
        raise LmstackError(f"{model} holds no tokenizer.json: pass --tokenizer DIR, or token ids with --prompt_ids")
    # Flags given win, then the model's generation_config.json, then this command's greedy 64-token default.
    sampling = merge_sampling({"temperature": 0.0, "max_tokens": 64, **llm.engine.generation_defaults},
                              dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty))
    params = SamplingParams(
        **sampling, n=n, min_p=min_p, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos, regex=regex,
        json_schema=json_schema, choice=choice, use_beam_search=beam_width > 0, beam_width=max(beam_width, n, 1),
        length_penalty=length_penalty)
    start = time.perf_counter()
    if chat:
        if any(not isinstance(p, str) for p in prompts):
            raise LmstackError("--chat needs text prompts")
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=len(prompts) > 1)
    else:
        outs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    elapsed = time.perf_counter() - start
    records = []
    for out in outs:
        rec = {"prompt": out.prompt if out.prompt is not None else out.prompt_token_ids,
               "completions": [{"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                                "cumulative_logprob": round(c.cumulative_logprob, 4)} for c in out.outputs]}
        records.append(rec)
        if json_output:
            print(json.dumps(rec, ensure_ascii=False))
        else:
            for c in out.outputs:
                print(c.text if llm.tokenizer is not None else c.token_ids)
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    stats = llm.engine.stats()
    extra = f", spec acceptance {stats['spec_acceptance_rate']:.2f}" if spec else ""
    print(f"[{len(outs)} prompts, {tokens} tokens in {elapsed:.2f}s, {tokens / max(elapsed, 1e-9):.1f} tok/s, "
          f"prefix-cache hits {stats['prefix_cache_hit_tokens']} tokens{extra}]")
    llm.engine.close()  # tensor-parallel workers stop now, not when the engine is collected
    return records


COMMANDS = generate
