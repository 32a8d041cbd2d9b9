import pytest

from lmstack.model import PRESETS, Transformer, preset
from lmstack.model.counting import model_stats


@pytest.mark.parametrize("name", [p for p in PRESETS if not p.endswith("base")])
def test_parameter_counts_match_built_models(name):
    cfg = preset(name)
    assert model_stats(cfg).total_params == Transformer(cfg).num_parameters()


def test_kv_bytes_flops_and_memory():
    mha = model_stats(preset("llama-small", n_kv_heads=8))
    gqa = model_stats(preset("llama-small"))  # 8 heads, 2 kv heads
    mqa = model_stats(preset("llama-small", n_kv_heads=1))
    assert mha.kv_cache_bytes_per_token == 4 * gqa.kv_cache_bytes_per_token == 8 * mqa.kv_cache_bytes_per_token
    cfg = preset("llama-small")
    assert gqa.kv_cache_bytes_per_token == 2 * cfg.n_layers * 2 * cfg.head_dim * 4
    assert gqa.train_flops_per_token == 3 * gqa.forward_flops_per_token
    assert gqa.weight_bytes["fp32"] == 4 * gqa.weight_bytes["int8"] == 2 * gqa.weight_bytes["bf16"]
    short = model_stats(cfg, context=16)
    assert gqa.forward_flops_per_token - short.forward_flops_per_token == 4 * cfg.n_layers * (512 - 16) * cfg.d_model


def test_moe_active_fraction():
    cfg = preset("mixtral-small")
    s = model_stats(cfg)
    expert = 3 * cfg.d_model * cfg.moe_d_ff
    assert s.total_params - s.active_params == cfg.n_layers * (cfg.n_experts - cfg.moe_top_k) * expert
