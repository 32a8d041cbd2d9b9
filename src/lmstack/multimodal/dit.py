"""DiT (Peebles & Xie 2023), a diffusion denoiser that is the ONE lmstack Transformer reading patch tokens, and
ImageGenerator: a DiT, the frozen CLIP text tower that conditions it, the tokenizer and the noise schedule.

A noisy picture (B, 3, S, S) is cut into (S/p)^2 patches, each projected to a token with a learned position;
the timestep is a sinusoidal embedding through an MLP, used twice: as one "time" token in front and added to
every patch token. The text condition is the frozen CLIP text tower's per-token hidden states (multimodal/clip.py),
projected and prepended as tokens ("in-context conditioning"), so every patch attends to the prompt. Padding of
short prompts is masked out of attention. The Transformer is bidirectional (causal=False, head="none"); a
zero-initialised linear layer maps each output patch token back to its p*p*3 noise prediction, so an untrained
DiT predicts zero noise.

ImageGenerator holds either denoiser: this DiT or the conv UNet of multimodal/unet.py (same call signature);
config.json names it ("denoiser": "dit" | "unet", absent = "dit") beside its config, and its weights are saved
under that prefix (dit.* or unet.*).

ImageGenerator samples with DDIM or DDPM (multimodal/diffusion.py) and classifier-free guidance, the
unconditional half conditioned on the empty prompt "" (what training drops prompts to). A model directory holds
config.json (model_type lmstack-diffusion), model.safetensors (dit.* or unet.*, and text.*) and the tokenizer;
config.json is written last, so a half-written directory is never taken for a model. Train one with
multimodal/diffusion_train.py (`lmstack mm train-diffusion`).

Usage:
    from lmstack.multimodal.dit import DiT, DiTConfig, ImageGenerator
    dit = DiT(DiTConfig(image_size=32, patch_size=4, d_model=128, n_layers=4, text_dim=64))
    eps = dit(x_t, t, text, text_mask)     # (B,3,32,32), (B,), (B,L,64), (B,L) bool -> (B,3,32,32)

    gen = ImageGenerator.from_dir("runs/diffusion")       # or ImageGenerator.random(tiny=True, seed=0)
    images, warnings = gen.generate("a red circle", n=4, seed=0, steps=25, sampler="ddim", guidance=3.0)
    images[0].shape == (gen.size, gen.size, 3)             # uint8; warnings name words the model never saw
    gen.save("runs/copy")
    ImageGenerator.random(tiny=True, denoiser="unet").kind == "unet"
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lmstack.config import atomic_write_bytes, atomic_write_text, from_dict, to_dict
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.load_guard import check_model_dir, load_safetensors, load_state_checked, read_json
from lmstack.multimodal.clip import TextConfig, tokenize
from lmstack.multimodal.diffusion import (SCHEDULES, NoiseSchedule, ddim_sample, ddpm_sample, guided,
                                          timestep_embedding)
from lmstack.multimodal.shapes import COLOURS, SHAPES
from lmstack.multimodal.text import shapes_tokenizer
from lmstack.multimodal.unet import UNet, UNetConfig
from lmstack.multimodal.vit import swap_activation
from lmstack.runtime.validation import check_choice, need
from lmstack.tokenizer import load_tokenizer

MODEL_TYPE = "lmstack-diffusion"
SAMPLERS = ("ddim", "ddpm")
MAX_IMAGES = 64  # per generate() call: a bound on one request's work


@dataclass
class DiTConfig:
    image_size: int = 32
    """Side of the (square) pictures in pixels; a multiple of patch_size."""
    patch_size: int = 4
    """Side of one patch token."""
    d_model: int = 128
    """Width of the Transformer."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads."""
    text_dim: int = 64
    """Width of the text condition (the CLIP text tower's d_model)."""
    max_text_len: int = 16
    """Most text tokens the condition may have (BOS and EOS included)."""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "d_model", "n_layers", "n_heads", "text_dim", "max_text_len"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"dit.{name} must be a positive integer, got {value!r}")
        need(self.image_size % self.patch_size == 0,
             f"dit.image_size={self.image_size} must be a multiple of dit.patch_size={self.patch_size}")
        need(self.d_model % self.n_heads == 0,
             f"dit.d_model={self.d_model} must be divisible by dit.n_heads={self.n_heads}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def model_config(self) -> ModelConfig:
        """The encoder: bidirectional, no head, positions added here (the text part has none of its own)."""
        return ModelConfig(vocab_size=1, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                           d_ff=4 * self.d_model, max_seq_len=1 + self.max_text_len + self.n_patches,
                           norm="layernorm", position="none", causal=False, head="none", mlp="gelu",
                           qkv_bias=True, out_bias=True, mlp_bias=True, init="normal")

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DiTConfig":
        return from_dict(cls, data)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        d, p = cfg.d_model, cfg.patch_size
        self.patch_embed = nn.Linear(3 * p * p, d)
        self.pos_emb = nn.Parameter(torch.randn(cfg.n_patches, d) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.text_proj = nn.Linear(cfg.text_dim, d)
        self.text_pos = nn.Parameter(torch.randn(cfg.max_text_len, d) * 0.02)
        self.encoder = Transformer(cfg.model_config())
        # the Transformer always owns a token table; the DiT feeds inputs_embeds and never reads it: zero, frozen
        nn.init.zeros_(self.encoder.tok_emb.weight)
        self.encoder.tok_emb.weight.requires_grad_(False)
        self.out = nn.Linear(d, 3 * p * p)
        nn.init.zeros_(self.out.weight)  # the untrained denoiser predicts zero noise (DiT's zero-init output)
        nn.init.zeros_(self.out.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, P, 3 p p), patches in row-major order."""
        b, p, g = x.shape[0], self.config.patch_size, self.config.image_size // self.config.patch_size
        return x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, P, 3 p p) -> (B, 3, S, S), the inverse of patchify."""
        b, p, g = tokens.shape[0], self.config.patch_size, self.config.image_size // self.config.patch_size
        return tokens.reshape(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Noise prediction for x_t (B, 3, S, S) at steps t (B,), given text (B, L, text_dim), mask (B, L)."""
        cfg = self.config
        s = cfg.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise LmstackError(f"DiT input must have shape (B, 3, {s}, {s}), got {tuple(x.shape)}")
        if text.dim() != 3 or text.shape[0] != x.shape[0] or text.shape[2] != cfg.text_dim:
            raise LmstackError(f"text condition must have shape ({x.shape[0]}, L, {cfg.text_dim}), "
                               f"got {tuple(text.shape)}")
        if text.shape[1] > cfg.max_text_len:
            raise LmstackError(f"text condition of {text.shape[1]} tokens is longer than "
                               f"dit.max_text_len={cfg.max_text_len}")
        b, n_text = x.shape[0], text.shape[1]
        temb = self.time_mlp(timestep_embedding(t.to(x.device), cfg.d_model))  # (B, d)
        patches = self.patch_embed(self.patchify(x)) + self.pos_emb + temb[:, None]
        words = self.text_proj(text.to(x.dtype)) + self.text_pos[:n_text]
        h = torch.cat([temb[:, None], words, patches], dim=1)
        mask = None
        if text_mask is not None:
            ones = torch.ones(b, 1, dtype=torch.long, device=x.device)
            mask = torch.cat([ones, text_mask.long().to(x.device), ones.expand(b, cfg.n_patches)], dim=1)
        h = self.encoder(inputs_embeds=h, attention_mask=mask)
        return self.unpatchify(self.out(h[:, 1 + n_text:]))


DENOISERS = {"dit": (DiT, DiTConfig), "unet": (UNet, UNetConfig)}  # kind -> (module, its config)


def denoiser_kind(module: nn.Module) -> str:
    """"dit" or "unet": the key under which a denoiser's config and weights are saved."""
    for kind, (cls, _) in DENOISERS.items():
        if isinstance(module, cls):
            return kind
    raise LmstackError(f"not a denoiser of an ImageGenerator: {type(module).__name__} (want one of "
                       f"{', '.join(DENOISERS)})")


def prompt_for(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def pixels_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, S, S) in [-1, 1] -> (N, S, S, 3) uint8."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class ImageGenerator:
    """A trained (or random) text-to-image model: a denoiser (DiT or UNet, kept as .dit whichever it is) + frozen
    CLIP text tower + tokenizer + noise schedule."""

    def __init__(self, dit: nn.Module, text: Transformer, text_config: TextConfig, tok, schedule: NoiseSchedule,
                 known_words):
        self.kind = denoiser_kind(dit)
        self.dit, self.text, self.text_config = dit.eval(), text.eval(), text_config
        self.tok, self.schedule = tok, schedule
        self.known_words = sorted(set(known_words))
        self._cache: dict[str, tuple[torch.Tensor, int]] = {}

    @property
    def size(self) -> int:
        return self.dit.config.image_size

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    def to(self, device) -> "ImageGenerator":
        self.dit.to(device), self.text.to(device)
        self._cache.clear()
        return self

    @classmethod
    def random(cls, tiny: bool = True, seed: int = 0, image_size: int = 32, denoiser: str = "dit") -> "ImageGenerator":
        """An untrained generator (for tests and serving checks): the shapes tokenizer, a random text tower."""
        check_choice("denoiser", denoiser, tuple(DENOISERS))
        torch.manual_seed(seed)
        tok = shapes_tokenizer(vocab_size=300, n_images=20)
        d_text = 32 if tiny else 64
        text_cfg = TextConfig(vocab_size=tok.vocab_size, d_model=d_text, n_layers=1 if tiny else 2, n_heads=2,
                              max_seq_len=16, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                              pad_token_id=tok.pad_id)
        dit_cfg = (DiTConfig(image_size=image_size, patch_size=8, d_model=32, n_layers=1, n_heads=2, text_dim=d_text)
                   if tiny else DiTConfig(image_size=image_size, text_dim=d_text))
        if denoiser == "unet":
            dit_cfg = (UNetConfig(image_size=image_size, channels=8, channel_mults=(1, 2), groups=4, n_heads=2,
                                  text_dim=d_text) if tiny else UNetConfig(image_size=image_size, text_dim=d_text))
        words = {w for c in COLOURS for s in SHAPES for w in prompt_for(c, s).split()}
        return cls(DENOISERS[denoiser][0](dit_cfg), text_tower(text_cfg), text_cfg, tok, NoiseSchedule("cosine", 1000),
                   words)

    # ---- text
    def check_prompt(self, prompt: str) -> list[str]:
        """Raise on an empty or over-long prompt; return warnings naming words the model never saw."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise LmstackError("the prompt is empty: describe a picture, e.g. 'a red circle'")
        n_tokens = len(self.tok.encode(prompt)) + 2
        limit = self.dit.config.max_text_len
        if n_tokens > limit:
            raise LmstackError(f"the prompt is {n_tokens} tokens (BOS and EOS included), over this model's "
                               f"limit of {limit}; shorten it")
        known = set(self.known_words)
        unknown = [w for w in dict.fromkeys(re.findall(r"[a-z]+", prompt.lower())) if w not in known]
        if not unknown:
            return []
        return [f"unknown word{'s' if len(unknown) > 1 else ''} {', '.join(repr(w) for w in unknown)}: never seen "
                f"in training, so the picture cannot follow {'them' if len(unknown) > 1 else 'it'} "
                f"(known words: {', '.join(self.known_words)})"]

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, int]:
        """(max_text_len, text_dim) hidden states of the text tower (zeros past EOS) and the real length."""
        if prompt not in self._cache:
            ids = tokenize(self.tok, [prompt], self.dit.config.max_text_len).to(self.device)
            hidden = self.text(ids)[0]
            out = torch.zeros(self.dit.config.max_text_len, hidden.shape[-1], device=self.device)
            out[:ids.shape[1]] = hidden
            self._cache[prompt] = (out, ids.shape[1])
        return self._cache[prompt]

    def condition(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, text_dim) text states and (B, L) bool mask, L the longest prompt's length."""
        enc = [self.encode_prompt(p) for p in prompts]
        width = max(n for _, n in enc)
        text = torch.stack([h[:width] for h, _ in enc])
        lengths = torch.tensor([n for _, n in enc], device=self.device)
        mask = torch.arange(width, device=self.device)[None] < lengths[:, None]
        return text, mask

    # ---- sampling
    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int = 0, steps: int = 50, sampler: str = "ddim",
               guidance: float = 3.0, eta: float = 0.0) -> torch.Tensor:
        """(len(prompts), 3, S, S) pixels in [-1, 1], one picture per prompt, in one batch."""
        check_choice("sampler", sampler, SAMPLERS)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise LmstackError(f"seed must be an integer, got {seed!r}")
        if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or not 0 <= guidance <= 50:
            raise LmstackError(f"guidance must be a number in 0..50 (1 = no guidance), got {guidance!r}")
        cond, cond_mask = self.condition(prompts)
        uncond, uncond_mask = self.condition([""] * len(prompts))
        width = max(cond.shape[1], uncond.shape[1])
        pad = lambda a, m: (torch.nn.functional.pad(a, (0, 0, 0, width - a.shape[1])),  # noqa: E731
                            torch.nn.functional.pad(m, (0, width - m.shape[1])))
        (cond, cond_mask), (uncond, uncond_mask) = pad(cond, cond_mask), pad(uncond, uncond_mask)
        both, both_mask = torch.cat([cond, uncond]), torch.cat([cond_mask, uncond_mask])

        def cond_uncond(x, t):
            if guidance == 1.0:  # w=1 is the conditional model: skip the unconditional half
                e = self.dit(x, t, cond, cond_mask)
                return e, e
            e = self.dit(torch.cat([x, x]), torch.cat([t, t]), both, both_mask)
            return e[:len(x)], e[len(x):]

        eps_fn = guided(cond_uncond, float(guidance))
        shape = (len(prompts), 3, self.size, self.size)
        gen = torch.Generator().manual_seed(seed)
        if sampler == "ddpm":
            return ddpm_sample(eps_fn, shape, self.schedule, steps=steps, generator=gen, device=self.device)
        return ddim_sample(eps_fn, shape, self.schedule, steps=steps, eta=eta, generator=gen, device=self.device)

    def generate(self, prompt: str, n: int = 1, seed: int = 0, steps: int = 50, sampler: str = "ddim",
                 guidance: float = 3.0) -> tuple[list[np.ndarray], list[str]]:
        """`n` pictures of `prompt` as uint8 (S, S, 3) arrays, and warnings (unknown words); seed fixes them."""
        warnings = self.check_prompt(prompt)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_IMAGES:
            raise LmstackError(f"n must be an integer in 1..{MAX_IMAGES}, got {n!r}")
        pixels = self.sample([prompt] * n, seed=seed, steps=steps, sampler=sampler, guidance=guidance)
        return list(pixels_to_uint8(pixels)), warnings

    # ---- files
    def save(self, path: str | Path) -> Path:
        """Write config.json, model.safetensors and the tokenizer, each atomically, config.json last."""
        out = Path(path)
        if out.exists() and not out.is_dir():
            raise LmstackError(f"cannot save an image generator to {out}: it is a file, not a directory")
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"{self.kind}.{k}": v for k, v in self.dit.state_dict().items()}
        tensors.update({f"text.{k}": v for k, v in self.text.state_dict().items()})
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        atomic_write_bytes(out / "model.safetensors", safetensors_bytes(tensors, metadata={"format": "pt"}))
        self.tok.save(out)
        config = {"model_type": MODEL_TYPE, "denoiser": self.kind, self.kind: to_dict(self.dit.config),
                  "text": to_dict(self.text_config),
                  "schedule": {"kind": self.schedule.kind, "timesteps": self.schedule.timesteps},
                  "known_words": self.known_words}
        atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
        return out

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device = "cpu") -> "ImageGenerator":
        """Load what save() wrote; any other directory is refused, naming what is missing or wrong."""
        path = check_model_dir(path, "an image generator")
        data = read_json(path, "config.json", "image generator config", want_object=True)
        if data.get("model_type") != MODEL_TYPE:
            raise LmstackError(f"{path}/config.json has model_type={data.get('model_type')!r}, not {MODEL_TYPE!r}: "
                               "not an image generator (write one with lmstack mm train-diffusion)")
        kind = data.get("denoiser", "dit")  # directories saved before the UNet existed hold a DiT
        if kind not in DENOISERS:
            raise LmstackError(f"{path}/config.json: denoiser={kind!r} is not one of {', '.join(DENOISERS)}")
        missing = [k for k in (kind, "text", "schedule", "known_words") if k not in data]
        if missing:
            raise LmstackError(f"{path}/config.json lacks {', '.join(missing)}")
        sched = data["schedule"]
        if not isinstance(sched, dict) or sched.get("kind") not in SCHEDULES:
            raise LmstackError(f"{path}/config.json: schedule.kind must be one of {', '.join(SCHEDULES)}")
        text_cfg = from_dict(TextConfig, data["text"])
        module_cls, config_cls = DENOISERS[kind]
        dit, text = module_cls(from_dict(config_cls, data[kind])), text_tower(text_cfg)
        tensors = load_safetensors(path, "model.safetensors", "image generator weights")
        for prefix, module in ((f"{kind}.", dit), ("text.", text)):
            got = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            load_state_checked(module, got, f"{path}/model.safetensors", prefix)
        gen = cls(dit, text, text_cfg, load_tokenizer(path), NoiseSchedule(sched["kind"], int(sched["timesteps"])),
                  [str(w) for w in data["known_words"]])
        return gen.to(device)


def text_tower(cfg: TextConfig) -> Transformer:
    """CLIP's causal text Transformer (the same module CLIP.text is), frozen."""
    tower = Transformer(cfg.model_config())
    swap_activation(tower, cfg.activation)
    return tower.requires_grad_(False).eval()
