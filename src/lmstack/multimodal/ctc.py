"""The CTC baseline (Graves et al. 2006): Whisper's front-end and encoder with a per-frame character classifier.

Same conv front-end, sinusoidal positions and encoder (the one lmstack Transformer) as whisper.py; instead of a
decoder, a Linear layer maps each encoder position to characters + blank (id 0; the characters are asr.CHARSET,
ids 1..95). Trained with torch.nn.functional.ctc_loss. To compare at equal size, give it more encoder layers
than the Whisper-style model has (a decoder block holds about 16 d^2 parameters, an encoder block 12 d^2): the
benchmark picks the depth that puts both parameter counts within 10% and reports both.

Decoding:
- greedy: argmax per frame, collapse repeats, drop blanks;
- prefix beam search (Hannun et al. 2014, without a language model): each prefix keeps the probability of
  ending in a blank and in a non-blank, so "aa" (a, blank, a) and "a" (a, a) stay apart; at each frame only
  the `prune` most likely characters extend a prefix.

Usage:
    from lmstack.multimodal.ctc import CTCConfig, CTCModel, CTCRecognizer
    model = CTCModel(CTCConfig(d_model=64, n_heads=2, n_encoder_layers=3))
    logp, lengths = model.log_probs(mel, frames)           # (B, S, 96) log-softmax, (B,) valid positions
    loss = model.loss(mel, frames, texts)
    asr = CTCRecognizer(model)
    asr.transcribe(samples, beam=8)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import LmstackError
from lmstack.model import Transformer
from lmstack.multimodal.asr import CHARSET, batch_features, check_audio, clean_text
from lmstack.multimodal.audio import HOP, SAMPLE_RATE
from lmstack.multimodal.whisper import Whisper, WhisperConfig, sinusoids
from lmstack.runtime.validation import check_range

BLANK = 0


@dataclass
class CTCConfig:
    n_mels: int = 80
    """Mel bands of the input features."""
    n_audio_ctx: int = 300
    """Encoder positions (mel frames / 2)."""
    d_model: int = 128
    """Encoder width."""
    n_heads: int = 4
    """Attention heads."""
    n_encoder_layers: int = 6
    """Encoder blocks (more than a Whisper-style model of the same size, which spends parameters on a decoder)."""
    d_ff: int = 0
    """MLP hidden width; 0 means 4 * d_model."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""

    def __post_init__(self):
        check_range("n_encoder_layers", self.n_encoder_layers, low=1)
        self.d_ff = self.whisper_config().d_ff  # validates the shared fields too

    def whisper_config(self) -> WhisperConfig:
        """The Whisper config whose front-end and encoder this model shares (decoder fields unused)."""
        return WhisperConfig(n_mels=self.n_mels, n_audio_ctx=self.n_audio_ctx, d_model=self.d_model,
                             n_heads=self.n_heads, n_encoder_layers=self.n_encoder_layers, d_ff=self.d_ff,
                             layer_norm_eps=self.layer_norm_eps)

    @property
    def max_frames(self) -> int:
        return 2 * self.n_audio_ctx

    @property
    def vocab_size(self) -> int:
        return len(CHARSET) + 1


