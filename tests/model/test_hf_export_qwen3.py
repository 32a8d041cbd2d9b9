"""Models with per-head q/k RMSNorm export as transformers' Qwen3, and every model config the README and
recipes use exports to a directory that transformers loads with the same logits (CPU fp32, 1e-4)."""
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

import lmstack
from lmstack.config import from_dict
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer, preset

T = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]


def _jitter(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every weight, norms included (their init is all ones, which would hide a skipped q/k norm)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _tiny_qwen3(**kw):
    cfg = T.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64, **kw)
    torch.manual_seed(0)
    return _jitter(T.Qwen3ForCausalLM(cfg))


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": True, "attention_bias": True}])
def test_hf_qwen3_loads_in_lmstack_and_exports_back(kw, tmp_path):
    hf = _tiny_qwen3(**kw)
    hf.save_pretrained(tmp_path / "hf")
    ours = lmstack.load_model(tmp_path / "hf")
    assert ours.config.qk_norm and ours.config.hf_model_type == "qwen3"
    x = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        ref, out = hf(x).logits, ours(x)
    assert (out - ref).abs().max() < 1e-4
    lmstack.save_model(ours, tmp_path / "ours")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is T.Qwen3ForCausalLM
    with torch.no_grad():
        assert (back(x).logits - ref).abs().max() < 1e-4


def test_llama_with_qk_norm_exports_as_qwen3(tmp_path):
    # The speedrun's block: llama (RMSNorm, RoPE, SwiGLU, GQA, tied embeddings) plus per-head q/k RMSNorm.
    cfg = ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, mlp="swiglu",
                      norm="rmsnorm", position="rope", qk_norm=True, tie_embeddings=True, hf_model_type="llama")
    torch.manual_seed(0)
    model = _jitter(Transformer(cfg))
    lmstack.save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen3"
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf) is T.Qwen3ForCausalLM
    x = torch.randint(0, 96, (2, 33))
    with torch.no_grad():
        ref = model(x)
        assert (hf(x).logits - ref).abs().max() < 1e-4
        # Without its q/k norms the same weights give other logits: the test would catch a dropped norm.
        no_norm = Transformer(cfg.replace(qk_norm=False))
        no_norm.load_state_dict({k: v for k, v in model.state_dict().items() if "_norm." not in k or "attn." not in k},
                                strict=False)
        assert (no_norm.eval()(x) - ref).abs().max() > 1e-3
    back = lmstack.load_model(tmp_path)
    assert back.config == model.config  # lmstack_config.json keeps hf_model_type="llama" and the rest
    with torch.no_grad():
        assert torch.equal(back(x), ref)


def test_qk_norm_under_a_family_without_it_is_refused(tmp_path):
    from lmstack.model.hf_convert import config_to_hf

    with pytest.raises(LmstackError, match="qwen2 config cannot express.*qk_norm=True"):
        config_to_hf(preset("qwen2-tiny", qk_norm=True))


def _recipe_models() -> dict[str, ModelConfig]:
    """The model config of every recipe that defines one, as the run builds it."""
    from lmstack.stages.speedrun import _default_pretrain

    out = {}
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if "pretrain" in data and "model" in data["pretrain"]:  # the speedrun: its recipe over its defaults
            out[path.name] = _default_pretrain().model.replace(**data["pretrain"]["model"])
        elif isinstance(data.get("model"), dict):
            out[path.name] = from_dict(ModelConfig, data["model"])
    return out


def _doc_presets() -> list[str]:
    from lmstack.model.presets import PRESETS

    text = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in (ROOT / "recipes").glob("*.yaml"))
    return sorted({p for p in PRESETS if re.search(rf"\b{re.escape(p)}\b", text)})


def test_every_readme_and_recipe_model_exports_to_transformers(tmp_path):
    models = {name: preset(name) for name in _doc_presets()} | _recipe_models()
    assert "speedrun.yaml" in models and "shakespeare_char.yaml" in models and len(models) >= 4
    for name, cfg in models.items():
        if cfg.d_model > 64:  # the export question is the architecture's, not the width's: keep the test fast
            heads = min(cfg.n_heads, 4)
            cfg = cfg.replace(d_model=64, n_heads=heads, n_kv_heads=max(1, heads * cfg.n_kv_heads // cfg.n_heads),
                              head_dim=0, d_ff=0, moe_d_ff=0, vocab_size=min(cfg.vocab_size, 512), n_layers=2)
        torch.manual_seed(0)
        model = _jitter(Transformer(cfg))
        out = tmp_path / name
        lmstack.save_model(model, out)
        mt = json.loads((out / "config.json").read_text())["model_type"]
        assert mt != "lmstack", f"{name} was written in lmstack's own layout"
        hf = T.AutoModelForCausalLM.from_pretrained(out).eval()
        x = torch.randint(0, cfg.vocab_size, (1, min(24, cfg.max_seq_len)))
        with torch.no_grad():
            assert (hf(x).logits - model(x)).abs().max() < 1e-4, name
            assert torch.equal(lmstack.load_model(out)(x), model(x)), name


def test_bias_free_gpt2_round_trip_checks_the_zero_biases(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = ModelConfig(vocab_size=65, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, norm="layernorm",
                      norm_bias=False, position="learned", mlp="gelu", tie_embeddings=True, hf_model_type="gpt2")
    lmstack.save_model(_jitter(Transformer(cfg)), tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert float(weights["transformer.h.0.ln_1.bias"].abs().max()) == 0.0
    weights["transformer.h.0.ln_1.bias"] += 0.5
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(LmstackError, match="ln_1.bias' is not zero"):
        lmstack.load_model(tmp_path)
