"""Train a small llama-style model on the synthetic world for a fixed time (for benchmarks that need a
model that knows something: speculative decoding's draft agreement, prompt compression's accuracy).

A plain next-token loop (AdamW, cosine decay, bf16 never on CPU): the benchmark owns its training, so it
does not depend on lmstack.train's configs. Deterministic given the seed (up to the time budget).

Usage:
    from _tiny_lm import world_texts, make_tokenizer, token_stream, train_for
    texts = world_texts(kinds=("bio", "qa"))
    tok = make_tokenizer(texts, vocab_size=1024)
    data = token_stream(tok, texts)
    losses = train_for(model, data, seconds=60, batch=16, seq_len=128)
    losses = train_for(draft, data, seconds=30, teacher=model)       # distil a draft from the model
"""
from __future__ import annotations

import math
import random
import time

import torch
import torch.nn.functional as F

from lmstack.world import World
from lmstack.tokenizer import train_tokenizer


def world_texts(kinds: tuple[str, ...] = ("bio", "qa", "city", "country"), seed: int = 0, size: str = "small",
                split: str = "train") -> list[str]:
    world = World(seed=seed, size=size)
    return [r["text"] for r in world.corpus("pretrain", split=split) if r["kind"] in kinds]


def make_tokenizer(texts: list[str], vocab_size: int = 1024):
    sample = texts[:: max(1, len(texts) // 3000)]
    return train_tokenizer(texts=sample, type="bpe", vocab_size=vocab_size, show_progress=False, special_tokens="chat")


def token_stream(tok, texts: list[str], seed: int = 0) -> torch.Tensor:
    """All texts (shuffled), each ending with EOS, as one long 1-D id tensor."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    eos = tok.eos_id
    ids: list[int] = []
    for ids_one in tok.encode_batch(order):
        ids.extend(ids_one + [eos])
    return torch.tensor(ids)


def train_for(model, data: torch.Tensor, seconds: float, batch: int = 16, seq_len: int = 128, lr: float = 3e-3,
              seed: int = 0, max_steps: int = 100_000, teacher=None) -> list[float]:
    """Train until `seconds` pass; returns the loss of every step. With a teacher model the loss is
    KL(teacher || model) on the teacher's next-token distributions (distillation) instead of the text."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    step = 0
    while time.perf_counter() - start < seconds and step < max_steps:
        frac = min(1.0, (time.perf_counter() - start) / seconds)
        for group in opt.param_groups:  # short warmup, then cosine to 10%
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g)
        x = torch.stack([data[i:i + seq_len] for i in idx.tolist()])
        y = torch.stack([data[i + 1:i + seq_len + 1] for i in idx.tolist()])
        if teacher is None:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        else:
            with torch.no_grad():
                target = teacher(x).log_softmax(-1).flatten(0, 1)
            loss = F.kl_div(model(x).log_softmax(-1).flatten(0, 1), target, log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
    model.eval()
    return losses
