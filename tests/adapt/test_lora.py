"""LoRA, rsLoRA and DoRA layers: no-op at init, exact formulas, targeting, config checks, training."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.adapt import AdapterConfig, add_adapter, get_peft_model, trainable_report
from lmstack.adapt.layers import AdapterLinear
from lmstack.adapt.dora import init_magnitude
from lmstack.config import ConfigError
from lmstack.errors import LmstackError

from _lora_tiny import make_tiny


def ids(b=2, t=10, seed=1, vocab=96):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def randomize(layer: AdapterLinear, name: str, std: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B[name].weight.copy_(torch.randn(layer.lora_B[name].weight.shape, generator=g) * std)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_new_adapter_is_a_no_op(tiny_model, method):
    x = ids()
    before = tiny_model(x)
    get_peft_model(tiny_model, AdapterConfig(method=method, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert isinstance(tiny_model.blocks[0].attn.q_proj, AdapterLinear)
    assert torch.equal(tiny_model.blocks[0].attn.q_proj.lora_B["default"].weight, torch.zeros(32, 8))
    assert tiny_model.blocks[0].attn.q_proj.lora_A["default"].weight.abs().sum() > 0  # A is random, B zero
    torch.testing.assert_close(tiny_model(x), before, atol=1e-6, rtol=0)


def test_kaiming_uniform_bound_of_A():
    layer = AdapterLinear(nn.Linear(400, 20))
    layer.add_lora("a", r=64, scale=1.0)
    # kaiming_uniform(a=sqrt(5)) on fan_in=400 draws from U(-1/sqrt(400), 1/sqrt(400))
    w = layer.lora_A["a"].weight
    assert w.abs().max() <= 1 / math.sqrt(400) + 1e-7 and w.abs().max() > 0.9 / math.sqrt(400)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_output_equals_formula(rslora):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    cfg = AdapterConfig(r=4, alpha=6.0, use_rslora=rslora)
    assert cfg.scale == pytest.approx(6 / 2 if rslora else 6 / 4)
    layer = AdapterLinear(base)
    layer.add_lora("x", cfg.r, cfg.scale)
    randomize(layer, "x")
    x = torch.randn(3, 5, 12)
    a, b = layer.lora_A["x"].weight, layer.lora_B["x"].weight
    expect = x @ base.weight.t() + base.bias + cfg.scale * (x @ a.t() @ b.t())
    torch.testing.assert_close(layer(x), expect, atol=1e-6, rtol=1e-6)


def test_dora_matches_direct_formula():
    torch.manual_seed(0)
    base = nn.Linear(16, 9)
    layer = AdapterLinear(base)
    layer.add_lora("d", r=3, scale=2.0, kind="dora")
    init_magnitude(layer, "d")
    torch.testing.assert_close(layer.lora_magnitude["d"].detach(), base.weight.norm(dim=1))  # ||W|| at init
    randomize(layer, "d")
    with torch.no_grad():
        layer.lora_magnitude["d"].mul_(torch.rand(9) + 0.5)
    x = torch.randn(4, 16)
    w = base.weight + 2.0 * layer.lora_B["d"].weight @ layer.lora_A["d"].weight
    w_dora = layer.lora_magnitude["d"][:, None] * w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ w_dora.t() + base.bias, atol=1e-5, rtol=1e-5)
    layer(x).sum().backward()  # magnitude, A and B all get gradients
    for p in (layer.lora_magnitude["d"], layer.lora_A["d"].weight, layer.lora_B["d"].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_dropout_only_in_training():
    layer = AdapterLinear(nn.Linear(8, 8))
    layer.add_lora("a", r=2, scale=1.0, dropout=0.5)
    randomize(layer, "a")
    x = torch.randn(64, 8)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_targets_by_suffix_and_regex(tiny_model):
    get_peft_model(tiny_model, AdapterConfig(target_modules=[r"blocks\.0\.(attn\.q|mlp\.up)_proj", "1.attn.o_proj"]))
    wrapped = sorted(n for n, m in tiny_model.named_modules() if isinstance(m, AdapterLinear))
    assert wrapped == ["blocks.0.attn.q_proj", "blocks.0.mlp.up_proj", "blocks.1.attn.o_proj"]


def test_pattern_that_matches_nothing_is_an_error(tiny_model):
    with pytest.raises(LmstackError, match="qq_proj"):
        get_peft_model(tiny_model, AdapterConfig(target_modules=["q_proj", "qq_proj"]))
    for m in ("qlora", "dora"):
        with pytest.raises(LmstackError, match="nothing_here"):
            get_peft_model(make_tiny(), AdapterConfig(method=m, target_modules=["nothing_here"]))


@pytest.mark.parametrize("field,value", [("method", "lorax"), ("r", 0), ("alpha", -1.0), ("dropout", 1.0),
                                         ("quant", "fp8"), ("target_modules", [""]), ("layers_to_train", [-1])])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        AdapterConfig(**{field: value})


def test_config_round_trips_through_dict():
    cfg = AdapterConfig(method="dora", r=4, target_modules=["o_proj"], use_rslora=True)
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        AdapterConfig.from_dict({"rank": 4})


def test_duplicate_adapter_name_is_refused(tiny_model):
    get_peft_model(tiny_model, AdapterConfig())
    with pytest.raises(LmstackError, match="already has an adapter"):
        add_adapter(tiny_model, AdapterConfig(), "default")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_training_moves_only_the_adapter_and_lowers_loss(tiny_model, method):
    base_state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    get_peft_model(tiny_model, AdapterConfig(method=method, r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    rep = trainable_report(tiny_model)
    per_layer = 4 * (32 + 32) + 4 * (32 + 16) + 4 * (32 + tiny_model.config.d_ff)  # q: 32->32, v: 32->16, up
    extra = (32 + 16 + tiny_model.config.d_ff) * 2 if method == "dora" else 0   # magnitudes
    assert rep["trainable"] == 2 * per_layer + extra
    assert rep["trainable_pct"] < 20
    x = ids(4, 12, seed=3)
    y = ids(4, 12, seed=4)
    opt = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(tiny_model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    state = tiny_model.state_dict()
    for k, v in base_state.items():  # base weights are untouched (now under .base_layer)
        k2 = k if k in state else k.replace(".weight", ".base_layer.weight")
        assert torch.equal(state[k2], v), k


def test_full_method_trains_everything(tiny_model):
    get_peft_model(tiny_model, AdapterConfig(method="full"))
    rep = trainable_report(tiny_model)
    assert rep["trainable"] == rep["total"] and rep["trainable_pct"] == 100.0
