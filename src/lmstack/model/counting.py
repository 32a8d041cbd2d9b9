"""Counting: parameters (total and active per token), FLOPs, KV-cache bytes and weight memory.

Everything is computed from the config alone, so `lmstack model info --preset mixtral-base` is
instant; tests check the parameter counts against a built model.

FLOPs follow Kaplan et al. (2020): a forward pass costs 2 FLOPs per active weight per token, plus
attention's 2 * 2 * n_layers * context * (n_heads * head_dim) for QK^T and AV. Training costs about
3x forward (the backward pass is twice the forward).

Usage:
    stats = model_stats(cfg)              # ModelStats dataclass
    kv_bytes_per_token(cfg, 2)            # KV-cache bytes per token in bf16
    print(format_stats(cfg, stats))      # the `lmstack model info` table
"""
from __future__ import annotations

from dataclasses import dataclass

from lmstack.model.config import ModelConfig


@dataclass
class ModelStats:
    total_params: int
    active_params: int
    """Parameters one token touches: for MoE only its top_k routed experts (plus shared experts)."""
    embedding_params: int
    forward_flops_per_token: float
    train_flops_per_token: float
    context: int
    kv_cache_bytes_per_token: int
    """K and V over all layers for one token, in the compute dtype (fp32 here unless given)."""
    weight_bytes: dict


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _norm(cfg: ModelConfig, dim: int) -> int:
    return dim * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)


def _mlp(cfg: ModelConfig, d_ff: int) -> int:
    n = 3 if cfg.gated else 2
    bias = d_ff * (2 if cfg.gated else 1) + cfg.d_model if cfg.mlp_bias else 0
    return n * cfg.d_model * d_ff + bias


def block_params(cfg: ModelConfig, layer: int) -> tuple[int, int]:
    """(total, active per token) parameters of one block."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = (_linear(d, cfg.n_heads * hd, cfg.qkv_bias) + 2 * _linear(d, cfg.n_kv_heads * hd, cfg.qkv_bias)
            + _linear(cfg.n_heads * hd, d, cfg.out_bias) + (2 * hd if cfg.qk_norm else 0))
    norms = (4 if cfg.norm_position == "sandwich" else 2) * _norm(cfg, d)
    norms += d if cfg.is_mod_layer(layer) else 0  # Mixture-of-Depths: the block's router, one score per token
    if not cfg.is_moe_layer(layer):
        mlp = _mlp(cfg, cfg.d_ff)
        return attn + norms + mlp, attn + norms + mlp
    expert = (3 if cfg.gated else 2) * d * cfg.moe_d_ff
    shared = _mlp(cfg, cfg.moe_d_ff * cfg.n_shared_experts) if cfg.n_shared_experts else 0
    router = d * cfg.n_experts
    total = attn + norms + router + shared + cfg.n_experts * expert
    active = attn + norms + router + shared + cfg.moe_top_k * expert
    return total, active


def kv_values_per_token(cfg: ModelConfig) -> int:
    """Numbers one token adds to the KV cache: a key and a value of head_dim per KV head, in every layer."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
    """The KV-cache bytes of one token: 2 x n_layers x n_kv_heads x head_dim x bytes per number. The one
    owner of this formula: `model info`, the engine's pool sizing and load_guard's memory check all call it."""
    return kv_values_per_token(cfg) * dtype_bytes


def memory_params(cfg: ModelConfig) -> int:
    """Parameters of a long-context memory (model/memory/): the kNN gate (one per query head), or the
    compressive memory's strided convolutions (one per layer: kernel = stride = cmem_rate, d -> d, with bias)."""
    if cfg.memory == "knn":
        return cfg.n_heads
    if cfg.memory == "compressive" and cfg.cmem_fn == "conv":
        return cfg.n_layers * (cfg.d_model * cfg.d_model * cfg.cmem_rate + cfg.d_model)
    return 0


def model_stats(cfg: ModelConfig, context: int | None = None, kv_dtype_bytes: int = 4) -> ModelStats:
    context = context or cfg.max_seq_len
    d, v = cfg.d_model, cfg.vocab_size
    emb = v * d + (cfg.max_seq_len * d if cfg.position == "learned" else 0) + cfg.type_vocab_size * d
    emb += _norm(cfg, d) if cfg.embedding_norm else 0
    unique = cfg.n_unique_layers or cfg.n_layers
    total = emb + sum(block_params(cfg, i)[0] for i in range(unique)) + memory_params(cfg)
    active_blocks = sum(block_params(cfg, i % unique)[1] for i in range(cfg.n_layers))
    head = 0
    if cfg.norm_position != "post":
        total += _norm(cfg, d)
    if cfg.head in ("lm", "mlm") and not cfg.tie_embeddings:
        head = v * d
        total += head
    if cfg.head == "mlm":
        total += _linear(d, d, True) + _norm(cfg, d) + v
    # Per token, the model applies every layer (shared blocks count once per use) and the output matmul.
    matmul_params = active_blocks + (v * d if cfg.head != "none" else 0)
    attn_flops = 2 * 2 * cfg.n_layers * context * cfg.n_heads * cfg.head_dim
    fwd = 2 * matmul_params + attn_flops
    active = emb + active_blocks + head + (_norm(cfg, d) if cfg.norm_position != "post" else 0)
    kv = kv_bytes_per_token(cfg, kv_dtype_bytes)
    weight_bytes = {"fp32": total * 4, "bf16": total * 2, "int8": total}
    return ModelStats(total, active, emb, float(fwd), float(3 * fwd), context, kv, weight_bytes)


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_stats(cfg: ModelConfig, stats: ModelStats) -> str:
    """The table `lmstack model info` prints: the config's shape, then stats (as model_stats made them for cfg),
    one row each, labels padded to one column. The KV rows are labelled fp32, so stats should come from
    model_stats' default kv_dtype_bytes=4."""
    rows = [
        ("model", cfg.name or cfg.hf_model_type or "custom"),
        ("layers / d_model / heads (kv)", f"{cfg.n_layers} / {cfg.d_model} / {cfg.n_heads} ({cfg.n_kv_heads})"),
        ("total parameters", f"{stats.total_params:,} ({_human(stats.total_params)})"),
        ("active parameters per token", f"{stats.active_params:,} ({_human(stats.active_params)})"
         + (f"  [{cfg.moe_top_k} of {cfg.n_experts} experts]" if cfg.n_experts else "")),
        ("embedding parameters", f"{stats.embedding_params:,}"),
        (f"forward FLOPs / token (context {stats.context})", _human(stats.forward_flops_per_token, "FLOP")),
        ("training FLOPs / token (3x forward)", _human(stats.train_flops_per_token, "FLOP")),
        ("KV cache / token (fp32)", f"{stats.kv_cache_bytes_per_token:,} B"
         + (f"  ({cfg.n_heads // cfg.n_kv_heads}x smaller than MHA)" if cfg.n_kv_heads < cfg.n_heads else "")),
        ("KV cache at full context (fp32)", _human(stats.kv_cache_bytes_per_token * stats.context, "B")),
        ("weights fp32 / bf16 / int8", " / ".join(_human(b, "B") for b in stats.weight_bytes.values())),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
