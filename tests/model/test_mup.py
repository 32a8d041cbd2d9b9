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


_LAYERS = ("tok_emb", "blocks.0.attn", "blocks.0.mlp", "blocks.0", "blocks.1.attn", "blocks.1.mlp", "blocks.1")


def _coords(width: int, param: str, steps: int = 4, lr: float = 2.0**-6) -> list[dict[str, float]]:
    """Tensor Programs V's coordinate check: mean |x| of every layer's output (and the logits) on a fixed batch
    before each of `steps` Adam steps and after the last, i.e. at t = 0..steps."""
    torch.manual_seed(0)
    model = Transformer(_cfg(width, param))
    opt = torch.optim.Adam(param_groups(model, OPT, lr))
    data = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    modules = dict(model.named_modules())
    out = []
    for t in range(steps + 1):
        seen = {}
        hooks = [modules[name].register_forward_hook(
            lambda mod, args, o, name=name: seen.__setitem__(name, (o[0] if isinstance(o, tuple) else o).detach()))
            for name in _LAYERS]
        logits = model(data[:, :-1])
        for hook in hooks:
            hook.remove()
        seen["logits"] = logits.detach()
        out.append({name: float(x.abs().mean()) for name, x in seen.items()})
        if t < steps:
            loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return out


def test_coordinate_check_flat_under_mup_and_growing_under_standard():
    widths = (64, 128, 256)
    mup = [_coords(w, "mup") for w in widths]
    std = [_coords(w, "standard") for w in widths]
    for t in range(5):
        for layer in (*_LAYERS, "logits"):
            vals = [c[t][layer] for c in mup]
            if (t, layer) == (0, "logits"):
                # the readout's base-std init under the 1/m multiplier: logits at init shrink as 1/sqrt(m)
                assert vals[-1] / vals[0] == pytest.approx(4**-0.5, rel=0.2), vals
                continue
            # µP: no layer grows with width at any step (measured: widest/narrowest <= 1.0) and all stay within
            # 3x of each other (measured <= 2.7x up to d512, the narrowest being the noisiest: finite-width effects)
            assert vals[-1] / vals[0] < 1.5 and max(vals) / min(vals) < 3.0, (t, layer, vals)
    for layer in ("blocks.0", "blocks.1"):
        growth = [std[-1][t][layer] / std[0][t][layer] for t in range(5)]
        # standard: the residual stream grows with width, more with every step (measured for 4x the width:
        # about 2x at t=0, then 20-120x at t=2..4)
        assert growth[4] > 10.0 and growth[4] > 3 * growth[0], (layer, growth)
        assert all(a[4][layer] < b[4][layer] for a, b in zip(std, std[1:])), (layer, [c[4][layer] for c in std])


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


def test_weight_decay_scales_up_with_width_so_lr_times_decay_stays_put():
    opt = SimpleNamespace(layer_lr_decay=1.0, no_decay_norms_biases_embeddings=True, weight_decay=0.1)
    for width in (64, 256):
        groups = {n: g for g in param_groups(Transformer(_cfg(width)), opt, 1e-2) for n in g["names"]}
        hidden = groups["blocks.0.mlp.up_proj.weight"]
        assert hidden["lr"] * hidden["weight_decay"] == pytest.approx(1e-3)  # width-independent, as mup's MuAdam
        assert hidden["weight_decay"] == pytest.approx(0.1 * width / BASE)
        assert groups["lm_head.weight"]["weight_decay"] == pytest.approx(0.1)  # vector-like: lr and decay as is
        assert groups["final_norm.weight"]["weight_decay"] == 0.0


def test_mup_init_scales_hidden_matrices_with_width_and_keeps_the_readout_std():
    for width in (64, 256):
        torch.manual_seed(0)
        model = Transformer(_cfg(width))
        m = width_mult(model.config)
        assert float(model.blocks[0].attn.q_proj.weight.detach().std()) == pytest.approx(0.02 / math.sqrt(m), rel=0.1)
        # residual outputs: the width factor on top of GPT-2's 1/sqrt(2 * n_layers)
        assert float(model.blocks[1].mlp.down_proj.weight.detach().std()) == pytest.approx(
            0.02 / math.sqrt(m) / 2, rel=0.1)
        assert float(model.tok_emb.weight.detach().std()) == pytest.approx(0.02, rel=0.1)
        # the readout keeps the base std (Tensor Programs V, Table 3, under the 1/m logit multiplier), not zero
        assert float(model.lm_head.weight.detach().std()) == pytest.approx(0.02, rel=0.1)
        head_dim = model.config.head_dim
        assert model.blocks[0].attn.scale == pytest.approx(math.sqrt(head_dim / m) / head_dim)
    assert attention_scale(_cfg(BASE)) == pytest.approx(_cfg(BASE).head_dim ** -0.5)  # base width: 1/sqrt(d)
    torch.manual_seed(0)
    small = Transformer(_cfg(256, init="small"))  # init='small' takes its std at the base width, sqrt(2/(5*64))
    assert float(small.tok_emb.weight.detach().std()) == pytest.approx(math.sqrt(2 / (5 * BASE)), rel=0.1)
    assert float(small.blocks[0].attn.q_proj.weight.detach().std()) == pytest.approx(
        math.sqrt(2 / (5 * BASE)) / 2, rel=0.1)


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True}, {"n_experts": 4}, {"init": "small"}])
def test_mup_at_the_base_width_is_the_standard_model_bit_for_bit(kw):
    torch.manual_seed(0)
    std = Transformer(_cfg(BASE, "standard", **kw))
    torch.manual_seed(0)
    mup = Transformer(_cfg(BASE, **kw))
    idx = torch.arange(12).view(2, 6)
    with torch.no_grad():
        assert torch.equal(std(idx), mup(idx))
    lrs = {n: g["lr"] for g in param_groups(mup, OPT, 1e-2) for n in g["names"]}
    assert set(lrs.values()) == {1e-2}


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
