"""Fused q/k/v and gate/up projections (config.fused_projections, Transformer.fuse_projections): the same
logits as the split layout, a save/load round trip, HF export in each architecture's own layout, and clear
refusals."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lmstack
from lmstack.adapt import AdapterConfig, get_peft_model
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.config import ConfigError
from lmstack.model.hf_convert import config_from_hf
from lmstack.model.fused_projections import FusedLinear, projections_fusable, unfuse_module

FAMILIES = {  # llama (GQA), qwen2 (q/k/v bias), phi3 (whose checkpoints are fused)
    "llama": dict(preset="llama-tiny", n_kv_heads=2),
    "qwen2": dict(preset="qwen2-tiny"),
    "phi3": dict(preset="phi3-tiny"),
}


def build(family: str, seed: int = 0, **overrides) -> Transformer:
    kw = dict(FAMILIES[family])
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset(kw.pop("preset"), **kw, **overrides)).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_logits_equal_split_logits_with_and_without_a_cache(family):
    split = build(family)
    assert family != "qwen2" or split.config.qkv_bias
    fused = copy.deepcopy(split).fuse_projections()
    assert fused.config.fused_projections and not split.config.fused_projections
    attn, mlp = fused.blocks[0].attn, fused.blocks[0].mlp
    assert isinstance(attn.qkv_proj, FusedLinear) and attn.q_proj is None and attn.k_proj is None
    assert isinstance(mlp.gate_up_proj, FusedLinear) and mlp.gate_proj is None and mlp.up_proj is None
    ids = torch.randint(0, split.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(fused(ids), split(ids))
        caches = split.new_cache(2, 16), fused.new_cache(2, 16)
        for chunk in (ids[:, :7], ids[:, 7:8], ids[:, 8:]):  # prefill, a decode step, a short window
            assert torch.equal(fused(chunk, cache=caches[1]), split(chunk, cache=caches[0]))


def test_a_config_with_fused_projections_builds_them_and_unfuse_restores_the_split_state():
    split = build("llama", seed=1)
    fused = copy.deepcopy(split).fuse_projections()
    rebuilt = Transformer(fused.config)
    assert rebuilt.state_dict().keys() == fused.state_dict().keys()
    assert "blocks.0.attn.qkv_proj.weight" in fused.state_dict()
    back = copy.deepcopy(fused).unfuse_projections()
    assert not back.config.fused_projections
    assert back.state_dict().keys() == split.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), split.state_dict().values()))
    # each unfused part owns its storage, so safetensors (which refuses shared tensors) can write it
    q, k = back.blocks[0].attn.q_proj.weight, back.blocks[0].attn.k_proj.weight
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_and_hf_export_equal_the_split_models(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    split = build(family, seed=2)
    fused = copy.deepcopy(split).fuse_projections()
    lmstack.save_model(split, tmp_path / "split")
    lmstack.save_model(fused, tmp_path / "fused")
    a, b = load_file(tmp_path / "split" / "model.safetensors"), load_file(tmp_path / "fused" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the HF architecture's layout
    fused_hf = "model.layers.0.self_attn.qkv_proj.weight" in a
    assert fused_hf == (family == "phi3")
    ids = torch.randint(0, split.config.vocab_size, (1, 9))
    with torch.no_grad():
        want = split(ids)
        loaded = lmstack.load_model(tmp_path / "fused")
        assert loaded.config.fused_projections and isinstance(loaded.blocks[1].attn.qkv_proj, FusedLinear)
        assert torch.equal(loaded(ids), want)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
        torch.testing.assert_close(hf(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_a_phi3_checkpoint_loads_into_fused_projections_as_stored(tmp_path):
    model = build("phi3", seed=3)
    lmstack.save_model(model, tmp_path)
    (tmp_path / "lmstack_config.json").unlink()  # a plain HF Phi-3 directory
    cfg = config_from_hf(json.loads((tmp_path / "config.json").read_text())).replace(fused_projections=True)
    (tmp_path / "lmstack_config.json").write_text(json.dumps(cfg.to_dict()))
    loaded = lmstack.load_model(tmp_path, lazy=False)
    stored = load_file(tmp_path / "model.safetensors")["model.layers.0.self_attn.qkv_proj.weight"]
    assert torch.equal(loaded.blocks[0].attn.qkv_proj.weight, stored)
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_fusing_refuses_what_it_would_break():
    model = build("llama", seed=4)
    model.blocks[0].attn.q_proj.register_forward_hook(lambda m, i, o: None)
    assert not projections_fusable(model)
    with pytest.raises(LmstackError, match="blocks.0.attn.q_proj: it has forward hooks"):
        copy.deepcopy(model).fuse_projections()
    other = build("llama", seed=4)

    class Quantized(nn.Linear):
        pass

    old = other.blocks[1].mlp.up_proj
    other.blocks[1].mlp.up_proj = Quantized(old.in_features, old.out_features, bias=False)
    assert not projections_fusable(other)
    with pytest.raises(LmstackError, match="blocks.1.mlp.up_proj: it is a Quantized, not a plain nn.Linear"):
        other.fuse_projections()
    assert projections_fusable(build("llama", seed=4))
    with pytest.raises(ConfigError, match="fused_projections needs a k_proj"):
        ModelConfig(attention="lsh", lsh_shared_qk=True, fused_projections=True, causal=False)
    with pytest.raises(LmstackError, match="cannot unfuse blocks.0.attn.qkv_proj: it is a NoneType"):
        unfuse_module(build("llama").blocks[0].attn, "qkv_proj", "blocks.0.attn.")


def test_a_plain_mlp_keeps_its_up_proj():
    torch.manual_seed(5)
    model = Transformer(ModelConfig.from_preset("llama-tiny", mlp="gelu")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        want = model(ids)
        model.fuse_projections()
        assert model.blocks[0].mlp.up_proj is not None and model.blocks[0].mlp.gate_up_proj is None
        assert isinstance(model.blocks[0].attn.qkv_proj, FusedLinear)
        assert torch.equal(model(ids), want)


def test_a_training_adapter_is_refused_on_a_fused_model_and_attaches_after_unfusing():
    model = build("llama", seed=6).fuse_projections()
    cfg = AdapterConfig(method="lora", r=2, target_modules=["q_proj", "v_proj"])
    with pytest.raises(LmstackError, match="fused projections .* call model.unfuse_projections\\(\\) first"):
        get_peft_model(model, cfg)
    get_peft_model(model.unfuse_projections(), cfg)
    assert any(p.requires_grad for p in model.blocks[0].attn.q_proj.parameters())
