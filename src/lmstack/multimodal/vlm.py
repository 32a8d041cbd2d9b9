"""The VLM: a ViT, one of three fusions, and a plain lmstack Transformer LM (issue 24 §2 fusion, §3 captioning/VQA).

fusion="projector" (LLaVA): the ViT's patch tokens (from `feature_layer`, the class token dropped unless
    feature_select="full") pass a 2-layer MLP into the LM's width and take the places of the `<image>` tokens.
fusion="qformer" (BLIP-2): n_queries learned queries read the patches (qformer.py); their outputs take the places of
    the `<image>` tokens.
fusion="xattn" (Flamingo): no LM position holds the picture; gated cross-attention layers (fusion.py), gates at 0,
    run before every `xattn_every`-th LM block and read the patch tokens. The prompt keeps its single `<image>`
    marker as an ordinary token. Meant for a frozen LM (freeze_lm=True). Text with no picture runs the LM alone.

The prompt convention is LLaVA's processor's: the `<image>` token (multimodal/text.py IMAGE_TOKEN) repeated
n_image_tokens times where the picture goes (`expand_prompt`). In a batch, the k-th run of image tokens (row-major)
receives image k, so rows may hold zero, one or several pictures (projector/qformer); xattn takes one per row.

A VLM directory holds config.json ({"model_type": "lmstack_vlm", "vlm": {...}}), model.safetensors and the
tokenizer; every file is written atomically, config.json last.

Usage:
    from lmstack.multimodal.vlm import VLM, VLMConfig, save_vlm, load_vlm
    cfg = VLMConfig(vision=VisionConfig(image_size=64, patch_size=16), lm=ModelConfig(vocab_size=512),
                    fusion="projector", image_token_id=tok.token_to_id(IMAGE_TOKEN))
    vlm = VLM(cfg)
    ids = torch.tensor([vlm.expand_prompt(tok.encode("<image> How many shapes are there?"))])
    logits = vlm(ids, pixels=to_pixels([img], 64))                     # (1, T, vocab)
    out = vlm(ids, pixels=pixels, labels=labels)                       # .loss (-100 = no target), .logits
    new_ids = vlm.generate(ids, pixels, max_new_tokens=16)             # greedy, KV-cached: one list per row
    save_vlm(vlm, tok, "out/vlm"); vlm = load_vlm("out/vlm")           # tokenizer: lmstack.load_tokenizer(dir)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save
from torch import nn

from lmstack.config import ConfigError, atomic_write_bytes, atomic_write_text, from_dict, to_dict
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.outputs import CausalLMOutput, causal_lm_loss
from lmstack.multimodal.fusion import GatedCrossAttention, Projector, XAttnHook, xattn_layers
from lmstack.multimodal.qformer import QFormer
from lmstack.multimodal.text import IMAGE_TOKEN
from lmstack.multimodal.vit import ViT, VisionConfig
from lmstack.runtime.validation import check_choices, need

MODEL_TYPE = "lmstack_vlm"


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    """The ViT encoder."""
    lm: ModelConfig = field(default_factory=ModelConfig)
    """The language model (a causal lmstack Transformer with an LM head)."""
    fusion: Literal["projector", "xattn", "qformer"] = "projector"
    """projector (LLaVA MLP into the LM input), xattn (Flamingo gated cross-attention), qformer (BLIP-2 queries)."""
    n_queries: int = 16
    """qformer: learned queries, i.e. image tokens the LM reads."""
    qformer_layers: int = 2
    """qformer: Transformer blocks of the Q-Former (width = the vision width)."""
    xattn_every: int = 1
    """xattn: a gated cross-attention layer before every this-many-th LM block (0, k, 2k, ...)."""
    feature_layer: int = -1
    """Which ViT hidden state feeds the fusion, as HF hidden_states indexes it (-1 last block, -2 LLaVA's)."""
    feature_select: Literal["default", "full"] = "default"
    """default: the patch tokens (class token dropped, LLaVA's default); full: class token too."""
    projector_hidden: int = 0
    """projector: hidden width of the MLP; 0 = the LM width."""
    image_token_id: int = -1
    """Id of `<image>` in the tokenizer (tok.token_to_id(IMAGE_TOKEN)); required, -1 = unset."""
    freeze_lm: bool = False
    """Keep the LM's weights fixed in training (Flamingo freezes it)."""
    freeze_vision: bool = False
    """Keep the ViT's weights fixed in training."""

    def __post_init__(self) -> None:
        check_choices(self)
        need(self.n_queries >= 1, f"n_queries must be >= 1, got {self.n_queries}")
        need(self.qformer_layers >= 1, f"qformer_layers must be >= 1, got {self.qformer_layers}")
        need(self.xattn_every >= 1, f"xattn_every must be >= 1, got {self.xattn_every}")
        n = self.vision.n_layers
        need(-(n + 1) <= self.feature_layer <= n,
             f"feature_layer={self.feature_layer} must be in -{n + 1}..{n} (the ViT has {n} blocks)")
        need(self.lm.head == "lm" and self.lm.causal, "the VLM's lm must be a causal LM (head='lm', causal=True)")
        need(-1 <= self.image_token_id < self.lm.vocab_size,
             f"image_token_id={self.image_token_id} must be an id of the LM's vocabulary (0..{self.lm.vocab_size - 1}); "
             f"set it to tok.token_to_id({IMAGE_TOKEN!r})")

    @classmethod
    def from_dict(cls, data: dict) -> "VLMConfig":
        return from_dict(cls, data)


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        if cfg.image_token_id < 0:
            raise LmstackError(f"VLMConfig.image_token_id is unset; set it to tok.token_to_id({IMAGE_TOKEN!r})")
        self.config = cfg
        self.vision = ViT(cfg.vision)
        self.lm = Transformer(cfg.lm)
        d_v, d_lm = cfg.vision.d_model, cfg.lm.d_model
        if cfg.fusion == "projector":
            self.projector = Projector(d_v, d_lm, cfg.projector_hidden)
        elif cfg.fusion == "qformer":
            self.qformer = QFormer(d_v, d_lm, cfg.n_queries, d_model=d_v, n_layers=cfg.qformer_layers,
                                   n_heads=cfg.vision.n_heads)
        else:
            self.xattn = nn.ModuleList(GatedCrossAttention(d_lm, d_v, cfg.lm.n_heads)
                                       for _ in xattn_layers(cfg.lm.n_layers, cfg.xattn_every))
        self.freeze(lm=cfg.freeze_lm, vision=cfg.freeze_vision)

    def freeze(self, lm: bool, vision: bool) -> None:
        for p in self.lm.parameters():
            p.requires_grad_(not lm)
        for p in self.vision.parameters():
            p.requires_grad_(not vision)

    # ---- facts
    @property
    def n_image_tokens(self) -> int:
        """LM positions one picture fills: patches (+1 with feature_select='full'), n_queries, or 0 for xattn."""
        cfg = self.config
        if cfg.fusion == "projector":
            return cfg.vision.n_patches + (cfg.feature_select == "full")
        return cfg.n_queries if cfg.fusion == "qformer" else 0

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    def expand_prompt(self, ids: list[int], image_id: int | None = None) -> list[int]:
        """Each `<image>` in ids repeated n_image_tokens times (xattn: left as one marker token)."""
        image_id = self.image_token_id if image_id is None else image_id
        if image_id != self.image_token_id:
            raise LmstackError(f"image_id={image_id} is not this VLM's <image> id {self.image_token_id}")
        if self.config.fusion == "xattn":
            return list(ids)
        out: list[int] = []
        for i in ids:
            out.extend([i] * self.n_image_tokens if i == image_id else [i])
        return out

    # ---- images
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, P or 1 + P, d_vision): the ViT's tokens that feed the fusion."""
        tokens = self.vision(pixels, layer=self.config.feature_layer)
        return tokens if self.config.feature_select == "full" else tokens[:, 1:]

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, n_image_tokens, d_lm): what the prompt's `<image>` positions receive."""
        if self.config.fusion == "xattn":
            raise LmstackError("fusion='xattn' puts no image vectors in the prompt; it reads features(pixels) "
                               "through cross-attention (pass pixels to forward/generate)")
        feats = self.features(pixels)
        return self.projector(feats) if self.config.fusion == "projector" else self.qformer(feats)

    def _splice(self, ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        where = ids == self.image_token_id
        n_slots, n_img = int(where.sum()), self.n_image_tokens
        if image_embeds.dim() != 3 or image_embeds.shape[1:] != (n_img, self.config.lm.d_model):
            raise LmstackError(f"image_embeds must be (N, {n_img}, {self.config.lm.d_model}), "
                               f"got {tuple(image_embeds.shape)}")
        if n_slots != image_embeds.shape[0] * n_img:
            raise LmstackError(f"the prompt holds {n_slots} <image> tokens but {image_embeds.shape[0]} image(s) "
                               f"need {image_embeds.shape[0] * n_img} ({n_img} each); expand the prompt with "
                               "vlm.expand_prompt(ids)")
        x = self.lm.tok_emb(ids.masked_fill(where, 0))
        return x.masked_scatter(where.unsqueeze(-1), image_embeds.to(x.dtype).reshape(-1, x.shape[-1]))

    def _inputs(self, ids: torch.Tensor, pixels: torch.Tensor | None, image_embeds: torch.Tensor | None):
        """(inputs_embeds or None, layer_hook or None) for the LM."""
        if ids.dim() != 2:
            raise LmstackError(f"ids must have shape (batch, time), got {tuple(ids.shape)}")
        if pixels is not None and image_embeds is not None:
            raise LmstackError("pass the picture once: pixels=... or image_embeds=...")
        if self.config.fusion == "xattn":
            if pixels is not None:
                image_embeds = self.features(pixels)
            if image_embeds is None:
                if bool((ids == self.image_token_id).any()):
                    raise LmstackError("the prompt holds <image> but no picture was given (pixels=...)")
                return None, None  # text alone: no picture to attend to, the LM runs as it is
            if image_embeds.shape[0] != ids.shape[0]:
                raise LmstackError(f"fusion='xattn' takes one image per row: {image_embeds.shape[0]} images for "
                                   f"{ids.shape[0]} rows")
            return None, XAttnHook(self.xattn, self.config.xattn_every, image_embeds)
        if pixels is not None:
            image_embeds = self.encode_images(pixels)
        if image_embeds is None:
            if bool((ids == self.image_token_id).any()):
                raise LmstackError("the prompt holds <image> tokens but no picture was given (pixels=...)")
            return None, None
        return self._splice(ids, image_embeds), None

    # ---- forward
    def forward(self, ids: torch.Tensor, pixels: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None, cache=None) -> torch.Tensor | CausalLMOutput:
        """Logits (B, T, vocab); with labels (B, T), -100 where there is no target, a CausalLMOutput with the
        shifted next-token loss. image_embeds: encode_images' output (xattn: features'), e.g. a cached one."""
        embeds, hook = self._inputs(ids, pixels, image_embeds)
        if embeds is None:
            logits = self.lm(ids, cache, layer_hook=hook)
        else:
            logits = self.lm(inputs_embeds=embeds, cache=cache, layer_hook=hook)
        if labels is None:
            return logits
        return CausalLMOutput(logits, causal_lm_loss(logits, labels, self.config.lm.real_vocab_size), None)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, pixels: torch.Tensor | None = None, max_new_tokens: int = 32,
                 temperature: float = 0.0, image_embeds: torch.Tensor | None = None,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None) -> list[list[int]]:
        """New tokens per row (stopped at eos, which is left out), KV-cached; temperature 0 = greedy; `<image>`
        is never generated. Rows must have the same length (the prompts of one batch)."""
        if max_new_tokens < 0:
            raise LmstackError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise LmstackError(f"temperature must be >= 0, got {temperature}")
        if ids.dim() == 1:
            ids = ids[None]
        b, t = ids.shape
        if t + max_new_tokens > self.config.lm.max_seq_len:
            raise LmstackError(f"prompt of {t} tokens + max_new_tokens={max_new_tokens} exceeds the LM's "
                               f"max_seq_len={self.config.lm.max_seq_len}")
        eos = self.config.lm.eos_token_id if eos_token_id is None else eos_token_id
        was_training = self.training
        self.eval()
        embeds, hook = self._inputs(ids, pixels, image_embeds)
        cache = self.lm.new_cache(batch_size=b, max_len=t + max_new_tokens)
        if embeds is None:
            logits = self.lm(ids, cache, layer_hook=hook, logits_to_keep=1)
        else:
            logits = self.lm(inputs_embeds=embeds, cache=cache, layer_hook=hook, logits_to_keep=1)
        out: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        for step in range(max_new_tokens):
            last = logits[:, -1].float()
            last[:, self.image_token_id] = float("-inf")  # a generated <image> would have no picture behind it
            if temperature == 0:
                nxt = last.argmax(-1)
            else:
                nxt = torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=generator)[:, 0]
            for r in range(b):
                if done[r]:
                    continue
                if eos is not None and int(nxt[r]) == eos:
                    done[r] = True
                else:
                    out[r].append(int(nxt[r]))
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = self.lm(nxt[:, None], cache, layer_hook=hook)
        self.train(was_training)
        return out

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


