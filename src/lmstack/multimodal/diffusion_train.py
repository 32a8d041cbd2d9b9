"""Training a text-to-image DiT on the shapes world, and the `lmstack mm train-diffusion` / `generate-image`
commands (the model itself, ImageGenerator, is in multimodal/dit.py; it is re-exported here).

The data are single-object pictures: one shape of one colour, at a random place and radius, on the world's
plain gray background, captioned "a {colour} {shape}". The colour-shape pairs of vision_world.HELDOUT_PAIRS are
kept out of training, so a prompt like "a green star" tests composition. Training first fits a small CLIP on the
same pictures (or loads one: `clip`), freezes its text tower, and trains the DiT with the simple epsilon loss,
the prompt dropped to "" 10% of the time (what guidance subtracts), and an EMA of the weights.

The run writes into `out`: the model (config.json, model.safetensors, tokenizer), clip/ (the conditioning
CLIP, when trained here), train_config.json, metrics.jsonl and loss.png.

Usage:
    lmstack mm train-diffusion --out runs/diffusion --steps 1500
    lmstack mm train-diffusion --out runs/unet --denoiser unet        # the conv UNet denoiser (multimodal/unet.py)
    lmstack mm generate-image --prompt "a red circle" --model runs/diffusion --out img.png

    from lmstack.multimodal.diffusion_train import DiffusionTrainConfig, ImageGenerator, train_diffusion
    summary = train_diffusion(DiffusionTrainConfig(out="runs/diffusion", steps=1500))
    images, warnings = ImageGenerator.from_dir("runs/diffusion").generate("a red circle", n=4)
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lmstack.config import atomic_save_figure, atomic_write_bytes, atomic_write_text, to_dict
from lmstack.errors import LmstackError
from lmstack.multimodal.clip import CLIP, CLIPConfig, TextConfig, load_clip, save_clip
from lmstack.multimodal.clip_train import CLIPTrainConfig, fit as fit_clip
from lmstack.multimodal.diffusion import SCHEDULES, NoiseSchedule, diffusion_loss
from lmstack.multimodal.dit import DENOISERS, DiTConfig, ImageGenerator, prompt_for, text_tower
from lmstack.multimodal.shapes import COLOURS, SHAPES, Obj, Scene, render
from lmstack.multimodal.text import shapes_tokenizer
from lmstack.multimodal.unet import UNetConfig
from lmstack.multimodal.vision_world import HELDOUT_PAIRS
from lmstack.multimodal.vit import VisionConfig
from lmstack.progress import BudgetBar
from lmstack.runtime.device import resolve_device
from lmstack.runtime.validation import check_choice, need
from lmstack.threads import set_threads
from lmstack.train.metrics import RunLog

CLIP_TEMPLATES = ("{}", "{}.", "a picture of {}.", "an image of {}.")


def single_object_world(n: int, size: int = 32, seed: int = 0, pairs=None) -> tuple[np.ndarray, list[tuple]]:
    """(uint8 pictures (n, size, size, 3), [(colour, shape)] labels): one shape of a random pair in `pairs`
    (default: every pair but HELDOUT_PAIRS), radius 20-32% of the side, anywhere it fits, on plain gray."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS] if pairs is None else pairs
    if not pairs or n < 1:
        raise LmstackError(f"single_object_world needs n >= 1 and at least one pair, got n={n}, {len(pairs)} pairs")
    rng = random.Random(seed)
    # shapes.Scene draws on at least 32 px: smaller pictures are rendered at 32 and reduced by box filtering
    side = max(size, 32)
    out, labels = np.empty((n, size, size, 3), dtype=np.uint8), []
    for i in range(n):
        colour, shape = pairs[rng.randrange(len(pairs))]
        r = rng.randint(round(0.2 * side), round(0.32 * side))
        cx, cy = rng.randint(r, side - 1 - r), rng.randint(r, side - 1 - r)
        img = render(Scene(side, "gray", "plain", 0, (Obj(shape, colour, "large", cx, cy, r),)))
        out[i] = np.asarray(img if side == size else img.resize((size, size), Image.BOX), dtype=np.uint8)
        labels.append((colour, shape))
    return out, labels


def uint8_to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0





