"""Training the speech recognisers on the speech world (`lmstack data synth-speech`): the Whisper-style model
(cross-entropy on the transcript after the task prompt) and the CTC baseline, by one loop.

Log-mels are computed once per utterance and kept in memory. Each step draws a batch (by default utterances
of similar length, `length_batches`), zero-pads it to its longest clip (both models mask the padding),
optionally applies SpecAugment (Park et al. 2019: `freq_masks` bands of up to `freq_mask_width` mel channels
and `time_masks` spans of up to `time_mask_frac` of the clip, filled with the utterance's mean), and takes an
AdamW step with linear warmup, cosine decay and gradient clipping. The prompt tokens are inputs, never targets.

Noise/reverb augmentation (`augment` > 0, off by default): each drawn utterance is, with probability `augment`,
degraded on the WAVEFORM before its log-mel is recomputed -- white noise at an SNR drawn uniformly from
[snr_db_low, snr_db_high], a synthetic room (speech_world.add_reverb) with RT60 drawn from [rt60_low, rt60_high],
or both (one of the three, equally likely). Its draws come from their own generator (seeded by `seed`), so the
batches and SpecAugment masks are the same as without augmentation. `train_asr` also stores a decoding guard
(asr.guard_from_transcripts over the training transcripts) in the saved model.

Fine-tuning (`init_from`, off by default): the loop starts from saved weights of the same model (a directory
from SpeechRecognizer.save or a .safetensors file; names and shapes must match) with a fresh optimizer and its
own warmup/decay -- e.g. augmentation applied to an already aligned clean model.

A run writes into `out`: the model (SpeechRecognizer.save), asr_train.json (the resolved config and the
summary) and metrics.jsonl (one row per logged step, then the validation WER/CER).

Usage:
    lmstack data synth-speech --out data/speech --n_utterances 400
    lmstack mm train-asr --data data/speech --out runs/asr --steps 300
    lmstack mm train-asr --data data/speech --out runs/asr_ft --steps 100 --lr 5e-4 --init_from runs/asr --augment 0.5
    lmstack mm transcribe clip.wav --model runs/asr --beam 4
    lmstack mm transcribe clip.wav --model runs/asr --timestamps      # + one "start end word" line per word
    from lmstack.multimodal.asr_train import ASRTrainConfig, train_asr, load_split, fit
    summary = train_asr(ASRTrainConfig(data="data/speech", out="runs/asr", steps=50))
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lmstack.config import atomic_write_text, to_dict
from lmstack.errors import LmstackError
from lmstack.eval.speech_metrics import cer, wer
from lmstack.model.load_guard import load_safetensors, load_state_checked
from lmstack.multimodal.asr import SpeechRecognizer, asr_tokenizer, guard_from_transcripts
from lmstack.multimodal.audio import SAMPLE_RATE, log_mel, read_wav, resample
from lmstack.multimodal.speech_world import add_noise, add_reverb
from lmstack.multimodal.whisper import Whisper, WhisperConfig
from lmstack.progress import BudgetBar
from lmstack.runtime.validation import check_range


@dataclass
class ASRTrainConfig:
    data: str = ""
    """Speech world directory from `lmstack data synth-speech` (train.jsonl, val.jsonl, audio/)."""
    out: str = "runs/asr"
    """Output directory: the model (config.json, model.safetensors, tokenizer.json), asr_train.json, metrics."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Utterances per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    warmup: int = 30
    """Linear warmup steps, then cosine decay to 10% of lr."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 = off)."""
    d_model: int = 128
    """Model width."""
    n_heads: int = 4
    """Attention heads."""
    n_encoder_layers: int = 4
    """Encoder blocks."""
    n_decoder_layers: int = 2
    """Decoder blocks."""
    n_audio_ctx: int = 400
    """Encoder positions: the longest audio is n_audio_ctx / 50 seconds (the world's slowest are ~7 s)."""
    n_text_ctx: int = 96
    """Longest token sequence (prompt + characters + end)."""
    length_batches: bool = True
    """Batch utterances of similar length (consecutive in length order, batches shuffled each epoch): less
    padding, about half the compute on the speech world; False = uniform random batches."""
    spec_augment: bool = True
    """SpecAugment-style frequency and time masking of the training log-mels."""
    freq_masks: int = 2
    """Frequency masks per utterance."""
    freq_mask_width: int = 10
    """Widest frequency mask (mel channels)."""
    time_masks: int = 2
    """Time masks per utterance."""
    time_mask_frac: float = 0.05
    """Widest time mask as a fraction of the utterance."""
    augment: float = 0.0
    """Fraction of drawn training utterances degraded by noise and/or reverb before the log-mel (0 = off)."""
    snr_db_low: float = 5.0
    """Lowest SNR (dB) of the added white noise."""
    snr_db_high: float = 30.0
    """Highest SNR (dB) of the added white noise."""
    rt60_low: float = 0.2
    """Shortest reverberation time (s) of the synthetic room."""
    rt60_high: float = 0.8
    """Longest reverberation time (s) of the synthetic room."""
    init_from: str = ""
    """Start from these weights instead of a fresh initialisation (fine-tuning): a directory holding
    model.safetensors (SpeechRecognizer.save) or a .safetensors file of the same model; "" = from scratch."""
    max_train: int = 0
    """Use at most this many training utterances (0 = all)."""
    val_n: int = 100
    """Validation utterances scored (greedy WER) at the end (0 = none)."""
    seed: int = 0
    """Seed of initialisation, batches and masks."""
    log_every: int = 25
    """Steps between metrics rows."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "d_model", "n_heads", "n_encoder_layers", "n_decoder_layers",
                     "n_audio_ctx", "n_text_ctx", "log_every"):
            check_range(name, getattr(self, name), low=1)
        for name in ("warmup", "freq_masks", "freq_mask_width", "time_masks", "max_train", "val_n", "grad_clip",
                     "weight_decay"):
            check_range(name, getattr(self, name), low=0)
        check_range("lr", self.lr, low=0, low_open=True)
        check_range("time_mask_frac", self.time_mask_frac, low=0, high=0.5)
        check_range("augment", self.augment, low=0, high=1)
        check_range("rt60_low", self.rt60_low, low=0.05, high=3.0)
        check_range("rt60_high", self.rt60_high, low=self.rt60_low, high=3.0)
        check_range("snr_db_low", self.snr_db_low, low=-20, high=100)
        check_range("snr_db_high", self.snr_db_high, low=self.snr_db_low, high=100)

    def whisper_config(self, vocab_size: int) -> WhisperConfig:
        return WhisperConfig(n_audio_ctx=self.n_audio_ctx, d_model=self.d_model, n_heads=self.n_heads,
                             n_encoder_layers=self.n_encoder_layers, n_decoder_layers=self.n_decoder_layers,
                             vocab_size=vocab_size, n_text_ctx=self.n_text_ctx)


def load_split(data: str | Path, split: str, limit: int = 0) -> list[dict]:
    """The records of one split with their audio: each record gains `samples` (float32 mono 16 kHz)."""
    data = Path(data)
    index = data / f"{split}.jsonl"
    if not data.is_dir() or not index.is_file():
        raise LmstackError(f"{index} not found: --data must be a speech world directory; make one with "
                           "`lmstack data synth-speech --out DIR`")
    rows = []
    for n, line in enumerate(index.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmstackError(f"{index} line {n + 1} is not JSON: {e.msg}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or not isinstance(rec.get("audio"), str):
            raise LmstackError(f"{index} line {n + 1} needs 'text' and 'audio' strings")
        path = (data / rec["audio"]).resolve()
        if data.resolve() not in path.parents:
            raise LmstackError(f"{index} line {n + 1}: audio path {rec['audio']!r} leaves the data directory")
        samples, rate = read_wav(path.read_bytes())
        rows.append({**rec, "samples": resample(samples, rate)})
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise LmstackError(f"{index} holds no utterances")
    return rows


def features(records: list[dict], max_frames: int) -> list[torch.Tensor]:
    """Each record's log-mel (80, frames); a clip over max_frames is an error naming it."""
    mels = []
    for rec in records:
        mel = log_mel(rec["samples"])
        if mel.shape[1] > max_frames:
            raise LmstackError(f"utterance {rec.get('id')} is {mel.shape[1] / 100:.2f} s, over the model's "
                               f"{max_frames / 100:g} s; raise n_audio_ctx")
        mels.append(mel)
    return mels


