"""Training the codec and the VALL-E-style TTS (codec.py, tts.py), from Python or `lmstack mm`.

- `train_codec_on(codec, waves, ...)`: k-means init of the residual codebooks on the encoder's latents, then Adam
  on random crops with L1 + multi-resolution STFT + commitment losses (no GAN: see codec.py).
- `train_tts_on(lm, texts, codes, ...)`: the AR and the NAR losses summed, one AdamW over both models
  (dropout inside both Transformers when `TTSConfig.dropout` > 0; generation runs in eval mode).
- The CLI reads a speech world (`lmstack data synth-speech`): the codec learns from every training utterance of
  the chosen voices; the TTS from one voice and one prosody bundle (no acoustic prompt, so one voice per model),
  its transcripts passed through the model's text front end (tts.front_end: numbers as words when
  `--tts.normalize` is on, the default) exactly as speak() will pass what it is asked to say.

Usage:
    lmstack data synth-speech --out data/speech --n_utterances 2000
    lmstack mm train-codec --data data/speech --out runs/codec --steps 800
    lmstack mm train-tts --data data/speech --codec runs/codec --out runs/tts --steps 600
    lmstack mm speak "4217" --model runs/tts --out x.wav
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lmstack.config import atomic_write_bytes, atomic_write_text, to_dict
from lmstack.errors import LmstackError
from lmstack.multimodal.audio import SAMPLE_RATE, read_wav, resample, write_wav
from lmstack.multimodal.codec import Codec, CodecConfig, load_codec, mel_distance, reconstruction_loss, snr_db
from lmstack.multimodal.tts import CodecLM, SpeechSynthesizer, TTSConfig, front_end
from lmstack.runtime.validation import need
from lmstack.threads import set_threads
from lmstack.tokenizer import train_tokenizer


def read_speech_split(data: str | Path, split: str, voice: str = "", prosody: str = "",
                      max_seconds: float = 0.0) -> list[dict]:
    """Records of <data>/<split>.jsonl with their float32 16 kHz `samples`, filtered by voice/prosody/length."""
    path = Path(data) / f"{split}.jsonl"
    if not Path(data).is_dir() or not path.is_file():
        raise LmstackError(f"{path} not found: write a speech world with `lmstack data synth-speech --out {data}`")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmstackError(f"{path} line {n} is not JSON: {e}") from None
        if (voice and rec.get("voice") != voice) or (prosody and rec.get("prosody") != prosody):
            continue
        samples, rate = read_wav((Path(data) / rec["audio"]).read_bytes())
        rec["samples"] = resample(samples, rate, SAMPLE_RATE)
        if max_seconds and rec["samples"].size > max_seconds * SAMPLE_RATE:
            continue
        out.append(rec)
    if not out:
        raise LmstackError(f"no utterances in {path} match voice={voice or 'any'!r}, prosody={prosody or 'any'!r}")
    return out


def _crops(waves: list[np.ndarray], n: int, length: int, gen: np.random.Generator) -> torch.Tensor:
    """n random crops of `length` samples (zero-padded when an utterance is shorter)."""
    out = np.zeros((n, length), dtype=np.float32)
    for i, w in enumerate(gen.integers(0, len(waves), n)):
        x = waves[w]
        start = int(gen.integers(0, max(1, x.size - length + 1)))
        piece = x[start: start + length]
        out[i, : piece.size] = piece
    return torch.from_numpy(out)


def train_codec_on(codec: Codec, waves: list[np.ndarray], steps: int, batch_size: int = 8, crop_seconds: float = 0.5,
                   lr: float = 2e-3, seed: int = 0, progress: bool = False) -> list[dict]:
    """k-means init of the codebooks, then `steps` Adam steps (cosine LR); returns a loss log every ~10%."""
    if not waves or steps < 1:
        raise LmstackError("train_codec_on needs at least one waveform and one step")
    hop = codec.config.hop
    length = max(hop, int(crop_seconds * SAMPLE_RATE) // hop * hop)
    gen = np.random.default_rng(seed)
    torch.manual_seed(seed)
    init = _crops(waves, max(8, 4 * codec.config.codebook_size * hop // length), length, gen)
    codec.rvq.fit_kmeans(codec.latents(init), iters=10, seed=seed)
    opt = torch.optim.AdamW(codec.parameters(), lr=lr, betas=(0.8, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    codec.train()
    log, every = [], max(1, steps // 10)
    for step in tqdm(range(1, steps + 1), desc="train-codec", unit="step", disable=not progress):
        wave = _crops(waves, batch_size, length, gen)
        recon, _, q_loss = codec(wave)
        g = codec.config.gain  # the loss at the codec's working scale, where its log-power floor was tuned
        parts = reconstruction_loss(recon * g, wave * g, eps=1e-3)
        loss = parts["total"] + q_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(codec.parameters(), 5.0)
        opt.step()
        sched.step()
        if step % every == 0 or step == steps:
            log.append({"step": step, "loss": float(loss.detach()), "l1": float(parts["l1"].detach()),
                        "stft": float(parts["stft"].detach()), "commit": float(q_loss.detach())})
    codec.eval()
    return log


def codec_scores(codec: Codec, waves: list[np.ndarray], n_q: int | None = None) -> dict:
    """Mean mel distance and SNR (dB) of encode->decode over `waves`, each with n and stderr."""
    mel, snr = [], []
    for x in waves:
        y = codec.resynthesize(x, n_q=n_q)
        mel.append(mel_distance(x, y))
        snr.append(snr_db(x, y))
    return {"mel_distance": mean_stderr(mel), "snr_db": mean_stderr(snr)}


def mean_stderr(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    err = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
    return {"value": float(v.mean()), "stderr": err, "n": int(v.size)}


def train_tts_on(lm: CodecLM, texts: list[list[int]], codes: list[torch.Tensor], steps: int, batch_size: int = 16,
                 lr: float = 2e-3, seed: int = 0, progress: bool = False) -> list[dict]:
    """`steps` AdamW steps on AR loss + NAR loss over random batches (cosine LR with warmup)."""
    if not texts or len(texts) != len(codes) or steps < 1:
        raise LmstackError("train_tts_on needs as many transcripts as code sequences (>= 1) and >= 1 step")
    too_long = [i for i, (t, c) in enumerate(zip(texts, codes))
                if len(t) > lm.cfg.max_chars or c.shape[1] > lm.cfg.max_frames]
    if too_long:
        raise LmstackError(f"{len(too_long)} utterances exceed max_chars={lm.cfg.max_chars} or max_frames="
                           f"{lm.cfg.max_frames}; raise them or filter the data")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    lm.train()
    log, every = [], max(1, steps // 10)
    for step in tqdm(range(1, steps + 1), desc="train-tts", unit="step", disable=not progress):
        pick = torch.randint(0, len(texts), (batch_size,), generator=gen).tolist()
        bt, bc = [texts[i] for i in pick], [codes[i] for i in pick]
        ar = lm.ar_loss(bt, bc)
        nar = lm.nar_loss(bt, bc, gen) if lm.n_q > 1 else ar.new_zeros(())
        loss = ar + nar
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % every == 0 or step == steps:
            log.append({"step": step, "ar": float(ar.detach()), "nar": float(nar.detach())})
    lm.eval()
    return log


def char_tokenizer(texts: list[str]):
    """An lmstack char Tokenizer over the transcripts' characters (no merges: phoneme-free, letter by letter)."""
    chars = set("".join(texts))
    return train_tokenizer(texts=sorted(chars), type="char", vocab_size=len(chars))


