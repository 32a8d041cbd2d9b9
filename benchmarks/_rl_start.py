"""A small SFT'd chat model on the synthetic world, the starting point of the RL benchmarks (TRPO vs PPO, the
reward-model loop, multi-agent self-play), built once and cached as a model directory (HF layout + tokenizer).

The model (llama-style, d96 x 3 layers, ~0.5M parameters) is trained with lmstack's SFT objective (loss on the
assistant tokens) on the world's arithmetic chat rows (word problems with step-by-step solutions) and the asker
role of self-play (the user says "Ask me this question: <problem>", the assistant writes the problem as its question;
self_play.role_prompt), a fixed number of steps from a fixed seed, so every benchmark starts from the same weights.
Its greedy arithmetic accuracy is low but not zero (14.8% on the val split's 61 problems of difficulty <= 2), which is
what RL needs: some rollouts of a group are right and some wrong.

Usage:
    from _rl_start import start_model, arithmetic_records
    path = start_model()      # builds /tmp/lmstack_rl_start/model once (800 steps: 20 min on a busy 2-core box)
    train, val = arithmetic_records(max_difficulty=2)
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from lmstack.world import World

CACHE = Path(os.environ.get("LMSTACK_RL_START", "/tmp/lmstack_rl_start"))
STEPS, SEQ, BATCH, LR = 800, 160, 16, 3e-3
RECIPE = {"model": "llama d96 x3 layers, 4 heads (2 kv), d_ff 256", "tokenizer": "BPE 1024 on the world's chats",
          "sft": f"{STEPS} steps x {BATCH} rows x {SEQ} tokens, AdamW lr {LR}, warmup 20, cosine to 10%",
          "data": "world chat train split: arithmetic rows + asker-role rows for the same problems"}


def world() -> World:
    return World(seed=0, size="small")


def arithmetic_records(max_difficulty: int = 2) -> tuple[list[dict], list[dict]]:
    """(train, val) arithmetic chat records of the world at most this difficulty (val = the world's val split)."""
    w = world()
    pick = lambda split: [r for r in w.corpus("chat", split=split)  # noqa: E731
                          if r["kind"] == "arithmetic" and r.get("difficulty", 0) <= max_difficulty]
    return pick("train"), pick("val")


def start_model(path: Path = CACHE) -> Path:
    """The cached model directory; trains it first when absent."""
    model_dir = path / "model"
    if (model_dir / "config.json").exists() and (path / "recipe.json").exists():
        return model_dir
    from lmstack.adapt.sft import SFTLoader, SFTObjective, encode_rows, pack_examples
    from lmstack.model import ModelConfig, Transformer
    from lmstack.model.hf_io import save_model
    from lmstack.tokenizer import train_tokenizer

    torch.manual_seed(0)
    from lmstack.align.rollout import prompt_text
    from lmstack.align.self_play import role_prompt

    rows = [r for r in world().corpus("chat", split="train") if r["kind"] == "arithmetic"]
    rows += [{"messages": [{"role": "user", "content": role_prompt(r)},
                           {"role": "assistant", "content": prompt_text(r)}], "kind": "asker",
              "text": role_prompt(r) + "\n" + prompt_text(r)} for r in rows if r["kind"] == "arithmetic"]
    tok = train_tokenizer(texts=[r["text"] for r in rows], type="bpe", vocab_size=1024, show_progress=False,
                          special_tokens="chat")
    examples, _ = encode_rows(tok, rows, max_len=SEQ + 1)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=96, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=256,
                      max_seq_len=512)
    model = Transformer(cfg)
    loader = SFTLoader(pack_examples(examples, SEQ, tok.pad_id), BATCH, seed=0)
    objective = SFTObjective()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / STEPS)))
        loss, _ = objective.loss(model, next(loader))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            print(f"rl start model: step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    save_model(model, model_dir, tokenizer=tok)
    tmp = path / "recipe.json.tmp"
    tmp.write_text(json.dumps({**RECIPE, "final_loss": loss.item(), "seconds": time.perf_counter() - t0}) + "\n")
    tmp.replace(path / "recipe.json")
    return model_dir


def recipe(path: Path = CACHE) -> dict:
    return json.loads((path / "recipe.json").read_text())


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(start_model())
