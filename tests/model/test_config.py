import pytest

from lmstack.config import ConfigError, from_dict
from lmstack.model import PRESETS, ModelConfig, Transformer, preset


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(d_model=65, n_heads=4), "d_model"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(n_experts=4, moe_top_k=5), "moe_top_k"),
        (dict(position="rotary"), "position"),
        (dict(mlp="swish"), "mlp"),
        (dict(rope_scaling="yarn", position="alibi"), "rope_scaling"),
        (dict(sliding_window_layers=[5], n_layers=2), "sliding_window_layers"),
        (dict(attn_logit_softcap=30.0), "attn_logit_softcap"),
        (dict(attention="linformer"), "linformer"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_invalid_combinations_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_from_dict_refuses_unknown_keys_and_lists_allowed():
    with pytest.raises(ConfigError, match="unknown key 'd_modle'.*allowed keys:.*d_model"):
        ModelConfig.from_dict({"d_modle": 64})
    with pytest.raises(ConfigError, match="position='xyz' is not allowed; choose one of"):
        from_dict(ModelConfig, {"position": "xyz"})
    with pytest.raises(ConfigError, match="n_layers must be an integer"):
        from_dict(ModelConfig, {"n_layers": "two"})


def test_derived_sizes_are_resolved_and_round_trip():
    cfg = ModelConfig(d_model=96, n_heads=6, mlp="swiglu")
    assert cfg.n_kv_heads == 6 and cfg.head_dim == 16 and cfg.d_ff == 256  # 8/3*96 = 256
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig(d_model=96, n_heads=6, mlp="gelu").d_ff == 384


@pytest.mark.parametrize("name", [p for p in PRESETS if p.endswith("tiny")])
def test_tiny_presets_build(name):
    cfg = preset(name)
    assert cfg.name == name and Transformer(cfg).num_parameters() > 0


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="llama-tiny"):
        preset("llama-huge")


def test_family_presets_differ_only_in_fields():
    llama, qwen, gpt2, bert = (preset(f"{f}-tiny") for f in ("llama", "qwen2", "gpt2", "bert"))
    assert llama.n_kv_heads < llama.n_heads and qwen.qkv_bias and qwen.tie_embeddings
    assert gpt2.position == "learned" and gpt2.norm == "layernorm" and gpt2.mlp == "gelu_tanh"
    assert not bert.causal and bert.norm_position == "post" and bert.head == "none"
    assert preset("mistral-small").sliding_window == 256
    assert preset("mixtral-small").n_experts == 8
