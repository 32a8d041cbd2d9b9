"""Video-language training on the video world (issue 25 §2, XII.9): video-text contrastive pretraining (symmetric
InfoNCE between a clip and its caption), video QA (classification over the world's answer vocabulary) and their
measurements: retrieval recall@k video<->text, QA accuracy overall, on `frame_order_sensitive` questions and on
the rest, by question type, each with n and stderr, next to the majority-answer level of the same questions.

A clip's caption is its caption sentences joined (each clip's is nearly unique, so retrieval is well posed). A QA
step takes `batch_size` clips and up to `questions_per_clip` of each clip's questions: the clip is encoded once.

Usage:
    lmstack data synth-video --out data/video --n_clips 600 --frames 8 --size 32
    lmstack mm train-video --data data/video --out runs/video --model.video.encoder temporal --pretrain_steps 200

    from lmstack.multimodal.video_train import (answer_vocab, video_tokenizer, render_clips, qa_items, train_qa,
                                                evaluate_qa, pretrain_contrastive, video_retrieval, majority_level)
    tok, answers = video_tokenizer(), answer_vocab()
    clips = render_clips(records)                           # uint8 (N, F, 3, S, S)
    rows = train_qa(model, tok, qa_items(train, answers), clips, steps=300)
    scores = evaluate_qa(model, tok, qa_items(test, answers), test_clips)   # {"all", "temporal", ...}
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes

from lmstack.config import atomic_write_bytes, atomic_write_text, from_dict, to_dict
from lmstack.errors import LmstackError
from lmstack.model.load_guard import (check_model_dir, load_safetensors, load_state_checked, read_json,
                                      resolve_inside)
from lmstack.multimodal.clip import retrieval_recall, tokenize
from lmstack.multimodal.shapes import COLOURS, SHAPES, render
from lmstack.multimodal.video_model import VideoCLIP, VideoCLIPConfig, VideoQA, VideoQAConfig, clip_to_pixels
from lmstack.multimodal.video_world import DIRECTIONS, MAX_OBJECTS, build_video_world, frame_scenes, load_video_clip
from lmstack.multimodal.vision_world import read_split_lines
from lmstack.progress import BudgetBar
from lmstack.runtime.device import resolve_device
from lmstack.runtime.validation import need
from lmstack.threads import set_threads
from lmstack.tokenizer import load_tokenizer, train_tokenizer
from lmstack.train.metrics import RunLog

MODEL_TYPE = "lmstack-video-qa"


def answer_vocab() -> list[str]:
    """Every answer the video world can give: counts, yes/no, directions and each (colour, shape) name."""
    return ([str(i) for i in range(MAX_OBJECTS + 1)] + ["yes", "no"] + list(DIRECTIONS)
            + [f"{c} {s}" for c in sorted(COLOURS) for s in sorted(SHAPES)])


def video_tokenizer(vocab_size: int = 600, n_clips: int = 200, seed: int = 0):
    """A byte-level BPE trained on the captions and questions of a fixed video world (deterministic in its args)."""
    if vocab_size < 300:
        raise LmstackError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use 300 or more")
    records = build_video_world(n_clips, frames=8, size=32, seed=seed)
    texts = [" ".join(r["captions"]) for r in records] + [q["question"] for r in records for q in r["questions"]]
    return train_tokenizer(type="bpe", vocab_size=vocab_size, texts=texts, show_progress=False)


def render_clips(records: Sequence[dict]) -> torch.Tensor:
    """The records' clips drawn in memory from their stored states: uint8 (N, F, 3, S, S)."""
    if not records:
        raise LmstackError("no clips to render")
    out = [np.stack([np.asarray(render(s), dtype=np.uint8) for s in frame_scenes(r)]) for r in records]
    return torch.from_numpy(np.stack(out)).permute(0, 1, 4, 2, 3).contiguous()


def load_video_split(data: str | Path, split: str, frames: int, size: int) -> tuple[list[dict], torch.Tensor]:
    """(records, uint8 clips (N, F, 3, S, S)) of one split written by `lmstack data synth-video`; each sprite
    sheet is checked (frame count, frame size) before use."""
    root, file, lines = read_split_lines(data, split, "video world", "lmstack data synth-video")
    records, clips = [], []
    for n, rec in lines:
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str) or "questions" not in rec:
            raise LmstackError(f"{file} line {n} is not a video-world record (needs path, captions, questions)")
        arr = load_video_clip(resolve_inside(root, rec["path"], "clip"), frames)
        clips.append(((clip_to_pixels(arr, frames, size) + 1) * 127.5).round().to(torch.uint8))
        records.append(rec)
    if not records:
        raise LmstackError(f"{file} holds no clips; write more with `lmstack data synth-video`")
    return records, torch.stack(clips)


