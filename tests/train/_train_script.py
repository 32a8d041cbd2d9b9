"""A small training run used by the trainer tests (also run as a subprocess for the SIGKILL test).

Usage: python _train_script.py OUT_DIR STEPS SAVE_EVERY [SLEEP_PER_STEP]
"""
import sys
import time

import numpy as np
import torch

from lmstack.data.windows import RandomWindows
from lmstack.model import ModelConfig, Transformer
from lmstack.train.config import TrainConfig
from lmstack.train.objectives import ObjectiveConfig, build_objective
from lmstack.train.trainer import Trainer


def markov_tokens(n: int = 20000, vocab: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    trans = rng.dirichlet(np.full(vocab, 0.2), size=vocab)
    out = np.empty(n, dtype=np.int64)
    out[0] = 0
    for i in range(1, n):
        out[i] = rng.choice(vocab, p=trans[out[i - 1]])
    return out


def build(out: str, steps: int, save_every: int, dropout: float = 0.1, batch_size: int = 8, **train_kw):
    torch.manual_seed(0)
    tokens = markov_tokens()
    model = Transformer(ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, dropout=dropout))
    objective = build_objective(ObjectiveConfig(name="clm"), model.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = RandomWindows(tokens[:18000], batch_size=batch_size, seq_len=16, seed=0)
    cfg = TrainConfig(steps=steps, save_every=save_every, eval_every=0, log_every=1, progress=False,
                      device="cpu", keep_checkpoints=2, **train_kw)
    return Trainer(model, objective, optimizer, lambda p: 1.0 - 0.5 * p, cfg, train,
                   lambda: train.sequential(tokens[18000:]), out, tokens_per_row=16, log=lambda m: None)


if __name__ == "__main__":
    out, steps, save_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    trainer = build(out, steps, save_every)
    if delay:  # slow each step so the parent can kill us mid-run
        step = trainer.train_step

        def slow(progress):
            time.sleep(delay)
            return step(progress)

        trainer.train_step = slow
    trainer.fit()
