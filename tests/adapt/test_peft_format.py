"""PEFT files both ways against the real `peft` library, base-model checks, and serving an adapter."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from lmstack.adapt import (AdapterConfig, add_weighted_adapter, get_peft_model, apply_adapter, load_serving_adapter,
                           merge_and_unload, save_adapter, set_adapter)
from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model

from _lora_tiny import X, make_tiny, train_like

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_base(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def peft_from(path, adapter_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about our extra "lmstack" entry in adapter_config.json
        return peft.PeftModel.from_pretrained(hf_base(path), adapter_dir).eval()


@pytest.mark.parametrize("kw", [dict(method="lora", r=4, alpha=8.0), dict(method="dora", r=4, alpha=8.0),
                                dict(method="lora", r=3, alpha=5.0, use_rslora=True)])
def test_peft_loads_our_adapter(tiny_model, tiny_model_dir, tmp_path, kw):
    get_peft_model(tiny_model, AdapterConfig(target_modules=ALL, **kw))
    train_like(tiny_model)
    ours = tiny_model(X)
    out = save_adapter(tiny_model, tmp_path / "adapter", base_model_dir=str(tiny_model_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == (kw["method"] == "dora")
    assert config["lmstack"]["base_model"] == "adapt-test-tiny"
    assert config["lmstack"]["base_shapes"]["model.layers.0.self_attn.k_proj"] == [16, 32]
    with torch.no_grad():
        theirs = peft_from(tiny_model_dir, out)(X).logits
    assert (ours - hf_base(tiny_model_dir)(X).logits).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_peft_loads_a_weighted_adapter_with_per_module_ranks(tiny_model, tiny_model_dir, tmp_path):
    from lmstack.adapt import add_adapter
    get_peft_model(tiny_model, AdapterConfig(r=2, target_modules=["q_proj", "v_proj"]), "a")
    add_adapter(tiny_model, AdapterConfig(r=3, alpha=9.0, target_modules=["v_proj"]), "b")
    train_like(tiny_model)
    add_weighted_adapter(tiny_model, ["a", "b"], [0.5, 2.0], "mix")
    set_adapter(tiny_model, "mix")
    ours = tiny_model(X)
    out = save_adapter(tiny_model, tmp_path / "mix", adapter_name="mix")
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"]  # q_proj rank 2, v_proj rank 5
    with torch.no_grad():
        theirs = peft_from(tiny_model_dir, out)(X).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_we_load_an_adapter_saved_by_peft(tiny_model_dir, tmp_path, use_dora):
    hf = peft.get_peft_model(hf_base(tiny_model_dir), peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], use_dora=use_dora))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
            if "lora_magnitude" in name:
                p.mul_(1.1)
    hf.eval()
    with torch.no_grad():
        theirs = hf(X).logits
    hf.save_pretrained(tmp_path / "peft_adapter")
    model = load_model(tiny_model_dir).eval()
    apply_adapter(model, tmp_path / "peft_adapter")
    assert model.adapter_configs["default"].method == ("dora" if use_dora else "lora")
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference unless is_trainable
    with torch.no_grad():
        torch.testing.assert_close(model(X), theirs, atol=1e-4, rtol=0)
    # and back out again: our file of their adapter loads in peft with the same logits
    save_adapter(model, tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(peft_from(tiny_model_dir, tmp_path / "again")(X).logits, theirs, atol=1e-4, rtol=0)


def test_adapter_for_another_base_is_refused(tiny_model, tmp_path):
    get_peft_model(tiny_model, AdapterConfig(target_modules=["q_proj", "down_proj"]))
    save_adapter(tiny_model, tmp_path / "a")
    other = make_tiny(d_model=48)
    other.config.name = "wider-base"
    with pytest.raises(LmstackError, match="adapt-test-tiny") as err:
        apply_adapter(other, tmp_path / "a")
    assert "(out, in)" in str(err.value) and "wider-base" in str(err.value)
    with pytest.raises(LmstackError, match="adapt-test-tiny"):
        load_serving_adapter(other, tmp_path / "a")
    assert not hasattr(other, "adapter_configs") or not other.adapter_configs  # nothing half-added
    shallow = make_tiny(n_layers=1)
    save_adapter(get_peft_model(make_tiny(), AdapterConfig(target_modules=[r"blocks\.1\.attn\.q_proj"])), tmp_path / "b")
    with pytest.raises(LmstackError, match="does not have"):
        apply_adapter(shallow, tmp_path / "b")


def test_bad_adapter_directories(tiny_model, tmp_path):
    with pytest.raises(LmstackError, match="adapter_config.json is missing"):
        apply_adapter(tiny_model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(LmstackError, match="only LORA"):
        apply_adapter(tiny_model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(LmstackError, match="adapter_model.safetensors"):
        apply_adapter(tiny_model, tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LmstackError, match="not a readable safetensors"):
        apply_adapter(tiny_model, tmp_path)
    with pytest.raises(LmstackError, match="no LoRA/DoRA adapter"):
        save_adapter(tiny_model, tmp_path / "out")


def test_engine_serves_loaded_adapters_like_the_merged_models(tiny_model, tmp_path):
    """LoRA and DoRA adapters read from disk, mixed with the base model in one batch of the inference engine,
    give the same greedy tokens as each adapter merged into the weights."""
    from lmstack.infer import LLM, SamplingParams
    from lmstack.model.reference_decode import reference_decode

    merged = {}
    for method in ("lora", "dora"):
        trained = make_tiny()
        get_peft_model(trained, AdapterConfig(method=method, r=4, target_modules=ALL))
        train_like(trained, std=0.3, seed=len(method))
        save_adapter(trained, tmp_path / method)
        merged[method] = merge_and_unload(trained).eval()
    adapters = {m: load_serving_adapter(tiny_model, tmp_path / m) for m in merged}  # tiny_model: the same base, unadapted
    llm = LLM(tiny_model, block_size=4, num_blocks=128, lora_adapters=adapters)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[3, 14, 15, 92, 65], [2, 7, 18, 28], [3, 14, 15, 92, 65], [50, 51]]
    names = ["lora", "dora", None, "dora"]
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, lora=names)]
    for prompt, name, got in zip(prompts, names, outs):
        ref = tiny_model if name is None else merged[name]
        assert got == reference_decode(ref, torch.tensor([prompt]), 8)[0, len(prompt):].tolist(), name
    assert outs[0] != outs[2]  # the adapter changes what the model says
