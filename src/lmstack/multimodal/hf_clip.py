"""HF CLIPModel <-> our CLIP: configs and tensor names both ways, so a transformers CLIP runs in lmstack and ours
runs in transformers with the same image embeddings, text embeddings and logits_per_image.

The towers map block for block: layer_norm1/2 -> attn_norm/mlp_norm, self_attn.{q,k,v,out}_proj ->
attn.{q,k,v,o}_proj, mlp.fc1/fc2 -> mlp.up_proj/down_proj, pre_layrnorm -> the ViT encoder's embedding norm,
post_layernorm -> ViT.post_norm, final_layer_norm -> the text tower's final norm. Our ViT encoder carries a one-row
token table it never reads (the Transformer always has one); it is zero on import and dropped on export.

Only the CLIP that HF builds from a config is convertible: a separate eos_token_id (not the legacy 2, where HF pools
at argmax(input_ids)), 3 channels, and an activation we have (quick_gelu, gelu, gelu_new/tanh, relu).

Usage:
    from lmstack.multimodal.hf_clip import clip_from_hf, clip_to_hf, weights_from_hf, weights_to_hf
    ours = clip_from_hf(transformers.CLIPModel.from_pretrained(path))
    theirs = clip_to_hf(ours)                  # a transformers.CLIPModel with our weights
"""
from __future__ import annotations

import re
from typing import Any

import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.clip import CLIP, CLIPConfig, TextConfig
from lmstack.multimodal.vit import VisionConfig

_ACT_FROM_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu"}
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}

# HF suffix inside one encoder layer -> ours inside one block
_LAYER = {"layer_norm1": "attn_norm", "layer_norm2": "mlp_norm", "self_attn.q_proj": "attn.q_proj",
          "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj", "self_attn.out_proj": "attn.o_proj",
          "mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj"}
_FIXED = {"logit_scale": "logit_scale", "visual_projection.weight": "visual_projection.weight",
          "text_projection.weight": "text_projection.weight",
          "vision_model.embeddings.class_embedding": "vision.cls_token",
          "vision_model.embeddings.patch_embedding.weight": "vision.patch_embed.weight",
          "vision_model.embeddings.position_embedding.weight": "vision.pos_emb",
          "text_model.embeddings.token_embedding.weight": "text.tok_emb.weight",
          "text_model.embeddings.position_embedding.weight": "text.pos_emb.weight"}
_NORMS = {"vision_model.pre_layrnorm": "vision.encoder.emb_norm", "vision_model.post_layernorm": "vision.post_norm",
          "text_model.final_layer_norm": "text.final_norm"}
_TOWERS = {"vision_model": "vision.encoder", "text_model": "text"}
_LAYER_RX = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
UNUSED = "vision.encoder.tok_emb.weight"


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def _act(name: str, where: str) -> str:
    if name not in _ACT_FROM_HF:
        raise LmstackError(f"{where}.hidden_act={name!r} has no lmstack equivalent; supported: {', '.join(_ACT_FROM_HF)}")
    return _ACT_FROM_HF[name]


def config_from_hf(hf: Any) -> CLIPConfig:
    """A transformers CLIPConfig (object or dict) -> our CLIPConfig; refuses what our CLIP cannot compute."""
    v, t = _get(hf, "vision_config"), _get(hf, "text_config")
    if v is None or t is None:
        raise LmstackError("not a CLIP config: it needs vision_config and text_config")
    if _get(v, "num_channels", 3) != 3:
        raise LmstackError(f"vision_config.num_channels={_get(v, 'num_channels')}: our ViT reads RGB (3 channels)")
    eos = _get(t, "eos_token_id")
    if eos == 2 or not isinstance(eos, int):
        raise LmstackError(f"text_config.eos_token_id={eos!r}: HF pools a legacy eos_token_id=2 config at "
                           "argmax(input_ids); we pool at the first EOS, so give the real EOS id")
    eps = _get(v, "layer_norm_eps", 1e-5)
    if _get(t, "layer_norm_eps", 1e-5) != eps:
        raise LmstackError("vision and text layer_norm_eps differ; convert only CLIPs with one epsilon")
    vision = VisionConfig(image_size=_get(v, "image_size"), patch_size=_get(v, "patch_size"),
                          d_model=_get(v, "hidden_size"), n_layers=_get(v, "num_hidden_layers"),
                          n_heads=_get(v, "num_attention_heads"), d_ff=_get(v, "intermediate_size"),
                          activation=_act(_get(v, "hidden_act"), "vision_config"), norm_eps=eps, pool="cls",
                          pre_norm=True, patch_bias=False)
    vocab = _get(t, "vocab_size")
    pad, bos = _get(t, "pad_token_id"), _get(t, "bos_token_id")
    text = TextConfig(vocab_size=vocab, d_model=_get(t, "hidden_size"), n_layers=_get(t, "num_hidden_layers"),
                      n_heads=_get(t, "num_attention_heads"), d_ff=_get(t, "intermediate_size"),
                      max_seq_len=_get(t, "max_position_embeddings"),
                      activation=_act(_get(t, "hidden_act"), "text_config"), norm_eps=eps,
                      bos_token_id=bos if isinstance(bos, int) and 0 <= bos < vocab else 0, eos_token_id=eos,
                      pad_token_id=pad if isinstance(pad, int) and 0 <= pad < vocab else eos)
    scale = float(_get(hf, "logit_scale_init_value", 2.6592))
    return CLIPConfig(vision=vision, text=text, embed_dim=_get(hf, "projection_dim"),
                      init_temperature=float(torch.tensor(-scale).exp()))


