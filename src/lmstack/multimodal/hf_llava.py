"""HF LlavaForConditionalGeneration <-> our projector VLM: configs and weights both ways, same logits.

A Llava is our fusion="projector" VLM exactly: a CLIP vision tower (our ViT; its tensor names map through
multimodal/hf_clip.py's CLIP mapping), hidden_states[vision_feature_layer] with the class token dropped
(strategy "default") or kept ("full"), multi_modal_projector.linear_1 / GELU / linear_2 (our Projector), and a
llama LM (our Transformer; names and config through model/hf_convert.py). The image token id is the config's
image_token_index, repeated image_seq_length (= the patch count) times in the prompt, as LLaVA's processor does.

Refused with a message: a vision tower other than CLIP, a list of feature layers, a projector activation other
than GELU, a projector without bias, a text model our llama converter refuses.

Usage:
    from lmstack.multimodal.hf_llava import vlm_from_hf, vlm_to_hf
    ours = vlm_from_hf(transformers.LlavaForConditionalGeneration.from_pretrained(path))
    theirs = vlm_to_hf(ours)                 # a transformers LlavaForConditionalGeneration with our weights
"""
from __future__ import annotations

from typing import Any

import torch

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.hf_convert import config_from_hf, config_to_hf, weights_from_hf, weights_to_hf
from lmstack.multimodal.clip import CLIPConfig
from lmstack.multimodal.hf_clip import UNUSED, weights_from_hf as clip_weights_from_hf, \
    weights_to_hf as clip_weights_to_hf
from lmstack.multimodal.vit import VisionConfig
from lmstack.multimodal.vlm import VLM, VLMConfig

_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
         "relu": "relu"}
_VISION = "model.vision_tower."
_PROJ = "model.multi_modal_projector."
_LM = "model.language_model."


def _dict(cfg: Any) -> dict:
    return cfg if isinstance(cfg, dict) else cfg.to_dict()


def config_from_llava(hf: Any) -> VLMConfig:
    """A transformers LlavaConfig (object or dict) -> our VLMConfig (fusion='projector')."""
    hf = _dict(hf)
    v, t = _dict(hf["vision_config"]), _dict(hf["text_config"])
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise LmstackError(f"vision_config.model_type={v.get('model_type')!r}: only a CLIP vision tower converts")
    if v.get("num_channels", 3) != 3:
        raise LmstackError(f"vision_config.num_channels={v.get('num_channels')}: our ViT reads RGB (3 channels)")
    if v.get("hidden_act") not in _ACTS:
        raise LmstackError(f"vision_config.hidden_act={v.get('hidden_act')!r} has no lmstack equivalent")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise LmstackError(f"vision_feature_layer={layer!r}: only a single layer converts, not a list")
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise LmstackError(f"projector_hidden_act={hf.get('projector_hidden_act')!r}: our projector uses GELU")
    if not hf.get("multimodal_projector_bias", True):
        raise LmstackError("multimodal_projector_bias=False: our projector's Linears have biases")
    image_id = hf.get("image_token_index", hf.get("image_token_id"))
    vision = VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], d_model=v["hidden_size"],
                          n_layers=v["num_hidden_layers"], n_heads=v["num_attention_heads"],
                          d_ff=v["intermediate_size"], activation=_ACTS[v["hidden_act"]],
                          norm_eps=v.get("layer_norm_eps", 1e-5), pool="cls", pre_norm=True, patch_bias=False)
    lm = config_from_hf(t)
    return VLMConfig(vision=vision, lm=lm, fusion="projector", feature_layer=layer,
                     feature_select=hf.get("vision_feature_select_strategy", "default"), image_token_id=image_id)


def config_to_llava(cfg: VLMConfig) -> Any:
    """Our projector VLMConfig -> a transformers LlavaConfig."""
    # lazy: optional extra (transformers); lmstack imports without it
    from transformers import LlavaConfig

    if cfg.fusion != "projector":
        raise LmstackError(f"only fusion='projector' is a Llava; this VLM has fusion={cfg.fusion!r}")
    v = cfg.vision
    if v.pool != "cls" or not v.pre_norm or v.patch_bias or v.norm != "layernorm":
        raise LmstackError("only a CLIP-shaped ViT exports (pool='cls', pre_norm=True, patch_bias=False, layernorm)")
    if cfg.projector_hidden not in (0, cfg.lm.d_model):
        raise LmstackError(f"projector_hidden={cfg.projector_hidden}: Llava's projector is as wide as the LM")
    back = {ours: theirs for theirs, ours in _ACTS.items() if theirs != "gelu_new"}
    vision = dict(model_type="clip_vision_model", hidden_size=v.d_model, intermediate_size=v.d_ff or 4 * v.d_model,
                  num_hidden_layers=v.n_layers, num_attention_heads=v.n_heads, image_size=v.image_size,
                  patch_size=v.patch_size, hidden_act=back[v.activation], layer_norm_eps=v.norm_eps, num_channels=3)
    n_img = v.n_patches + (cfg.feature_select == "full")
    return LlavaConfig(vision_config=vision, text_config=config_to_hf(cfg.lm), image_token_index=cfg.image_token_id,
                       image_seq_length=n_img, vision_feature_layer=cfg.feature_layer,
                       vision_feature_select_strategy=cfg.feature_select, projector_hidden_act="gelu",
                       multimodal_projector_bias=True, tie_word_embeddings=cfg.lm.tie_embeddings)


