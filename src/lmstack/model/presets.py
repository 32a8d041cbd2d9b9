"""Model family presets: llama, mistral, mixtral, qwen2, gemma2, phi3, gpt2 and a bert-style encoder, in
tiny/small/base.

A preset is a dict of ModelConfig fields; families differ only in those fields, never in code.
`base` sizes are ~100M+ parameter models (llama-base is the ~130M config the benchmarks use);
`small` trains on a laptop in minutes; `tiny` is for tests.

Usage:
    from lmstack.model.presets import preset, PRESETS
    cfg = preset("llama-small")
    cfg = preset("mistral-tiny", sliding_window=8)   # overrides win
"""
from __future__ import annotations

from typing import Any

from lmstack.config import ConfigError
from lmstack.model.config import ModelConfig

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
    "small": dict(vocab_size=8192, d_model=256, n_layers=6, n_heads=8, max_seq_len=512),
    "base": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, max_seq_len=2048),
}

# Family fields, as the public checkpoints of each family set them. kv_ratio sets n_kv_heads = n_heads // kv_ratio.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(norm="rmsnorm", norm_eps=1e-5, position="rope", rope_theta=10000.0, mlp="swiglu",
                  kv_ratio=4, hf_model_type="llama"),
    "mistral": dict(norm="rmsnorm", norm_eps=1e-5, position="rope", rope_theta=10000.0, mlp="swiglu",
                    kv_ratio=4, window_frac=0.5, hf_model_type="mistral"),
    "mixtral": dict(norm="rmsnorm", norm_eps=1e-5, position="rope", rope_theta=1e6, mlp="swiglu",
                    kv_ratio=4, n_experts=8, moe_top_k=2, router_aux_loss_coef=0.02, hf_model_type="mixtral"),
    "qwen2": dict(norm="rmsnorm", norm_eps=1e-6, position="rope", rope_theta=1e6, mlp="swiglu", qkv_bias=True,
                  tie_embeddings=True, kv_ratio=2, hf_model_type="qwen2"),
    # Gemma-2: sandwich norms with (1 + w) RMSNorm, sqrt(d) embeddings, tanh-GeGLU, soft-capped attention and
    # output logits, a sliding window on every other layer (0, 2, ...); SDPA cannot softcap, hence naive attention.
    "gemma2": dict(norm="rmsnorm", norm_eps=1e-6, norm_position="sandwich", norm_plus_one=True, scale_embeddings=True,
                   position="rope", rope_theta=10000.0, mlp="geglu_tanh", attn_logit_softcap=50.0,
                   final_logit_softcap=30.0, attn_backend="naive", tie_embeddings=True, kv_ratio=2, window_frac=0.5,
                   window_every=2, hf_model_type="gemma2"),
    # Phi-3 (mini): a llama block with MHA and untied embeddings; its fused qkv/gate_up exist only in HF's files.
    "phi3": dict(norm="rmsnorm", norm_eps=1e-5, position="rope", rope_theta=10000.0, mlp="swiglu", kv_ratio=1,
                 hf_model_type="phi3"),
    "gpt2": dict(norm="layernorm", norm_eps=1e-5, position="learned", mlp="gelu_tanh", qkv_bias=True,
                 out_bias=True, mlp_bias=True, tie_embeddings=True, kv_ratio=1, hf_model_type="gpt2"),
    "bert": dict(norm="layernorm", norm_eps=1e-12, norm_position="post", position="learned", mlp="gelu",
                 qkv_bias=True, out_bias=True, mlp_bias=True, causal=False, embedding_norm=True,
                 type_vocab_size=2, head="none", tie_embeddings=True, kv_ratio=1, hf_model_type="bert"),
}

PRESETS = [f"{family}-{size}" for family in FAMILIES for size in SIZES]


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of preset `name` ("<family>-<size>"), with `overrides` applied."""
    family, _, size = name.partition("-")
    if family not in FAMILIES or size not in SIZES:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = {**SIZES[size], **FAMILIES[family]}
    kv_ratio = fields.pop("kv_ratio")
    window_frac = fields.pop("window_frac", 0)
    window_every = fields.pop("window_every", 0)
    fields["n_kv_heads"] = max(1, fields["n_heads"] // kv_ratio)
    if window_frac:
        fields["sliding_window"] = int(fields["max_seq_len"] * window_frac)
    if family == "mixtral" and size == "tiny":
        fields["n_experts"] = 4
    if family == "gpt2":
        fields["vocab_size"] = {"tiny": 512, "small": 8192, "base": 50257}[size]
        fields["max_seq_len"] = min(fields["max_seq_len"], 1024)
    if family == "bert":
        fields["max_seq_len"] = min(fields["max_seq_len"], 512)
    fields["name"] = name
    fields.update(overrides)
    if window_every and "sliding_window_layers" not in overrides:  # alternate over the final layer count
        fields["sliding_window_layers"] = list(range(0, fields["n_layers"], window_every))
    return ModelConfig(**fields)
