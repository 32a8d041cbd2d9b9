"""Text-to-speech over neural codec tokens, VALL-E style (Wang et al. 2023; issue 25 §2 TTS, row XII.8).

The speech is the codec's (codec.py) integer codes, n_q codebooks per frame. Two models of the ONE `Transformer`:
- AR: a causal decoder-only LM over [transcript characters, <sep>, codes of codebook 1 ..., <eos>]. It learns
  when each sound comes and how long the utterance is (the <eos> ends it). Loss on the audio part only.
- NAR: a bidirectional Transformer (causal=False, head="none") fed by inputs_embeds: the transcript, then per
  frame the sum of the embeddings of codebooks 1..j-1, plus a stage embedding for j; it predicts codebook j for
  every frame at once (VALL-E's split: j = 2..n_q each one parallel pass).
Text is phoneme-free: the transcript's characters (an lmstack char Tokenizer), so the models learn the spelling-
to-sound mapping themselves. A text-normalisation front end (text_normalize.py, `TTSConfig.normalize`) first writes
numbers as the words the voice says ("4217" -> "four thousand two hundred and seventeen"), so the model need not
learn place value from its training pairs; it is on for new models and off for a saved config that predates the
field (those models were trained on digits). No acoustic prompt: `voices` is the single voice the model was
trained on.

Sampling of the AR codes uses lmstack's sampling helper (model.reference_decode.sample_next: temperature and
top-k) with the logits restricted to codes and <eos> (no <eos> before `min_frames`); `max_frames` guards the
length. The NAR stages are greedy.

`SpeechSynthesizer` is the served wrapper: speak(text, voice, seed) -> (float32 samples, 16000).
A model directory (save / from_dir) holds config.json (format lmstack-tts-1: the TTS and codec configs),
codec.safetensors, tts.safetensors and tokenizer.json; a directory missing any of them is refused by name.

Usage:
    from lmstack.multimodal.tts import SpeechSynthesizer
    synth = SpeechSynthesizer.random(tiny=True, seed=0)       # untrained, for tests and serving checks
    samples, rate = synth.speak("4217", voice=None, seed=0)   # float32 mono, 16000
    synth.save("runs/tts"); synth = SpeechSynthesizer.from_dir("runs/tts")
    synth.voices, synth.max_chars
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as save_bytes
from torch import nn

from lmstack.config import ConfigError, atomic_write_bytes, atomic_write_text, from_dict, to_dict
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.load_guard import load_safetensors, read_json
from lmstack.model.reference_decode import sample_next
from lmstack.multimodal.audio import SAMPLE_RATE
from lmstack.multimodal.codec import FORMAT as CODEC_FORMAT, Codec, CodecConfig, codec_from_parts
from lmstack.multimodal.text_normalize import normalize_text
from lmstack.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

FORMAT = "lmstack-tts-1"
FILES = ("config.json", "codec.safetensors", "tts.safetensors", "tokenizer.json")
IGNORE = -100
DEFAULT_ALPHABET = string.ascii_letters + string.digits + " .,'?!-"
"""Characters a fresh (random) synthesizer's tokenizer knows; a trained one knows its transcripts' characters."""


@dataclass
class TTSConfig:
    d_model: int = 128
    """Width of both Transformers."""
    n_layers: int = 4
    """Blocks of the AR model (codebook 1)."""
    nar_layers: int = 3
    """Blocks of the NAR model (codebooks 2..n_q)."""
    n_heads: int = 4
    """Attention heads of both."""
    dropout: float = 0.0
    """Dropout inside both Transformers while training (residual and attention; off in eval and generation)."""
    max_chars: int = 80
    """Longest transcript speak() accepts (characters)."""
    max_frames: int = 300
    """Most codec frames the AR model may generate (the length guard; 6 s at 50 frames/s)."""
    min_frames: int = 5
    """<eos> is not allowed before this many frames."""
    temperature: float = 1.0
    """Default sampling temperature of the AR codes (0 = greedy)."""
    top_k: int = 20
    """Default top-k of the AR sampling (0 = off)."""
    voices: list[str] = field(default_factory=lambda: ["en"])
    """The voice(s) the model was trained on (no acoustic prompt: one voice per model)."""
    normalize: bool = True
    """Text front end: numbers in digits -> English words (text_normalize.normalize_text) before tokenising, for
    training and speaking alike. A saved config without this field loads with it off (trained on raw text)."""

    def __post_init__(self):
        if self.d_model < 8 or self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} must be >= 8 and divisible by n_heads={self.n_heads}")
        if self.n_layers < 1 or self.nar_layers < 1:
            raise ConfigError("n_layers and nar_layers must be >= 1")
        if self.max_chars < 1 or self.max_frames < 1 or not 0 <= self.min_frames <= self.max_frames:
            raise ConfigError("max_chars and max_frames must be >= 1, and 0 <= min_frames <= max_frames")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.temperature < 0 or self.top_k < 0:
            raise ConfigError(f"temperature ({self.temperature}) and top_k ({self.top_k}) must be >= 0")
        if not self.voices:
            raise ConfigError("voices must name at least one voice")


def front_end(text: str, config: TTSConfig) -> str:
    """The text the model reads: stripped, and with numbers as words when `config.normalize` is on."""
    text = text.strip()
    return normalize_text(text) if config.normalize else text


class CodecLM(nn.Module):
    """VALL-E's pair: the AR model over codebook 1 and the NAR model over codebooks 2..n_q."""

    def __init__(self, cfg: TTSConfig, text_vocab: int, n_q: int, codebook_size: int):
        super().__init__()
        self.cfg, self.text_vocab, self.n_q, self.k = cfg, text_vocab, n_q, codebook_size
        # AR ids: [0, V) text, V = <sep>, V+1 .. V+K the codes of codebook 1, V+1+K = <eos>
        self.sep, self.code0, self.eos = text_vocab, text_vocab + 1, text_vocab + 1 + codebook_size
        seq = cfg.max_chars + cfg.max_frames + 2
        self.ar = Transformer(ModelConfig(vocab_size=self.eos + 1, d_model=cfg.d_model, n_layers=cfg.n_layers,
                                          n_heads=cfg.n_heads, max_seq_len=seq, dropout=cfg.dropout))
        self.nar = Transformer(ModelConfig(vocab_size=8, d_model=cfg.d_model, n_layers=cfg.nar_layers,
                                           n_heads=cfg.n_heads, max_seq_len=seq, causal=False, head="none",
                                           dropout=cfg.dropout))
        self.nar_text = nn.Embedding(text_vocab + 1, cfg.d_model)  # + <sep>
        self.nar_codes = nn.Embedding(n_q * codebook_size, cfg.d_model)  # codebook i's row c at i * K + c
        self.nar_stage = nn.Embedding(max(n_q, 1), cfg.d_model)
        self.nar_head = nn.Linear(cfg.d_model, max(n_q - 1, 1) * codebook_size)
        for emb in (self.nar_text, self.nar_codes, self.nar_stage):
            nn.init.normal_(emb.weight, std=0.02)

    # ---- training batches
    def ar_loss(self, texts: list[list[int]], codes: list[torch.Tensor]) -> torch.Tensor:
        """Next-token loss on [text, <sep>, codebook-1 codes, <eos>], counted on the audio part and <eos>."""
        rows = [list(t) + [self.sep] + (c[0].long() + self.code0).tolist() + [self.eos] for t, c in zip(texts, codes)]
        width = max(len(r) for r in rows) - 1
        inp = torch.full((len(rows), width), self.eos, dtype=torch.long)
        tgt = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for b, (r, t) in enumerate(zip(rows, texts)):
            inp[b, : len(r) - 1] = torch.tensor(r[:-1])
            tgt[b, len(t): len(r) - 1] = torch.tensor(r[len(t) + 1:])  # targets from the first code on
        logits = self.ar(inp)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE)

    def _nar_logits(self, texts: list[list[int]], codes: list[torch.Tensor], stages: torch.Tensor
                    ) -> tuple[torch.Tensor, list[int]]:
        """Logits (B, L, K) for codebook stages[b] (1-based 1..n_q-1, i.e. the 2nd..n_q-th) at every position."""
        d = self.cfg.d_model
        lens = [len(t) + 1 + c.shape[1] for t, c in zip(texts, codes)]
        x = torch.zeros(len(texts), max(lens), d)
        mask = torch.zeros(len(texts), max(lens), dtype=torch.long)
        for b, (t, c) in enumerate(zip(texts, codes)):
            n_text = len(t) + 1
            x[b, :n_text] = self.nar_text(torch.tensor(list(t) + [self.sep]))
            j = int(stages[b])
            offsets = (torch.arange(j) * self.k)[:, None]
            x[b, n_text: lens[b]] = self.nar_codes(c[:j].long() + offsets).sum(0)
            mask[b, : lens[b]] = 1
        x = x + self.nar_stage(stages)[:, None]
        h = self.nar(inputs_embeds=x, attention_mask=mask)
        logits = self.nar_head(h).reshape(h.shape[0], h.shape[1], -1, self.k)
        idx = (stages - 1).clamp_min(0)[:, None, None, None].expand(-1, h.shape[1], 1, self.k)
        return logits.gather(2, idx)[:, :, 0], lens

    def nar_loss(self, texts: list[list[int]], codes: list[torch.Tensor], generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """Cross-entropy of a random codebook j in 2..n_q per row, given the text and codebooks 1..j-1."""
        if self.n_q < 2:
            raise LmstackError("the NAR model predicts codebooks 2..n_q; this codec has one codebook")
        stages = torch.randint(1, self.n_q, (len(texts),), generator=generator)
        logits, _ = self._nar_logits(texts, codes, stages)
        tgt = torch.full(logits.shape[:2], IGNORE, dtype=torch.long)
        for b, (t, c) in enumerate(zip(texts, codes)):
            tgt[b, len(t) + 1: len(t) + 1 + c.shape[1]] = c[int(stages[b])].long()
        return F.cross_entropy(logits.reshape(-1, self.k), tgt.reshape(-1), ignore_index=IGNORE)

    # ---- generation
    @torch.no_grad()
    def generate(self, text: list[int], temperature: float, top_k: int, seed: int,
                 max_frames: int | None = None) -> torch.Tensor:
        """Codes (n_q, T) for the text ids: AR sampling of codebook 1 until <eos> or max_frames, then NAR stages."""
        cfg = self.cfg
        limit = min(max_frames or cfg.max_frames, cfg.max_frames)
        gen = torch.Generator().manual_seed(seed)
        prompt = torch.tensor([list(text) + [self.sep]])
        cache = self.ar.new_cache(1, max_len=prompt.shape[1] + limit + 1)
        allowed = torch.zeros(self.eos + 1, dtype=torch.bool)
        allowed[self.code0: self.eos] = True
        out: list[int] = []
        step = prompt
        while len(out) < limit:
            logits = self.ar(step, cache=cache, logits_to_keep=1)[:, -1].float()
            ok = allowed.clone()
            ok[self.eos] = len(out) >= cfg.min_frames
            nxt = int(sample_next(logits.masked_fill(~ok, float("-inf")), temperature, top_k, generator=gen)[0])
            if nxt == self.eos:
                break
            out.append(nxt - self.code0)
            step = torch.tensor([[nxt]])
        if not out:  # min_frames = 0 and an immediate <eos>: one frame keeps the decoder's input non-empty
            out.append(0)
        codes = torch.tensor(out)[None]
        for j in range(1, self.n_q):
            logits, _ = self._nar_logits([list(text)], [codes], torch.tensor([j]))
            nxt = logits[0, len(text) + 1:].argmax(-1)
            codes = torch.cat([codes, nxt[None]], 0)
        return codes


class SpeechSynthesizer:
    """Text -> speech: char tokenizer -> CodecLM (AR + NAR) -> codec decoder. See the module docstring."""

    sample_rate = SAMPLE_RATE

    def __init__(self, codec: Codec, lm: CodecLM, tokenizer: Tokenizer, config: TTSConfig):
        self.codec, self.lm, self.tokenizer, self.config = codec.eval(), lm.eval(), tokenizer, config
        self._known = set(tokenizer.get_vocab())

    @classmethod
    def build(cls, codec: Codec, tokenizer: Tokenizer, config: TTSConfig | None = None, seed: int = 0
              ) -> "SpeechSynthesizer":
        """A fresh (untrained) CodecLM over this codec's codes and this tokenizer's characters."""
        config = config or TTSConfig()
        torch.manual_seed(seed)
        lm = CodecLM(config, tokenizer.vocab_size, codec.config.n_q, codec.config.codebook_size)
        return cls(codec, lm, tokenizer, config)

    @classmethod
    def random(cls, tiny: bool = True, seed: int = 0) -> "SpeechSynthesizer":
        """An untrained synthesizer (random weights) that speaks noise: for tests and serving checks."""
        torch.manual_seed(seed)
        codec_cfg = CodecConfig(channels=4, latent_dim=8, n_q=2, codebook_size=16) if tiny else CodecConfig()
        cfg = TTSConfig(d_model=16, n_layers=1, nar_layers=1, n_heads=2, max_frames=40) if tiny else TTSConfig()
        tok = train_tokenizer(texts=[DEFAULT_ALPHABET], type="char", vocab_size=len(set(DEFAULT_ALPHABET)))
        return cls.build(Codec(codec_cfg), tok, cfg, seed)

    @property
    def voices(self) -> list[str]:
        return list(self.config.voices)

    @property
    def max_chars(self) -> int:
        return self.config.max_chars

    def text_ids(self, text: str) -> list[int]:
        """The transcript's ids (after the front end); empty, over-long or unknown-character text raises
        LmstackError naming it."""
        if not isinstance(text, str):
            raise LmstackError(f"the text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise LmstackError("the text to speak is empty")
        spoken = front_end(text, self.config)
        if len(spoken) > self.max_chars:
            words = " once its numbers are written as words" if spoken != text.strip() else ""
            raise LmstackError(f"the text is {len(spoken)} characters long{words}; this model speaks at most "
                               f"{self.max_chars}")
        text = spoken
        unknown = sorted({ch for ch in text if ch not in self._known})
        if unknown:
            raise LmstackError(f"the text has characters this model cannot speak: {''.join(unknown)!r} "
                               f"(it knows {''.join(sorted(self._known))!r})")
        return self.tokenizer.encode(text)

    def speak(self, text: str, voice: str | None = None, seed: int = 0, temperature: float | None = None,
              top_k: int | None = None) -> tuple[np.ndarray, int]:
        """Synthesize `text` -> (float32 mono samples in [-1, 1], 16000). The same seed gives the same audio."""
        ids = self.text_ids(text)
        if voice is not None and voice not in self.config.voices:
            raise LmstackError(f"unknown voice {voice!r}; this model speaks {', '.join(self.config.voices)}")
        temperature = self.config.temperature if temperature is None else float(temperature)
        top_k = self.config.top_k if top_k is None else int(top_k)
        if temperature < 0 or top_k < 0:
            raise LmstackError(f"temperature ({temperature}) and top_k ({top_k}) must be >= 0")
        codes = self.lm.generate(ids, temperature, top_k, seed)
        return self.codec.decode(codes), SAMPLE_RATE

    def save(self, path: str | Path) -> Path:
        """config.json (last), codec.safetensors, tts.safetensors and tokenizer.json into `path`, each atomic."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise LmstackError(f"cannot save a TTS model to {path}: it is a file, not a directory")
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(path)
        atomic_write_bytes(path / "codec.safetensors", save_bytes(self.codec.tensors()))
        lm = {k: v.detach().cpu().contiguous() for k, v in self.lm.state_dict().items()}
        atomic_write_bytes(path / "tts.safetensors", save_bytes(lm))
        meta = {"format": FORMAT, "tts": to_dict(self.config),
                "codec": {"format": CODEC_FORMAT, **to_dict(self.codec.config)}, "sample_rate": SAMPLE_RATE}
        atomic_write_text(path / "config.json", json.dumps(meta, indent=2))  # last: a half-written dir is no model
        return path

    @classmethod
    def from_dir(cls, path: str | Path) -> "SpeechSynthesizer":
        """Load a directory written by save(); one that is not a TTS model raises naming what is missing."""
        path = Path(path)
        if not path.is_dir():
            raise LmstackError(f"{path} is not a directory (a TTS model directory holds {', '.join(FILES)})")
        missing = [f for f in FILES if not (path / f).is_file()]
        if missing:
            raise LmstackError(f"{path} is not a TTS model: missing {', '.join(missing)}")
        meta = read_json(path, "config.json", "TTS config", want_object=True)
        if meta.get("format") != FORMAT or not isinstance(meta.get("tts"), dict) or \
                not isinstance(meta.get("codec"), dict):
            raise LmstackError(f"{path / 'config.json'} is not an lmstack TTS config (format {FORMAT} with "
                               "'tts' and 'codec' sections)")
        # a config saved before the normalisation front end existed: its model was trained on raw text
        cfg = from_dict(TTSConfig, {"normalize": False, **meta["tts"]})
        codec = codec_from_parts(meta["codec"], load_safetensors(path, "codec.safetensors", "codec weights"),
                                 str(path / "config.json"))
        tok = load_tokenizer(path)
        lm = CodecLM(cfg, tok.vocab_size, codec.config.n_q, codec.config.codebook_size)
        try:
            lm.load_state_dict(load_safetensors(path, "tts.safetensors", "TTS weights"))
        except RuntimeError as e:
            raise LmstackError(f"{path / 'tts.safetensors'} does not fit {path / 'config.json'}: {e}") from None
        return cls(codec, lm, tok, cfg)


__all__ = ["SpeechSynthesizer", "TTSConfig", "CodecLM", "DEFAULT_ALPHABET", "FORMAT", "front_end"]