def spec_augment(mel: torch.Tensor, cfg: ASRTrainConfig, rng: random.Random) -> torch.Tensor:
    """A masked copy of one (n_mels, frames) log-mel."""
    mel = mel.clone()
    fill = float(mel.mean())
    n_mels, frames = mel.shape
    for _ in range(cfg.freq_masks):
        w = rng.randint(0, cfg.freq_mask_width)
        f0 = rng.randint(0, max(0, n_mels - w))
        mel[f0:f0 + w] = fill
    for _ in range(cfg.time_masks):
        w = rng.randint(0, int(cfg.time_mask_frac * frames))
        t0 = rng.randint(0, max(0, frames - w))
        mel[:, t0:t0 + w] = fill
    return mel


def degrade(samples: np.ndarray, cfg: ASRTrainConfig, rng: np.random.Generator) -> np.ndarray:
    """One utterance with white noise, reverb or both (equally likely), at a random SNR / RT60 from cfg's ranges."""
    kind = int(rng.integers(3))  # 0 noise, 1 reverb, 2 both
    x = samples
    if kind >= 1:
        x = add_reverb(x, rng, rt60=float(rng.uniform(cfg.rt60_low, cfg.rt60_high)))
    if kind != 1 and np.any(x):  # a silent clip has no SNR: it stays as it is
        x = add_noise(x, float(rng.uniform(cfg.snr_db_low, cfg.snr_db_high)), rng)
    return x


