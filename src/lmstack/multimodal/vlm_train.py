"""Train and evaluate a VLM on the shapes world: captioning and VQA, the loss on answer tokens only.

An example is a prompt and an answer: captioning "<image> Caption:" -> " <one of the record's captions><eos>", VQA
"<image> Q: <question> A:" -> " <answer><eos>". The prompt's `<image>` is expanded to the VLM's n_image_tokens
(vlm.expand_prompt) and its positions, with the prompt's, carry no target (-100). With use_images=False the prompt has
no `<image>` and no picture is given: the same LM learns the text prior alone. That is both the text-only baseline
and the usual first stage: an LM pretrained on the world's text, which a VLM then starts from (Flamingo needs a
trained LM to freeze). Rows are right-padded (a causal LM's earlier positions never see the padding).

Pixels come from the records' scenes (rendered, deterministic) or, for a directory written by
`lmstack data synth-vision`, from its PNG files (`read_split`).

Usage:
    from lmstack.multimodal.vlm_train import VLMTrainConfig, train_vlm, evaluate_captions, evaluate_vqa, render_pixels
    records = build_vision_world(400, size=64, seed=0)
    train = [r for r in records if r["split"] == "train"]
    stats = train_vlm(VLMTrainConfig(steps=200, task="both"), train, vlm, tok)     # {"steps", "seconds", "loss", ...}
    caps = evaluate_captions(vlm, tok, test)       # attribute exact/recall, BLEU-4, CIDEr-D, each with n and stderr
    vqa = evaluate_vqa(vlm, tok, test)             # accuracy by question type, with n and stderr
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from lmstack.config import from_dict
from lmstack.errors import LmstackError
from lmstack.eval.caption_metrics import attribute_match, cider_d, corpus_bleu_stderr
from lmstack.multimodal.images import read_image_file, to_pixels
from lmstack.multimodal.shapes import Scene, render
from lmstack.multimodal.text import IGNORE, IMAGE_TOKEN, collate
from lmstack.multimodal.vision_world import SPLITS
from lmstack.multimodal.vlm import VLM
from lmstack.runtime.validation import check_choices, need

CAPTION_PROMPT = "Caption:"


@dataclass
class VLMTrainConfig:
    task: Literal["caption", "vqa", "both"] = "both"
    """What to train on: captions, VQA items, or both mixed."""
    steps: int = 200
    """Optimizer steps (the run stops earlier when max_seconds is reached)."""
    max_seconds: float = 0.0
    """Stop after this much wall time (equal-time comparisons between fusions); 0 = no limit."""
    batch_size: int = 16
    """Examples per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warmup, then cosine to 10%)."""
    warmup: int = 20
    """Warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this; 0 = off."""
    seed: int = 0
    """Seed of the batch order."""
    use_images: bool = True
    """False: the text-only model (no <image>, no picture), the baseline and the LM's pretraining stage."""
    vision_lr_mult: float = 1.0
    """LR multiplier of everything outside the LM (ViT and fusion), which starts from scratch while the LM is
    pretrained (LLaVA trains its projector at a far higher LR than its LM)."""

    def __post_init__(self) -> None:
        check_choices(self)
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.max_seconds >= 0, f"max_seconds must be >= 0, got {self.max_seconds}")
        need(self.vision_lr_mult > 0, f"vision_lr_mult must be > 0, got {self.vision_lr_mult}")

    @classmethod
    def from_dict(cls, data: dict) -> "VLMTrainConfig":
        return from_dict(cls, data)


# ---- data
def render_pixels(records: list[dict], size: int) -> torch.Tensor:
    """(N, 3, size, size) pixels of the records: their PNG (a synth-vision directory) or their rendered scene."""
    images = []
    for rec in records:
        if "image_file" in rec:
            images.append(read_image_file(rec["image_file"]))
        else:
            images.append(render(Scene.from_dict(rec["scene"])))
    return to_pixels(images, size=size)


def read_split(data_dir: str | Path, split: str) -> list[dict]:
    """The records of `split` in a directory written by `lmstack data synth-vision`, each with its image_file."""
    if split not in SPLITS:
        raise LmstackError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    root = Path(data_dir)
    file = root / f"{split}.jsonl"
    if not file.is_file():
        raise LmstackError(f"{file} not found; write the shapes world with `lmstack data synth-vision --out {root}`")
    records = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            path = (root / rec["path"]).resolve()
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LmstackError(f"{file}:{n}: not a shapes-world record ({type(e).__name__}: {e})") from None
        if root.resolve() not in path.parents:
            raise LmstackError(f"{file}:{n}: image path {rec['path']!r} leaves {root}")
        records.append(dict(rec, image_file=str(path)))
    return records


