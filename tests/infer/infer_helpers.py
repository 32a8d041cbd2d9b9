"""Helpers for tests/infer: tiny models, text and prompts made in the test process.

(A uniquely named module rather than `from conftest import ...`, which clashes with other folders' conftests.)
"""
import random

import torch

from lmstack.model import Transformer, preset

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no will more what up out "
         "said time about other into than its only some could new them these two may first then do any like").split()


def make_text(n_lines: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]) + f" {rng.randint(0, 999)}")
    return "\n".join(lines) + "\n"


def tiny_model(vocab_size: int = 400, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = preset("llama-tiny", vocab_size=vocab_size, max_seq_len=256, **overrides)
    return Transformer(cfg).eval()


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(20, vocab, (length,), generator=g).tolist() for length in lengths]
