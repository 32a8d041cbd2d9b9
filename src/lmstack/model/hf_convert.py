"""Conversion between HF checkpoints and lmstack: config fields and tensor names, one spec per family.

Supported model_type: llama, mistral, mixtral, qwen2, gpt2, bert, qwen3, gemma, gemma2, phi3. Names map by ordered
regex rules; the few tensors that do not map one-to-one have small handlers: GPT-2's fused c_attn (and its
Conv1D weights, stored transposed), Mixtral's per-expert w1/w2/w3, which we keep stacked, and Phi-3's fused
qkv_proj and gate_up_proj, split into our q/k/v and gate/up on load and concatenated again on export. A model
with fused projections (config.fused_projections, fused_projections.py) loads Phi-3's fused tensors as they are,
concatenates the other families' split ones, and is exported in each HF architecture's own layout.

Gemma (1) is the llama block with (1 + w) RMSNorm, sqrt(d_model)-scaled embeddings and tanh-GeGLU (transformers
reads its legacy hidden_act "gelu" as the tanh GELU, and so do we). Gemma-2 is the llama block with switches on:
four norms per block (norm_position="sandwich"), RMSNorm scaled by (1 + w) (norm_plus_one), embeddings times
sqrt(d_model) (scale_embeddings), GeGLU with the tanh GELU (mlp="geglu_tanh"), attention scaled by
query_pre_attn_scalar**-0.5, attention and final logit soft-capping, and sliding windows on the layers
layer_types marks "sliding_attention" (every other layer, starting with layer 0, when layer_types is absent). Its attention softcap needs the naive backend, which the loader picks.
Phi-3's longrope ("su") RoPE scaling and partial rotary embeddings are refused with a message naming the field.

Per-head q/k RMSNorm (qk_norm=True) is what Qwen3 adds to the llama block: RMSNorm over head_dim on the
queries and keys, before RoPE, with the block's eps. So a llama-type config with qk_norm exports as
model_type "qwen3" (`export_type`); nothing else about the block differs, and the parity tests
(tests/model/test_hf_export_qwen3.py) hold it to transformers' Qwen3ForCausalLM both ways.

A bias-free GPT-2 (nanoGPT's bias=False, recipes/shakespeare_char.yaml) exports as gpt2 with every bias
tensor written as zeros: LayerNorm/Linear with a zero bias computes exactly what the bias-free layer does.
Loading such a directory back under our bias-free config checks that those tensors still are zero.

Usage:
    cfg = config_from_hf(json.load(open("config.json")))
    hf_cfg = config_to_hf(cfg)
    ours = weights_from_hf(cfg, reader)        # reader: name -> tensor, with .keys()
    theirs = weights_to_hf(cfg, model.state_dict())
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import torch

from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.fused_projections import fused_key_parts, part_rows, split_fused_state
from lmstack.model.load_guard import SHAPE_LIMITS, check_int_fields

SUPPORTED = ("llama", "mistral", "mixtral", "qwen2", "gpt2", "bert", "qwen3", "gemma", "gemma2", "phi3")
EXPORTABLE = ("llama", "mistral", "mixtral", "qwen2", "gpt2", "bert", "qwen3", "gemma", "gemma2", "phi3")
REAL_VOCAB_KEY = "lmstack_real_vocab_size"  # ModelConfig.real_vocab_size in an HF config.json (see vocab.py)
LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertModel",
                 "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "phi3": "Phi3ForCausalLM"}

# ---------------------------------------------------------------- configs
_ACT_TO_GATED = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh"}
_ACT_TO_PLAIN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
                 "gelu_fast": "gelu_tanh"}


def _unsupported(model_type: str, what: str) -> LmstackError:
    return LmstackError(f"{model_type} config: {what} is not supported by lmstack")


def _rope_fields(hf: dict, model_type: str) -> dict[str, Any]:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    src = params if params.get("rope_type", "default") != "default" else scaling
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind not in ("linear", "yarn", "llama3"):
        raise _unsupported(model_type, f"rope scaling type {kind!r} (supported: linear, yarn, llama3)")
    out.update(rope_scaling=kind, rope_factor=float(src["factor"]))
    if "original_max_position_embeddings" in src:
        out["rope_original_max_seq_len"] = int(src["original_max_position_embeddings"])
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(src["low_freq_factor"]), rope_high_freq_factor=float(src["high_freq_factor"]))
    if kind == "yarn":
        if src.get("attention_factor") or src.get("mscale") or src.get("truncate") is False:
            raise _unsupported(model_type, "yarn with attention_factor/mscale/truncate overrides")
        out.update(rope_yarn_beta_fast=float(src.get("beta_fast") or 32), rope_yarn_beta_slow=float(src.get("beta_slow") or 1))
    return out


# Config keys that hold shapes, per family, and the lmstack field each becomes: checked against
# load_guard.SHAPE_LIMITS before anything is built, and used to name the user's field in errors.
_LLAMA_SHAPES = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
                 "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim",
                 "intermediate_size": "d_ff", "max_position_embeddings": "max_seq_len",
                 "num_local_experts": "n_experts", "num_experts_per_tok": "moe_top_k",
                 "sliding_window": "sliding_window"}
HF_SHAPE_FIELDS = {**{mt: _LLAMA_SHAPES for mt in LLAMA_LIKE},
                   "gpt2": {"vocab_size": "vocab_size", "n_embd": "d_model", "n_layer": "n_layers", "n_head": "n_heads",
                            "n_inner": "d_ff", "n_positions": "max_seq_len"},
                   "bert": {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
                            "num_attention_heads": "n_heads", "intermediate_size": "d_ff",
                            "max_position_embeddings": "max_seq_len", "type_vocab_size": "type_vocab_size"}}


def hf_field_names(model_type: str) -> dict[str, str]:
    """lmstack field -> the HF config key it comes from, for messages (empty for unknown families)."""
    return {ours: theirs for theirs, ours in HF_SHAPE_FIELDS.get(model_type, {}).items()}


def _check_hf_shapes(hf: dict[str, Any], mt: str, source: str) -> None:
    fields = HF_SHAPE_FIELDS[mt]
    check_int_fields(hf, {theirs: SHAPE_LIMITS[ours] for theirs, ours in fields.items()}, source)
    types = hf.get("layer_types")
    if types is not None and (not isinstance(types, list) or len(types) > SHAPE_LIMITS["n_layers"]):
        raise LmstackError(f"{source}: layer_types must be a list of at most {SHAPE_LIMITS['n_layers']} entries")


def _first_id(value):
    return value[0] if isinstance(value, list) and value else value


def config_from_hf(hf: dict[str, Any], architectures: Iterable[str] | None = None,
                   source: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF config.json dict; shapes are bounded (load_guard.SHAPE_LIMITS) before use."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise LmstackError(f"unsupported model_type {mt!r:.100}; lmstack loads: {', '.join(SUPPORTED)}")
    _check_hf_shapes(hf, mt, source)
    ids = dict(bos_token_id=_first_id(hf.get("bos_token_id")), eos_token_id=_first_id(hf.get("eos_token_id")),
               pad_token_id=_first_id(hf.get("pad_token_id")), hf_model_type=mt, name=hf.get("_name_or_path", ""),
               real_vocab_size=hf.get(REAL_VOCAB_KEY))
    if mt in LLAMA_LIKE:
        act = hf.get("hidden_act", "silu")
        if mt in ("gemma", "gemma2"):  # Gemma names it hidden_activation; Gemma 1's legacy "gelu" means tanh
            act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
            act = "gelu_pytorch_tanh" if mt == "gemma" and act == "gelu" else act
        if act not in _ACT_TO_GATED:
            raise _unsupported(mt, f"hidden_act {act!r}")
        if mt == "phi3":
            _check_phi3_rope(hf)
        bias = bool(hf.get("attention_bias", False))
        fields = dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                      n_heads=hf["num_attention_heads"],
                      n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                      head_dim=hf.get("head_dim") or (256 if mt in ("gemma", "gemma2") else 0),
                      d_ff=hf["intermediate_size"],
                      max_seq_len=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
                      norm_eps=hf.get("rms_norm_eps", 1e-6), position="rope", mlp=_ACT_TO_GATED[act],
                      qkv_bias=bias or mt == "qwen2", out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)),
                      qk_norm=mt == "qwen3",
                      tie_embeddings=bool(hf.get("tie_word_embeddings", mt in ("gemma", "gemma2"))),
                      **_rope_fields(hf, mt))
        window = hf.get("sliding_window") or 0
        if mt in ("qwen2", "qwen3"):
            types = hf.get("layer_types")
            if types and "sliding_attention" in types:
                fields.update(sliding_window=window,
                              sliding_window_layers=[i for i, t in enumerate(types) if t == "sliding_attention"])
            elif not types and hf.get("use_sliding_window") and window:
                start = hf.get("max_window_layers", 0)
                fields.update(sliding_window=window, sliding_window_layers=list(range(start, hf["num_hidden_layers"])))
        elif mt in ("mistral", "mixtral", "phi3"):
            fields["sliding_window"] = window
        elif mt == "gemma2":
            fields.update(_gemma2_fields(hf, fields))
        if mt == "gemma":
            fields.update(norm_plus_one=True, scale_embeddings=True, norm_eps=hf.get("rms_norm_eps", 1e-6))
        if mt == "mixtral":
            fields.update(n_experts=hf["num_local_experts"], moe_top_k=hf["num_experts_per_tok"],
                          router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
        return ModelConfig(**fields, **ids)
    if mt == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in _ACT_TO_PLAIN:
            raise _unsupported(mt, f"activation_function {act!r}")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise _unsupported(mt, "scale_attn_by_inverse_layer_idx / unscaled attention")
        d = hf["n_embd"]
        return ModelConfig(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
                           d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf.get("n_positions", 1024), norm="layernorm",
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned", mlp=_ACT_TO_PLAIN[act],
                           qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True, **ids)
    # bert
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise _unsupported(mt, f"position_embedding_type {hf['position_embedding_type']!r}")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACT_TO_PLAIN:
        raise _unsupported(mt, f"hidden_act {act!r}")
    mlm = any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in (architectures or hf.get("architectures") or []))
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                       n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
                       max_seq_len=hf.get("max_position_embeddings", 512), norm="layernorm",
                       norm_eps=hf.get("layer_norm_eps", 1e-12), norm_position="post", position="learned",
                       mlp=_ACT_TO_PLAIN[act], qkv_bias=True, out_bias=True, mlp_bias=True, causal=False,
                       embedding_norm=True, type_vocab_size=hf.get("type_vocab_size", 2),
                       head="mlm" if mlm else "none", tie_embeddings=True, **ids)


def _check_phi3_rope(hf: dict[str, Any]) -> None:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind != "default":  # transformers reads "su" and "yarn" as longrope for Phi-3
        raise _unsupported("phi3", f"rope_parameters.rope_type {kind!r} (longrope / su scaling; only default RoPE)")
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise _unsupported("phi3", f"partial_rotary_factor {factor!r} (RoPE on part of each head; only 1.0)")


def _gemma2_fields(hf: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """The Gemma-2 switches on top of the llama fields, with transformers' Gemma2Config defaults."""
    if hf.get("use_bidirectional_attention"):
        raise _unsupported("gemma2", "use_bidirectional_attention")
    n = fields["n_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    window = hf.get("sliding_window", 4096) or 0
    scalar = float(hf.get("query_pre_attn_scalar", 256))
    if not scalar > 0:  # transformers would scale scores by scalar**-0.5: inf or NaN
        raise LmstackError(f"gemma2 config: query_pre_attn_scalar must be positive, got {scalar}")
    attn_cap = float(hf.get("attn_logit_softcapping", 50.0) or 0.0)
    return dict(norm_position="sandwich", norm_plus_one=True, scale_embeddings=True,
                norm_eps=hf.get("rms_norm_eps", 1e-6), sliding_window=window,
                sliding_window_layers=[i for i, t in enumerate(types) if t == "sliding_attention"],
                query_pre_attn_scalar=0.0 if scalar == fields["head_dim"] else scalar,
                attn_logit_softcap=attn_cap, final_logit_softcap=float(hf.get("final_logit_softcapping", 30.0) or 0.0),
                # SDPA cannot cap attention logits; the naive backend computes what transformers' eager path does
                attn_backend="naive" if attn_cap else "sdpa")


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x  # Gemma2Config types query_pre_attn_scalar as int


def export_type(cfg: ModelConfig) -> str:
    """The HF model_type cfg is written as: its hf_model_type, except that a llama with per-head q/k RMSNorm is
    exactly a Qwen3 block, so it is written as qwen3 (a llama config.json has no field for the q/k norms)."""
    mt = cfg.hf_model_type
    return "qwen3" if mt == "llama" and cfg.qk_norm else mt


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """An HF config.json dict for cfg; LmstackError if cfg uses something its family cannot express."""
    mt = export_type(cfg)
    if mt not in EXPORTABLE:
        raise LmstackError(f"cannot export hf_model_type {mt!r}; exportable: {', '.join(EXPORTABLE)}")
    if cfg.memory != "none":
        raise LmstackError(f"memory={cfg.memory!r} has no Hugging Face architecture: transformers' {mt} would run "
                           "each input as one window without the memory, a different model; keep lmstack's layout")
    ids = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if mt in LLAMA_LIKE:
        act = {v: k for k, v in _ACT_TO_GATED.items() if k != "swish"}.get(cfg.mlp)
        rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
        if cfg.rope_scaling != "none":
            rope.update(rope_type=cfg.rope_scaling, factor=cfg.rope_factor,
                        original_max_position_embeddings=cfg.rope_original_max_seq_len)
            if cfg.rope_scaling == "llama3":
                rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
            if cfg.rope_scaling == "yarn":
                rope.update(beta_fast=cfg.rope_yarn_beta_fast, beta_slow=cfg.rope_yarn_beta_slow)
        out = dict(model_type=mt, architectures=[ARCHITECTURES[mt]], vocab_size=cfg.vocab_size,
                   hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
                   num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                   hidden_act=act, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                   tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope, rope_theta=cfg.rope_theta,
                   attention_dropout=0.0, dtype="float32", **ids)
        if mt in ("llama", "qwen3", "gemma"):
            out.update(attention_bias=cfg.qkv_bias)
        if mt == "llama":
            out["mlp_bias"] = cfg.mlp_bias
        if mt in ("mistral", "mixtral", "phi3"):
            out["sliding_window"] = cfg.sliding_window or None
        if mt == "gemma2":
            sliding = [cfg.window_for_layer(i) > 0 for i in range(cfg.n_layers)]
            out.pop("hidden_act")
            # a window no shorter than the context changes nothing: written when no layer slides, since
            # transformers builds a sliding mask for gemma2 whatever layer_types says
            out.update(hidden_activation=act, attention_bias=cfg.qkv_bias,
                       query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
                       attn_logit_softcapping=cfg.attn_logit_softcap or None,
                       final_logit_softcapping=cfg.final_logit_softcap or None,
                       sliding_window=cfg.sliding_window or cfg.max_seq_len,
                       layer_types=["sliding_attention" if s else "full_attention" for s in sliding])
        if mt in ("qwen2", "qwen3"):
            layers = cfg.sliding_window_layers if cfg.sliding_window_layers is not None else list(range(cfg.n_layers))
            sliding = bool(cfg.sliding_window)
            out.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window or None,
                       max_window_layers=min(layers) if sliding and layers else cfg.n_layers,
                       layer_types=["sliding_attention" if sliding and i in layers else "full_attention"
                                    for i in range(cfg.n_layers)])
        if mt == "mixtral":
            out.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.moe_top_k,
                       router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=False)
    elif mt == "gpt2":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}.get(cfg.mlp)
        out = dict(model_type=mt, architectures=[ARCHITECTURES[mt]], vocab_size=cfg.vocab_size, n_embd=cfg.d_model,
                   n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff, n_positions=cfg.max_seq_len,
                   activation_function=act, layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=True,
                   attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, dtype="float32", **ids)
    else:
        act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}.get(cfg.mlp)
        out = dict(model_type=mt, architectures=["BertForMaskedLM" if cfg.head == "mlm" else "BertModel"],
                   vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                   num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff, hidden_act=act,
                   max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
                   layer_norm_eps=cfg.norm_eps, position_embedding_type="absolute", tie_word_embeddings=True,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dtype="float32", **ids)
    if act is None:
        raise LmstackError(f"mlp={cfg.mlp!r} cannot be expressed as a {mt} config")
    if cfg.real_vocab_size is not None:
        # HF configs have no "real rows" field: keep it under our own key (transformers keeps unknown keys as
        # attributes); save_model also lists the padded ids as generation_config.json's suppress_tokens.
        out[REAL_VOCAB_KEY] = cfg.real_vocab_size
    # Round trip: anything HF cannot express would silently change the model, so refuse instead.
    back = config_from_hf(out)
    # Missing GPT-2 biases are written as zeros (_gpt2_zero_biases), which HF's always-biased layers express.
    zero_bias = {"norm_bias", "qkv_bias", "out_bias", "mlp_bias"} if mt == "gpt2" else set()
    zero_bias = {k for k in zero_bias if not getattr(cfg, k)}
    skip = zero_bias | {"name", "hf_model_type", "dropout", "init", "init_std", "n_sink_tokens", "attn_backend", "attn_block_size", "fused_kernels",
            "fused_projections",
            "router_z_loss_coef", "router_aux_loss_coef", "mod_aux_loss_coef", "sliding_window",
            "sliding_window_layers"}
    diffs = [k for k in ModelConfig.__dataclass_fields__ if k not in skip and getattr(back, k) != getattr(cfg, k)]
    windows = [cfg.window_for_layer(i) for i in range(cfg.n_layers)]
    if [back.window_for_layer(i) for i in range(cfg.n_layers)] != windows:
        diffs.append("sliding_window")
    if diffs:
        raise LmstackError(f"a {mt} config cannot express these lmstack settings: "
                           + ", ".join(f"{k}={getattr(cfg, k)!r}" for k in diffs))
    return out


