"""`lmstack mm train-vlm`: a VLM trained on a shapes world from the command line and saved as a directory that
`lmstack serve`, `lmstack chat --image` and `lmstack mm caption` load.

The recipe is LLaVA's, at laptop scale:
1. the LM learns the world's text alone first (`pretrain_steps`: captions and VQA answers, no picture), so the
   fusion starts against an LM that can already write the world's sentences;
2. the vision tower is a trained CLIP's ViT, frozen (`--clip DIR` from `lmstack mm train-clip`): a ViT trained
   from scratch inside the VLM barely learns to see at this budget (benchmarks/vision_vlm.py measures both);
   without `--clip` a fresh ViT trains with the rest;
3. the fusion trains on captions and VQA with the picture, and the LM with it, except under `fusion=xattn`
   (Flamingo keeps its LM frozen).
Val captions and VQA are scored at the end, each with n and stderr, into OUT/metrics.json.

Usage:
    lmstack data synth-vision --out data/vision --n_images 2000
    lmstack mm train-clip --data data/vision --out runs/clip --steps 800
    lmstack mm train-vlm --data data/vision --clip runs/clip --out runs/vlm --train.steps 1500
    lmstack mm caption picture.png --model runs/vlm
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lmstack.config import atomic_write_text, to_dict
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig
from lmstack.multimodal.clip import load_clip
from lmstack.multimodal.text import IMAGE_TOKEN, shapes_tokenizer
from lmstack.multimodal.vit import VisionConfig
from lmstack.multimodal.vlm import VLM, VLMConfig, save_vlm
from lmstack.multimodal.vlm_train import VLMTrainConfig, evaluate_captions, evaluate_vqa, read_split, train_vlm
from lmstack.runtime.validation import check_choices, need
from lmstack.threads import set_threads


@dataclass
class VLMRunConfig:
    data: str = ""
    """A shapes-world directory written by `lmstack data synth-vision --out DIR`."""
    out: str = ""
    """The VLM directory to write (save_vlm: config.json, model.safetensors, tokenizer.json, metrics.json)."""
    clip: str = ""
    """A CLIP directory (`lmstack mm train-clip`) whose ViT, frozen, is the vision tower; empty = a fresh ViT."""
    fusion: Literal["projector", "xattn", "qformer"] = "projector"
    """How the picture reaches the LM: LLaVA's MLP projector, Flamingo's gated cross-attention, BLIP-2's Q-Former."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """The fresh ViT's shape (ignored with --clip: the CLIP's own ViT is used)."""
    d_model: int = 96
    """LM width."""
    n_layers: int = 3
    """LM blocks."""
    n_heads: int = 4
    """LM attention heads."""
    n_queries: int = 16
    """qformer: image tokens the LM reads."""
    vocab_size: int = 512
    """BPE merges of the shapes tokenizer (multimodal/text.py)."""
    pretrain_steps: int = 200
    """Text-only LM steps before the picture is added (0 = none)."""
    train: VLMTrainConfig = field(default_factory=lambda: VLMTrainConfig(steps=600))
    """The multimodal stage (steps, batch, LR; vision_lr_mult for a fresh ViT)."""
    eval_images: int = 64
    """Val pictures scored at the end (captions, VQA); 0 = skip."""
    threads: int = 0
    """Torch threads (0 = the default)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        check_choices(self)
        need(self.pretrain_steps >= 0, f"pretrain_steps must be >= 0, got {self.pretrain_steps}")
        need(self.eval_images >= 0, f"eval_images must be >= 0, got {self.eval_images}")
        need(self.d_model % self.n_heads == 0, f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")


def build_vlm(cfg: VLMRunConfig, tok) -> VLM:
    """The VLM the config describes; with cfg.clip, the CLIP's ViT weights loaded and frozen."""
    vision, clip = cfg.vision, None
    if cfg.clip:
        clip, _ = load_clip(cfg.clip)
        vision = clip.config.vision
    max_len = 64 + max(vision.n_patches, cfg.n_queries) + 8  # prompt + image tokens + answer
    lm = ModelConfig(vocab_size=tok.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                     max_seq_len=max_len, eos_token_id=tok.token_to_id("<|eos|>"))
    vlm = VLM(VLMConfig(vision=vision, lm=lm, fusion=cfg.fusion, n_queries=cfg.n_queries,
                        image_token_id=tok.token_to_id(IMAGE_TOKEN), freeze_lm=cfg.fusion == "xattn",
                        freeze_vision=clip is not None))
    if clip is not None:
        vlm.vision.load_state_dict(clip.vision.state_dict())
    return vlm


def run_train_vlm(cfg: VLMRunConfig) -> dict:
    """Train a VLM on a shapes world (text pretraining, then the picture), score it on val, save it to --out."""
    if not cfg.data or not cfg.out:
        raise LmstackError("--data DIR and --out DIR are required (write a world with `lmstack data synth-vision`)")
    if cfg.threads:
        set_threads(cfg.threads)
    train, val = read_split(cfg.data, "train"), read_split(cfg.data, "val")
    torch.manual_seed(cfg.train.seed)
    tok = shapes_tokenizer(cfg.vocab_size)
    vlm = build_vlm(cfg, tok)
    start = time.perf_counter()
    stages = {}
    if cfg.pretrain_steps:
        text_cfg = VLMTrainConfig(**{**to_dict(cfg.train), "steps": cfg.pretrain_steps, "use_images": False})
        stages["text"] = train_vlm(text_cfg, train, vlm, tok, progress=cfg.progress)
    stages["multimodal"] = train_vlm(cfg.train, train, vlm, tok, progress=cfg.progress)
    metrics = {"stages": stages, "seconds": round(time.perf_counter() - start, 1), "config": to_dict(cfg)}
    if cfg.eval_images and val:
        held = val[: cfg.eval_images]
        vlm.eval()
        with torch.no_grad():
            caps, vqa = evaluate_captions(vlm, tok, held), evaluate_vqa(vlm, tok, held)
        metrics["val"] = {"captions": {k: v for k, v in caps.items() if k != "samples"}, "vqa": vqa}
        print(f"train-vlm: val ({len(held)} pictures) CIDEr-D {caps['cider_d']['value']:.3f}, attribute recall "
              f"{caps['attribute_recall']['value']:.3f}, VQA {vqa['all']['value']:.3f} "
              f"± {vqa['all']['stderr']:.3f} (n={vqa['all']['n']})")
    out = save_vlm(vlm, tok, cfg.out)
    atomic_write_text(Path(out) / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print(f"train-vlm: {cfg.fusion} VLM, {vlm.num_parameters():,} parameters, {metrics['seconds']:.0f} s; wrote {out}")
    return metrics
