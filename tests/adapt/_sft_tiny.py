"""Tiny SFT fixtures shared by the sft / finetune / continual tests: a world's chat rows, a chat BPE tokenizer
trained on them, a 2-layer model, and a saved base model directory (HF layout + tokenizer)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from lmstack.world import World
from lmstack.model import ModelConfig, Transformer
from lmstack.tokenizer import train_tokenizer


@lru_cache(maxsize=None)
def chat_rows(n_people: int = 16) -> tuple[dict, ...]:
    return tuple(World(seed=0, n_people=n_people).corpus("chat", split="train"))


@lru_cache(maxsize=None)
def tokenizer():
    rows = chat_rows()
    return train_tokenizer(texts=[r["text"] for r in rows], type="bpe", vocab_size=600, show_progress=False,
                           special_tokens="chat")


def tiny_model(tok=None, seed: int = 0, **overrides) -> Transformer:
    tok = tok or tokenizer()
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256,
               hf_model_type="llama", bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    cfg.update(overrides)
    return Transformer(ModelConfig(**cfg))


def save_base(path: Path, tok=None, seed: int = 0) -> Path:
    from lmstack.model.hf_io import save_model

    tok = tok or tokenizer()
    return save_model(tiny_model(tok, seed), path, tokenizer=tok)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