# ---- training
@dataclass
class DiffusionTrainConfig:
    out: str = ""
    """The run directory: the model (ImageGenerator.from_dir reads it), clip/, metrics.jsonl, loss.png."""
    n_images: int = 4000
    """Training pictures of the single-object world (held-out colour-shape pairs excluded)."""
    image_size: int = 32
    """Side of the pictures (16, 24 or 32 ...; below 32 they are rendered at 32 and box-reduced)."""
    steps: int = 1500
    """Optimizer steps of the DiT."""
    batch_size: int = 64
    """Pictures per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    warmup: int = 50
    """Warmup steps."""
    p_uncond: float = 0.1
    """Probability that a training prompt is replaced by "" (the unconditional model guidance needs)."""
    ema: float = 0.995
    """Decay of the weights' exponential moving average that is saved (0 = save the raw weights)."""
    schedule: str = "cosine"
    """Beta schedule: linear or cosine."""
    timesteps: int = 1000
    """Diffusion steps T of the training chain."""
    denoiser: str = "dit"
    """The denoiser: dit (a Transformer on patch tokens) or unet (a conv UNet, multimodal/unet.py)."""
    dit: DiTConfig = field(default_factory=DiTConfig)
    """The DiT when denoiser=dit (image_size and text_dim are taken from the run and the CLIP)."""
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(channels=16, groups=4))
    """The UNet when denoiser=unet (image_size and text_dim are taken from the run and the CLIP)."""
    clip: str = ""
    """A CLIP directory whose frozen text tower conditions the DiT; "" trains one on the same pictures first."""
    clip_steps: int = 300
    """Steps of that CLIP when it is trained here."""
    seed: int = 0
    """Seed of the data, the init and the batches."""
    max_seconds: float = 0.0
    """Stop the DiT's training after this many seconds (0 = no limit)."""
    device: str = "auto"
    """auto (cuda when visible), cpu, cuda, cuda:N."""
    threads: int = 0
    """Torch threads (0 = the default)."""
    log_every: int = 50
    """Steps between metrics rows."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("denoiser", self.denoiser, tuple(DENOISERS))
        need(self.n_images >= 2 and self.steps >= 1 and self.batch_size >= 1,
             "n_images must be >= 2, steps and batch_size >= 1")
        need(self.lr > 0 and self.warmup >= 0 and self.log_every >= 1, "lr must be > 0, warmup >= 0, log_every >= 1")
        need(0.0 <= self.p_uncond < 1.0, f"p_uncond must be in [0, 1), got {self.p_uncond}")
        need(0.0 <= self.ema < 1.0, f"ema must be in [0, 1), got {self.ema}")
        need(self.image_size >= 8, f"image_size must be >= 8, got {self.image_size}")


def train_text_clip(images: np.ndarray, labels: list[tuple], tok, steps: int = 300, seed: int = 0,
                    d_model: int = 64, progress: bool = False, device: str | torch.device = "cpu") -> CLIP:
    """A small CLIP fitted (multimodal/clip_train.fit, ITC) on the pictures and their prompts in a few templates."""
    size = images.shape[1]
    patch = 8 if size % 8 == 0 else 4 if size % 4 == 0 else size
    text = TextConfig(vocab_size=tok.vocab_size, d_model=d_model, n_layers=2, n_heads=4, max_seq_len=16,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(seed)
    clip = CLIP(CLIPConfig(vision=VisionConfig(image_size=size, patch_size=patch, d_model=d_model), text=text,
                           embed_dim=d_model)).to(device)
    records = [{"captions": [t.format(prompt_for(c, s)) for t in CLIP_TEMPLATES]} for c, s in labels]
    cfg = CLIPTrainConfig(steps=steps, batch_size=64, lr=1e-3, warmup=20, seed=seed, progress=progress)
    fit_clip(clip, tok, records, uint8_to_pixels(images), cfg)
    return clip.eval()


def fit_dit(gen: ImageGenerator, images: np.ndarray, labels: list[tuple], cfg: DiffusionTrainConfig,
            log=None, stop=None) -> list[dict]:
    """Train gen.dit in place on (pictures, prompts) with CFG dropout and EMA; returns the logged rows.
    `stop()` (optional) is asked before each step; True ends training there (e.g. a CPU-time budget)."""
    device = gen.device
    pixels = uint8_to_pixels(images).to(device)
    prompts = [prompt_for(c, s) for c, s in labels]
    gen_rng = torch.Generator().manual_seed(cfg.seed)
    dit = gen.dit.train()
    ema = copy.deepcopy(dit).eval().requires_grad_(False) if cfg.ema else None
    decay_params = [p for n, p in dit.named_parameters() if p.requires_grad and p.dim() >= 2 and "pos" not in n]
    other = [p for n, p in dit.named_parameters() if p.requires_grad and not (p.dim() >= 2 and "pos" not in n)]
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.99))
    warm = max(cfg.warmup, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, s - cfg.warmup) / max(1, cfg.steps - cfg.warmup))))))
    bar = BudgetBar(cfg.steps, max_seconds=cfg.max_seconds, desc="train-diffusion", enabled=cfg.progress)
    rows, t0, n = [], time.perf_counter(), len(prompts)
    for step in range(1, cfg.steps + 1):
        if cfg.max_seconds and time.perf_counter() - t0 > cfg.max_seconds or stop is not None and stop():
            break
        pick = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen_rng)
        drop = torch.rand(len(pick), generator=gen_rng) < cfg.p_uncond
        text, mask = gen.condition(["" if d else prompts[i] for i, d in zip(pick.tolist(), drop.tolist())])
        loss = diffusion_loss(lambda x, t: dit(x, t, text, mask), pixels[pick.to(device)], gen.schedule, gen_rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            d = min(cfg.ema, (1 + step) / (10 + step))  # a short run's EMA must not remember the init
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), dit.parameters()):
                    pe.lerp_(p, 1 - d)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {"step": step, "seconds": round(time.perf_counter() - t0, 2), "lr": sched.get_last_lr()[0],
                   "loss": float(loss.detach())}
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if log:
                log(row)
    bar.close()
    if ema is not None:
        dit.load_state_dict(ema.state_dict())
    dit.eval()
    return rows


def build_generator(cfg: DiffusionTrainConfig, clip: CLIP, tok) -> ImageGenerator:
    """An untrained ImageGenerator whose text tower is `clip`'s (copied, frozen) and whose denoiser (DiT or UNet)
    the config gives."""
    text_cfg = clip.config.text
    module_cls, _ = DENOISERS[cfg.denoiser]
    base = cfg.unet if cfg.denoiser == "unet" else cfg.dit
    dit_cfg = dataclasses.replace(base, image_size=cfg.image_size, text_dim=text_cfg.d_model,
                                  max_text_len=min(base.max_text_len, text_cfg.max_seq_len))
    tower = text_tower(text_cfg)
    tower.load_state_dict(clip.text.state_dict())
    torch.manual_seed(cfg.seed)
    words = {w for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS for w in prompt_for(c, s).split()}
    return ImageGenerator(module_cls(dit_cfg), tower, text_cfg, tok, NoiseSchedule(cfg.schedule, cfg.timesteps), words)


def train_diffusion(cfg: DiffusionTrainConfig) -> dict:
    """Make the pictures, get the CLIP text tower, train the DiT, write the run directory; returns a summary."""
    if not cfg.out:
        raise LmstackError("--out RUN_DIR is required (where the model is written)")
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "train_config.json", json.dumps(to_dict(cfg), indent=2) + "\n")
    images, labels = single_object_world(cfg.n_images, cfg.image_size, cfg.seed)
    t0 = time.perf_counter()
    if cfg.clip:
        clip, tok = load_clip(cfg.clip, device)
    else:
        tok = shapes_tokenizer(vocab_size=300, n_images=20)
        clip = train_text_clip(images, labels, tok, steps=cfg.clip_steps, seed=cfg.seed, progress=cfg.progress,
                               device=device)
        save_clip(clip, tok, out / "clip")
    gen = build_generator(cfg, clip, tok).to(device)
    log = RunLog(out)
    rows = fit_dit(gen, images, labels, cfg, log)
    gen.save(out)
    if rows:
        _plot(rows, out / "loss.png")
    return {"out": str(out), "steps": rows[-1]["step"] if rows else 0, "seconds": time.perf_counter() - t0,
            "final_loss": rows[-1]["loss"] if rows else None}


def _plot(rows: list[dict], path: Path) -> None:
    # lazy: heavy (matplotlib), which this module does not import at its top
    import matplotlib

    matplotlib.use("Agg")
    # lazy: heavy (matplotlib), which this module does not import at its top
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    ax.set_yscale("log")
    fig.tight_layout()
    atomic_save_figure(fig, path)


# ---- CLI
def run_train_diffusion(cfg: DiffusionTrainConfig) -> dict:
    """Train a text-to-image DiT on the shapes world's single-object pictures (prompts "a {colour} {shape}")."""
    summary = train_diffusion(cfg)
    print(f"train-diffusion: {summary['steps']} steps in {summary['seconds']:.1f} s, final loss "
          f"{summary['final_loss']:.4f}; wrote {summary['out']} (ImageGenerator.from_dir)")
    return summary


