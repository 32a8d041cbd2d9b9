"""Train CLIP (ITC) or the BLIP-style VLP (ITC + ITM + LM, any subset) on a shapes world written by
`lmstack data synth-vision`: each step takes batch_size distinct training pictures and one of each picture's
captions, drawn at random.

The run writes into `out`: the CLIP directory (config.json, model.safetensors, tokenizer; load_clip reads it),
vlp.safetensors + vlp.json when ITM or LM were trained (load_vlp), train_config.json (the resolved config),
metrics.jsonl (one row per logged step, then the validation recall) and loss.png.

Usage:
    lmstack data synth-vision --out data/vision --n_images 400
    lmstack mm train-clip --data data/vision --out runs/clip --steps 300
    lmstack mm train-clip --data data/vision --out runs/vlp --objectives '[itc, itm, lm]' --model.vision.n_layers 3

    from lmstack.multimodal.clip_train import CLIPTrainConfig, train_clip, load_split, fit
    result = train_clip(CLIPTrainConfig(data="data/vision", out="runs/clip", steps=300))
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save as safetensors_bytes

from lmstack.config import atomic_save_figure, atomic_write_bytes, atomic_write_text, from_dict, to_dict
from lmstack.errors import LmstackError
from lmstack.model.load_guard import load_safetensors, read_json, resolve_inside
from lmstack.multimodal.clip import CLIP, CLIPConfig, load_clip, retrieval_recall, save_clip, tokenize
from lmstack.multimodal.images import read_image_file, to_pixels
from lmstack.multimodal.text import shapes_tokenizer
from lmstack.multimodal.vision_world import read_split_lines
from lmstack.multimodal.vlp import OBJECTIVES, VLP, VLPConfig, vlp_loss
from lmstack.progress import BudgetBar
from lmstack.runtime.device import resolve_device
from lmstack.runtime.validation import check_choice, need
from lmstack.threads import set_threads
from lmstack.train.metrics import RunLog

@dataclass
class CLIPTrainConfig:
    data: str = ""
    """A shapes-world directory written by `lmstack data synth-vision --out DIR`."""
    out: str = ""
    """The run directory to write (the CLIP directory, metrics, plot)."""
    objectives: list[str] = field(default_factory=lambda: ["itc"])
    """Losses to train: itc (CLIP), itm (matching with hard negatives), lm (captioning); any non-empty subset."""
    model: CLIPConfig = field(default_factory=CLIPConfig)
    """The two towers (text.vocab_size and the special ids are taken from the tokenizer)."""
    vlp: VLPConfig = field(default_factory=VLPConfig)
    """Fusion encoder, decoder and loss weights, used when objectives go beyond itc (its clip field is ignored)."""
    vocab_size: int = 512
    """BPE merges of the shapes tokenizer (its vocab_size, before the <image> token)."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 32
    """Pictures per step (each with one of its captions); ITC's negatives are the batch's other pairs."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    warmup: int = 20
    """Warmup steps."""
    weight_decay: float = 0.05
    """AdamW weight decay on matrices (not on norms, biases, embeddings of positions or logit_scale)."""
    seed: int = 0
    """Seed of the init and of the batches."""
    max_seconds: float = 0.0
    """Stop after this many seconds (0 = no limit)."""
    device: str = "auto"
    """auto (cuda when visible), cpu, cuda, cuda:N."""
    threads: int = 0
    """Torch threads (0 = the default)."""
    log_every: int = 10
    """Steps between metrics rows."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        need(self.objectives, "objectives must name at least one of itc, itm, lm")
        for name in self.objectives:
            check_choice("objectives", name, OBJECTIVES)
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 2, f"batch_size must be >= 2 (in-batch negatives), got {self.batch_size}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.warmup >= 0 and self.log_every >= 1, "warmup must be >= 0 and log_every >= 1")