@dataclass
class CodecTrainConfig:
    data: str = ""
    """A speech world written by `lmstack data synth-speech --out DIR`."""
    out: str = ""
    """Directory to write the codec to (codec_config.json, codec.safetensors, metrics.json)."""
    voice: str = ""
    """Train on this voice only (empty = every voice)."""
    steps: int = 800
    """Adam steps."""
    batch_size: int = 8
    """Crops per step."""
    crop_seconds: float = 0.5
    """Length of each training crop."""
    lr: float = 2e-3
    """Peak learning rate (one-cycle schedule)."""
    seed: int = 0
    """Seed of the crops and the k-means init."""
    codec: CodecConfig = field(default_factory=CodecConfig)
    """The codec's shape (strides, channels, n_q, codebook size, ...)."""
    eval_utterances: int = 32
    """Val utterances scored at the end (mel distance, SNR)."""
    threads: int = 0
    """Torch threads (0 = the default)."""

    def __post_init__(self):
        need(self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be >= 1")
        need(self.crop_seconds > 0 and self.lr > 0, "crop_seconds and lr must be > 0")


def run_train_codec(cfg: CodecTrainConfig) -> dict:
    """Train the neural audio codec (conv + residual VQ) on a speech world and save it to --out."""
    if not cfg.data or not cfg.out:
        raise LmstackError("--data DIR and --out DIR are required (write a world with `lmstack data synth-speech`)")
    if cfg.threads:
        set_threads(cfg.threads)
    train = read_speech_split(cfg.data, "train", cfg.voice)
    torch.manual_seed(cfg.seed)
    codec = Codec(cfg.codec)
    start = time.perf_counter()
    log = train_codec_on(codec, [r["samples"] for r in train], cfg.steps, cfg.batch_size, cfg.crop_seconds, cfg.lr,
                         cfg.seed, progress=True)
    metrics = {"log": log, "seconds": round(time.perf_counter() - start, 1), "bitrate_bps": codec.config.bitrate,
               "config": to_dict(cfg)}
    if cfg.eval_utterances:
        val = read_speech_split(cfg.data, "val", cfg.voice)[: cfg.eval_utterances]
        metrics["val"] = codec_scores(codec, [r["samples"] for r in val])
        v = metrics["val"]
        print(f"train-codec: val mel distance {v['mel_distance']['value']:.3f}, SNR {v['snr_db']['value']:.2f} dB "
              f"(n={v['snr_db']['n']})")
    codec.save(cfg.out)
    atomic_write_text(Path(cfg.out) / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print(f"train-codec: {codec.config.bitrate:.0f} bits/s (arithmetic), {metrics['seconds']:.0f} s; wrote {cfg.out}")
    return metrics


@dataclass
class TTSTrainConfig:
    data: str = ""
    """A speech world written by `lmstack data synth-speech --out DIR`."""
    codec: str = ""
    """A codec directory from `lmstack mm train-codec`."""
    out: str = ""
    """The TTS model directory to write (SpeechSynthesizer.save)."""
    voice: str = "en"
    """The one voice the model learns (no acoustic prompt)."""
    prosody: str = "neutral"
    """The one prosody bundle it learns (empty = all)."""
    steps: int = 600
    """AdamW steps (AR + NAR loss)."""
    batch_size: int = 16
    """Utterances per step."""
    lr: float = 2e-3
    """Peak learning rate."""
    seed: int = 0
    """Seed of the batches and the init."""
    tts: TTSConfig = field(default_factory=TTSConfig)
    """The models' shape and the default sampling."""
    threads: int = 0
    """Torch threads (0 = the default)."""

    def __post_init__(self):
        need(self.steps >= 1 and self.batch_size >= 1 and self.lr > 0, "steps, batch_size and lr must be > 0")


def run_train_tts(cfg: TTSTrainConfig) -> dict:
    """Train the VALL-E-style TTS (AR + NAR over codec tokens) on one voice of a speech world; save to --out."""
    if not cfg.data or not cfg.out or not cfg.codec:
        raise LmstackError("--data DIR, --codec DIR and --out DIR are required (`lmstack data synth-speech`, "
                           "`lmstack mm train-codec`)")
    if cfg.threads:
        set_threads(cfg.threads)
    codec = load_codec(cfg.codec)
    max_seconds = cfg.tts.max_frames / codec.config.frame_rate
    train = [{**r, "spoken": front_end(r["text"], cfg.tts)}
             for r in read_speech_split(cfg.data, "train", cfg.voice, cfg.prosody, max_seconds)]
    train = [r for r in train if len(r["spoken"]) <= cfg.tts.max_chars]
    if not train:
        raise LmstackError(f"no training utterance fits max_chars={cfg.tts.max_chars} (after the text front end)")
    tok = char_tokenizer([r["spoken"] for r in train])
    synth = SpeechSynthesizer.build(codec, tok, TTSConfig(**{**to_dict(cfg.tts), "voices": [cfg.voice or "any"]}),
                                    cfg.seed)
    codes = [codec.encode(r["samples"]) for r in train]
    start = time.perf_counter()
    log = train_tts_on(synth.lm, [tok.encode(r["spoken"]) for r in train], codes, cfg.steps, cfg.batch_size, cfg.lr,
                       cfg.seed, progress=True)
    synth.save(cfg.out)
    metrics = {"log": log, "utterances": len(train), "seconds": round(time.perf_counter() - start, 1),
               "config": to_dict(cfg)}
    atomic_write_text(Path(cfg.out) / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print(f"train-tts: {len(train)} utterances, final AR loss {log[-1]['ar']:.3f}, NAR {log[-1]['nar']:.3f}; "
          f"wrote {cfg.out}")
    return metrics


def speak(text: str, model: str | None = None, out: str = "speech.wav", voice: str | None = None, seed: int = 0,
          temperature: float | None = None) -> str:
    """Speak a text with a TTS model and write a 16 kHz WAV.

    Args:
        text: What to say (the model's characters, at most its max_chars).
        model: A TTS directory (`lmstack mm train-tts`).
        out: The WAV file to write.
        voice: One of the model's voices (default: its voice).
        seed: Sampling seed (the same seed gives the same audio).
        temperature: AR sampling temperature (default: the model's; 0 = greedy).
    """
    if model is None:
        raise LmstackError("--model TTS_DIR is required (a directory written by `lmstack mm train-tts`)")
    synth = SpeechSynthesizer.from_dir(model)
    samples, rate = synth.speak(text, voice=voice, seed=seed, temperature=temperature)
    atomic_write_bytes(out, write_wav(samples, rate))
    print(f"wrote {out} ({samples.size / rate:.2f} s)")
    return out


__all__ = ["CodecTrainConfig", "TTSTrainConfig", "run_train_codec", "run_train_tts", "speak", "train_codec_on",
           "train_tts_on", "codec_scores", "char_tokenizer", "read_speech_split", "mean_stderr"]
