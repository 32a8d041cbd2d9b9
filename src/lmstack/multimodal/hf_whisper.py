"""transformers' Whisper weights in our Whisper-style model (whisper.py): the parity target of the ASR model.

`whisper_config_from_hf` maps a transformers WhisperConfig to ours (refusing what our model does not build:
different encoder/decoder widths or head counts, an activation other than GELU, scaled embeddings, untied
output); `whisper_state_from_hf` renames a WhisperForConditionalGeneration state dict to ours. The encoder's
k_proj has no bias in Whisper; the one Transformer's biased projections get a zero k bias (a constant on
every key adds the same score to all keys of a query, so softmax ignores it anyway). Whisper's encoder
positions are a fixed sinusoid table; ours is computed (whisper.sinusoids) and checked against the table.

tests/multimodal/test_hf_whisper.py: a tiny random transformers Whisper gives the same logits as ours to 1e-4
on the same log-mel (ours, from audio.log_mel) and decoder ids, and greedy decoding with our KV cache picks the
tokens transformers' uncached forward picks.

Usage:
    from transformers import WhisperForConditionalGeneration
    from lmstack.multimodal.hf_whisper import from_hf_whisper, load_hf_whisper_dir
    ours = from_hf_whisper(WhisperForConditionalGeneration(hf_config))   # a transformers module -> Whisper
    ours = load_hf_whisper_dir("path/to/whisper-tiny")                    # config.json + model.safetensors
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from lmstack.errors import LmstackError
from lmstack.model.load_guard import load_safetensors, read_json
from lmstack.multimodal.whisper import Whisper, WhisperConfig, sinusoids

_ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "out_proj": "out_proj"}


_MISSING = object()


def _get(cfg, name: str, default=_MISSING):
    value = cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)
    if value is _MISSING:
        raise LmstackError(f"the Whisper config has no {name}")
    return value


def whisper_config_from_hf(cfg) -> WhisperConfig:
    """Our WhisperConfig for a transformers WhisperConfig (object or config.json dict)."""
    heads, ffn = _get(cfg, "encoder_attention_heads"), _get(cfg, "encoder_ffn_dim")
    if _get(cfg, "decoder_attention_heads") != heads or _get(cfg, "decoder_ffn_dim") != ffn:
        raise LmstackError("the encoder and decoder of this Whisper differ in heads or MLP width; ours shares them")
    act = _get(cfg, "activation_function", "gelu")
    if act != "gelu":
        raise LmstackError(f"activation_function={act!r}: our Whisper builds GELU MLPs only")
    if _get(cfg, "scale_embedding", False):
        raise LmstackError("scale_embedding=True is not built by our Whisper (Whisper's checkpoints use False)")
    return WhisperConfig(n_mels=_get(cfg, "num_mel_bins"), n_audio_ctx=_get(cfg, "max_source_positions"),
                         d_model=_get(cfg, "d_model"), n_heads=heads, n_encoder_layers=_get(cfg, "encoder_layers"),
                         n_decoder_layers=_get(cfg, "decoder_layers"), vocab_size=_get(cfg, "vocab_size"),
                         n_text_ctx=_get(cfg, "max_target_positions"), d_ff=ffn)


def whisper_state_from_hf(state: dict[str, torch.Tensor], cfg: WhisperConfig) -> dict[str, torch.Tensor]:
    """transformers' parameter names and tensors -> ours (every one of ours filled, every one of theirs used)."""
    src = {k.removeprefix("model."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(theirs: str, ours: str) -> None:
        if theirs not in src:
            raise LmstackError(f"the Whisper checkpoint has no {theirs}")
        out[ours] = src[theirs]
        used.add(theirs)

    for name in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"):
        take(f"encoder.{name}", name)
    for i in range(cfg.n_encoder_layers):
        h, o = f"encoder.layers.{i}.", f"encoder.blocks.{i}."
        for theirs, ours in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("out_proj", "o_proj")):
            take(f"{h}self_attn.{theirs}.weight", f"{o}attn.{ours}.weight")
            if theirs != "k_proj":
                take(f"{h}self_attn.{theirs}.bias", f"{o}attn.{ours}.bias")
        out[f"{o}attn.k_proj.bias"] = torch.zeros(cfg.d_model)
        for part in ("weight", "bias"):
            take(f"{h}self_attn_layer_norm.{part}", f"{o}attn_norm.{part}")
            take(f"{h}final_layer_norm.{part}", f"{o}mlp_norm.{part}")
            take(f"{h}fc1.{part}", f"{o}mlp.up_proj.{part}")
            take(f"{h}fc2.{part}", f"{o}mlp.down_proj.{part}")
    for part in ("weight", "bias"):
        take(f"encoder.layer_norm.{part}", f"encoder.final_norm.{part}")
        take(f"decoder.layer_norm.{part}", f"final_norm.{part}")
    take("decoder.embed_tokens.weight", "tok_emb.weight")
    take("decoder.embed_positions.weight", "pos_emb.weight")
    for i in range(cfg.n_decoder_layers):
        h, o = f"decoder.layers.{i}.", f"blocks.{i}."
        for theirs, ours in (("self_attn", "self_attn"), ("encoder_attn", "cross_attn")):
            for proj in _ATTN:
                take(f"{h}{theirs}.{proj}.weight", f"{o}{ours}.{proj}.weight")
                if proj != "k_proj":
                    take(f"{h}{theirs}.{proj}.bias", f"{o}{ours}.{proj}.bias")
            for part in ("weight", "bias"):
                take(f"{h}{theirs}_layer_norm.{part}", f"{o}{ours}_norm.{part}")
        for part in ("weight", "bias"):
            take(f"{h}final_layer_norm.{part}", f"{o}mlp_norm.{part}")
            take(f"{h}fc1.{part}", f"{o}mlp.up_proj.{part}")
            take(f"{h}fc2.{part}", f"{o}mlp.down_proj.{part}")
    table = src.get("encoder.embed_positions.weight")
    if table is not None:
        used.add("encoder.embed_positions.weight")
        if not torch.allclose(table.float(), sinusoids(cfg.n_audio_ctx, cfg.d_model), atol=1e-4):
            raise LmstackError("the checkpoint's encoder positions are not Whisper's sinusoids; ours computes them")
    head = src.get("proj_out.weight")
    if head is not None:
        used.add("proj_out.weight")
        if not torch.equal(head, src["decoder.embed_tokens.weight"]):
            raise LmstackError("proj_out differs from the token embedding; our Whisper ties them")
    left = sorted(set(src) - used)
    if left:
        raise LmstackError(f"the Whisper checkpoint has weights our model does not use: {left[:3]}")
    return out


def _build(cfg: WhisperConfig, state: dict[str, torch.Tensor]) -> Whisper:
    model = Whisper(cfg)
    ours = whisper_state_from_hf(state, cfg)
    want = {k: v for k, v in model.state_dict().items() if k != "encoder.tok_emb.weight"}
    missing = sorted(set(want) - set(ours))
    if missing:
        raise LmstackError(f"converted Whisper weights miss {missing[:3]}")
    for k, v in ours.items():
        if v.shape != want[k].shape:
            raise LmstackError(f"Whisper weight {k} has shape {tuple(v.shape)}, ours wants {tuple(want[k].shape)}")
    model.load_state_dict(ours, strict=False)  # the encoder Transformer's unused 1-row token table keeps its init
    return model.eval()


def from_hf_whisper(hf_model) -> Whisper:
    """Our Whisper from a transformers WhisperForConditionalGeneration (or WhisperModel) module."""
    cfg = whisper_config_from_hf(hf_model.config)
    state = {k: v.detach().float().cpu() for k, v in hf_model.state_dict().items()}
    return _build(cfg, state)


def load_hf_whisper_dir(path: str | os.PathLike) -> Whisper:
    """Our Whisper from a Hugging Face Whisper directory (config.json + model.safetensors), no transformers needed."""
    path = Path(path)
    data = read_json(path, "config.json", "Whisper config", want_object=True)
    if data.get("model_type") != "whisper":
        raise LmstackError(f"{path}/config.json has model_type={data.get('model_type')!r}, not 'whisper'")
    state = {k: v.float() for k, v in load_safetensors(path, "model.safetensors", "Whisper weights").items()}
    return _build(whisper_config_from_hf(data), state)


__all__ = ["whisper_config_from_hf", "whisper_state_from_hf", "from_hf_whisper", "load_hf_whisper_dir"]