def load_init(model: torch.nn.Module, source: str | Path) -> None:
    """Load `source` (a model directory with model.safetensors, or a .safetensors file) into `model`, refusing
    weights of another model: every tensor name and shape must match `model`'s."""
    source = Path(source)
    if source.is_dir():
        tensors = load_safetensors(source, "model.safetensors", "init_from weights")
    elif source.is_file() and source.suffix == ".safetensors":
        tensors = load_safetensors(source.parent, source.name, "init_from weights")
    else:
        raise LmstackError(f"init_from={str(source)!r}: not a model directory (with model.safetensors) nor a "
                           ".safetensors file")
    load_state_checked(model, tensors, f"init_from={str(source)!r}")


def pad_batch(mels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    frames = torch.tensor([m.shape[1] for m in mels])
    out = torch.zeros(len(mels), mels[0].shape[0], int(frames.max()))
    for i, m in enumerate(mels):
        out[i, :, : m.shape[1]] = m
    return out, frames


def whisper_loss(asr: SpeechRecognizer) -> Callable:
    """Loss of a batch for the Whisper-style model: next-token cross-entropy over transcript + <|endoftext|>."""
    n_prompt = len(asr.ids.prompt)

    def loss(mel: torch.Tensor, frames: torch.Tensor, texts: list[str]) -> torch.Tensor:
        rows = [asr.ids.target(asr.tokenizer, t) for t in texts]
        width = max(map(len, rows))
        if width > asr.config.n_text_ctx + 1:
            raise LmstackError(f"a transcript needs {width} tokens, over n_text_ctx={asr.config.n_text_ctx}")
        ids = torch.full((len(rows), width), asr.ids.eot, dtype=torch.long)
        labels = torch.full((len(rows), width - 1), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, n_prompt - 1: len(r) - 1] = torch.tensor(r[n_prompt:])
        logits = asr.model(mel, ids[:, :-1], frames)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    return loss


def fit(model: torch.nn.Module, loss_fn: Callable, mels: list[torch.Tensor], texts: list[str],
        cfg: ASRTrainConfig, desc: str = "train-asr", samples: list[np.ndarray] | None = None) -> list[dict]:
    """The training loop shared by both models; returns the logged rows (step, loss, lr, seconds).
    cfg.augment > 0 needs each utterance's `samples` (the waveforms the mels came from); cfg.init_from loads
    starting weights into `model` first (fine-tuning: the optimizer state is fresh)."""
    if cfg.augment and (samples is None or len(samples) != len(mels)):
        raise LmstackError(f"augment={cfg.augment} degrades waveforms: fit needs samples, one per mel")
    if cfg.init_from:
        load_init(model, cfg.init_from)
    rng = random.Random(cfg.seed)
    aug_rng = np.random.default_rng([cfg.seed, 7])  # its own stream: batches and masks match the unaugmented run
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    order = sorted(range(len(mels)), key=lambda i: mels[i].shape[1])
    size = min(cfg.batch_size, len(mels))
    queue: list[list[int]] = []

    def next_batch() -> list[int]:
        if not cfg.length_batches:
            return [rng.randrange(len(mels)) for _ in range(size)]
        if not queue:  # a new epoch: chunks of the length order from a random offset, in random order
            offset = rng.randrange(size)
            cut = [order[:offset]] if offset else []
            cut += [order[i:i + size] for i in range(offset, len(order), size)]
            queue.extend(c for c in cut if len(c) * 2 >= size)  # too-short edge chunks wait for the next epoch
            rng.shuffle(queue)
        return queue.pop()

    model.train()
    rows, start, running = [], time.perf_counter(), []
    bar = BudgetBar(cfg.steps, desc=desc, enabled=cfg.progress)
    for step in range(cfg.steps):
        pick = next_batch()
        batch = [mels[i] for i in pick]
        if cfg.augment:
            batch = [log_mel(degrade(samples[i], cfg, aug_rng)) if aug_rng.random() < cfg.augment else m
                     for i, m in zip(pick, batch)]
        batch = [spec_augment(m, cfg, rng) for m in batch] if cfg.spec_augment else batch
        mel, frames = pad_batch(batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_fn(mel, frames, [texts[i] for i in pick])
        if not torch.isfinite(loss):
            raise LmstackError(f"the loss is {float(loss)} at step {step}; lower lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        running.append(float(loss.detach()))
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            rows.append({"step": step + 1, "loss": sum(running) / len(running), "lr": lr_at(step),
                         "seconds": round(time.perf_counter() - start, 2)})
            bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}")
            running = []
    bar.close()
    model.eval()
    return rows


def new_whisper(cfg: ASRTrainConfig) -> SpeechRecognizer:
    torch.manual_seed(cfg.seed)
    tok = asr_tokenizer()
    return SpeechRecognizer(Whisper(cfg.whisper_config(tok.vocab_size)), tok)


def train_asr(cfg: ASRTrainConfig) -> dict:
    """Train the Whisper-style recogniser on `cfg.data`, score greedy WER on val, save it into `cfg.out`."""
    if not cfg.data:
        raise LmstackError("--data is required: a speech world directory from `lmstack data synth-speech`")
    train = load_split(cfg.data, "train", cfg.max_train)
    asr = new_whisper(cfg)
    mels = features(train, asr.config.max_frames)
    start = time.perf_counter()
    texts = [r["text"] for r in train]
    rows = fit(asr.model, whisper_loss(asr), mels, texts, cfg, samples=[r["samples"] for r in train])
    asr.guard = guard_from_transcripts(texts, [r["samples"].size / SAMPLE_RATE for r in train])
    summary = {"steps": cfg.steps, "seconds": round(time.perf_counter() - start, 2), "final_loss": rows[-1]["loss"],
               "n_train": len(train), "parameters": asr.model.num_parameters()}
    if cfg.val_n:
        val = load_split(cfg.data, "val", cfg.val_n)
        hyps = asr.transcribe_batch([r["samples"] for r in val])
        refs = [r["text"] for r in val]
        summary["val"] = {"wer": wer(refs, hyps), "cer": cer(refs, hyps)}
        rows.append({"val_wer": summary["val"]["wer"]["wer"], "val_cer": summary["val"]["cer"]["cer"]})
    out = asr.save(cfg.out)
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out / "asr_train.json", json.dumps({"config": to_dict(cfg), "summary": summary}, indent=1))
    summary["out"] = str(out)
    return summary


def run_train_asr(cfg: ASRTrainConfig) -> dict:
    """Train the Whisper-style speech recogniser on a speech world from `lmstack data synth-speech`."""
    summary = train_asr(cfg)
    print(f"train-asr: {summary['steps']} steps in {summary['seconds']:.1f} s, final loss {summary['final_loss']:.3f} "
          f"({summary['parameters']:,} parameters, {summary['n_train']} utterances)")
    if "val" in summary:
        w, c = summary["val"]["wer"], summary["val"]["cer"]
        print(f"train-asr: val greedy WER {w['wer']:.3f} ({w['errors']}/{w['words']} words, {w['utterances']} "
              f"utterances), CER {c['cer']:.3f}")
    print(f"wrote {summary['out']} (load with lmstack.multimodal.asr.SpeechRecognizer.from_dir)")
    return summary


def transcribe(audio: str, model: str | None = None, beam: int = 1, timestamps: bool = False) -> str:
    """Transcribe a WAV file with a speech recogniser (greedy, or beam search with --beam N).

    Args:
        audio: A PCM WAV file (any sample rate: it is resampled to 16 kHz; channels are averaged).
        model: An ASR model directory (`lmstack mm train-asr`, SpeechRecognizer.save).
        beam: Beam width; 1 = greedy.
        timestamps: Also print each word with its start and end (seconds), one per line after the text
            (cross-attention + DTW, multimodal/asr_timing.py).
    """
    if model is None:
        raise LmstackError("--model ASR_DIR is required (a directory written by `lmstack mm train-asr`)")
    path = Path(audio)
    if not path.is_file():
        raise LmstackError(f"{audio}: no such audio file")
    samples, rate = read_wav(path.read_bytes())  # a bad file fails before the model loads
    asr = SpeechRecognizer.from_dir(model)
    if not timestamps:
        text = asr.transcribe(resample(samples, rate), beam=beam)
        print(text)
        return text
    text, words = asr.transcribe_words(resample(samples, rate), beam=beam)
    print(text)
    for word, start, end in words:
        print(f"{start:7.2f} {end:7.2f}  {word}")
    return text


__all__ = ["ASRTrainConfig", "train_asr", "fit", "load_init", "load_split", "features", "spec_augment", "degrade", "pad_batch",
           "whisper_loss", "new_whisper", "run_train_asr", "transcribe"]