# ---- files
def save_vlm(vlm: VLM, tokenizer, path: str | os.PathLike) -> Path:
    """Write config.json (with the "vlm" section), model.safetensors and tokenizer.json into `path`, atomically."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LmstackError(f"cannot save a VLM to {path}: it is a file, not a directory")
    if tokenizer.token_to_id(IMAGE_TOKEN) != vlm.image_token_id:
        raise LmstackError(f"the tokenizer's {IMAGE_TOKEN} id {tokenizer.token_to_id(IMAGE_TOKEN)} is not the VLM's "
                           f"image_token_id {vlm.image_token_id}")
    path.mkdir(parents=True, exist_ok=True)
    # clones: a tied embedding is one tensor under two names, which safetensors refuses to alias
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in vlm.state_dict().items()}
    atomic_write_bytes(path / "model.safetensors", save(state, metadata={"format": "pt"}))
    tokenizer.save(path)
    config = {"model_type": MODEL_TYPE, "architectures": ["LmstackVLM"], "vlm": to_dict(vlm.config)}
    atomic_write_text(path / "config.json", json.dumps(config, indent=2) + "\n")  # last: a dir with it is whole
    return path


def read_vlm_config(path: str | os.PathLike) -> VLMConfig:
    """The VLMConfig of a VLM directory; a text-only model or another kind of directory is refused by name."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise LmstackError(f"{path} has no config.json, so it is not a VLM directory (save one with save_vlm)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmstackError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise LmstackError(f"{file} must hold a JSON object")
    kind = data.get("model_type")
    if "vlm" not in data:
        if kind == "lmstack" or "num_hidden_layers" in data or "n_layer" in data:
            raise LmstackError(f"{path} is a text-only model directory (model_type {kind!r}, no 'vlm' section in "
                               "config.json): it takes no images; load it with lmstack.load_model")
        raise LmstackError(f"{path} is a {kind!r} directory, not a VLM (config.json has no 'vlm' section)")
    if kind != MODEL_TYPE:
        raise LmstackError(f"{file}: model_type is {kind!r}, not {MODEL_TYPE!r}")
    try:
        return VLMConfig.from_dict(data["vlm"])
    except ConfigError as e:
        raise LmstackError(f"{file}: {e}") from None


def load_vlm(path: str | os.PathLike, device: str | torch.device = "cpu") -> VLM:
    """A VLM from a directory written by save_vlm (its tokenizer: lmstack.load_tokenizer(path)), in eval mode."""
    path = Path(path)
    cfg = read_vlm_config(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise LmstackError(f"{path} has config.json but no model.safetensors")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for a truncated or corrupt file
        raise LmstackError(f"{weights} cannot be read as safetensors ({type(e).__name__}: {e})") from None
    vlm = VLM(cfg)
    expected = vlm.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the config does not use"
        raise LmstackError(f"{weights} {what}; config.json does not fit the weights")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise LmstackError(f"{weights}: {k!r} has shape {tuple(v.shape)} but the config needs "
                               f"{tuple(expected[k].shape)}")
    vlm.load_state_dict(state)
    return vlm.to(device).eval()


__all__ = ["VLMConfig", "VLM", "save_vlm", "load_vlm", "read_vlm_config", "MODEL_TYPE"]
