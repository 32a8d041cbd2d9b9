"""`lmstack model ...`: inspect, create, convert and sample from models.

Usage:
    lmstack model info --preset mixtral-small          # params (total/active), FLOPs, KV bytes, memory
    lmstack model info --model path/to/hf_or_our_dir
    lmstack model init --preset llama-tiny --out runs/tiny      # a random model + a byte-level tokenizer
    lmstack model init --preset llama-tiny --out runs/tiny --tokenizer tok/   # ... with your tokenizer
    lmstack model convert --src hf_dir --out our_dir            # load any supported HF dir, save it back
    lmstack model generate --model runs/tiny --prompt "Once upon" --max_tokens 32
"""
from __future__ import annotations

from dataclasses import asdict
import json
from pathlib import Path
import time
from typing import Literal

import torch

from lmstack.errors import LmstackError
from lmstack.model.counting import format_stats, model_stats
from lmstack.model.hf_io import check_output_head, load_model, read_config, save_model
from lmstack.model.lazy_safetensors import CheckpointReader
from lmstack.model.memory.knn import KNNMemory
from lmstack.model.memory.segments import generate_with_memory, new_memory
from lmstack.model.presets import preset as make_preset
from lmstack.model.reference_decode import reference_decode
from lmstack.model.side_files import keep_source_files
from lmstack.model.transformer import Transformer
from lmstack.model.vocab import check_vocab, real_vocab
from lmstack.threads import set_threads
from lmstack.tokenizer import load_tokenizer, train_tokenizer
from lmstack.tokenizer.core import has_tokenizer


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def info(preset: str | None = None, model: str | None = None, context: int | None = None,
         json_output: bool = False) -> dict:
    """Print parameter counts (total, active per token), FLOPs per token, KV-cache bytes and weight memory.

    With --model it also checks the directory without loading any weights: every weight file the index names
    exists and has a valid header, and the tokenizer beside it has no more ids than the model has rows.

    Args:
        preset: a preset name such as llama-small (see lmstack.model.PRESETS).
        model: a model directory (ours or HF's) instead of a preset.
        context: context length for the attention FLOPs (default: the model's max_seq_len).
        json_output: print JSON instead of a table.
    """

    if (preset is None) == (model is None):
        raise LmstackError("give exactly one of --preset or --model")
    cfg, hf_names = (make_preset(preset), False) if preset else read_config(model)
    if model is not None and any((Path(model) / n).exists() for n in WEIGHT_FILES):
        # headers only (nothing is read): a missing or corrupt shard fails here, not at the first generate
        reader = CheckpointReader(model)
        reader.validate_all()
        if hf_names:
            check_output_head(cfg, Path(model), reader.keys(), reader)
    if model is not None and has_tokenizer(model):
        # a tokenizer with more ids than the model has rows would fail mid-generate: say so now
        check_vocab(cfg, load_tokenizer(model), model_path=model, tokenizer_path=model, what="model info")
    stats = model_stats(cfg, context)
    if json_output:
        print(json.dumps(asdict(stats), indent=2))
    else:
        print(format_stats(cfg, stats))
    return {"config": cfg, "stats": stats}


def byte_tokenizer():
    """A byte-level tokenizer with no merges: 256 byte tokens plus the chat special tokens. Any text
    encodes, so a freshly initialised model can be sampled, served and chatted with at once."""

    # one character has no pairs to merge, so the result is exactly the bytes and the special tokens
    return train_tokenizer(texts=["a"], type="bpe", vocab_size=512, special_tokens="chat", show_progress=False)


def init(preset: str, out: str, seed: int = 0, tokenizer: str | None = None) -> str:
    """Write a randomly initialised model of a preset to a model directory (HF layout when possible),
    with a tokenizer beside it, so `lmstack generate / serve / chat --model OUT` work at once.

    Args:
        preset: preset name, e.g. llama-tiny.
        out: output directory.
        seed: torch seed for the initial weights.
        tokenizer: a tokenizer directory (or tokenizer.json) to copy in; its vocabulary must fit the model's.
            Default: a byte-level tokenizer (256 bytes + chat special tokens, no merges).
    """

    cfg = make_preset(preset)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        tok = byte_tokenizer()
    if tok.vocab_size > cfg.vocab_size:
        raise LmstackError(f"the tokenizer has {tok.vocab_size} ids but {preset} has vocab_size={cfg.vocab_size}; "
                           f"give a smaller tokenizer with --tokenizer, or a preset with a larger vocabulary")
    # the special ids the tokenizer defines go into config.json / generation_config.json
    cfg = cfg.replace(**{f"{name}_token_id": getattr(tok, f"{name}_id") for name in ("bos", "eos", "pad")
                         if getattr(cfg, f"{name}_token_id") is None and getattr(tok, f"{name}_id") is not None})
    torch.manual_seed(seed)
    path = save_model(Transformer(cfg), out)
    tok.save(path)
    print(f"wrote {preset} to {path} (with a {tok.vocab_size}-id tokenizer"
          f"{' from ' + str(tokenizer) if tokenizer else ', byte-level'})")
    return str(path)


