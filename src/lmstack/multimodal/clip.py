"""CLIP (Radford et al. 2021): a ViT and a causal text Transformer trained so that a picture and its caption land
close together, by a symmetric InfoNCE loss over the batch's image-text similarity matrix.

Both towers are the one lmstack Transformer. The text tower is pooled at the first EOS token (HF CLIP with a
post-#24773 eos_token_id), each tower has a bias-free projection into the shared embed_dim, and the learned
logit_scale (log 1/temperature) is clamped at log(100) as CLIP does, so logits stay <= 100 * cosine.

Usage:
    from lmstack.multimodal.clip import CLIP, CLIPConfig, TextConfig, zero_shot, retrieval_recall, save_clip, load_clip
    model = CLIP(CLIPConfig(vision=VisionConfig(image_size=32), text=TextConfig(vocab_size=tok.vocab_size)))
    ids = tokenize(tok, ["a red circle.", "a blue star."], model.config.text.max_seq_len)
    loss = clip_loss(model.logits(pixels, ids))                      # the batch's pairs on the diagonal
    probs = zero_shot(model, tok, pixels, ["red circle", "blue star"])  # (N, 2), prompt-ensembled
    recall = retrieval_recall(model.encode_image(pixels), model.encode_text(ids), ks=(1, 5))
    save_clip(model, tok, "runs/clip"); model, tok = load_clip("runs/clip")
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lmstack.config import atomic_write_bytes, atomic_write_text, from_dict, to_dict
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.load_guard import check_model_dir, load_safetensors, load_state_checked, read_json
from lmstack.multimodal.vit import ViT, VisionConfig, swap_activation
from lmstack.runtime.validation import check_choices, need
from lmstack.tokenizer import load_tokenizer

MODEL_TYPE = "lmstack-clip"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature so logits never exceed 100 * cosine
TEMPLATES = ("a picture of a {}.", "a {}.", "an image with a {}.", "there is a {} in this picture.")


@dataclass
class TextConfig:
    vocab_size: int = 512
    """Token ids the text tower embeds (the tokenizer's vocab_size)."""
    d_model: int = 64
    """Width of the text tower."""
    n_layers: int = 2
    """Transformer blocks of the text tower."""
    n_heads: int = 4
    """Attention heads."""
    d_ff: int = 0
    """MLP hidden width; 0 means 4 * d_model."""
    max_seq_len: int = 64
    """Longest text in tokens, BOS and EOS included (learned positions)."""
    activation: Literal["gelu", "quick_gelu", "gelu_tanh", "relu"] = "quick_gelu"
    """MLP activation (CLIP: quick_gelu)."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    bos_token_id: int = 0
    """Id put in front of every text."""
    eos_token_id: int = 1
    """Id after every text; the tower is pooled at its first occurrence."""
    pad_token_id: int = 2
    """Id that pads short texts on the right (never seen by the EOS token: attention is causal)."""

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            need(getattr(self, name) > 0, f"text.{name} must be positive, got {getattr(self, name)}")
        need(self.max_seq_len >= 3, f"text.max_seq_len={self.max_seq_len} must leave room for BOS, a token and EOS")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            need(0 <= getattr(self, name) < self.vocab_size,
                 f"text.{name}={getattr(self, name)} must be an id below vocab_size={self.vocab_size}")

    def model_config(self) -> ModelConfig:
        mlp = "gelu" if self.activation == "quick_gelu" else self.activation
        return ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, d_ff=self.d_ff or 4 * self.d_model, max_seq_len=self.max_seq_len,
                           norm="layernorm", norm_eps=self.norm_eps, position="learned", causal=True, head="none",
                           qkv_bias=True, out_bias=True, mlp=mlp, mlp_bias=True, init="normal",
                           bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
                           pad_token_id=self.pad_token_id)


@dataclass
class CLIPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    """The image tower (a ViT)."""
    text: TextConfig = field(default_factory=TextConfig)
    """The text tower (a causal Transformer pooled at EOS)."""
    embed_dim: int = 64
    """Width of the shared image-text space both projections map into."""
    init_temperature: float = 0.07
    """Softmax temperature at init; logit_scale starts at log(1 / init_temperature) (CLIP: 0.07)."""

    def __post_init__(self) -> None:
        need(self.embed_dim > 0, f"embed_dim must be positive, got {self.embed_dim}")
        need(0.01 <= self.init_temperature <= 10,
             f"init_temperature must be in [0.01, 10] (logit_scale is clamped at 100), got {self.init_temperature}")


def tokenize(tok, texts: Sequence[str], max_len: int) -> torch.Tensor:
    """(B, T) ids: BOS + text + EOS, right-padded with PAD to the longest row; a long text is cut before its EOS."""
    if isinstance(texts, str) or not len(texts):
        raise LmstackError(f"texts must be a non-empty list of strings, got {texts!r}")
    rows = []
    for text in texts:
        if not isinstance(text, str):
            raise LmstackError(f"each text must be a string, got {type(text).__name__}")
        rows.append([tok.bos_id] + tok.encode(text)[:max_len - 2] + [tok.eos_id])
    width = max(map(len, rows))
    return torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


def check_text_ids(ids: torch.Tensor, cfg: TextConfig) -> None:
    """Refuse, naming the problem, ids a text tower built from `cfg` cannot read (shape, dtype, length, range)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        raise LmstackError(f"text ids must be an integer tensor (batch, time), got "
                           f"{getattr(ids, 'shape', type(ids).__name__)}")
    if ids.shape[1] > cfg.max_seq_len:
        raise LmstackError(f"text of {ids.shape[1]} tokens is longer than text.max_seq_len={cfg.max_seq_len}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
        raise LmstackError(f"text ids must be in 0..{cfg.vocab_size - 1}, got {int(ids.min())}..{int(ids.max())}")


def first_eos(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B,) position of each row's first EOS, where a causal text tower pools (refused if a row has none)."""
    is_eos = ids == eos_token_id
    if not bool(is_eos.any(dim=1).all()):
        raise LmstackError(f"every text row needs an EOS token (id {eos_token_id}); "
                           "make ids with lmstack.multimodal.clip.tokenize")
    return is_eos.int().argmax(dim=1)  # the first EOS: PAD may equal EOS in some tokenizers


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.vision = ViT(cfg.vision)
        self.text = Transformer(cfg.text.model_config())
        swap_activation(self.text, cfg.text.activation)
        self.visual_projection = nn.Linear(cfg.vision.d_model, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.d_model, cfg.embed_dim, bias=False)
        for proj in (self.visual_projection, self.text_projection):
            nn.init.normal_(proj.weight, 0.0, proj.in_features ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100 (CLIP's guard against a collapsing temperature)."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, embed_dim) projected, not normalised (HF get_image_features)."""
        return self.visual_projection(self.vision.pooled(pixels))

    def text_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, d_text) final-normed hidden states of the causal text tower."""
        check_text_ids(ids, self.config.text)
        return self.text(ids)

    def eos_positions(self, ids: torch.Tensor) -> torch.Tensor:
        return first_eos(ids, self.config.text.eos_token_id)

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, embed_dim): the hidden state at the first EOS, projected (HF get_text_features)."""
        hidden = self.text_hidden(ids)
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), self.eos_positions(ids)]
        return self.text_projection(pooled)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(pixels), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_features(ids), dim=-1)

    def logits(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """logits_per_image (N, B): scale * cosine(image n, text b)."""
        return self.scale() * self.encode_image(pixels) @ self.encode_text(ids).T

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The symmetric InfoNCE loss of N pictures and their N texts (pair i = row i of each)."""
        if pixels.shape[0] != ids.shape[0]:
            raise LmstackError(f"CLIP's loss pairs picture i with text i: got {pixels.shape[0]} pictures and "
                               f"{ids.shape[0]} texts")
        return clip_loss(self.logits(pixels, ids))


def clip_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies with the matching pair on the diagonal."""
    n = logits_per_image.shape[0]
    if logits_per_image.dim() != 2 or logits_per_image.shape[1] != n:
        raise LmstackError(f"clip_loss needs a square (N, N) similarity matrix, got {tuple(logits_per_image.shape)}")
    target = torch.arange(n, device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.T, target)) / 2


