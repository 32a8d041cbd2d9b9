"""Quantized weight storage: NF4 levels, round-trip error bounds, exact storage sizes, QuantizedLinear, QLoRA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.compress import (NF4, QuantizedLinear, dequantize_int8, dequantize_nf4, quantize_int8, quantize_model,
                              quantize_nf4)
from lmstack.errors import LmstackError

from lmstack.model import Transformer
from lmstack.model.presets import preset

def make_tiny(init_std: float = 0.2) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("llama-tiny", vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              max_seq_len=64, init_std=init_std)).eval()


MAX_HALF_GAP = (NF4[1:] - NF4[:-1]).max().item() / 2


def test_nf4_levels_are_normal_quantiles_with_exact_zero():
    assert NF4.numel() == 16 and torch.all(NF4[1:] > NF4[:-1])
    assert NF4[0] == -1 and NF4[-1] == 1 and (NF4 == 0).sum() == 1
    assert (NF4 > 0).sum() == 8 and (NF4 < 0).sum() == 7
    # the published table (Dettmers et al. 2023, appendix E) to 4 decimals
    assert NF4[1].item() == pytest.approx(-0.6962, abs=1e-4) and NF4[-2].item() == pytest.approx(0.7230, abs=1e-4)


def test_nf4_round_trip_is_within_half_a_level_per_block():
    w = torch.randn(96, 80)  # 7680 values: 120 blocks of 64
    state = quantize_nf4(w, double_quant=False)
    back = dequantize_nf4(state, w.shape)
    absmax = w.flatten().view(-1, 64).abs().amax(dim=1)
    err = (back - w).flatten().view(-1, 64).abs()
    assert torch.all(err <= absmax[:, None] * MAX_HALF_GAP + 1e-6)
    # every block's largest value is a level (+-1 * absmax), so it comes back exactly
    idx = w.flatten().view(-1, 64).abs().argmax(dim=1)
    torch.testing.assert_close(back.flatten().view(-1, 64).gather(1, idx[:, None]),
                               w.flatten().view(-1, 64).gather(1, idx[:, None]))


def test_nf4_error_on_normal_weights_and_double_quant_cost():
    w = torch.randn(256, 256) * 0.02
    plain = (dequantize_nf4(quantize_nf4(w, False), w.shape) - w).pow(2).mean().sqrt() / w.std()
    dq = (dequantize_nf4(quantize_nf4(w, True), w.shape) - w).pow(2).mean().sqrt() / w.std()
    assert plain < 0.11  # about 0.1 of the weights' spread for 4 bits
    assert dq < plain * 1.02  # quantizing the constants costs almost nothing


def test_odd_sizes_and_zeros_survive():
    w = torch.randn(7, 13)
    w[0] = 0
    back = dequantize_nf4(quantize_nf4(w), w.shape)
    assert back.shape == w.shape and torch.all(back[0] == 0)
    assert torch.all(dequantize_nf4(quantize_nf4(torch.zeros(5, 5)), (5, 5)) == 0)


def test_int8_round_trip_is_within_half_a_step_per_row():
    w = torch.randn(40, 33)
    state = quantize_int8(w)
    scale = w.abs().amax(dim=1) / 127
    assert torch.all((dequantize_int8(state) - w).abs() <= scale[:, None] / 2 + 1e-7)


@pytest.mark.parametrize("kind,dq,expect", [
    ("nf4", True, 256 * 256 // 2 + 1024 + 4 * 4 + 4),   # codes + int8 absmax + 4 second-level scales + offset
    ("nf4", False, 256 * 256 // 2 + 1024 * 4),           # codes + fp32 absmax: 4.5 bits per weight
    ("int8", True, 256 * 256 + 256 * 4),                 # codes + one fp32 scale per row
])
def test_storage_bytes(kind, dq, expect):
    q = QuantizedLinear.from_linear(nn.Linear(256, 256), kind=kind, double_quant=dq)
    assert q.storage_bytes() == expect and q.fp32_bytes() == 256 * 256 * 4
    assert sum(b.numel() * b.element_size() for b in q.buffers()) == expect
    if kind == "nf4" and dq:
        assert 8 * q.storage_bytes() / q.n_quantized_params == pytest.approx(4.127, abs=1e-3)


def test_quantized_linear_forward_and_gradients():
    lin = nn.Linear(64, 48)
    q = QuantizedLinear.from_linear(lin, "nf4")
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, F.linear(x, q.dequantize(), lin.bias))
    assert (y - lin(x)).norm() < 0.15 * lin(x).norm()  # measured 0.097 (uniform init weights, 4 bits)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in q.parameters())  # the base stays frozen
    with pytest.raises(LmstackError, match="does not fit"):
        q.requantize(torch.zeros(3, 3))
    with pytest.raises(LmstackError, match="int8, nf4"):
        QuantizedLinear(torch.zeros(2, 2), None, kind="fp3")


@pytest.mark.parametrize("kind,max_err", [("nf4", 0.1), ("int8", 0.01)])
def test_quantize_model_reports_bytes_saved(kind, max_err):
    model = make_tiny(init_std=0.02)  # the usual init; measured logit error: nf4 3.6%, int8 0.2%
    x = torch.randint(0, 96, (2, 9))
    before = model(x)
    report = quantize_model(model, kind)
    assert report["layers"] == 2 * 7  # q k v o gate up down per block; lm_head is kept in full precision
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.blocks[0].mlp.down_proj, QuantizedLinear)
    saved = 0.85 if kind == "nf4" else 0.7
    assert report["bytes_saved"] == report["fp32_bytes"] - report["quantized_bytes"] > saved * report["fp32_bytes"]
    after = model(x)
    assert (after - before).norm() < max_err * before.norm()


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_qlora_trains_and_keeps_the_codes(quant):
    from lmstack.adapt import AdapterConfig, get_peft_model, trainable_report

    model = make_tiny()
    get_peft_model(model, AdapterConfig(method="qlora", quant=quant, r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    assert model.quant_report["layers"] == 14
    codes = {n: b.clone() for n, b in model.named_buffers() if "base_layer" in n or "codes" in n or "packed" in n}
    rep = trainable_report(model)
    assert 0 < rep["trainable_pct"] < 20
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 96, (4, 12), generator=g), torch.randint(0, 96, (4, 12), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers() if n in codes)
