"""Gemma-2 against transformers' Gemma2ForCausalLM, both directions (CPU fp32, 1e-4): soft-capped attention
and output logits, sliding windows on alternate layers, (1 + w) RMSNorm, sqrt(d) embeddings, four norms per
block, tanh-GeGLU, query_pre_attn_scalar and a head_dim that is not d_model / n_heads. Also greedy decoding
through our engine and the paged engine's logits."""
import json

import pytest
import torch

import lmstack
from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.model import Transformer, preset

from family_parity import (check_export_of_ours, check_greedy_matches_hf, check_load_and_export, check_paged_logits,
                           jitter)

T = pytest.importorskip("transformers")
WINDOW = 8


def tiny_gemma2(**kw):
    # 4 layers so windows alternate (0 and 2 slide); head_dim 24 != 64/4; scalar 20 != head_dim; caps small
    # enough that tanh bends the scores and logits of these jittered weights.
    args = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, max_position_embeddings=64, sliding_window=WINDOW,
                query_pre_attn_scalar=20, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    return jitter(T.Gemma2ForCausalLM(T.Gemma2Config(**{**args, **kw})))


def test_gemma2_loads_with_every_feature_and_exports_back(tmp_path):
    hf = tiny_gemma2()
    x = torch.randint(0, 128, (2, 40))  # 40 > the window of 8
    ours = check_load_and_export(hf, tmp_path, x)
    cfg = ours.config
    assert (cfg.norm_position, cfg.norm_plus_one, cfg.scale_embeddings, cfg.mlp) == ("sandwich", True, True, "geglu_tanh")
    assert [cfg.window_for_layer(i) for i in range(4)] == [WINDOW, 0, WINDOW, 0]
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.query_pre_attn_scalar, cfg.head_dim) == (5.0, 3.0, 20, 24)
    exported = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert exported["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert exported["query_pre_attn_scalar"] == 20 and exported["hidden_activation"] == "gelu_pytorch_tanh"


@pytest.mark.parametrize("change", [dict(attn_logit_softcap=0.0), dict(final_logit_softcap=0.0),
                                    dict(sliding_window=0), dict(norm_plus_one=False), dict(scale_embeddings=False),
                                    dict(query_pre_attn_scalar=0.0), dict(mlp="swiglu")])
def test_each_gemma2_switch_changes_the_logits(change, tmp_path):
    # The parity above would not notice a feature the test shapes never reach; each one must matter here.
    hf = tiny_gemma2()
    hf.save_pretrained(tmp_path)
    ours = lmstack.load_model(tmp_path)
    other = Transformer(ours.config.replace(**change)).eval()
    other.load_state_dict(ours.state_dict())
    x = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        assert (other(x) - ours(x)).abs().max().item() > 1e-3


def test_gemma2_greedy_and_paged_logits_equal_transformers(tmp_path):
    hf = tiny_gemma2()
    hf.save_pretrained(tmp_path)
    ours = lmstack.load_model(tmp_path)
    prompt = torch.randint(3, 128, (14,), generator=torch.Generator().manual_seed(3)).tolist()
    out = check_greedy_matches_hf(hf, ours, prompt, n=16)  # 30 tokens: several windows of 8
    ids = prompt + out
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    check_paged_logits(ours, ids, ref)


def test_gemma2_preset_exports_to_transformers(tmp_path):
    cfg = preset("gemma2-tiny", n_layers=4, sliding_window=WINDOW, attn_logit_softcap=5.0, final_logit_softcap=3.0)
    assert cfg.sliding_window_layers == [0, 2]
    torch.manual_seed(0)
    model = jitter(Transformer(cfg))
    check_export_of_ours(model, tmp_path, torch.randint(0, cfg.vocab_size, (2, 40)), T.Gemma2ForCausalLM)
    back = lmstack.load_model(tmp_path)
    x = torch.randint(0, cfg.vocab_size, (1, 24))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


@pytest.mark.parametrize("change, message", [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention is not supported"),
    ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar must be positive, got 0.0"),
])
def test_gemma2_configs_we_cannot_run_are_refused(change, message, tmp_path):
    hf = tiny_gemma2()
    hf.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, **change}))
    with pytest.raises(LmstackError, match=message):
        lmstack.load_model(tmp_path)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
def test_gemma1_loads_and_exports_back(act, tmp_path):
    # Gemma (1): the llama block with (1 + w) norms, sqrt(d) embeddings and tanh-GeGLU; transformers reads the
    # legacy hidden_act "gelu" of the first releases' config.json as the tanh GELU, and so must we.
    cfg = T.GemmaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=24, max_position_embeddings=64,
                        pad_token_id=0)
    torch.manual_seed(0)
    hf = jitter(T.GemmaForCausalLM(cfg))
    hf.save_pretrained(tmp_path / "hf")
    data = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**data, "hidden_act": act}))
    ours = lmstack.load_model(tmp_path / "hf")
    c = ours.config
    assert (c.norm_position, c.norm_plus_one, c.scale_embeddings, c.mlp, c.tie_embeddings) == \
        ("pre", True, True, "geglu_tanh", True)
    x = torch.randint(0, 128, (2, 33))
    check_export_of_ours(ours, tmp_path / "ours", x, T.GemmaForCausalLM)
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() < 1e-4


def test_gemma2_blockwise_backend_gives_the_same_logits(tmp_path):
    # Loading picks the naive backend (SDPA cannot softcap); the O(T)-memory blockwise one computes the same.
    hf = tiny_gemma2()
    hf.save_pretrained(tmp_path)
    ours = lmstack.load_model(tmp_path)
    tiled = Transformer(ours.config.replace(attn_backend="blockwise", attn_block_size=16)).eval()
    tiled.load_state_dict(ours.state_dict())
    x = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        assert (tiled(x) - hf(x).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("fields, message", [
    (dict(norm="layernorm", norm_plus_one=True), "norm_plus_one needs norm='rmsnorm'"),
    (dict(norm_plus_one=True, fused_kernels=True), "fused_kernels' RMSNorm has no"),
    (dict(norm_position="sandwich", parallel_residual=True), "'sandwich' and parallel_residual cannot be combined"),
    (dict(query_pre_attn_scalar=-1.0), "query_pre_attn_scalar must be"),
    (dict(norm_position="middle"), "norm_position"),
])
def test_gemma_switches_refuse_bad_combinations(fields, message):
    with pytest.raises(ConfigError, match=message):
        preset("llama-tiny", **fields)
