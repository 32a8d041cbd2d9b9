"""Video encoders (issue 25 §2, XII.9) on the shapes ViT and the ONE lmstack Transformer, plus the two heads that
use them: video-text contrastive matching (VideoCLIP) and video question answering (VideoQA).

A clip is (B, F, 3, S, S) pixels in [-1, 1]. Three encoders, one registry (`VideoConfig.encoder`):
- temporal: a ViT per frame (pooled class token), learned temporal position embeddings on the F frame vectors, a
  video class token in front, then a bidirectional Transformer over time ("ViT + temporal Transformer").
- divided: TimeSformer's divided space-time attention: the ViT's patch tokens of every frame, a temporal
  position embedding added, and before each ViT block (space attention within a frame) a one-block Transformer
  attends over time at each fixed token position (run as the ViT encoder's layer_hook).
- mean: the BASELINE. The same per-frame ViT, the frame vectors averaged: order-invariant by construction, so it
  cannot know which frame came first.
`tokens(clip)` -> (B, N, d) vectors a fusion reads; `encode(clip)` -> (B, d) one vector per clip.

VideoQA answers by CLASSIFICATION over a fixed answer vocabulary: the clip's tokens (projected) and the question's
token embeddings go through one bidirectional fusion Transformer; the state at the question's BOS is classified.

Usage:
    from lmstack.multimodal.video_model import VideoConfig, build_video_encoder, clip_to_pixels, VideoQA
    enc = build_video_encoder(VideoConfig(frames=8, encoder="temporal"))
    pixels = clip_to_pixels(load_video_clip(path, frames=8), frames=8, size=32)     # (8, 3, 32, 32), checked
    vec = enc.encode(pixels[None])                                                  # (1, 64)
    qa = VideoQA(VideoQAConfig(video=VideoConfig(), vocab_size=tok.vocab_size, n_answers=len(answers)))
    logits = qa(pixels[None], ids, mask)                                            # (1, n_answers)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.multimodal.clip import MAX_LOGIT_SCALE, TextConfig, check_text_ids, clip_loss, first_eos
from lmstack.multimodal.vit import ViT, VisionConfig, swap_activation
from lmstack.runtime.validation import check_choices, need

MAX_FRAMES = 32  # the video world's limit (video_world.MAX_FRAMES)


def _small_vision() -> VisionConfig:
    return VisionConfig(image_size=32, patch_size=8, d_model=64, n_layers=2, n_heads=4, pool="mean")


@dataclass
class VideoConfig:
    vision: VisionConfig = field(default_factory=_small_vision)
    """The per-frame ViT (its blocks are the space attention of the divided encoder)."""
    frames: int = 8
    """Frames per clip; every clip must have exactly this many (temporal position embeddings)."""
    encoder: Literal["temporal", "divided", "mean"] = "temporal"
    """temporal: ViT + temporal Transformer; divided: TimeSformer space-time attention; mean: frame averaging."""
    temporal_layers: int = 2
    """Blocks of the temporal Transformer (encoder=temporal; divided has one time block per ViT block)."""

    def __post_init__(self) -> None:
        check_choices(self)
        need(isinstance(self.frames, int) and 1 <= self.frames <= MAX_FRAMES,
             f"frames must be an integer in 1..{MAX_FRAMES}, got {self.frames!r}")
        need(self.temporal_layers >= 1, f"temporal_layers must be >= 1, got {self.temporal_layers}")


def _encoder_config(d: int, n_heads: int, n_layers: int, max_seq_len: int, vocab_size: int = 1,
                    position: str = "none") -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, d_model=d, n_layers=n_layers, n_heads=n_heads, d_ff=4 * d,
                       max_seq_len=max_seq_len, norm="layernorm", norm_bias=True, position=position, causal=False,
                       head="none", qkv_bias=True, out_bias=True, mlp="gelu", mlp_bias=True, init="normal")


def _embeds_only(model: Transformer) -> Transformer:
    """A Transformer fed inputs_embeds only: its token table is never read, so zero it and freeze it."""
    nn.init.zeros_(model.tok_emb.weight)
    model.tok_emb.weight.requires_grad_(False)
    return model


def clip_to_pixels(clip, frames: int, size: int) -> torch.Tensor:
    """A uint8 clip (F, S, S, 3) (load_video_clip) -> (F, 3, S, S) floats in [-1, 1], refused unless it has
    exactly `frames` frames of size x size RGB."""
    if not isinstance(clip, np.ndarray):
        raise LmstackError(f"a clip must be a uint8 numpy array (frames, {size}, {size}, 3), got {type(clip).__name__}")
    if clip.ndim != 4:
        raise LmstackError(f"a clip must have shape (frames, {size}, {size}, 3), got {clip.shape}")
    if clip.shape[0] == 0:
        raise LmstackError("the video has no frames: a clip needs at least one frame")
    if clip.shape[0] != frames:
        raise LmstackError(f"the video has {clip.shape[0]} frames; this model reads exactly {frames}")
    if clip.shape[1:] != (size, size, 3):
        raise LmstackError(f"each frame must be {size}x{size} RGB (shape ({size}, {size}, 3)), got {clip.shape[1:]}")
    if clip.dtype != np.uint8:
        raise LmstackError(f"a clip must hold uint8 pixels, got dtype {clip.dtype}")
    return torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class VideoEncoder(nn.Module):
    """The shared part: the per-frame ViT and the clip check. Subclasses define tokens() and encode()."""

    def __init__(self, cfg: VideoConfig):
        super().__init__()
        self.config = cfg
        self.vit = ViT(cfg.vision)

    @property
    def d_model(self) -> int:
        return self.config.vision.d_model

    def check(self, clip: torch.Tensor) -> tuple[int, int]:
        """Refuse anything but float (B, F, 3, S, S) with F == config.frames; returns (B, F)."""
        cfg, s = self.config, self.config.vision.image_size
        if not isinstance(clip, torch.Tensor) or clip.dim() != 5:
            shape = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
            raise LmstackError(f"a clip batch must have shape (batch, frames={cfg.frames}, 3, {s}, {s}), got {shape}")
        if clip.shape[1] == 0:
            raise LmstackError("the video has no frames: a clip needs at least one frame")
        if clip.shape[1] != cfg.frames:
            raise LmstackError(f"the video has {clip.shape[1]} frames; this {cfg.encoder} encoder reads exactly "
                               f"{cfg.frames}")
        if tuple(clip.shape[2:]) != (3, s, s):
            raise LmstackError(f"each frame must be (3, {s}, {s}) pixels, got {tuple(clip.shape[2:])}")
        if not clip.is_floating_point():
            raise LmstackError(f"clip pixels must be floats in [-1, 1], got dtype {clip.dtype}")
        return clip.shape[0], clip.shape[1]

    def frame_vectors(self, clip: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, S, S) -> (B, F, d): each frame through the ViT alone (pooled, normed class token)."""
        b, f = self.check(clip)
        return self.vit.pooled(clip.flatten(0, 1)).view(b, f, -1)

    def tokens(self, clip: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, clip: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TemporalEncoder(VideoEncoder):
    """ViT per frame + learned temporal positions + a bidirectional Transformer over [video CLS, frame_1..F]."""

    def __init__(self, cfg: VideoConfig):
        super().__init__(cfg)
        d = self.d_model
        self.time_emb = nn.Parameter(torch.randn(cfg.frames, d) * 0.5)  # frame vectors are normed (unit scale)
        self.cls_token = nn.Parameter(torch.randn(d) * d ** -0.5)
        self.temporal = _embeds_only(Transformer(_encoder_config(d, cfg.vision.n_heads, cfg.temporal_layers,
                                                                 cfg.frames + 1)))

    def tokens(self, clip: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, S, S) -> (B, 1 + F, d): the video class token, then each frame in time context (normed)."""
        x = self.frame_vectors(clip) + self.time_emb
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        return self.temporal(inputs_embeds=torch.cat([cls, x], dim=1))

    def encode(self, clip: torch.Tensor) -> torch.Tensor:
        return self.tokens(clip)[:, 0]


class DividedEncoder(VideoEncoder):
    """TimeSformer's divided attention: before each ViT block (space, within a frame) a one-block Transformer
    attends over time at each token position; each frame pooled after the last block is an output token."""

    def __init__(self, cfg: VideoConfig):
        super().__init__(cfg)
        d, v = self.d_model, cfg.vision
        self.time_emb = nn.Parameter(torch.randn(cfg.frames, d) * 0.02)
        self.time_blocks = nn.ModuleList(
            _embeds_only(Transformer(_encoder_config(d, v.n_heads, 1, cfg.frames))) for _ in range(v.n_layers))
        for block in self.time_blocks:
            block.final_norm = None  # a residual sub-layer of the ViT's stream, not a finished encoder

    def tokens(self, clip: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, S, S) -> (B, F, d): each frame pooled (class token or patch mean) after space-time attention."""
        b, f = self.check(clip)
        x = self.vit.embed(clip.flatten(0, 1))  # (B*F, 1 + P, d): space positions added
        t = x.shape[1]
        x = (x.view(b, f, t, -1) + self.time_emb[None, :, None]).flatten(0, 1)

        def over_time(layer: int, h: torch.Tensor) -> torch.Tensor:
            # (B*F, T, d) -> (B*T, F, d): every token position attends over the frames, then back for space
            h = h.view(b, f, t, -1).transpose(1, 2).reshape(b * t, f, -1)
            h = self.time_blocks[layer](inputs_embeds=h)
            return h.view(b, t, f, -1).transpose(1, 2).reshape(b * f, t, -1)

        h = self.vit.encoder(inputs_embeds=x, layer_hook=over_time)
        frame = h[:, 0] if self.config.vision.pool == "cls" else h[:, 1:].mean(dim=1)  # as ViT.pooled
        return self.vit.post_norm(frame).view(b, f, -1)

    def encode(self, clip: torch.Tensor) -> torch.Tensor:
        return self.tokens(clip).mean(dim=1)


class FrameMeanEncoder(VideoEncoder):
    """The baseline: the per-frame ViT's vectors averaged over time (one token): blind to frame order."""

    def tokens(self, clip: torch.Tensor) -> torch.Tensor:
        return self.frame_vectors(clip).mean(dim=1, keepdim=True)

    def encode(self, clip: torch.Tensor) -> torch.Tensor:
        return self.tokens(clip)[:, 0]


ENCODERS = {"temporal": TemporalEncoder, "divided": DividedEncoder, "mean": FrameMeanEncoder}


def build_video_encoder(cfg: VideoConfig) -> VideoEncoder:
    return ENCODERS[cfg.encoder](cfg)


def n_video_tokens(cfg: VideoConfig) -> int:
    """How many vectors tokens() gives per clip."""
    return {"temporal": cfg.frames + 1, "divided": cfg.frames, "mean": 1}[cfg.encoder]


@dataclass
class VideoCLIPConfig:
    video: VideoConfig = field(default_factory=VideoConfig)
    """The video tower."""
    text: TextConfig = field(default_factory=lambda: TextConfig(max_seq_len=192))
    """The caption tower: a causal Transformer pooled at its first EOS (clip.py's text side)."""
    embed_dim: int = 64
    """Width of the shared video-text space."""
    init_temperature: float = 0.07
    """Softmax temperature at init (logit_scale = log 1/T, clamped at log 100)."""

    def __post_init__(self) -> None:
        need(self.embed_dim > 0, f"embed_dim must be positive, got {self.embed_dim}")
        need(0.01 <= self.init_temperature <= 10,
             f"init_temperature must be in [0.01, 10], got {self.init_temperature}")


class VideoCLIP(nn.Module):
    """Video-text contrastive pretraining: symmetric InfoNCE between clips and their captions (as CLIP)."""

    def __init__(self, cfg: VideoCLIPConfig):
        super().__init__()
        self.config = cfg
        self.video = build_video_encoder(cfg.video)
        self.text = Transformer(cfg.text.model_config())
        swap_activation(self.text, cfg.text.activation)
        self.video_projection = nn.Linear(self.video.d_model, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.d_model, cfg.embed_dim, bias=False)
        for proj in (self.video_projection, self.text_projection):
            nn.init.normal_(proj.weight, 0.0, proj.in_features ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def encode_video(self, clip: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.video_projection(self.video.encode(clip)), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        check_text_ids(ids, self.config.text)  # the same text tower and checks as CLIP's
        hidden = self.text(ids)
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), first_eos(ids, self.config.text.eos_token_id)]
        return F.normalize(self.text_projection(pooled), dim=-1)

    def forward(self, clip: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if clip.shape[0] != ids.shape[0]:
            raise LmstackError(f"the loss pairs clip i with caption i: got {clip.shape[0]} clips, {ids.shape[0]} texts")
        return clip_loss(self.scale() * self.encode_video(clip) @ self.encode_text(ids).T)


@dataclass
class VideoQAConfig:
    video: VideoConfig = field(default_factory=VideoConfig)
    """The video encoder whose tokens the fusion reads."""
    vocab_size: int = 512
    """Question token ids (the tokenizer's vocab_size)."""
    n_answers: int = 64
    """Classes: the answer vocabulary's size."""
    d_model: int = 64
    """Width of the fusion Transformer."""
    n_layers: int = 2
    """Fusion Transformer blocks (bidirectional over video tokens + question tokens)."""
    n_heads: int = 4
    """Fusion attention heads."""
    max_question_len: int = 32
    """Longest question in tokens, BOS and EOS included."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_answers", "d_model", "n_layers", "n_heads", "max_question_len"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.n_answers >= 2, f"n_answers must be >= 2, got {self.n_answers}")
        need(self.d_model % self.n_heads == 0, f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")


class VideoQA(nn.Module):
    """[video tokens projected | question tokens] -> fusion Transformer -> answer logits at the question's BOS."""

    def __init__(self, cfg: VideoQAConfig):
        super().__init__()
        self.config = cfg
        self.video = build_video_encoder(cfg.video)
        self.n_video = n_video_tokens(cfg.video)
        self.fusion = Transformer(_encoder_config(cfg.d_model, cfg.n_heads, cfg.n_layers,
                                                  self.n_video + cfg.max_question_len, cfg.vocab_size, "learned"))
        self.video_proj = nn.Linear(self.video.d_model, cfg.d_model)
        self.modality = nn.Parameter(torch.randn(2, cfg.d_model) * 0.02)  # video vs text, as BERT's segment types
        self.head = nn.Linear(cfg.d_model, cfg.n_answers)

    def forward(self, clip: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """clip (B, F, 3, S, S), ids (B, T) questions (BOS first, right-padded), mask (B, T) 1 = real token
        -> (B, n_answers) logits."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != clip.shape[0]:
            raise LmstackError(f"question ids must be (batch={clip.shape[0]}, time), got "
                               f"{getattr(ids, 'shape', type(ids).__name__)}")
        return self.answer(self.video.tokens(clip), ids, mask)

    def answer(self, video_tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """forward() from the encoder's tokens (B, N, d): a clip asked several questions is encoded once."""
        cfg = self.config
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != video_tokens.shape[0]:
            raise LmstackError(f"question ids must be (batch={video_tokens.shape[0]}, time), got "
                               f"{getattr(ids, 'shape', type(ids).__name__)}")
        if ids.shape[1] > cfg.max_question_len:
            raise LmstackError(f"a question of {ids.shape[1]} tokens is longer than max_question_len="
                               f"{cfg.max_question_len}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
            raise LmstackError(f"question ids must be in 0..{cfg.vocab_size - 1}, got "
                               f"{int(ids.min())}..{int(ids.max())}")
        v = self.video_proj(video_tokens) + self.modality[0]
        q = self.fusion.tok_emb(ids) + self.modality[1]
        keep = torch.ones(ids.shape, dtype=torch.long, device=ids.device) if mask is None else mask.long()
        keep = torch.cat([keep.new_ones(v.shape[:2]), keep], dim=1)
        h = self.fusion(inputs_embeds=torch.cat([v, q], dim=1), attention_mask=keep)
        return self.head(h[:, v.shape[1]])  # the question's BOS, right after the video tokens


__all__ = ["VideoConfig", "VideoEncoder", "TemporalEncoder", "DividedEncoder", "FrameMeanEncoder", "ENCODERS",
           "build_video_encoder", "n_video_tokens", "clip_to_pixels", "VideoCLIPConfig", "VideoCLIP",
           "VideoQAConfig", "VideoQA"]