def caption_prompt(use_images: bool = True) -> str:
    return f"{IMAGE_TOKEN} {CAPTION_PROMPT}" if use_images else CAPTION_PROMPT


def vqa_prompt(question: str, use_images: bool = True) -> str:
    return f"{IMAGE_TOKEN} Q: {question} A:" if use_images else f"Q: {question} A:"


def examples(records: list[dict], task: str) -> list[tuple[int, str, list[str]]]:
    """(record index, prompt kind or question, possible answers): a caption example draws one of its captions."""
    out = []
    for i, rec in enumerate(records):
        if task in ("caption", "both"):
            out.append((i, "", list(rec["captions"])))
        if task in ("vqa", "both"):
            out += [(i, item["question"], [item["answer"]]) for item in rec["vqa"]]
    if not out:
        raise LmstackError(f"no {task} examples in {len(records)} records")
    return out


def _eos(tok) -> int:
    eos = tok.token_to_id("<|eos|>")
    if eos is None:
        raise LmstackError("the tokenizer has no <|eos|> token to end answers with")
    return eos


def encode_example(vlm: VLM, tok, question: str, answer: str | None, use_images: bool) -> tuple[list[int], list[int]]:
    """(ids, labels): the expanded prompt (no targets), then the answer and eos (targets). answer=None: prompt only."""
    text = vqa_prompt(question, use_images) if question else caption_prompt(use_images)
    prompt = tok.encode(text)
    if use_images:
        prompt = vlm.expand_prompt(prompt)
    if answer is None:
        return prompt, [IGNORE] * len(prompt)
    target = tok.encode(" " + answer) + [_eos(tok)]
    return prompt + target, [IGNORE] * len(prompt) + target


