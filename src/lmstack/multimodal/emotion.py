"""Classifiers for the emotion-proxy world (emotion_world.py: prosody arousal x lexical valence, four classes)
from audio, from text, and from both.

- audio: Whisper's log-mel (audio.log_mel) -> two stride-2 convolutions (4x fewer frames; Whisper's stem
  subsamples 2x) -> the one lmstack Transformer as an encoder (ModelConfig(causal=False, head="none"), padded frames
  masked) -> mean over real frames -> linear.
- text: a byte-level BPE tokenizer trained on the messages (emotion_tokenizer) -> the same Transformer encoder ->
  mean over real tokens -> linear. BagOfWords (word counts -> logistic regression) is the simple text baseline.
- both: the two pooled vectors concatenated -> linear, trained jointly (late fusion); fusion="xattn" first lets
  every text token attend to the audio frames (one cross-attention layer with a residual) before pooling.
- noisy_copies: noise augmentation (white noise at a random SNR) for training pairs.

Every model takes a batch dict from collate() and returns (B, n_classes) logits, so one training loop
(train_emotion: AdamW, warmup + cosine, batches drawn by a seeded generator, so arms with the same seed see the
same examples in the same order) and one evaluate (accuracy, n, binomial stderr, confusion matrix) serve all.
Bad input raises LmstackError naming it: a sample rate other than 16 kHz, empty, non-mono or non-finite audio,
an empty message, a missing modality.

Usage:
    from lmstack.multimodal.emotion import (EmotionConfig, EmotionClassifier, EmotionTrainConfig, classify,
                                            emotion_tokenizer, evaluate, load_emotion, make_examples, save_emotion,
                                            train_emotion)
    tok = emotion_tokenizer([r["text"] for r, _ in train_pairs])
    model = EmotionClassifier(EmotionConfig(modality="both", vocab_size=tok.vocab_size))
    train = make_examples(train_pairs, model.config, tok)       # pairs from emotion_world.load_emotion_split
    train_emotion(model, train, EmotionTrainConfig(steps=300))
    evaluate(model, make_examples(test_pairs, model.config, tok))  # {"accuracy", "n", "stderr", "confusion"}
    classify(model, tok, samples=wave, rate=16000, text="Sadly, Ada moved.")  # {"label", "probs"}
    save_emotion(model, "runs/emotion", tok); model, tok = load_emotion("runs/emotion")
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lmstack.config import atomic_write_bytes, atomic_write_text, from_dict, to_dict
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.load_guard import load_safetensors, load_state_checked, read_json
from lmstack.multimodal.audio import SAMPLE_RATE, log_mel
from lmstack.multimodal.emotion_world import CLASSES
from lmstack.multimodal.speech_world import add_noise
from lmstack.runtime.validation import check_choices, need
from lmstack.tokenizer import load_tokenizer, train_tokenizer

MODEL_TYPE = "lmstack-emotion"
_WORD = re.compile(r"[a-z']+")


@dataclass
class EmotionConfig:
    modality: Literal["audio", "text", "both"] = "both"
    """Which inputs the classifier reads."""
    fusion: Literal["concat", "xattn"] = "concat"
    """both: concat = late fusion of the pooled vectors; xattn = text tokens cross-attend to audio frames first."""
    n_classes: int = len(CLASSES)
    """Output classes (emotion_world.CLASSES)."""
    d_model: int = 64
    """Width of each encoder."""
    n_layers: int = 2
    """Transformer blocks per encoder."""
    n_heads: int = 4
    """Attention heads."""
    n_mels: int = 80
    """Mel bins of the audio features (Whisper: 80)."""
    vocab_size: int = 512
    """Token ids of the text encoder (the tokenizer's vocab_size)."""
    max_tokens: int = 64
    """Longest message in tokens; longer ones are cut."""
    max_frames: int = 1500
    """Longest audio in mel frames (10 ms each); longer audio is cut."""
    dropout: float = 0.0
    """Dropout inside the encoders (off by default: on one CPU thread its random masks cost ~30 % of a step)."""

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("n_classes", "d_model", "n_layers", "n_heads", "n_mels", "vocab_size", "max_tokens",
                     "max_frames"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.d_model % self.n_heads == 0, f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")

    def encoder(self, vocab_size: int, max_len: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, max_seq_len=max_len, causal=False, head="none",
                           dropout=self.dropout)


@dataclass
class EmotionTrainConfig:
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 32
    """Examples per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup: int = 20
    """Linear warmup steps, then cosine decay to 10 % of lr."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 = off)."""
    seed: int = 0
    """Seed of the batch draws (equal seeds = equal batches across arms)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.warmup >= 0 and self.grad_clip >= 0, "warmup and grad_clip must be >= 0")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class AudioEncoder(nn.Module):
    """(B, n_mels, T) log-mel + lengths -> (B, ~T/4, d) frames and their mask."""

    def __init__(self, cfg: EmotionConfig):
        super().__init__()
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.d_model, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, 3, stride=2, padding=1)
        self.encoder = Transformer(cfg.encoder(1, cfg.max_frames // 4 + 1))  # fed inputs_embeds: 1 unused id

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.gelu(self.conv1(mel))
        len1 = (lengths + 1) // 2  # each stride-2 conv with padding 1 keeps ceil(T / 2) frames
        # zero conv1's frames past each clip's end, as conv2's own zero padding would be for the clip alone:
        # then a clip's output does not depend on how long the other clips of its batch are
        h = h * (torch.arange(h.shape[2], device=h.device)[None, :] < len1[:, None]).unsqueeze(1)
        x = F.gelu(self.conv2(h)).transpose(1, 2)
        mask = (torch.arange(x.shape[1], device=x.device)[None, :] < ((len1 + 1) // 2)[:, None]).long()
        return self.encoder(inputs_embeds=x, attention_mask=mask), mask


class TextEncoder(nn.Module):
    """(B, L) ids + mask -> (B, L, d) token states."""

    def __init__(self, cfg: EmotionConfig):
        super().__init__()
        self.encoder = Transformer(cfg.encoder(cfg.vocab_size, cfg.max_tokens))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(ids, attention_mask=mask)


class EmotionClassifier(nn.Module):
    def __init__(self, config: EmotionConfig):
        super().__init__()
        cfg = self.config = config
        self.audio = AudioEncoder(cfg) if cfg.modality in ("audio", "both") else None
        self.text = TextEncoder(cfg) if cfg.modality in ("text", "both") else None
        self.xattn = self.xattn_norm = None
        if cfg.modality == "both" and cfg.fusion == "xattn":
            self.xattn = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
            self.xattn_norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model * (2 if cfg.modality == "both" else 1), cfg.n_classes)

    def forward(self, batch: dict) -> torch.Tensor:
        pooled = []
        if self.audio is not None:
            frames, fmask = self.audio(batch["mel"], batch["mel_len"])
            pooled.append(_masked_mean(frames, fmask))
        if self.text is not None:
            tokens = self.text(batch["ids"], batch["ids_mask"])
            if self.xattn is not None:  # each token looks at the voice; padded frames are never keys
                seen, _ = self.xattn(self.xattn_norm(tokens), frames, frames, key_padding_mask=fmask == 0,
                                     need_weights=False)
                tokens = tokens + seen
            pooled.append(_masked_mean(tokens, batch["ids_mask"]))
        return self.head(torch.cat(pooled, dim=-1))


class BagOfWords(nn.Module):
    """Word counts -> logistic regression: the text baseline that cannot see word order."""

    def __init__(self, words: list[str], n_classes: int = len(CLASSES)):
        super().__init__()
        if not words:
            raise LmstackError("BagOfWords needs a non-empty vocabulary")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.linear = nn.Linear(len(self.words), n_classes)

    @staticmethod
    def vocabulary(texts: list[str]) -> list[str]:
        return sorted({w for t in texts for w in _WORD.findall(t.lower())})

    def features(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), len(self.words))
        for row, text in enumerate(texts):
            for w in _WORD.findall(text.lower()):
                if w in self.index:  # words never seen in training carry no weight
                    out[row, self.index[w]] += 1.0
        return out

    def forward(self, batch: dict) -> torch.Tensor:
        return self.linear(self.features(batch["text"]))


def emotion_tokenizer(texts: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on the messages (a closed vocabulary: a few hundred merges suffice)."""
    if not texts:
        raise LmstackError("emotion_tokenizer needs at least one text to train on")
    return train_tokenizer(type="bpe", vocab_size=vocab_size, texts=texts, show_progress=False)


def audio_features(samples: np.ndarray, rate: int, max_frames: int = 1500) -> torch.Tensor:
    """Checked 16 kHz mono samples -> (80, frames) log-mel, cut to max_frames."""
    if rate != SAMPLE_RATE:
        raise LmstackError(f"the emotion model reads {SAMPLE_RATE} Hz audio, got a sample rate of {rate} Hz; "
                           "resample() it first")
    x = np.asarray(samples, dtype=np.float32)
    if x.size == 0:
        raise LmstackError("the audio is empty (0 samples)")
    if x.ndim != 1:
        raise LmstackError(f"the audio must be mono (one channel of samples), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise LmstackError("the audio holds NaN or infinite samples")
    return log_mel(x[: max_frames * 160])


def _text_ids(tok, text: str, max_tokens: int) -> list[int]:
    if not isinstance(text, str) or not text.strip():
        raise LmstackError("the message text is empty")
    return tok.encode(text)[:max_tokens]


def noisy_copies(pairs: list[tuple[dict, np.ndarray]], snr_db: tuple[float, float] = (5.0, 20.0),
                 seed: int = 0) -> list[tuple[dict, np.ndarray]]:
    """Noise augmentation: one copy of every pair with white noise at an SNR drawn uniformly from snr_db (the
    record gains "snr_db"); train on pairs + noisy_copies(pairs) to make the audio side robust to noise."""
    low, high = snr_db
    if not low <= high:
        raise LmstackError(f"snr_db must be (low, high) with low <= high, got {snr_db}")
    rng = np.random.default_rng(seed)
    out = []
    for rec, samples in pairs:
        snr = float(rng.uniform(low, high))
        out.append(({**rec, "snr_db": round(snr, 2)}, add_noise(samples, snr, rng)))
    return out


def make_examples(pairs: list[tuple[dict, np.ndarray]], cfg: EmotionConfig, tok=None) -> list[dict]:
    """(record, samples) pairs -> examples holding what cfg.modality reads (plus text and label, always)."""
    if cfg.modality != "audio" and tok is None:
        raise LmstackError(f"modality={cfg.modality!r} reads text: pass the tokenizer")
    out = []
    for rec, samples in pairs:
        ex = {"text": rec["text"], "label": int(rec["label_id"])}
        if cfg.modality != "text":
            ex["mel"] = audio_features(samples, int(rec.get("sample_rate", SAMPLE_RATE)), cfg.max_frames)
        if cfg.modality != "audio":
            ex["ids"] = _text_ids(tok, rec["text"], cfg.max_tokens)
        out.append(ex)
    return out


def collate(examples: list[dict]) -> dict:
    """Examples -> a batch: mel (B, n_mels, Tmax) zero-padded + mel_len, ids (B, Lmax) + ids_mask, text, label."""
    batch = {"text": [e["text"] for e in examples], "label": torch.tensor([e["label"] for e in examples])}
    if "mel" in examples[0]:
        lens = [e["mel"].shape[1] for e in examples]
        mel = torch.zeros(len(examples), examples[0]["mel"].shape[0], max(lens))
        for i, e in enumerate(examples):
            mel[i, :, : lens[i]] = e["mel"]
        batch["mel"], batch["mel_len"] = mel, torch.tensor(lens)
    if "ids" in examples[0]:
        width = max(len(e["ids"]) for e in examples)
        ids = torch.zeros(len(examples), width, dtype=torch.long)
        mask = torch.zeros(len(examples), width, dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e["ids"])] = torch.tensor(e["ids"])
            mask[i, : len(e["ids"])] = 1
        batch["ids"], batch["ids_mask"] = ids, mask
    return batch


def train_emotion(model: nn.Module, examples: list[dict], cfg: EmotionTrainConfig) -> list[float]:
    """Cross-entropy on batches drawn with replacement by a generator seeded cfg.seed; returns the step losses."""
    if not examples:
        raise LmstackError("train_emotion needs at least one training example")
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def scale(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, scale)
    model.train()
    losses = []
    for _ in range(cfg.steps):
        idx = torch.randint(len(examples), (cfg.batch_size,), generator=gen).tolist()
        batch = collate([examples[i] for i in idx])
        loss = F.cross_entropy(model(batch), batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def predict(model: nn.Module, examples: list[dict], batch_size: int = 64) -> torch.Tensor:
    """(N, n_classes) class probabilities."""
    model.eval()
    out = [F.softmax(model(collate(examples[i: i + batch_size])), dim=-1) for i in range(0, len(examples), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, len(CLASSES))


def evaluate(model: nn.Module, examples: list[dict], n_classes: int = len(CLASSES)) -> dict:
    """{"accuracy", "n", "stderr" (binomial), "confusion": rows = true class, columns = predicted}."""
    if not examples:
        raise LmstackError("evaluate needs at least one example")
    return scores([e["label"] for e in examples], predict(model, examples).argmax(-1).tolist(), n_classes)


def scores(true: list[int], pred: list[int], n_classes: int = len(CLASSES)) -> dict:
    """Accuracy, n, binomial stderr and the confusion matrix (rows true, columns predicted) of predictions."""
    if not true or len(true) != len(pred):
        raise LmstackError(f"scores needs equally many true and predicted labels, got {len(true)} and {len(pred)}")
    confusion = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(true, pred):
        confusion[t][p] += 1
    acc = sum(t == p for t, p in zip(true, pred)) / len(true)
    return {"accuracy": acc, "n": len(true), "stderr": math.sqrt(acc * (1 - acc) / len(true)),
            "confusion": confusion}


def classify(model: EmotionClassifier, tok=None, samples: np.ndarray | None = None, rate: int = SAMPLE_RATE,
             text: str | None = None) -> dict:
    """One example -> {"label", "probs": {class: p}}; the inputs the model's modality needs are required."""
    cfg = model.config
    if cfg.modality != "text" and samples is None:
        raise LmstackError(f"this emotion model (modality={cfg.modality!r}) needs audio samples")
    if cfg.modality != "audio" and (text is None or tok is None):
        raise LmstackError(f"this emotion model (modality={cfg.modality!r}) needs the message text and tokenizer")
    ex = {"text": text or "", "label": 0}
    if cfg.modality != "text":
        ex["mel"] = audio_features(samples, rate, cfg.max_frames)
    if cfg.modality != "audio":
        ex["ids"] = _text_ids(tok, text, cfg.max_tokens)
    probs = predict(model, [ex])[0].tolist()
    return {"label": CLASSES[int(np.argmax(probs))], "probs": dict(zip(CLASSES, probs))}


def save_emotion(model: EmotionClassifier, out: str | Path, tok=None) -> Path:
    """out/model.safetensors (+ tokenizer.json for text models), then config.json last, each atomically."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmstackError(f"cannot save an emotion model to {out}: it is a file, not a directory")
    if model.config.modality != "audio" and tok is None:
        raise LmstackError("a text-reading emotion model is saved with its tokenizer: pass tok")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / "model.safetensors", safetensors_bytes(tensors, metadata={"format": "pt"}))
    if tok is not None:
        tok.save(out)
    config = {"model_type": MODEL_TYPE, "classes": list(CLASSES), "emotion": to_dict(model.config)}
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def load_emotion(path: str | Path) -> tuple[EmotionClassifier, object]:
    """(model in eval mode, tokenizer or None) from a directory save_emotion wrote."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise LmstackError(f"{path} is not an emotion-model directory: config.json or model.safetensors is missing")
    data = read_json(path, "config.json", "emotion-model config", want_object=True)
    if data.get("model_type") != MODEL_TYPE or not isinstance(data.get("emotion"), dict):
        raise LmstackError(f"{path}/config.json is not an emotion-model config: model_type="
                           f"{data.get('model_type')!r} (want {MODEL_TYPE!r}) with an 'emotion' section")
    if data.get("classes") != list(CLASSES):
        raise LmstackError(f"{path}/config.json has classes {data.get('classes')!r}; this lmstack has {list(CLASSES)}")
    model = EmotionClassifier(from_dict(EmotionConfig, data["emotion"]))
    tensors = load_safetensors(path, "model.safetensors", "emotion-model weights")
    load_state_checked(model, tensors, f"{path}/model.safetensors")
    tok = None
    if model.config.modality != "audio":
        if not (path / "tokenizer.json").is_file():
            raise LmstackError(f"{path} holds a text-reading emotion model but no tokenizer.json")
        tok = load_tokenizer(path)
    return model.eval(), tok


__all__ = ["EmotionConfig", "EmotionTrainConfig", "EmotionClassifier", "AudioEncoder", "TextEncoder", "BagOfWords",
           "emotion_tokenizer", "audio_features", "noisy_copies", "make_examples", "collate", "train_emotion",
           "predict", "evaluate", "scores", "classify", "save_emotion", "load_emotion", "MODEL_TYPE"]