def generate_image(prompt: str = "", model: str | None = None, out: str = "image.png", n: int = 1, seed: int = 0,
                   steps: int = 50, sampler: str = "ddim", guidance: float = 3.0) -> list[str]:
    """Draw pictures of a prompt with a trained diffusion model and write them as PNG.

    Args:
        prompt: What to draw, e.g. "a red circle" (words the model never saw are warned about).
        model: A directory written by `lmstack mm train-diffusion`.
        out: The PNG to write; with n > 1, out's stem gets _0, _1, ...
        n: Pictures to draw.
        seed: Seed of the noise (the same seed gives the same pictures).
        steps: Denoising steps.
        sampler: ddim (deterministic) or ddpm (ancestral).
        guidance: Classifier-free guidance scale (1 = none).
    """
    if model is None:
        raise LmstackError("--model DIR is required (a directory written by lmstack mm train-diffusion)")
    gen = ImageGenerator.from_dir(model)
    images, warnings = gen.generate(prompt, n=n, seed=seed, steps=steps, sampler=sampler, guidance=guidance)
    for w in warnings:
        print(f"warning: {w}")
    target = Path(out)
    paths = [target] if n == 1 else [target.with_name(f"{target.stem}_{i}{target.suffix or '.png'}") for i in range(n)]
    for img, path in zip(images, paths):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
        print(f"wrote {path}")
    return [str(p) for p in paths]
