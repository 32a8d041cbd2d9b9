"""Compacter: the PHM weight is the sum of Kronecker products, the trainable count matches the formula, a new
adapter is a no-op, the rules are shared across layers, and it trains (loss falls)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmstack.adapt import AdapterConfig, get_peft_model, trainable_report
from lmstack.adapt.compacter import PHMLinear, PHMRule, count_compacter_params
from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.model import Transformer
from lmstack.model.presets import preset

V = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(d_model: int = 32) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("llama-tiny", vocab_size=V, d_model=d_model, n_layers=2, n_heads=4, max_seq_len=64,
                              init_std=0.2)).eval()


def test_phm_weight_is_sum_of_kronecker_products():
    torch.manual_seed(0)
    rule = PHMRule(4)
    layer = PHMLinear(rule, in_features=8, out_features=12, rank=2)
    expected = sum(torch.kron(rule.weight[i], layer.s[i] @ layer.t[i]) for i in range(4))
    assert torch.allclose(layer.weight(), expected, atol=1e-6)
    x = torch.randn(3, 8)
    assert torch.allclose(layer(x), x @ expected.T + layer.bias, atol=1e-5)


@pytest.mark.parametrize("n,r,b", [(4, 1, 8), (2, 2, 16), (8, 1, 16)])
def test_parameter_count_matches_formula(n, r, b):
    model = get_peft_model(tiny(), AdapterConfig(method="compacter", bottleneck_dim=b, phm_dim=n, phm_rank=r))
    assert trainable_report(model)["trainable"] == count_compacter_params(32, b, 2, n, r)
    # and fewer than the Houlsby adapter of the same width: 2 * L * (2 * d * b + b + d)
    assert count_compacter_params(32, b, 2, n, r) < 2 * 2 * (2 * 32 * b + b + 32)


def test_noop_at_init_shared_rules_and_loss_falls():
    base = tiny()
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, V, (4, 13), generator=g)
    idx, tgt = seq[:, :-1], seq[:, 1:]
    ref = base(idx)
    model = get_peft_model(base, AdapterConfig(method="compacter", bottleneck_dim=8, phm_dim=4))
    assert torch.allclose(model(idx), ref, atol=1e-6)  # up's s_i start at zero
    layers = [m for m in model.modules() if isinstance(m, PHMLinear)]
    assert len(layers) == 2 * 2 * 2 and all(m._rule is model.compacter_rules["default"] for m in layers)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(idx).flatten(0, 1), tgt.flatten())
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.1, losses[::5]
    assert model.compacter_rules["default"].weight.grad is not None  # the shared rules learn too


def test_bad_phm_dim_is_a_clear_error():
    with pytest.raises(LmstackError, match="phm_dim=3 must divide"):
        get_peft_model(tiny(), AdapterConfig(method="compacter", bottleneck_dim=8, phm_dim=3))
    with pytest.raises(ConfigError, match="phm_rank"):
        AdapterConfig(method="compacter", phm_rank=0)