class CTCModel(nn.Module):
    # the front-end and encoder are Whisper's, method for method (they read only the attributes set below)
    front_end = Whisper.front_end
    encode = Whisper.encode

    def __init__(self, config: CTCConfig):
        super().__init__()
        cfg = self.config = config
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, padding=1)
        self.register_buffer("audio_pos", sinusoids(cfg.n_audio_ctx, cfg.d_model), persistent=False)
        self.encoder = Transformer(cfg.whisper_config().encoder_config())
        self.out = nn.Linear(cfg.d_model, cfg.vocab_size)

    @cached_property
    def char_ids(self) -> dict[str, int]:
        return {c: i + 1 for i, c in enumerate(CHARSET)}

    def log_probs(self, mel: torch.Tensor, frames: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position log-probabilities (B, S, chars + blank) and each row's valid positions (B,)."""
        enc, _ = self.encode(mel, frames)
        s = enc.shape[1]
        lengths = torch.full((enc.shape[0],), s) if frames is None else ((frames + 1) // 2).clamp(max=s)
        return F.log_softmax(self.out(enc).float(), dim=-1), lengths

    def targets(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated character ids of the cleaned transcripts and their lengths (ctc_loss's 1-D form)."""
        ids = [[self.char_ids[c] for c in clean_text(t)] for t in texts]
        if any(not row for row in ids):
            raise LmstackError("a CTC target transcript is empty after cleaning; every utterance needs text")
        return torch.tensor([i for row in ids for i in row]), torch.tensor([len(row) for row in ids])

    def loss(self, mel: torch.Tensor, frames: torch.Tensor | None, texts: list[str]) -> torch.Tensor:
        """Mean CTC loss per target character (ctc_loss's reduction='mean'); impossible alignments give 0."""
        logp, lengths = self.log_probs(mel, frames)
        tgt, tgt_len = self.targets(texts)
        return F.ctc_loss(logp.transpose(0, 1), tgt, lengths, tgt_len, blank=BLANK, zero_infinity=True)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters()) - self.encoder.tok_emb.weight.numel()


def greedy_ctc(logp: np.ndarray) -> list[int]:
    """Best path: argmax per frame, repeats collapsed, blanks dropped. logp: (T, V) for one utterance."""
    best = np.asarray(logp).argmax(-1)
    out, prev = [], BLANK
    for k in best.tolist():
        if k != prev and k != BLANK:
            out.append(k)
        prev = k
    return out


def _logadd(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


def prefix_beam_ctc(logp: np.ndarray, beam: int = 8, prune: int = 8) -> list[int]:
    """CTC prefix beam search (no LM): the most probable labelling summed over its alignments, approximately."""
    if beam < 1 or prune < 1:
        raise LmstackError(f"beam and prune must be >= 1, got {beam}, {prune}")
    logp = np.asarray(logp, dtype=np.float64)
    ninf = -math.inf
    beams: dict[tuple, tuple[float, float]] = {(): (0.0, ninf)}  # prefix -> (log p ending blank, ending non-blank)
    for frame in logp:
        top = np.argsort(frame)[::-1][:prune]
        nxt: dict[tuple, list[float]] = {}

        def add(prefix, pb=ninf, pnb=ninf):
            cur = nxt.setdefault(prefix, [ninf, ninf])
            cur[0], cur[1] = _logadd(cur[0], pb), _logadd(cur[1], pnb)

        for prefix, (pb, pnb) in beams.items():
            total = _logadd(pb, pnb)
            for k in top.tolist():
                p = float(frame[k])
                if k == BLANK:
                    add(prefix, pb=total + p)
                elif prefix and prefix[-1] == k:
                    add(prefix, pnb=pnb + p)              # a repeat without a blank between collapses
                    add(prefix + (k,), pnb=pb + p)         # after a blank it is a new character
                else:
                    add(prefix + (k,), pnb=total + p)
        ranked = sorted(nxt.items(), key=lambda kv: _logadd(*kv[1]), reverse=True)[:beam]
        beams = {prefix: (v[0], v[1]) for prefix, v in ranked}
    return list(max(beams.items(), key=lambda kv: _logadd(*kv[1]))[0])


class CTCRecognizer:
    """The CTC baseline behind the same call as SpeechRecognizer: samples in, text out."""

    sample_rate = SAMPLE_RATE

    def __init__(self, model: CTCModel):
        self.model = model.eval()

    @property
    def max_seconds(self) -> float:
        return self.model.config.max_frames * HOP / SAMPLE_RATE

    def decode_ids(self, ids: list[int]) -> str:
        return "".join(CHARSET[i - 1] for i in ids).strip()

    def transcribe(self, samples: np.ndarray, beam: int = 1, sample_rate: int = SAMPLE_RATE) -> str:
        return self.transcribe_batch([samples], beam=beam, sample_rate=sample_rate)[0]

    @torch.no_grad()
    def transcribe_batch(self, clips: list[np.ndarray], beam: int = 1, sample_rate: int = SAMPLE_RATE) -> list[str]:
        """Greedy (beam=1) or prefix-beam transcripts of several recordings, one padded forward."""
        if not isinstance(beam, int) or beam < 1:
            raise LmstackError(f"beam must be a positive integer, got {beam!r}")
        if not isinstance(clips, (list, tuple)) or not clips:
            raise LmstackError("transcribe_batch takes a non-empty list of sample arrays")
        xs = [check_audio(c, sample_rate, self.max_seconds) for c in clips]
        mel, frames = batch_features(xs, self.model.config.n_mels)
        device = next(self.model.parameters()).device
        logp, lengths = self.model.log_probs(mel.to(device), frames)
        logp = logp.cpu().numpy()
        out = []
        for row, n in zip(logp, lengths.tolist()):
            ids = greedy_ctc(row[:n]) if beam == 1 else prefix_beam_ctc(row[:n], beam=beam)
            out.append(self.decode_ids(ids))
        return out


__all__ = ["CTCConfig", "CTCModel", "CTCRecognizer", "greedy_ctc", "prefix_beam_ctc", "BLANK"]
