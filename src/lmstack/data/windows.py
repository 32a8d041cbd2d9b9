"""Random-window batches from one token stream, nanoGPT's `get_batch`, resumable.

For a single long text (Tiny Shakespeare) there are no documents to pack: each row is a window of
T+1 tokens starting at a uniformly random offset, so the rows of a batch are independent. The
sampler's whole state is its generator, so `state_dict()` / `load_state_dict()` resume exactly.

Usage:
    tokens = np.array(tok.encode(text))
    train = RandomWindows(tokens[: int(0.9 * len(tokens))], batch_size=12, seq_len=64, seed=0)
    x, y = next(train)                               # LongTensors (12, 64); y is x shifted by one
    val = train.sequential(tokens[int(0.9 * len(tokens)):])   # fixed windows for evaluation
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from lmstack.errors import LmstackError


class RandomWindows:
    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
        if len(tokens) < seq_len + 2:
            raise LmstackError(f"the token stream has {len(tokens)} tokens, fewer than one window of {seq_len + 1}; "
                               "use a longer text or a shorter seq_len")
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.batch_size, self.seq_len = batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(seq_len + 1)

    def __iter__(self) -> "RandomWindows":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=self.generator)
        rows = self.tokens[starts[:, None] + self._offsets]
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["batch_size"], state["seq_len"]) != (self.batch_size, self.seq_len):
            raise LmstackError(f"window state was saved for batch_size={state['batch_size']}, "
                               f"seq_len={state['seq_len']}; this run uses {self.batch_size}, {self.seq_len}")
        self.generator.set_state(state["generator"])

    def sequential(self, tokens: np.ndarray, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows of another stream in order (validation), batch by batch."""
        t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        b, n = batch_size or self.batch_size, self.seq_len + 1
        rows = t[: (len(t) // n) * n].view(-1, n)
        for i in range(0, len(rows), b):
            chunk = rows[i:i + b]
            yield chunk[:, :-1], chunk[:, 1:]
