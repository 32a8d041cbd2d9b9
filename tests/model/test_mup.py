"""µP (model/mup.py): coordinate check across widths, per-layer Adam LRs, init scales, the unchanged standard default,
save/load and refused configs."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import lmstack
from lmstack.config import ConfigError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.mup import attention_scale, lr_scale, width_mult
from lmstack.train.optim.param_groups import param_groups

BASE = 64
OPT = SimpleNamespace(layer_lr_decay=1.0, no_decay_norms_biases_embeddings=True, weight_decay=0.0)


def _cfg(width: int, param: str = "mup", **kw) -> ModelConfig:
    mup = {"parametrization": "mup", "mup_base_width": BASE} if param == "mup" else {}
    return ModelConfig(vocab_size=64, d_model=width, n_layers=2, n_heads=4, max_seq_len=16, **mup, **kw)


def _coords(width: int, param: str, steps: int = 5, lr: float = 1e-2) -> tuple[float, float]:
    """Mean |x| of the last block's residual-stream output and of the logits after `steps` Adam steps."""
    torch.manual_seed(0)
    model = Transformer(_cfg(width, param))
    opt = torch.optim.Adam(param_groups(model, OPT, lr))
    data = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    seen = {}
    hook = model.blocks[-1].register_forward_hook(lambda mod, args, out: seen.__setitem__("x", out))
    with torch.no_grad():
        logits = model(data[:, :-1])
    hook.remove()
    return float(seen["x"].abs().mean()), float(logits.abs().mean())


def test_coordinate_check_flat_under_mup_and_growing_under_standard():
    widths = (64, 128, 256)
    mup = [_coords(w, "mup") for w in widths]
    std = [_coords(w, "standard") for w in widths]
    for i, what in enumerate(("residual stream", "logits")):
        mup_vals = [c[i] for c in mup]
        std_ratio = std[-1][i] / std[0][i]
        # µP: each coordinate's scale moves by less than 1.5x over a 4x width range ...
        assert max(mup_vals) / min(mup_vals) < 1.5, (what, mup_vals)
        # ... the standard parametrisation's grows with width (measured: residual about 50x, logits about 3x)
        assert std_ratio > 2.0, (what, [c[i] for c in std])
        assert all(a[i] < b[i] for a, b in zip(std, std[1:])), (what, std)


def test_param_groups_scale_hidden_matrices_only():
    model = Transformer(_cfg(256))
    lr = 1e-2
    by_name = {n: g["lr"] for g in param_groups(model, OPT, lr) for n in g["names"]}
    for name in ("blocks.0.attn.q_proj.weight", "blocks.1.attn.o_proj.weight", "blocks.0.mlp.down_proj.weight"):
        assert by_name[name] == pytest.approx(lr * BASE / 256), name
    for name in ("tok_emb.weight", "lm_head.weight", "blocks.0.attn_norm.weight", "final_norm.weight"):
        assert by_name[name] == pytest.approx(lr), name
    standard = {n: g["lr"] for g in param_groups(Transformer(_cfg(256, "standard")), OPT, lr) for n in g["names"]}
    assert set(standard.values()) == {lr}
    assert lr_scale(model.config, "module._orig_mod.blocks.3.mlp.w_in", 3) == pytest.approx(0.25)
    assert lr_scale(model.config, "blocks.0.mlp.router.weight", 2) == 1.0  # one dim is n_experts: vector-like


def test_mup_init_scales_with_width_and_zeroes_readout():
    for width in (64, 256):
        torch.manual_seed(0)
        model = Transformer(_cfg(width))
        m = width_mult(model.config)
        assert float(model.blocks[0].attn.q_proj.weight.detach().std()) == pytest.approx(0.02 / math.sqrt(m), rel=0.1)
        assert float(model.tok_emb.weight.detach().std()) == pytest.approx(0.02, rel=0.1)
        assert not model.lm_head.weight.any()
        head_dim = model.config.head_dim
        assert model.blocks[0].attn.scale == pytest.approx(math.sqrt(head_dim / m) / head_dim)
    assert attention_scale(_cfg(BASE)) == pytest.approx(_cfg(BASE).head_dim ** -0.5)  # base width: 1/sqrt(d)


def test_readout_multiplier_and_head_weight_agree():
    torch.manual_seed(0)
    model = Transformer(_cfg(256))
    torch.nn.init.normal_(model.lm_head.weight, 0.0, 0.02)
    idx = torch.arange(10).view(1, 10)
    with torch.no_grad():
        hidden = model(idx, return_hidden=True)
        logits = model(idx)
        plain = hidden @ model.lm_head.weight.T
    assert torch.allclose(logits, plain * BASE / 256, atol=1e-6)
    assert torch.allclose(hidden @ model.head_weight().T, logits, atol=1e-6)  # what fused losses use


def test_standard_default_unchanged():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
    assert cfg.parametrization == "standard" and cfg.mup_base_width == 0
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        logits = model(torch.arange(12).view(2, 6))
    # pinned from the code before µP existed (same seed, same config)
    assert float(logits.sum()) == pytest.approx(6.452889442443848, abs=1e-4)
    assert float(logits.abs().sum()) == pytest.approx(67.20569610595703, abs=1e-4)
    expected = [-0.11742248386144638, -0.07644487917423248, 0.15399235486984253, -0.06483549624681473]
    assert logits[0, 0, :4].tolist() == pytest.approx(expected, abs=1e-6)
    assert model.blocks[0].attn.scale == pytest.approx(cfg.head_dim ** -0.5)


def test_save_load_keeps_parametrization(tmp_path):
    torch.manual_seed(0)
    model = Transformer(_cfg(128))
    torch.nn.init.normal_(model.lm_head.weight, 0.0, 0.02)  # a trained (non-zero) readout
    lmstack.save_model(model, tmp_path / "m")
    loaded = lmstack.load_model(tmp_path / "m")
    assert loaded.config.parametrization == "mup" and loaded.config.mup_base_width == BASE
    assert loaded.blocks[0].attn.scale == pytest.approx(model.blocks[0].attn.scale)
    idx = torch.arange(12).view(2, 6)
    with torch.no_grad():
        assert torch.allclose(loaded(idx), model(idx), atol=1e-6)


@pytest.mark.parametrize("kw, field", [
    ({"parametrization": "mup"}, "mup_base_width"),
    ({"parametrization": "mup", "mup_base_width": -8}, "mup_base_width"),
    ({"mup_base_width": 64}, "mup_base_width"),
    ({"parametrization": "mup", "mup_base_width": 64, "attention": "performer"}, "attention"),
    ({"parametrization": "mu-p"}, "parametrization"),
])
def test_bad_config_refused_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict({"d_model": 64, "n_heads": 4, **kw})