def load_split(data: str | Path, split: str, size: int) -> tuple[list[dict], torch.Tensor]:
    """(records, pixels (N, 3, size, size)) of one split of a synth-vision directory."""
    root, file, lines = read_split_lines(data, split, "shapes world", "lmstack data synth-vision")
    records = []
    for n, rec in lines:
        if not isinstance(rec, dict) or not rec.get("captions") or not isinstance(rec.get("path"), str):
            raise LmstackError(f"{file} line {n} is not a shapes-world record (needs captions and path)")
        records.append(rec)
    if not records:
        raise LmstackError(f"{file} holds no records; write more images with `lmstack data synth-vision`")
    images = [read_image_file(resolve_inside(root, rec["path"], "image")) for rec in records]
    return records, to_pixels(images, size)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and "pos_emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fit(model: torch.nn.Module, tok, records: list[dict], pixels: torch.Tensor, cfg: CLIPTrainConfig,
        log: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model` (a CLIP for objectives ['itc'], else a VLP) in place; returns the logged metric rows."""
    device = next(model.parameters()).device
    objectives = set(cfg.objectives)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(records)
    if n < 2:
        raise LmstackError(f"training needs at least 2 pictures (in-batch negatives), got {n}")
    bsz = min(cfg.batch_size, n)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    warm = max(cfg.warmup, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, s - cfg.warmup) / max(1, cfg.steps - cfg.warmup))))))
    max_len = (model.config if isinstance(model, CLIP) else model.config.clip).text.max_seq_len
    bar = BudgetBar(cfg.steps, max_seconds=cfg.max_seconds, desc="train-clip", enabled=cfg.progress)
    rows: list[dict] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(1, cfg.steps + 1):
        if cfg.max_seconds and time.perf_counter() - t0 > cfg.max_seconds:
            break
        pick = rng.sample(range(n), bsz)
        ids = tokenize(tok, [rng.choice(records[i]["captions"]) for i in pick], max_len).to(device)
        batch = {"pixels": pixels[pick].to(device), "ids": ids}
        if isinstance(model, CLIP):
            losses = {"itc": model(batch["pixels"], ids)}
            losses["loss"] = losses["itc"]
        else:
            losses = vlp_loss(model, batch, objectives, generator=gen)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            clip = model if isinstance(model, CLIP) else model.clip
            row = {"step": step, "seconds": round(time.perf_counter() - t0, 2), "lr": sched.get_last_lr()[0],
                   "logit_scale": float(clip.scale().detach())}
            row.update({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()})
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if log:
                log(row)
    bar.close()
    model.eval()
    return rows


@torch.no_grad()
def embed_split(clip: CLIP, tok, records: list[dict], pixels: torch.Tensor, batch_size: int = 128
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embeddings (N, e), caption embeddings (M, e), text_image (M,)) with every caption of each picture."""
    device = clip.logit_scale.device
    imgs = torch.cat([clip.encode_image(pixels[i:i + batch_size].to(device)) for i in range(0, len(pixels), batch_size)])
    texts = [(i, c) for i, rec in enumerate(records) for c in rec["captions"]]
    max_len = clip.config.text.max_seq_len
    txt = torch.cat([clip.encode_text(tokenize(tok, [c for _, c in texts[i:i + batch_size]], max_len).to(device))
                     for i in range(0, len(texts), batch_size)])
    return imgs, txt, torch.tensor([i for i, _ in texts])


def save_vlp(model: VLP, out: str | Path) -> None:
    """The VLP's parts beyond the CLIP (fusion, ITM head, decoder) as vlp.safetensors + vlp.json (atomic)."""
    out = Path(out)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("clip.")}
    atomic_write_bytes(out / "vlp.safetensors", safetensors_bytes(tensors, metadata={"format": "pt"}))
    cfg = {k: v for k, v in to_dict(model.config).items() if k != "clip"}
    atomic_write_text(out / "vlp.json", json.dumps(cfg, indent=2) + "\n")


def load_vlp(path: str | Path) -> tuple[VLP, object]:
    """(VLP, tokenizer) from a train-clip run that trained ITM or LM."""
    path = Path(path)
    for name in ("vlp.json", "vlp.safetensors"):
        if not (path / name).is_file():
            raise LmstackError(f"{path} holds no VLP heads: {name} is missing (train with --objectives itm/lm)")
    clip, tok = load_clip(path)
    cfg = from_dict(VLPConfig, read_json(path, "vlp.json", "VLP config", want_object=True))
    model = VLP(dataclasses.replace(cfg, clip=clip.config))
    model.clip = clip
    tensors = load_safetensors(path, "vlp.safetensors", "VLP weights")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.startswith("clip.")]
    if missing or unexpected:
        raise LmstackError(f"{path}/vlp.safetensors does not match vlp.json: missing {missing[:3]}, "
                           f"unexpected {list(unexpected)[:3]}")
    return model.eval(), tok


def _plot(rows: list[dict], path: Path) -> None:
    # lazy: heavy (matplotlib), which this module does not import at its top
    import matplotlib

    matplotlib.use("Agg")
    # lazy: heavy (matplotlib), which this module does not import at its top
    import matplotlib.pyplot as plt

    parts = [k for k in OBJECTIVES if k in rows[0]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in parts + (["loss"] if len(parts) > 1 else []):  # one objective: its curve is the loss
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)


def build_model(cfg: CLIPTrainConfig, tok) -> CLIP | VLP:
    """The CLIP (objectives ['itc']) or VLP the config describes, text ids taken from the tokenizer."""
    text = dataclasses.replace(cfg.model.text, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                               eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    clip_cfg = dataclasses.replace(cfg.model, text=text)
    torch.manual_seed(cfg.seed)
    if set(cfg.objectives) == {"itc"}:
        return CLIP(clip_cfg)
    return VLP(dataclasses.replace(cfg.vlp, clip=clip_cfg))


def train_clip(cfg: CLIPTrainConfig) -> dict:
    """Train on the world's train split, measure recall@1/5 on val, write the run directory; returns a summary."""
    if not cfg.data:
        raise LmstackError("train-clip needs --data DIR, a shapes world written by "
                           "`lmstack data synth-vision --out DIR`")
    need(bool(cfg.out), "train-clip needs --out DIR, the run directory to write")
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    tok = shapes_tokenizer(vocab_size=cfg.vocab_size)
    size = cfg.model.vision.image_size
    records, pixels = load_split(cfg.data, "train", size)
    model = build_model(cfg, tok).to(device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "train_config.json", json.dumps(to_dict(cfg), indent=2) + "\n")
    log = RunLog(out)

    t0 = time.perf_counter()
    rows = fit(model, tok, records, pixels, cfg, log)
    seconds = time.perf_counter() - t0
    clip = model if isinstance(model, CLIP) else model.clip
    summary = {"out": str(out), "objectives": list(cfg.objectives), "steps": rows[-1]["step"] if rows else 0,
               "seconds": round(seconds, 2), "final": rows[-1] if rows else {}}
    try:
        val_records, val_pixels = load_split(cfg.data, "val", size)
    except LmstackError:
        val_records = []
    if val_records:
        img, txt, owner = embed_split(clip, tok, val_records, val_pixels)
        summary["val"] = retrieval_recall(img, txt, ks=(1, 5), text_image=owner)
        log({"split": "val", **summary["val"]})
    clip.cpu()
    save_clip(clip, tok, out)
    if isinstance(model, VLP):
        save_vlp(model.cpu(), out)
    if rows:
        _plot(rows, out / "loss.png")
    return summary
