"""Captions for people to look at: a PNG grid of pictures with their generated captions, and the report card's
vision-language section for a run directory that holds a VLM.

- `caption_images(vlm, tok, images)`: greedy captions with the prompt the VLM was trained on ("<image> Caption:",
  multimodal/vlm_train.py), one batch.
- `caption_grid(images, captions, path)`: the pictures in a grid, each caption wrapped under its picture (PIL
  drawing, the default bitmap font), written atomically; small pictures and a palette PNG keep it under 200 KB.
- `section_vlm(run_dir)`: markdown lines for `lmstack report` (a heading, the grid, a table of generated against
  reference captions) when the run directory, or a folder right under it, is a VLM directory (save_vlm); [] when
  there is none. The sample pictures come from a fixed shapes world (its held-out-composition and test splits
  first), so two runs are compared on the same pictures.
  `lmstack report` (lmstack.eval.report.build_report) calls it for every run.

Usage:
    caps = caption_images(vlm, tok, [img1, img2])
    caption_grid([img1, img2], caps, "runs/x/plots/vlm_captions.png")
    lines = section_vlm("runs/x")            # [] without a VLM
    build_report("runs/x")                   # report.md gains the section when runs/x holds a VLM
"""
from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from lmstack.config import atomic_write_bytes
from lmstack.errors import LmstackError
from lmstack.multimodal.engine_adapter import is_vlm_dir
from lmstack.multimodal.images import to_pixels
from lmstack.multimodal.shapes import Scene, render
from lmstack.multimodal.vision_world import build_vision_world
from lmstack.multimodal.vlm import VLM, load_vlm
from lmstack.multimodal.vlm_train import encode_example
from lmstack.tokenizer import load_tokenizer

CELL = 112
"""Side of one picture in the grid, in pixels."""
TEXT_LINES = 6
"""Caption lines under each picture (a longer caption ends in '...')."""
SAMPLE_WORLD = {"n_images": 48, "size": 64, "seed": 1234}
"""The fixed shapes world the report's sample pictures come from."""


@torch.no_grad()
def caption_images(vlm: VLM, tok, images: Sequence[Image.Image], max_new_tokens: int = 40) -> list[str]:
    """Greedy captions, stopped at <|eos|>, with the training prompt of multimodal/vlm_train.py."""
    if not images:
        return []
    prompt = encode_example(vlm, tok, "", None, True)[0]
    ids = torch.tensor([prompt] * len(images))
    pixels = to_pixels(list(images), vlm.config.vision.image_size)
    new = vlm.generate(ids, pixels, max_new_tokens=max_new_tokens, eos_token_id=tok.token_to_id("<|eos|>"))
    return [tok.decode(t, skip_special_tokens=True).strip() for t in new]


def _wrap(text: str, width: int) -> list[str]:
    lines = textwrap.wrap(text, width) or [""]
    if len(lines) > TEXT_LINES:
        lines = lines[:TEXT_LINES]
        lines[-1] = lines[-1][:max(0, width - 3)] + "..."
    return lines


def caption_grid(images: Sequence[Image.Image], captions: Sequence[str], path: str | Path, cols: int = 4) -> Path:
    """A PNG grid: each picture (scaled to CELL x CELL) with its caption wrapped below it; returns the path."""
    if len(images) != len(captions):
        raise LmstackError(f"caption_grid: {len(images)} images but {len(captions)} captions")
    if not images:
        raise LmstackError("caption_grid needs at least one image")
    font = ImageFont.load_default()
    line_h = 12
    chars = CELL // 6  # the default bitmap font is about 6 px wide
    pad = 6
    cell_w, cell_h = CELL + 2 * pad, CELL + TEXT_LINES * line_h + 3 * pad
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (img, cap) in enumerate(zip(images, captions)):
        x, y = (k % cols) * cell_w + pad, (k // cols) * cell_h + pad
        sheet.paste(img.convert("RGB").resize((CELL, CELL), Image.NEAREST), (x, y))
        for j, line in enumerate(_wrap(cap, chars)):
            draw.text((x, y + CELL + pad + j * line_h), line, fill=(20, 20, 20), font=font)
    buf = io.BytesIO()
    # a 64-colour palette: the shapes world has few colours, and the file stays small for the report
    sheet.quantize(colors=64).save(buf, format="PNG", optimize=True)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def find_vlm(run_dir: str | Path) -> Path | None:
    """The run directory itself, or the first folder right under it (by name), that is a VLM directory."""
    run = Path(run_dir)
    if is_vlm_dir(run):
        return run
    for sub in sorted(p for p in run.iterdir() if p.is_dir()) if run.is_dir() else []:
        if is_vlm_dir(sub):
            return sub
    return None


def sample_records(n: int) -> list[dict]:
    """n records of the fixed sample world, held-out compositions and test pictures first."""
    records = build_vision_world(**SAMPLE_WORLD)
    order = {"test_heldout": 0, "test": 1, "val": 2, "train": 3}
    return sorted(records, key=lambda r: order.get(r["split"], 4))[:n]


def section_vlm(run_dir: str | Path, n_images: int = 8) -> list[str]:
    """The report card's vision-language section (markdown lines), or [] when the run holds no VLM.
    Writes RUN/plots/vlm_captions.png."""
    run = Path(run_dir)
    where = find_vlm(run)
    if where is None:
        return []
    vlm, tok = load_vlm(where), load_tokenizer(where)
    records = sample_records(n_images)
    images = [render(Scene.from_dict(r["scene"])) for r in records]
    captions = caption_images(vlm, tok, images)
    png = caption_grid(images, captions, run / "plots" / "vlm_captions.png")
    rel = png.relative_to(run).as_posix()
    cfg = vlm.config
    lines = ["## Vision-language model", "",
             f"VLM at `{where.relative_to(run).as_posix() or '.'}`: fusion {cfg.fusion}, {vlm.n_image_tokens} image "
             f"tokens per picture, {vlm.num_parameters():,} parameters.", "",
             f"![generated captions]({rel})", "",
             f"*Greedy captions (prompt `<image> Caption:`) of {len(images)} pictures of a fixed shapes world "
             f"(seed {SAMPLE_WORLD['seed']}; held-out compositions first), from {rel}.*", "",
             "| picture | split | generated caption | a reference caption |", "|---|---|---|---|"]
    for r, cap in zip(records, captions):
        cells = [str(r["id"]), r["split"], cap or "(empty)", r["captions"][0]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines + [""]
