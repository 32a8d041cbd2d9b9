"""Merge, unmerge, safe merge and merge-and-unload: the logits agree in all four states."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lmstack.adapt import (AdapterConfig, add_adapter, get_peft_model, merge_adapter, merge_and_unload,
                           set_adapter, unmerge_adapter)
from lmstack.adapt.layers import AdapterLinear
from lmstack.adapt.lora import adapter_layers
from lmstack.compress import QuantizedLinear
from lmstack.errors import LmstackError

from _lora_tiny import X, make_tiny, train_like

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("method,overrides", [("lora", {}), ("dora", {}), ("lora", {"qkv_bias": True, "out_bias": True}),
                                              ("qlora", {})])
def test_logits_equal_in_four_states(method, overrides):
    model = make_tiny(**overrides)
    base = model(X)
    base_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    get_peft_model(model, AdapterConfig(method=method, r=4, target_modules=TARGETS))
    train_like(model)
    unmerged = model(X)
    assert (unmerged - base).abs().max() > 0.1  # the adapter really changes the model

    merge_adapter(model)
    assert all(layer.merged_adapters == ["default"] for layer in adapter_layers(model).values())
    torch.testing.assert_close(model(X), unmerged, atol=1e-5, rtol=0)

    unmerge_adapter(model)
    torch.testing.assert_close(model(X), unmerged, atol=1e-5, rtol=0)
    if method != "qlora":  # unmerging restores the base weights (re-quantizing them for qlora is lossy)
        for name, layer in adapter_layers(model).items():
            torch.testing.assert_close(layer.base_layer.weight, base_weights[name], atol=1e-6, rtol=0)

    merge_adapter(model)  # merge-and-unload works from the merged state as well as the unmerged one
    model = merge_and_unload(model)
    assert not adapter_layers(model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert isinstance(model.blocks[0].attn.q_proj, nn.Linear)
    torch.testing.assert_close(model(X), unmerged, atol=1e-5, rtol=0)


def test_several_active_adapters_merge_together(tiny_model):
    get_peft_model(tiny_model, AdapterConfig(r=2, target_modules=["q_proj", "v_proj"]))
    add_adapter(tiny_model, AdapterConfig(r=3, target_modules=["v_proj", "o_proj"], use_rslora=True), "second")
    assert tiny_model.blocks[0].attn.v_proj.active_adapters == ["default"]  # adding does not activate
    set_adapter(tiny_model, ["default", "second"])
    train_like(tiny_model, seed=3)
    both = tiny_model(X)
    merge_adapter(tiny_model)
    torch.testing.assert_close(tiny_model(X), both, atol=1e-5, rtol=0)
    unmerge_adapter(tiny_model)
    torch.testing.assert_close(tiny_model(X), both, atol=1e-5, rtol=0)
    merge_adapter(tiny_model, ["second"])  # merge only one of them
    assert tiny_model.blocks[0].attn.v_proj.merged_adapters == ["second"]
    torch.testing.assert_close(tiny_model(X), both, atol=1e-5, rtol=0)


def test_dora_does_not_stack_with_other_adapters(tiny_model):
    get_peft_model(tiny_model, AdapterConfig(r=2, target_modules=["v_proj"]))
    add_adapter(tiny_model, AdapterConfig(method="dora", r=2, target_modules=["v_proj"]), "d")
    set_adapter(tiny_model, ["default", "d"])
    with pytest.raises(LmstackError, match="DoRA"):
        tiny_model(X)
    set_adapter(tiny_model, "d")
    assert tiny_model(X).shape == (2, 11, 96)


def test_safe_merge_refuses_nan_and_changes_nothing(tiny_model):
    get_peft_model(tiny_model, AdapterConfig(target_modules=["q_proj", "v_proj"]))
    train_like(tiny_model)
    with torch.no_grad():
        tiny_model.blocks[1].attn.v_proj.lora_B["default"].weight[0, 0] = float("nan")
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(LmstackError, match="blocks.1.attn.v_proj"):
        merge_adapter(tiny_model, safe_merge=True)
    with pytest.raises(LmstackError, match="NaN"):
        merge_and_unload(tiny_model, safe_merge=True)
    after = tiny_model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) or (torch.isnan(v).any() and torch.equal(after[k].isnan(), v.isnan()))
               for k, v in state.items())
    assert all(not layer.merged_adapters for layer in adapter_layers(tiny_model).values())
    merge_adapter(tiny_model)  # without the check the NaN spreads into the base weight
    assert torch.isnan(tiny_model.blocks[1].attn.v_proj.base_layer.weight).any()


def test_merge_and_unload_without_merging_drops_adapters(tiny_model):
    base = tiny_model(X)
    get_peft_model(tiny_model, AdapterConfig(target_modules=["q_proj"]))
    train_like(tiny_model)
    model = merge_and_unload(tiny_model, merge=False)
    torch.testing.assert_close(model(X), base, atol=1e-6, rtol=0)
    assert model.adapter_configs == {}


def test_merge_errors(tiny_model):
    with pytest.raises(LmstackError, match="no LoRA-family adapter"):
        merge_adapter(tiny_model)
    get_peft_model(tiny_model, AdapterConfig(target_modules=["q_proj"]))
    with pytest.raises(LmstackError, match="nope"):
        merge_adapter(tiny_model, ["nope"])
    layer = tiny_model.blocks[0].attn.q_proj
    assert isinstance(layer, AdapterLinear)
    merge_adapter(tiny_model)
    with pytest.raises(LmstackError, match="unmerge"):
        layer.delete("default")