def convert(src: str, out: str, dtype: Literal["float32", "bfloat16", "float16", "source"] = "float32",
            max_model_gib: float | None = None) -> str:
    """Load a model directory (any supported HF family or ours) and save it in lmstack's HF layout.

    Only config.json and the weights are rewritten. The tokenizer files and chat templates are copied unchanged,
    and generation_config.json keeps every field of the source (list-valued eos_token_id, sampling settings);
    see model/side_files.py.

    Args:
        src: source model directory (config.json + safetensors).
        out: output directory.
        dtype: dtype of the saved weights; source keeps the checkpoint's (a bf16 checkpoint stays bf16).
        max_model_gib: refuse a model whose config.json (weights, and the KV pool the context implies) needs more
            memory than this many GiB, estimated before allocating; default: 64 or this machine's RAM, the smaller.
        memory: a memory='knn' model's persistent store: this directory is loaded when it holds one (refused when
            another model wrote it), and saved after with the prompt and the reply added, so a later call recalls them.
    """

    model = load_model(src, dtype=None if dtype == "source" else getattr(torch, dtype), max_model_gib=max_model_gib)
    path = save_model(model, out)
    copied = keep_source_files(src, path, model.config)
    print(f"converted {src} -> {path} ({model.num_parameters():,} parameters, {dtype}; kept "
          f"{', '.join(copied) or 'no tokenizer files'} and generation_config.json)")
    return str(path)


def generate(model: str, prompt: str | None = None, prompt_ids: list[int] | None = None, max_tokens: int = 32,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             cache: Literal["contiguous", "sink", "none"] = "contiguous", threads: int = 0,
             max_model_gib: float | None = None, memory: str | None = None) -> list[int]:
    """Sample from a model with the reference KV-cache decode loop (a memory model: with its memory).

    Args:
        model: model directory.
        prompt: text prompt (needs tokenizer.json in the model directory).
        prompt_ids: token ids instead of text, e.g. '[1, 2, 3]'.
        max_tokens: most tokens to generate.
        temperature: 0 for greedy decoding.
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus sampling mass (1 = off).
        seed: sampling seed.
        cache: contiguous KV cache, a bounded sink cache, or none (recompute the prefix each step).
        threads: CPU threads for torch: 0 = auto (the cores this process may use, minus those other processes keep busy
            right now; at least 1), N = exactly N.
        max_model_gib: refuse a model whose config.json (weights, and the KV pool the context implies) needs more
            memory than this many GiB, estimated before allocating; default: 64 or this machine's RAM, the smaller.
    """

    set_threads(threads)
    m = load_model(model, max_model_gib=max_model_gib)
    tok = None
    if prompt is not None:
        if not has_tokenizer(model):
            raise LmstackError(f"{model} has no tokenizer.json (nor tokenizer.model); pass --prompt_ids instead of "
                               "--prompt")

        tok = load_tokenizer(model)
        n_real = check_vocab(m, tok, model_path=model, tokenizer_path=model, what="model generate")
        if n_real < m.config.vocab_size:  # rows past the tokenizer (an older padded checkpoint) are padding
            m.config.real_vocab_size = n_real
        prompt_ids = tok.encode(prompt)
    if not prompt_ids:
        raise LmstackError("give --prompt or --prompt_ids")
    n_real = real_vocab(m.config)
    bad = [i for i in prompt_ids if not 0 <= i < n_real]
    if bad:
        raise LmstackError(f"prompt ids {bad[:5]} are outside the vocabulary (size {n_real})")
    start = time.perf_counter()
    if m.config.memory != "none":  # the memory model's own decode loop (a KV cache would drop the memory)
        if top_k or top_p < 1.0:
            raise LmstackError(f"memory={m.config.memory!r} models decode greedily or with temperature only; "
                               "drop --top_k/--top_p")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        store = None
        if memory is not None:
            if m.config.memory != "knn":
                raise LmstackError(f"--memory keeps a kNN store between calls; this model has memory="
                                   f"{m.config.memory!r} (only memory='knn' persists)")
            store = KNNMemory.load(memory, m) if KNNMemory.saved_in(memory) else new_memory(m)
        out = generate_with_memory(m, torch.tensor([prompt_ids]), max_tokens, temperature=temperature,
                                   eos_id=m.config.eos_token_id, generator=gen, memory=store, commit=store is not None)
        if store is not None:
            store.save(memory)
            print(f"[memory {memory}: {len(store)} stored tokens]")
    else:
        if memory is not None:
            raise LmstackError("--memory needs a memory='knn' model; this one has no long-context memory")
        out = reference_decode(m, torch.tensor([prompt_ids]), max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               eos_id=m.config.eos_token_id, cache=None if cache == "none" else cache, seed=seed)
    new = out[0, len(prompt_ids):].tolist()
    elapsed = time.perf_counter() - start
    print(tok.decode(new) if tok is not None else new)
    print(f"[{len(new)} tokens in {elapsed:.2f}s, {len(new) / max(elapsed, 1e-9):.1f} tok/s]")
    return new


COMMANDS = {"info": info, "init": init, "convert": convert, "generate": generate}
