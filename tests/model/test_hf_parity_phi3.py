"""Phi-3 against transformers' Phi3ForCausalLM, both directions (CPU fp32, 1e-4): the fused qkv_proj and
gate_up_proj split into our q/k/v and gate/up on load and fused again on export, with GQA and with Phi-3's
all-layer sliding window. Also greedy decoding through our engine, the paged engine's logits, and the clear
refusals: longrope ("su") scaling, partial rotary embeddings, a fused tensor of the wrong size, and a LoRA on a
module Phi-3 keeps fused (PEFT could not name it)."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmstack
from lmstack.adapt import AdapterConfig, get_peft_model, save_adapter
from lmstack.errors import LmstackError
from lmstack.model import Transformer, preset

from family_parity import (check_export_of_ours, check_greedy_matches_hf, check_load_and_export, check_paged_logits,
                           jitter)

T = pytest.importorskip("transformers")


def tiny_phi3(**kw):
    args = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return jitter(T.Phi3ForCausalLM(T.Phi3Config(**{**args, **kw})))


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 8}, {"num_key_value_heads": 4, "tie_word_embeddings": True}])
def test_phi3_loads_and_exports_back(kw, tmp_path):
    x = torch.randint(0, 128, (2, 40))
    ours = check_load_and_export(tiny_phi3(**kw), tmp_path, x)
    assert ours.config.hf_model_type == "phi3" and ours.config.sliding_window == kw.get("sliding_window", 0)
    names = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert tuple(names["model.layers.0.self_attn.qkv_proj.weight"].shape) == (64 + 2 * 16 * ours.config.n_kv_heads, 64)
    assert tuple(names["model.layers.1.mlp.gate_up_proj.weight"].shape) == (2 * 96, 64)
    assert not any(k.endswith(("q_proj.weight", "gate_proj.weight")) for k in names)


def test_phi3_split_puts_the_rows_where_they_belong(tmp_path):
    hf = tiny_phi3()
    hf.save_pretrained(tmp_path)
    ours = lmstack.load_model(tmp_path)
    qkv = hf.model.layers[0].self_attn.qkv_proj.weight
    gate_up = hf.model.layers[0].mlp.gate_up_proj.weight
    block = ours.blocks[0]
    assert torch.equal(block.attn.q_proj.weight, qkv[:64]) and torch.equal(block.attn.k_proj.weight, qkv[64:96])
    assert torch.equal(block.attn.v_proj.weight, qkv[96:])
    assert torch.equal(block.mlp.gate_proj.weight, gate_up[:96]) and torch.equal(block.mlp.up_proj.weight, gate_up[96:])


def test_phi3_greedy_and_paged_logits_equal_transformers(tmp_path):
    hf = tiny_phi3(sliding_window=8)
    hf.save_pretrained(tmp_path)
    ours = lmstack.load_model(tmp_path)
    prompt = torch.randint(3, 128, (14,), generator=torch.Generator().manual_seed(4)).tolist()
    ids = prompt + check_greedy_matches_hf(hf, ours, prompt, n=16)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    check_paged_logits(ours, ids, ref)


def test_phi3_preset_exports_to_transformers(tmp_path):
    cfg = preset("phi3-tiny")
    torch.manual_seed(0)
    model = jitter(Transformer(cfg))
    check_export_of_ours(model, tmp_path, torch.randint(0, cfg.vocab_size, (2, 33)), T.Phi3ForCausalLM)


def _edit_config(path, **changes):
    data = json.loads((path / "config.json").read_text())
    data.update(changes)
    (path / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("rope", [
    {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
     "original_max_position_embeddings": 32},
    {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
])
def test_phi3_longrope_is_refused_by_name(rope, tmp_path):
    tiny_phi3().save_pretrained(tmp_path)
    _edit_config(tmp_path, rope_parameters=rope)
    kind = rope.get("rope_type") or rope["type"]
    with pytest.raises(LmstackError, match=f"phi3 config: rope_parameters.rope_type '{kind}'.*not supported"):
        lmstack.load_model(tmp_path)


def test_phi3_partial_rotary_is_refused_by_name(tmp_path):
    tiny_phi3().save_pretrained(tmp_path)
    _edit_config(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75})
    with pytest.raises(LmstackError, match="partial_rotary_factor 0.75.*not supported"):
        lmstack.load_model(tmp_path)


def test_phi3_fused_tensor_of_the_wrong_size_is_refused(tmp_path):
    tiny_phi3().save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.1.self_attn.qkv_proj.weight"
    weights[name] = torch.cat([weights[name], weights[name][:16]])  # one extra head's rows
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LmstackError, match="qkv_proj.weight' has 144 rows, but config.json's sizes give 128"):
        lmstack.load_model(tmp_path)


def test_phi3_lora_exports_to_peft_only_where_phi3_has_the_module(tmp_path):
    # PEFT names modules after the HF model: o_proj / down_proj exist in Phi-3, q_proj / gate_proj do not (fused).
    peft = pytest.importorskip("peft")
    hf = tiny_phi3()
    hf.save_pretrained(tmp_path / "hf")
    ours = lmstack.load_model(tmp_path / "hf")
    get_peft_model(ours, AdapterConfig(r=4, alpha=8.0, target_modules=["o_proj", "down_proj"]))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora" in name:
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        mine = ours(x)
        assert (mine - hf(x).logits).abs().max() > 1e-3  # the adapter matters
    out = save_adapter(ours, tmp_path / "adapter", base_model_dir=str(tmp_path / "hf"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(T.Phi3ForCausalLM.from_pretrained(tmp_path / "hf"), out).eval()
    with torch.no_grad():
        assert (theirs(x).logits - mine).abs().max() < 1e-4
    fused = lmstack.load_model(tmp_path / "hf")
    get_peft_model(fused, AdapterConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(LmstackError, match="phi3 stores q, k and v fused in qkv_proj"):
        save_adapter(fused, tmp_path / "fused")