def _vision_key(rest: str) -> str:
    """A vision-tower tensor name as HF CLIPModel spells it (hf_clip's mapping reads those)."""
    return rest if rest.startswith("vision_model.") else "vision_model." + rest


def weights_from_llava(state: dict[str, torch.Tensor], cfg: VLMConfig) -> dict[str, torch.Tensor]:
    """An HF Llava state dict -> our VLM's names."""
    vision, lm_hf, out = {}, {}, {}
    for name, t in state.items():
        if name.startswith(_VISION):
            vision[_vision_key(name[len(_VISION):])] = t
        elif name.startswith(_PROJ):
            out["projector." + name[len(_PROJ):]] = t
        elif name.startswith(_LM):
            lm_hf["model." + name[len(_LM):]] = t
        elif name == "lm_head.weight":
            lm_hf[name] = t
        else:
            raise LmstackError(f"HF Llava tensor {name!r} has no place in our VLM")
    out.update(clip_weights_from_hf(vision, CLIPConfig(vision=cfg.vision)))
    with torch.device("meta"):
        expected = Transformer(cfg.lm).state_dict()
    lm, used = weights_from_hf(cfg.lm, expected, lm_hf.__getitem__, set(lm_hf))
    unused = sorted(set(lm_hf) - used)
    if unused:
        raise LmstackError(f"HF Llava text tensor {unused[0]!r} has no place in our LM")
    out.update({"lm." + k: v for k, v in lm.items()})
    return out


def weights_to_llava(state: dict[str, torch.Tensor], cfg: VLMConfig, hf_names: set[str]) -> dict[str, torch.Tensor]:
    """Our VLM state dict -> HF Llava names (hf_names: the target model's, to spell the vision tower its way)."""
    vision = {k: v for k, v in state.items() if k.startswith("vision.") and k != UNUSED}
    lm = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
    nested = any(k.startswith(_VISION + "vision_model.") for k in hf_names)
    out = {}
    for k, v in clip_weights_to_hf(vision).items():
        out[_VISION + (k if nested else k.removeprefix("vision_model."))] = v
    out.update({_PROJ + k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")})
    for k, v in weights_to_hf(cfg.lm, lm).items():
        out[_LM + k[len("model."):] if k.startswith("model.") else k] = v
    return out


def vlm_from_hf(hf_model: Any) -> VLM:
    """A transformers LlavaForConditionalGeneration -> our VLM with its weights (fp32, eval mode)."""
    cfg = config_from_llava(hf_model.config)
    vlm = VLM(cfg)
    state = weights_from_llava({k: v.detach().float() for k, v in hf_model.state_dict().items()}, cfg)
    want = vlm.state_dict()
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise LmstackError(f"HF Llava -> lmstack: missing {missing[:3]}, unexpected {extra[:3]}")
    vlm.load_state_dict(state)
    return vlm.eval()


def vlm_to_hf(vlm: VLM) -> Any:
    """Our projector VLM -> a transformers LlavaForConditionalGeneration with its weights (eval mode)."""
    # lazy: optional extra (transformers); lmstack imports without it
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration(config_to_llava(vlm.config))
    want = hf.state_dict()
    state = weights_to_llava({k: v.detach() for k, v in vlm.state_dict().items()}, vlm.config, set(want))
    missing = sorted(k for k in want if k not in state and not k.endswith("position_ids"))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise LmstackError(f"lmstack -> HF Llava: missing {missing[:3]}, unexpected {extra[:3]}")
    hf.load_state_dict(state, strict=False)
    return hf.eval()


__all__ = ["config_from_llava", "config_to_llava", "weights_from_llava", "weights_to_llava", "vlm_from_hf",
           "vlm_to_hf"]