def config_to_hf(cfg: CLIPConfig) -> Any:
    """Our CLIPConfig -> a transformers CLIPConfig."""
    # lazy: optional extra (transformers); lmstack imports without it
    from transformers import CLIPConfig as HFCLIPConfig

    v, t = cfg.vision, cfg.text
    if v.pool != "cls" or not v.pre_norm or v.patch_bias or v.norm != "layernorm":
        raise LmstackError("only a CLIP-shaped ViT exports (pool='cls', pre_norm=True, patch_bias=False, layernorm)")
    if t.norm_eps != v.norm_eps:
        raise LmstackError("HF CLIP has one layer_norm_eps per tower here; give both towers the same norm_eps")
    vision = dict(hidden_size=v.d_model, intermediate_size=v.d_ff or 4 * v.d_model, num_hidden_layers=v.n_layers,
                  num_attention_heads=v.n_heads, image_size=v.image_size, patch_size=v.patch_size,
                  hidden_act=_ACT_TO_HF[v.activation], layer_norm_eps=v.norm_eps, num_channels=3,
                  projection_dim=cfg.embed_dim)
    text = dict(vocab_size=t.vocab_size, hidden_size=t.d_model, intermediate_size=t.d_ff or 4 * t.d_model,
                num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads, max_position_embeddings=t.max_seq_len,
                hidden_act=_ACT_TO_HF[t.activation], layer_norm_eps=t.norm_eps, bos_token_id=t.bos_token_id,
                eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id, projection_dim=cfg.embed_dim)
    return HFCLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim,
                        logit_scale_init_value=float(torch.tensor(1 / cfg.init_temperature).log()))


def _name_from_hf(name: str) -> str:
    if name in _FIXED:
        return _FIXED[name]
    m = _LAYER_RX.match(name)
    if m and m.group(3) in _LAYER:
        return f"{_TOWERS[m.group(1)]}.blocks.{m.group(2)}.{_LAYER[m.group(3)]}.{m.group(4)}"
    base, _, leaf = name.rpartition(".")
    if base in _NORMS and leaf in ("weight", "bias"):
        return f"{_NORMS[base]}.{leaf}"
    raise LmstackError(f"HF CLIP tensor {name!r} has no place in our CLIP")


def weights_from_hf(state: dict[str, torch.Tensor], cfg: CLIPConfig) -> dict[str, torch.Tensor]:
    """HF CLIPModel state dict -> ours (buffers such as position_ids skipped; the ViT's unused token row zeroed)."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("position_ids"):
            continue
        ours = _name_from_hf(name)
        out[ours] = tensor.reshape(-1) if ours == "vision.cls_token" else tensor
    out[UNUSED] = torch.zeros(1, cfg.vision.d_model, dtype=out["vision.cls_token"].dtype)
    return out


def weights_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CLIP state dict -> HF CLIPModel names (the unused token row left out)."""
    to_hf = {ours: hf for hf, ours in _FIXED.items()}
    to_hf.update({f"{ours}.{leaf}": f"{hf}.{leaf}" for hf, ours in _NORMS.items() for leaf in ("weight", "bias")})
    back = {ours: hf for hf, ours in _LAYER.items()}
    rx = re.compile(r"^(vision\.encoder|text)\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
    out = {}
    for name, tensor in state.items():
        if name == UNUSED:
            continue
        if name in to_hf:
            out[to_hf[name]] = tensor
            continue
        m = rx.match(name)
        if not m or m.group(3) not in back:
            raise LmstackError(f"our CLIP tensor {name!r} has no HF CLIP name")
        tower = "vision_model" if m.group(1) == "vision.encoder" else "text_model"
        out[f"{tower}.encoder.layers.{m.group(2)}.{back[m.group(3)]}.{m.group(4)}"] = tensor
    return out


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    want = module.state_dict()
    missing = sorted(k for k in want if k not in state and not k.endswith("position_ids"))
    extra = sorted(k for k in state if k not in want)
    bad = [k for k in state if k in want and state[k].shape != want[k].shape]
    if missing or extra or bad:
        raise LmstackError(f"{what}: missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {bad[:3]}")
    module.load_state_dict(state, strict=False)


def clip_from_hf(hf_model: Any) -> CLIP:
    """A transformers CLIPModel -> our CLIP with its weights (fp32, eval mode)."""
    cfg = config_from_hf(hf_model.config)
    model = CLIP(cfg)
    state = {k: v.detach().float() for k, v in hf_model.state_dict().items()}
    _load_strict(model, weights_from_hf(state, cfg), "HF CLIP -> lmstack")
    return model.eval()


def clip_to_hf(model: CLIP) -> Any:
    """Our CLIP -> a transformers CLIPModel with its weights (eager attention, eval mode)."""
    # lazy: optional extra (transformers); lmstack imports without it
    from transformers import CLIPModel

    hf = CLIPModel(config_to_hf(model.config))
    _load_strict(hf, weights_to_hf({k: v.detach() for k, v in model.state_dict().items()}), "lmstack -> HF CLIP")
    return hf.eval()