# ---------------------------------------------------------------- tensor names
Rule = tuple[str, str, bool]  # (our regex, hf replacement, transpose)

_LLAMA_RULES: list[Rule] = [
    (r"^tok_emb\.", "model.embed_tokens.", False),
    (r"^final_norm\.", "model.norm.", False),
    (r"^lm_head\.", "lm_head.", False),
    (r"^blocks\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm.", False),
    (r"^blocks\.(\d+)\.mlp_norm\.", r"model.layers.\1.post_attention_layernorm.", False),
    (r"^blocks\.(\d+)\.attn\.", r"model.layers.\1.self_attn.", False),
    (r"^blocks\.(\d+)\.mlp\.router\.", r"model.layers.\1.block_sparse_moe.gate.", False),
    (r"^blocks\.(\d+)\.mlp\.", r"model.layers.\1.mlp.", False),
]
# Gemma-2 names its four norms by place; first match wins, so these go before the llama rules.
_GEMMA2_RULES: list[Rule] = [
    (r"^blocks\.(\d+)\.attn_post_norm\.", r"model.layers.\1.post_attention_layernorm.", False),
    (r"^blocks\.(\d+)\.mlp_norm\.", r"model.layers.\1.pre_feedforward_layernorm.", False),
    (r"^blocks\.(\d+)\.mlp_post_norm\.", r"model.layers.\1.post_feedforward_layernorm.", False),
] + _LLAMA_RULES
_GPT2_RULES: list[Rule] = [
    (r"^tok_emb\.", "transformer.wte.", False),
    (r"^pos_emb\.", "transformer.wpe.", False),
    (r"^final_norm\.", "transformer.ln_f.", False),
    (r"^blocks\.(\d+)\.attn_norm\.", r"transformer.h.\1.ln_1.", False),
    (r"^blocks\.(\d+)\.mlp_norm\.", r"transformer.h.\1.ln_2.", False),
    (r"^blocks\.(\d+)\.attn\.o_proj\.weight", r"transformer.h.\1.attn.c_proj.weight", True),
    (r"^blocks\.(\d+)\.attn\.o_proj\.bias", r"transformer.h.\1.attn.c_proj.bias", False),
    (r"^blocks\.(\d+)\.mlp\.up_proj\.weight", r"transformer.h.\1.mlp.c_fc.weight", True),
    (r"^blocks\.(\d+)\.mlp\.up_proj\.bias", r"transformer.h.\1.mlp.c_fc.bias", False),
    (r"^blocks\.(\d+)\.mlp\.down_proj\.weight", r"transformer.h.\1.mlp.c_proj.weight", True),
    (r"^blocks\.(\d+)\.mlp\.down_proj\.bias", r"transformer.h.\1.mlp.c_proj.bias", False),
]
_BERT_RULES: list[Rule] = [
    (r"^tok_emb\.", "embeddings.word_embeddings.", False),
    (r"^pos_emb\.", "embeddings.position_embeddings.", False),
    (r"^type_emb\.", "embeddings.token_type_embeddings.", False),
    (r"^emb_norm\.", "embeddings.LayerNorm.", False),
    (r"^blocks\.(\d+)\.attn\.q_proj\.", r"encoder.layer.\1.attention.self.query.", False),
    (r"^blocks\.(\d+)\.attn\.k_proj\.", r"encoder.layer.\1.attention.self.key.", False),
    (r"^blocks\.(\d+)\.attn\.v_proj\.", r"encoder.layer.\1.attention.self.value.", False),
    (r"^blocks\.(\d+)\.attn\.o_proj\.", r"encoder.layer.\1.attention.output.dense.", False),
    (r"^blocks\.(\d+)\.attn_norm\.", r"encoder.layer.\1.attention.output.LayerNorm.", False),
    (r"^blocks\.(\d+)\.mlp\.up_proj\.", r"encoder.layer.\1.intermediate.dense.", False),
    (r"^blocks\.(\d+)\.mlp\.down_proj\.", r"encoder.layer.\1.output.dense.", False),
    (r"^blocks\.(\d+)\.mlp_norm\.", r"encoder.layer.\1.output.LayerNorm.", False),
    (r"^mlm_dense\.", "cls.predictions.transform.dense.", False),
    (r"^mlm_norm\.", "cls.predictions.transform.LayerNorm.", False),
    (r"^mlm_bias$", "cls.predictions.bias", False),
]
# HF tensors that carry no weights we need (buffers, tied copies, BERT's pooler/NSP heads).
_IGNORED = {
    "gpt2": [r"\.attn\.(masked_)?bias$", r"^lm_head\.weight$"],
    "bert": [r"^pooler\.", r"position_ids$", r"^cls\.predictions\.decoder\.", r"^cls\.seq_relationship\."],
    "llama_like": [r"rotary_emb\.inv_freq$"],
}