@torch.no_grad()
def label_embeddings(model: CLIP, tok, labels: Sequence[str], templates: Sequence[str] = TEMPLATES) -> torch.Tensor:
    """(L, embed_dim): each label's prompts encoded, averaged over templates and renormalised (prompt ensembling)."""
    if not labels or not templates:
        raise LmstackError("zero-shot needs at least one label and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise LmstackError(f"each template needs a '{{}}' for the label, got {bad[0]!r}")
    texts = [t.format(label) for label in labels for t in templates]
    device = model.logit_scale.device
    emb = model.encode_text(tokenize(tok, texts, model.config.text.max_seq_len).to(device))
    emb = emb.view(len(labels), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


@torch.no_grad()
def zero_shot(model: CLIP, tok, pixels: torch.Tensor, labels: Sequence[str],
              templates: Sequence[str] = TEMPLATES) -> torch.Tensor:
    """(N, L) probabilities over `labels` for each picture: softmax of scale * cosine to the ensembled prompts."""
    classes = label_embeddings(model, tok, labels, templates)
    return (model.scale() * model.encode_image(pixels) @ classes.T).softmax(dim=-1)


def retrieval_recall(img_emb: torch.Tensor, txt_emb: torch.Tensor, ks: Sequence[int] = (1, 5),
                     text_image: torch.Tensor | None = None) -> dict:
    """Recall@k both ways from normalised embeddings. text_image[j] is the picture text j describes (default: j,
    one text per picture); image->text counts a hit when any of the picture's texts is in its top k."""
    n, m = img_emb.shape[0], txt_emb.shape[0]
    owner = torch.arange(m) if text_image is None else torch.as_tensor(text_image).long().cpu()
    if owner.shape != (m,) or (m and (int(owner.min()) < 0 or int(owner.max()) >= n)):
        raise LmstackError(f"text_image must give each of the {m} texts a picture in 0..{n - 1}")
    if text_image is None and n != m:
        raise LmstackError(f"{n} pictures and {m} texts: pass text_image to say which picture each text describes")
    sim = (img_emb @ txt_emb.T).float().cpu()  # (N, M)
    out: dict = {"n_images": n, "n_texts": m}
    for k in ks:
        if not 1 <= k:
            raise LmstackError(f"recall@k needs k >= 1, got {k}")
        top_t = sim.topk(min(k, m), dim=1).indices  # (N, k) texts per picture
        i2t = (owner[top_t] == torch.arange(n)[:, None]).any(dim=1).float()
        top_i = sim.T.topk(min(k, n), dim=1).indices  # (M, k) pictures per text
        t2i = (top_i == owner[:, None]).any(dim=1).float()
        out[f"i2t@{k}"], out[f"t2i@{k}"] = float(i2t.mean()), float(t2i.mean())
    return out


def save_clip(model: CLIP, tok, out: str | Path) -> Path:
    """Write out/config.json (model_type lmstack-clip), model.safetensors and the tokenizer, each atomically;
    config.json goes last, so a half-written directory is never taken for a CLIP."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmstackError(f"cannot save a CLIP to {out}: it is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / "model.safetensors", safetensors_bytes(tensors, metadata={"format": "pt"}))
    tok.save(out)
    config = {"model_type": MODEL_TYPE, "clip": to_dict(model.config)}
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def load_clip(path: str | Path, device: str | torch.device = "cpu") -> tuple[CLIP, object]:
    """(model, tokenizer) from a directory save_clip wrote; anything else is refused, naming what is missing."""
    path = check_model_dir(path, "a CLIP")
    data = read_json(path, "config.json", "CLIP config", want_object=True)
    if data.get("model_type") != MODEL_TYPE or not isinstance(data.get("clip"), dict):
        raise LmstackError(f"{path}/config.json is not a CLIP config: model_type={data.get('model_type')!r} "
                           f"(want {MODEL_TYPE!r}) with a 'clip' section")
    model = CLIP(from_dict(CLIPConfig, data["clip"]))
    tensors = load_safetensors(path, "model.safetensors", "CLIP weights")
    load_state_checked(model, tensors, f"{path}/model.safetensors")
    return model.to(device).eval(), load_tokenizer(path)
