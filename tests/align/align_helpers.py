"""Helpers shared by the align tests (a uniquely named module: `conftest` names clash across test folders)."""
import torch

from lmstack.model.presets import preset
from lmstack.model.transformer import Transformer


def make_policy(tok, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = preset("llama-tiny", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                 max_seq_len=256)
    return Transformer(cfg).eval()


def letter_e(prompt, completion, record):
    """A trivially learnable reward for RL tests: the share of characters that are 'e' (continuous, so the
    samples of a group differ)."""
    return completion.count("e") / max(1, len(completion))