def _rules(mt: str) -> list[Rule]:
    if mt == "gemma2":
        return _GEMMA2_RULES
    return _LLAMA_RULES if mt in LLAMA_LIKE else _GPT2_RULES if mt == "gpt2" else _BERT_RULES


def _rename(mt: str, our_key: str) -> tuple[str, bool] | None:
    for pattern, repl, transpose in _rules(mt):
        if re.match(pattern, our_key):
            return re.sub(pattern, repl, our_key), transpose
    return None


def ignored_hf_keys(cfg: ModelConfig) -> list[str]:
    mt = cfg.hf_model_type
    pats = list(_IGNORED.get("llama_like" if mt in LLAMA_LIKE else mt, []))
    if cfg.tie_embeddings:
        pats.append(r"^lm_head\.weight$")
    return pats


def weights_from_hf(cfg: ModelConfig, our_keys: Iterable[str], get: Callable[[str], torch.Tensor],
                    hf_keys: Iterable[str]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Tensors for each of our_keys fetched (lazily, via `get`) from HF names; returns (weights, used hf keys).

    Raises LmstackError naming the first HF tensor our config needs but the checkpoint lacks."""
    mt = cfg.hf_model_type
    hf_keys = set(hf_keys)
    prefix = "bert." if mt == "bert" and any(k.startswith("bert.") for k in hf_keys) else ""
    used: set[str] = set()

    def fetch(name: str) -> torch.Tensor:
        full = prefix + name if prefix and not name.startswith("cls.") else name
        if full not in hf_keys:
            raise LmstackError(f"the checkpoint lacks tensor {full!r}, which this {mt} config needs "
                               "(config.json does not fit the weights, or the file is incomplete)")
        used.add(full)
        return get(full)

    our_keys = list(our_keys)
    if cfg.fused_projections:  # our qkv_proj / gate_up_proj: Phi-3 stores them as they are, others split
        return _fused_weights_from_hf(cfg, our_keys, get, hf_keys)
    out: dict[str, torch.Tensor] = {}
    if mt == "gpt2":  # zero biases that our bias-free config has no parameter for: check they still are zero
        for name, shape in _gpt2_zero_biases(cfg).items():
            if name in hf_keys and bool(fetch(name).ne(0).any()):
                raise LmstackError(f"the checkpoint's {name!r} is not zero, but this bias-free gpt2 config (from "
                                   "lmstack_config.json) has no bias there; remove lmstack_config.json to load it "
                                   "with biases")
    for key in our_keys:
        m = re.match(r"^blocks\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)$", key)
        if mt == "gpt2" and m:  # fused c_attn: (D, 3D) Conv1D weight -> three (D, D) Linear weights
            i, which, kind = m.groups()
            fused = fetch(f"transformer.h.{i}.attn.c_attn.{kind}")
            part = fused.chunk(3, dim=-1)["qkv".index(which)]
            out[key] = part.t().contiguous() if kind == "weight" else part.contiguous()
            continue
        m = re.match(r"^blocks\.(\d+)\.(attn\.[qkv]_proj|mlp\.gate_proj|mlp\.up_proj)\.weight$", key)
        if mt == "phi3" and m:  # fused qkv_proj / gate_up_proj: our tensor is a row block of the fused one
            out[key] = _phi3_part(cfg, fetch, int(m.group(1)), m.group(2))
            continue
        m = re.match(r"^blocks\.(\d+)\.mlp\.(w_in|w_out)$", key)
        if mt == "mixtral" and m:
            out[key] = _mixtral_experts_from_hf(cfg, int(m.group(1)), m.group(2), fetch, hf_keys, prefix="")
            continue
        renamed = _rename(mt, key)
        if renamed is None:
            raise LmstackError(f"{mt} checkpoints have no tensor for lmstack parameter {key!r}")
        name, transpose = renamed
        t = fetch(name)
        out[key] = t.t().contiguous() if transpose else t
    return out, used


def _fused_weights_from_hf(cfg: ModelConfig, our_keys: list[str], get, hf_keys: set[str]):
    """weights_from_hf for a fused-projection config: each fused tensor is its HF parts concatenated, except
    Phi-3's, which the checkpoint already holds in our fused layout (checked for its exact row count)."""
    split_keys, fused = [], {}
    for key in our_keys:
        parts = fused_key_parts(key)
        m = re.match(r"^blocks\.(\d+)\.(attn\.qkv_proj|mlp\.gate_up_proj)\.weight$", key)
        if cfg.hf_model_type == "phi3" and m:
            fused[key] = None  # fetched whole below
        elif parts is None:
            split_keys.append(key)
        else:
            fused[key] = parts
            split_keys += parts
    out, used = weights_from_hf(cfg.replace(fused_projections=False), split_keys, get, hf_keys)
    for key, parts in fused.items():
        if parts is None:
            layer, module = re.match(r"^blocks\.(\d+)\.(attn\.qkv_proj|mlp\.gate_up_proj)\.weight$", key).groups()
            first = "attn.q_proj" if module == "attn.qkv_proj" else "mlp.gate_proj"
            name = f"model.layers.{layer}.{_phi3_rows(cfg, first)[0]}.weight"
            if name not in hf_keys:
                raise LmstackError(f"the checkpoint lacks tensor {name!r}, which this phi3 config needs")
            t = get(name)
            rows = sum(part_rows(cfg, module.split(".")[1]))
            if t.shape[0] != rows:
                raise LmstackError(f"the checkpoint's {name!r} has {t.shape[0]} rows, but config.json's sizes give "
                                   f"{rows}; config.json does not fit the weights")
            used.add(name)
            out[key] = t
        else:
            out[key] = torch.cat([out.pop(p) for p in parts])
    return {k: out[k] for k in our_keys}, used


def _phi3_rows(cfg: ModelConfig, part: str) -> tuple[str, int, int]:
    """(fused HF module, first row, rows) of our `part` (attn.q_proj, ..., mlp.up_proj) in Phi-3's fused weights."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"attn.q_proj": ("self_attn.qkv_proj", 0, q), "attn.k_proj": ("self_attn.qkv_proj", q, kv),
            "attn.v_proj": ("self_attn.qkv_proj", q + kv, kv), "mlp.gate_proj": ("mlp.gate_up_proj", 0, cfg.d_ff),
            "mlp.up_proj": ("mlp.gate_up_proj", cfg.d_ff, cfg.d_ff)}[part]


def _phi3_part(cfg: ModelConfig, fetch, layer: int, part: str) -> torch.Tensor:
    module, start, rows = _phi3_rows(cfg, part)
    name = f"model.layers.{layer}.{module}.weight"
    fused = fetch(name)
    last = _phi3_rows(cfg, "attn.v_proj" if module.endswith("qkv_proj") else "mlp.up_proj")
    if fused.shape[0] != last[1] + last[2]:  # a slice would hide extra rows; the fused size must be exact
        raise LmstackError(f"the checkpoint's {name!r} has {fused.shape[0]} rows, but config.json's sizes give "
                           f"{last[1] + last[2]}; config.json does not fit the weights")
    return fused[start:start + rows]


def _mixtral_experts_from_hf(cfg, layer, which, fetch, hf_keys, prefix) -> torch.Tensor:
    fused = f"model.layers.{layer}.mlp.experts.{'gate_up_proj' if which == 'w_in' else 'down_proj'}"
    if fused in hf_keys:  # transformers v5 in-memory layout, if a checkpoint was written that way
        return fetch(fused)
    base = f"model.layers.{layer}.block_sparse_moe.experts"
    if which == "w_in":
        return torch.stack([torch.cat((fetch(f"{base}.{e}.w1.weight"), fetch(f"{base}.{e}.w3.weight")))
                            for e in range(cfg.n_experts)])
    return torch.stack([fetch(f"{base}.{e}.w2.weight") for e in range(cfg.n_experts)])


def _gpt2_zero_biases(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF GPT-2 bias tensors that a bias-free config lacks -> their shapes (written as zeros on export)."""
    d, f = cfg.d_model, cfg.d_ff
    out: dict[str, tuple[int, ...]] = {}
    if not cfg.norm_bias:
        out["transformer.ln_f.bias"] = (d,)
    for i in range(cfg.n_layers):
        h = f"transformer.h.{i}"
        if not cfg.norm_bias:
            out[f"{h}.ln_1.bias"], out[f"{h}.ln_2.bias"] = (d,), (d,)
        if not cfg.qkv_bias:
            out[f"{h}.attn.c_attn.bias"] = (3 * d,)
        if not cfg.out_bias:
            out[f"{h}.attn.c_proj.bias"] = (d,)
        if not cfg.mlp_bias:
            out[f"{h}.mlp.c_fc.bias"], out[f"{h}.mlp.c_proj.bias"] = (f,), (d,)
    return out


def weights_to_hf(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-named tensors for our state dict (contiguous, ready for safetensors). A fused-projection state is
    written in the HF architecture's own layout: split for llama/qwen2/mistral..., fused again for phi3."""
    mt = cfg.hf_model_type
    state = split_fused_state(state, cfg)
    out: dict[str, torch.Tensor] = {}
    if mt == "gpt2":
        dtype = next(iter(state.values())).dtype if state else torch.float32
        out.update({name: torch.zeros(shape, dtype=dtype) for name, shape in _gpt2_zero_biases(cfg).items()})
    for key, t in state.items():
        m = re.match(r"^blocks\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)$", key)
        if mt == "gpt2" and m:
            i, which, kind = m.groups()
            if which != "q":
                continue  # written together with q
            parts = [state[f"blocks.{i}.attn.{p}_proj.{kind}"] for p in "qkv"]
            fused = torch.cat([p.t() for p in parts], dim=1) if kind == "weight" else torch.cat(parts)
            out[f"transformer.h.{i}.attn.c_attn.{kind}"] = fused.contiguous()
            continue
        m = re.match(r"^blocks\.(\d+)\.(attn\.[qkv]_proj|mlp\.gate_proj|mlp\.up_proj)\.weight$", key)
        if mt == "phi3" and m:
            i, part = m.groups()
            if part in ("attn.q_proj", "mlp.gate_proj"):  # the fused tensor is written once, with its first part
                parts = ("attn.q_proj", "attn.k_proj", "attn.v_proj") if part == "attn.q_proj" else \
                    ("mlp.gate_proj", "mlp.up_proj")
                module = _phi3_rows(cfg, part)[0]
                out[f"model.layers.{i}.{module}.weight"] = torch.cat(
                    [state[f"blocks.{i}.{p}.weight"] for p in parts]).contiguous()
            continue
        m = re.match(r"^blocks\.(\d+)\.mlp\.(w_in|w_out)$", key)
        if mt == "mixtral" and m:
            layer, which = m.groups()
            base = f"model.layers.{layer}.block_sparse_moe.experts"
            for e in range(cfg.n_experts):
                if which == "w_in":
                    gate, up = t[e].chunk(2, dim=0)
                    out[f"{base}.{e}.w1.weight"], out[f"{base}.{e}.w3.weight"] = gate.contiguous(), up.contiguous()
                else:
                    out[f"{base}.{e}.w2.weight"] = t[e].contiguous()
            continue
        renamed = _rename(mt, key)
        if renamed is None:
            raise LmstackError(f"lmstack parameter {key!r} has no {mt} counterpart")
        name, transpose = renamed
        out[name] = (t.t() if transpose else t).contiguous()
    return out