def as_float(clips: torch.Tensor) -> torch.Tensor:
    """uint8 clips -> floats in [-1, 1] (what the encoders read)."""
    return clips.float() / 127.5 - 1.0


def qa_items(records: Sequence[dict], answers: Sequence[str]) -> list[dict]:
    """One row per question: clip index, question, answer index, type and the frame-order flag."""
    index = {a: i for i, a in enumerate(answers)}
    items = []
    for c, rec in enumerate(records):
        for q in rec["questions"]:
            if q["answer"] not in index:
                raise LmstackError(f"answer {q['answer']!r} of {rec.get('id', c)} is not in the answer vocabulary")
            items.append({"clip": c, "question": q["question"], "label": index[q["answer"]], "type": q["type"],
                          "sensitive": bool(q["frame_order_sensitive"])})
    return items


def encode_questions(tok, questions: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (B, T): BOS + question + EOS, right-padded; a question too long is refused, not cut."""
    ids = tokenize(tok, list(questions), max_len + 1)  # +1: tokenize cuts at max_len, we refuse instead
    if ids.shape[1] > max_len:
        raise LmstackError(f"a question of {ids.shape[1]} tokens is longer than max_question_len={max_len}")
    mask = torch.ones_like(ids)
    for row, q in enumerate(questions):
        mask[row, len(tok.encode(q)) + 2:] = 0
    return ids, mask


def _optimizer(model: torch.nn.Module, lr: float, steps: int, warmup: int, weight_decay: float = 0.05):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "emb" not in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not (p.dim() >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    warm = max(warmup, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, steps - warmup))))))
    return opt, sched


def _step(model, opt, sched, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()


def _record(rows: list[dict], stage: str, step: int, steps: int, loss: torch.Tensor, t0: float,
            log: Callable[[dict], None] | None) -> None:
    """Every 25th step and the last: a row of (stage, step, loss, seconds), also handed to `log`."""
    if step % 25 == 0 or step == steps:
        rows.append({"stage": stage, "step": step, "loss": float(loss.detach()),
                     "seconds": round(time.perf_counter() - t0, 2)})
        if log:
            log(rows[-1])


def pretrain_contrastive(model: VideoCLIP, tok, records: Sequence[dict], clips: torch.Tensor, steps: int,
                         batch_size: int = 32, lr: float = 1e-3, seed: int = 0, progress: bool = False,
                         log: Callable[[dict], None] | None = None) -> list[dict]:
    """Symmetric InfoNCE on (clip, joined caption) pairs, batch_size distinct clips a step; returns logged rows."""
    need(len(records) >= 2 and len(records) == len(clips), "contrastive pretraining needs >= 2 clips, one record each")
    device = model.logit_scale.device
    texts = [" ".join(r["captions"]) for r in records]
    rng = random.Random(seed)
    opt, sched = _optimizer(model, lr, steps, max(1, steps // 20))
    bar = BudgetBar(steps, desc="video-text", enabled=progress)
    rows, t0 = [], time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        pick = rng.sample(range(len(records)), min(batch_size, len(records)))
        ids = tokenize(tok, [texts[i] for i in pick], model.config.text.max_seq_len).to(device)
        loss = model(as_float(clips[pick]).to(device), ids)
        _step(model, opt, sched, loss)
        bar.update(1)
        _record(rows, "contrastive", step, steps, loss, t0, log)
    bar.close()
    model.eval()
    return rows


@torch.no_grad()
def video_retrieval(model: VideoCLIP, tok, records: Sequence[dict], clips: torch.Tensor, ks=(1, 5),
                    batch_size: int = 64) -> dict:
    """Recall@k video->text (v2t) and text->video (t2v) over the records' joined captions, one per clip."""
    device = model.logit_scale.device
    texts = [" ".join(r["captions"]) for r in records]
    vid = torch.cat([model.encode_video(as_float(clips[i:i + batch_size]).to(device))
                     for i in range(0, len(clips), batch_size)])
    txt = torch.cat([model.encode_text(tokenize(tok, texts[i:i + batch_size], model.config.text.max_seq_len)
                                       .to(device)) for i in range(0, len(texts), batch_size)])
    r = retrieval_recall(vid, txt, ks=ks)
    out = {"n": r["n_images"]}
    for k in ks:
        out[f"v2t@{k}"], out[f"t2v@{k}"], out[f"chance@{k}"] = r[f"i2t@{k}"], r[f"t2i@{k}"], min(k, len(texts)) / len(texts)
    return out


def _video_tokens(model: VideoQA, clips: torch.Tensor, blind: bool) -> torch.Tensor:
    device = next(model.head.parameters()).device
    if blind:
        return torch.zeros(len(clips), 1, model.video.d_model, device=device)
    return model.video.tokens(as_float(clips).to(device))


def _qa_batch(items: Sequence[dict], pick_clips: Sequence[int], by_clip: dict, per_clip: int, rng) -> list[dict]:
    out = []
    for c in pick_clips:
        own = by_clip[c]
        out += rng.sample(own, min(per_clip, len(own)))
    return out


def train_qa(model: VideoQA, tok, items: Sequence[dict], clips: torch.Tensor, steps: int, batch_size: int = 16,
             questions_per_clip: int = 4, lr: float = 1e-3, seed: int = 1, progress: bool = False,
             log: Callable[[dict], None] | None = None, blind: bool = False) -> list[dict]:
    """Cross-entropy over the answer vocabulary; each step batch_size clips, each encoded once and asked up to
    questions_per_clip of its questions. The same seed gives the same batches for every encoder. blind=True
    trains the question prior: the fusion sees one zero vector in place of the clip (a question-only model)."""
    need(bool(items), "QA training needs at least one question")
    device = next(model.head.parameters()).device
    by_clip: dict[int, list[dict]] = {}
    for it in items:
        by_clip.setdefault(it["clip"], []).append(it)
    clip_ids = sorted(by_clip)
    rng = random.Random(seed)
    opt, sched = _optimizer(model, lr, steps, max(1, steps // 20))
    bar = BudgetBar(steps, desc="video-qa", enabled=progress)
    rows, t0 = [], time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        pick = rng.sample(clip_ids, min(batch_size, len(clip_ids)))
        batch = _qa_batch(items, pick, by_clip, questions_per_clip, rng)
        tokens = _video_tokens(model, clips[pick], blind)
        row_of = {c: i for i, c in enumerate(pick)}
        owner = torch.tensor([row_of[it["clip"]] for it in batch], device=device)
        ids, mask = encode_questions(tok, [it["question"] for it in batch], model.config.max_question_len)
        logits = model.answer(tokens[owner], ids.to(device), mask.to(device))
        loss = F.cross_entropy(logits, torch.tensor([it["label"] for it in batch], device=device))
        _step(model, opt, sched, loss)
        bar.update(1)
        _record(rows, "qa", step, steps, loss, t0, log)
    bar.close()
    model.eval()
    return rows


def accuracy(hits: Sequence[bool]) -> dict:
    """{acc, n, stderr} with the binomial standard error sqrt(p (1 - p) / n)."""
    n = len(hits)
    p = sum(hits) / n if n else float("nan")
    return {"acc": round(p, 4), "n": n, "stderr": round(math.sqrt(p * (1 - p) / n), 4) if n else float("nan")}


def _groups(items: Sequence[dict], hits: Sequence[bool]) -> dict:
    out = {"all": accuracy(hits),
           "temporal": accuracy([h for it, h in zip(items, hits) if it["sensitive"]]),
           "non_temporal": accuracy([h for it, h in zip(items, hits) if not it["sensitive"]])}
    for t in sorted({it["type"] for it in items}):
        for flag, tag in ((True, "temporal"), (False, "non_temporal")):
            sub = [h for it, h in zip(items, hits) if it["type"] == t and it["sensitive"] == flag]
            if sub:
                out[f"{t}_{tag}"] = accuracy(sub)
    return out


@torch.no_grad()
def predict_qa(model: VideoQA, tok, items: Sequence[dict], clips: torch.Tensor, batch_size: int = 64,
               blind: bool = False) -> list[int]:
    """The predicted answer index of each item (clips encoded once each; blind: as train_qa's)."""
    device = next(model.head.parameters()).device
    model.eval()
    preds: list[int] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        used = sorted({it["clip"] for it in chunk})
        row_of = {c: i for i, c in enumerate(used)}
        tokens = _video_tokens(model, clips[used], blind)
        owner = torch.tensor([row_of[it["clip"]] for it in chunk], device=device)
        ids, mask = encode_questions(tok, [it["question"] for it in chunk], model.config.max_question_len)
        preds += model.answer(tokens[owner], ids.to(device), mask.to(device)).argmax(-1).tolist()
    return preds


def evaluate_qa(model: VideoQA, tok, items: Sequence[dict], clips: torch.Tensor, blind: bool = False) -> dict:
    """Accuracy overall, on frame-order-sensitive ('temporal') questions, on the rest, and per type x flag."""
    preds = predict_qa(model, tok, items, clips, blind=blind)
    return _groups(items, [p == it["label"] for p, it in zip(preds, items)])


def majority_level(train_items: Sequence[dict], test_items: Sequence[dict]) -> dict:
    """The blind prior: each test question answered with its type-and-flag group's most common TRAIN answer
    (e.g. 'no' for touching, the commonest count); the level an order-blind model should sit near."""
    counts: dict[tuple, dict[int, int]] = {}
    for it in train_items:
        group = counts.setdefault((it["type"], it["sensitive"]), {})
        group[it["label"]] = group.get(it["label"], 0) + 1
    best = {k: max(v, key=lambda a: (v[a], -a)) for k, v in counts.items()}
    return _groups(test_items, [best.get((it["type"], it["sensitive"])) == it["label"] for it in test_items])


@dataclass
class VideoTrainConfig:
    data: str = ""
    """A video world written by `lmstack data synth-video --out DIR` (its frames and size must match the model)."""
    out: str = ""
    """The run directory: config.json, model.safetensors, tokenizer.json, metrics.jsonl, summary.json."""
    model: VideoQAConfig = field(default_factory=VideoQAConfig)
    """Video encoder (model.video.encoder: temporal | divided | mean) and QA fusion; vocab and answers are set."""
    text: VideoCLIPConfig = field(default_factory=VideoCLIPConfig)
    """Caption tower and shared space for pretraining (its video field is replaced by model.video)."""
    vocab_size: int = 600
    """BPE size of the video tokenizer."""
    pretrain_steps: int = 0
    """Video-text contrastive steps before QA (0 = QA from scratch)."""
    qa_steps: int = 300
    """QA optimizer steps."""
    batch_size: int = 16
    """Clips per step (contrastive: 2x this many pairs)."""
    questions_per_clip: int = 4
    """Questions asked of each clip in a QA step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (warmup, cosine decay to 10%)."""
    seed: int = 0
    """Seed of the init and the batches."""
    device: str = "auto"
    """auto (cuda when visible), cpu, cuda, cuda:N."""
    threads: int = 0
    """Torch threads (0 = the default)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        need(self.pretrain_steps >= 0 and self.qa_steps >= 1, "pretrain_steps must be >= 0 and qa_steps >= 1")
        need(self.batch_size >= 2 and self.questions_per_clip >= 1, "batch_size must be >= 2, questions_per_clip >= 1")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")


def save_video_qa(model: VideoQA, tok, answers: Sequence[str], out: str | Path) -> Path:
    """out/model.safetensors, tokenizer.json and config.json (last, so a half-written directory is never loaded)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / "model.safetensors", safetensors_bytes(tensors, metadata={"format": "pt"}))
    tok.save(out)
    config = {"model_type": MODEL_TYPE, "qa": to_dict(model.config), "answers": list(answers)}
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def load_video_qa(path: str | Path) -> tuple[VideoQA, object, list[str]]:
    """(model, tokenizer, answers) from a directory save_video_qa wrote; anything else is refused."""
    path = check_model_dir(path, "a video QA")
    data = read_json(path, "config.json", "video QA config", want_object=True)
    answers = data.get("answers")
    if data.get("model_type") != MODEL_TYPE or not isinstance(data.get("qa"), dict) or not isinstance(answers, list):
        raise LmstackError(f"{path}/config.json is not a video QA config (model_type {MODEL_TYPE!r}, qa, answers)")
    model = VideoQA(from_dict(VideoQAConfig, data["qa"]))
    tensors = load_safetensors(path, "model.safetensors", "video QA weights")
    load_state_checked(model, tensors, f"{path}/model.safetensors")
    return model.eval(), load_tokenizer(path), answers


def train_video(cfg: VideoTrainConfig) -> dict:
    """Optional contrastive pretraining, then QA on the train split; val scores (QA, majority level, retrieval);
    writes the run directory and returns the summary."""
    need(bool(cfg.data), "train-video needs --data DIR, a world from `lmstack data synth-video --out DIR`")
    need(bool(cfg.out), "train-video needs --out DIR, the run directory to write")
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    v = cfg.model.video
    tok, answers = video_tokenizer(cfg.vocab_size), answer_vocab()
    train, train_clips = load_video_split(cfg.data, "train", v.frames, v.vision.image_size)
    val, val_clips = load_video_split(cfg.data, "val", v.frames, v.vision.image_size)
    qa_cfg = from_dict(VideoQAConfig, dict(to_dict(cfg.model), vocab_size=tok.vocab_size, n_answers=len(answers)))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "train_config.json", json.dumps(to_dict(cfg), indent=2) + "\n")
    log = RunLog(out)

    torch.manual_seed(cfg.seed)
    summary: dict = {"out": str(out), "encoder": v.encoder, "train_clips": len(train), "val_clips": len(val)}
    t0 = time.perf_counter()
    qa = VideoQA(qa_cfg).to(device)
    if cfg.pretrain_steps:
        text = from_dict(type(cfg.text.text), dict(to_dict(cfg.text.text), vocab_size=tok.vocab_size,
                                                   bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                                   pad_token_id=tok.pad_id))
        pre = VideoCLIP(VideoCLIPConfig(video=v, text=text, embed_dim=cfg.text.embed_dim,
                                        init_temperature=cfg.text.init_temperature)).to(device)
        pretrain_contrastive(pre, tok, train, train_clips, cfg.pretrain_steps, 2 * cfg.batch_size, cfg.lr, cfg.seed,
                             cfg.progress, log)
        summary["retrieval_val"] = video_retrieval(pre, tok, val, val_clips)
        qa.video.load_state_dict(pre.video.state_dict())  # QA starts from the pretrained video tower
    train_items, val_items = qa_items(train, answers), qa_items(val, answers)
    train_qa(qa, tok, train_items, train_clips, cfg.qa_steps, cfg.batch_size, cfg.questions_per_clip, cfg.lr,
             cfg.seed + 1, cfg.progress, log)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["qa_val"] = evaluate_qa(qa, tok, val_items, val_clips)
    summary["majority_val"] = majority_level(train_items, val_items)
    log({"split": "val", "qa": summary["qa_val"]})
    save_video_qa(qa.cpu(), tok, answers, out)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def run_train_video(cfg: VideoTrainConfig) -> dict:
    """Train a video QA model (optionally after video-text pretraining) on a world from `lmstack data synth-video`."""
    summary = train_video(cfg)
    qa, base = summary["qa_val"], summary["majority_val"]
    print(f"train-video ({summary['encoder']}): {summary['seconds']:.1f} s; val QA accuracy "
          f"{qa['all']['acc']:.3f} (n={qa['all']['n']}), frame-order-sensitive {qa['temporal']['acc']:.3f} "
          f"(majority level {base['temporal']['acc']:.3f}), other {qa['non_temporal']['acc']:.3f}")
    if "retrieval_val" in summary:
        r = summary["retrieval_val"]
        print(f"train-video: val retrieval recall@1 video->text {r['v2t@1']:.3f}, text->video {r['t2v@1']:.3f} "
              f"(chance {r['chance@1']:.3f}, {r['n']} clips)")
    print(f"wrote {summary['out']} (load with lmstack.multimodal.video_train.load_video_qa)")
    return summary


__all__ = ["answer_vocab", "video_tokenizer", "render_clips", "load_video_split", "as_float", "qa_items",
           "encode_questions", "pretrain_contrastive", "video_retrieval", "train_qa", "predict_qa", "evaluate_qa",
           "accuracy", "majority_level", "VideoTrainConfig", "save_video_qa", "load_video_qa", "train_video", "run_train_video"]