# ---- training
def train_vlm(cfg: VLMTrainConfig, records: list[dict], vlm: VLM, tokenizer, pixels: torch.Tensor | None = None,
              progress: bool = False) -> dict:
    """Train `vlm` in place on the records' captions and/or VQA (cfg.task). pixels: render_pixels(records), a cache
    for a small set; None renders each batch's pictures when it is drawn (a large world needs no pixel tensor).

    Returns {"steps", "seconds", "examples", "loss_first", "loss_last" (mean of the last 10), "trainable_params"}."""
    if not records:
        raise LmstackError("train_vlm needs at least one record")
    data = examples(records, cfg.task)
    if pixels is not None and pixels.shape[0] != len(records):
        raise LmstackError(f"{pixels.shape[0]} pictures for {len(records)} records")
    params = [p for p in vlm.parameters() if p.requires_grad]
    if cfg.use_images is False:  # the text prior: only the LM learns
        params = [p for p in vlm.lm.parameters() if p.requires_grad]
    if not params:
        raise LmstackError("nothing to train: every parameter is frozen")
    lm_ids = {id(p) for p in vlm.lm.parameters()}
    groups = [{"params": [p for p in params if id(p) in lm_ids], "mult": 1.0},
              {"params": [p for p in params if id(p) not in lm_ids], "mult": cfg.vision_lr_mult}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95))

    def lr_at(step: int, elapsed: float) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        if cfg.max_seconds:  # a timed run anneals over its time budget (whichever of the two ends first)
            frac = max(frac, elapsed / cfg.max_seconds)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    rng = random.Random(cfg.seed)
    order: list[int] = []
    losses: list[float] = []
    pad = _eos(tokenizer)
    vlm.train()
    bar = None
    if progress:
        bar = tqdm(total=cfg.steps, desc="train-vlm", unit="step")
    start = time.perf_counter()
    step = 0
    while step < cfg.steps:
        if cfg.max_seconds and time.perf_counter() - start >= cfg.max_seconds:
            break
        if len(order) < cfg.batch_size:
            fresh = list(range(len(data)))
            rng.shuffle(fresh)
            order += fresh
        picked, order = order[:cfg.batch_size], order[cfg.batch_size:]
        rows, images = [], []
        for k in picked:
            rec, question, answers = data[k]
            rows.append(encode_example(vlm, tokenizer, question, rng.choice(answers), cfg.use_images))
            images.append(rec)
        ids, labels = collate(rows, pad)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, time.perf_counter() - start) * group["mult"]
        batch_pixels = None
        if cfg.use_images:  # without a cache, each batch's pictures are rendered (or read) on demand: no big tensor
            batch_pixels = pixels[images] if pixels is not None else \
                render_pixels([records[i] for i in images], vlm.config.vision.image_size)
        out = vlm(ids, pixels=batch_pixels, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        losses.append(out.loss.item())
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    vlm.eval()
    return {"steps": step, "seconds": time.perf_counter() - start, "examples": step * cfg.batch_size,
            "loss_first": losses[0] if losses else None,
            "loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "trainable_params": sum(p.numel() for p in params)}


# ---- evaluation
def answer_all(vlm: VLM, tok, records: list[dict], questions: list[tuple[int, str]], use_images: bool = True,
               pixels: torch.Tensor | None = None, max_new_tokens: int = 48, batch_size: int = 32) -> list[str]:
    """Greedy answers to (record index, question) pairs ('' = the caption prompt), batched by prompt length."""
    if use_images and pixels is None:
        pixels = render_pixels(records, vlm.config.vision.image_size)
    prompts = [encode_example(vlm, tok, q, None, use_images)[0] for _, q in questions]
    by_len: dict[int, list[int]] = {}
    for k, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(k)
    out = [""] * len(questions)
    eos = _eos(tok)
    for group in by_len.values():
        for s in range(0, len(group), batch_size):
            chunk = group[s:s + batch_size]
            ids = torch.tensor([prompts[k] for k in chunk])
            pix = pixels[[questions[k][0] for k in chunk]] if use_images else None
            new = vlm.generate(ids, pix, max_new_tokens=max_new_tokens, eos_token_id=eos)
            for k, toks in zip(chunk, new):
                out[k] = tok.decode(toks, skip_special_tokens=True).strip()
    return out


def _mean_err(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def evaluate_captions(vlm: VLM, tok, records: list[dict], use_images: bool = True,
                      pixels: torch.Tensor | None = None, samples: int = 0) -> dict:
    """Greedy captions of the records against their reference captions: attribute exact-match and recall (truth
    from the scene), corpus BLEU-4 (bootstrap stderr), CIDEr-D; each {"value", "stderr", "n"}."""
    if not records:
        raise LmstackError("evaluate_captions needs at least one record")
    caps = answer_all(vlm, tok, records, [(i, "") for i in range(len(records))], use_images, pixels)
    refs = [r["captions"] for r in records]
    exact, recall = zip(*(attribute_match(c, r["scene"]) for c, r in zip(caps, records)))
    bleu, bleu_err = corpus_bleu_stderr(caps, refs)
    cider = cider_d(caps, refs)["per_item"]
    n = len(records)
    out = {name: dict(zip(("value", "stderr"), _mean_err(list(xs))), n=n)
           for name, xs in (("attribute_exact", exact), ("attribute_recall", recall), ("cider_d", cider))}
    out["bleu4"] = {"value": bleu, "stderr": bleu_err, "n": n}
    out["samples"] = [{"id": r.get("id"), "caption": c, "reference": r["captions"][0]}
                      for r, c in list(zip(records, caps))[:samples]]
    return out


def evaluate_vqa(vlm: VLM, tok, records: list[dict], use_images: bool = True,
                 pixels: torch.Tensor | None = None) -> dict:
    """Exact-match accuracy of greedy answers by question type (and 'all'): {type: {"value", "stderr", "n"}}."""
    items = [(i, item) for i, rec in enumerate(records) for item in rec["vqa"]]
    if not items:
        raise LmstackError("evaluate_vqa needs records with VQA items")
    answers = answer_all(vlm, tok, records, [(i, item["question"]) for i, item in items], use_images, pixels,
                         max_new_tokens=4)
    hits: dict[str, list[float]] = {}
    for (_, item), got in zip(items, answers):
        ok = float(got.strip().rstrip(".").lower() == item["answer"].lower())
        hits.setdefault(item["type"], []).append(ok)
        hits.setdefault("all", []).append(ok)
    return {t: {"value": sum(h) / len(h), "stderr": math.sqrt(max(sum(h) / len(h) * (1 - sum(h) / len(h)), 0)
                                                               / len(h)), "n": len(h)}
            for t, h in sorted(hits.items())}


__all__ = ["VLMTrainConfig", "train_vlm", "evaluate_captions", "evaluate_vqa", "answer_all", "render_pixels",
           "read_split", "examples", "encode_example", "caption_prompt", "vqa_prompt"]
