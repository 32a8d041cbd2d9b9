import math

import torch

from lmstack.model import ModelConfig
from lmstack.model.positions import ROPE_SCALING, RotaryEmbedding, alibi_slopes, apply_rotary


def test_rope_scores_depend_only_on_relative_offset():
    cfg = ModelConfig(d_model=64, n_heads=2)
    rope = RotaryEmbedding(cfg)
    q, k = torch.randn(cfg.head_dim), torch.randn(cfg.head_dim)

    def score(i: int, j: int) -> float:
        cq, sq = rope(torch.tensor([i]))
        ck, sk = rope(torch.tensor([j]))
        return float(apply_rotary(q[None], cq, sq) @ apply_rotary(k[None], ck, sk).T)

    assert abs(score(5, 2) - score(105, 102)) < 1e-4
    assert abs(score(7, 7) - float(q @ k)) < 1e-4  # zero offset: no rotation at all
    assert abs(score(5, 2) - score(5, 4)) > 1e-3  # a different offset changes the score


def test_rope_table_grows_past_max_seq_len():
    cfg = ModelConfig(max_seq_len=16)
    rope = RotaryEmbedding(cfg)
    cos, _ = rope(torch.tensor([40]))
    assert rope.cos_table.shape[0] >= 41 and torch.isfinite(cos).all()


def test_rope_scaling_schemes_change_low_frequencies_only_where_they_should():
    base = ModelConfig(head_dim=64, n_heads=2, d_model=128, max_seq_len=64)
    f0, _ = ROPE_SCALING["none"](base)
    lin, _ = ROPE_SCALING["linear"](base.replace(rope_scaling="linear", rope_factor=4.0))
    assert torch.allclose(lin, f0 / 4)
    ntk, _ = ROPE_SCALING["ntk"](base.replace(rope_scaling="ntk", rope_factor=4.0))
    assert abs(float(ntk[0] / f0[0]) - 1) < 1e-6 and float(ntk[-1] / f0[-1]) < 0.3  # high freq kept, low stretched
    l3, _ = ROPE_SCALING["llama3"](base.replace(rope_scaling="llama3", rope_factor=8.0, rope_original_max_seq_len=64))
    assert torch.allclose(l3[0], f0[0]) and torch.allclose(l3[-1], f0[-1] / 8)
    yarn, scale = ROPE_SCALING["yarn"](base.replace(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=64))
    assert abs(scale - (0.1 * math.log(4) + 1)) < 1e-9 and torch.allclose(yarn[0], f0[0])


def test_alibi_slopes_follow_the_papers_geometric_sequence():
    s8 = alibi_slopes(8)
    assert torch.allclose(s8, torch.tensor([2 ** (-(i + 1)) for i in range(8)]))
    s16 = alibi_slopes(16)
    ratios = s16[1:] / s16[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 2 ** -0.5))
    # non powers of two: the 8 slopes of n=8, then every other slope of n=16
    s12 = alibi_slopes(12)
    assert torch.allclose(s12[:8], s8) and torch.allclose(s12[8:], s16[0::2][:4])
