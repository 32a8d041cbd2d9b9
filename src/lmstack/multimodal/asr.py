"""Speech recognition with the Whisper-style model (whisper.py): the tokenizer with Whisper's task tokens,
greedy and beam decoding, and `SpeechRecognizer`, the one object others load, save and call.

Tokenizer: CHARACTERS, not BPE. An lmstack char Tokenizer over printable ASCII (95 symbols, fixed, so a model
made before any data, e.g. `SpeechRecognizer.random`, has the same vocabulary as a trained one) plus Whisper's
task tokens as specials: <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|> <|endoftext|>. Every
transcript is decoded after the prompt `<|startoftranscript|><|en|><|transcribe|><|notimestamps|>` and ends
with `<|endoftext|>`. Timestamp TOKENS are not modelled (the world's utterances are one short sentence each);
word timestamps come after decoding from the cross-attention (`transcribe_words`, asr_timing.py), with the
alignment heads stored in config.json ("alignment_heads"; absent = every head of the last half of the decoder;
"alignment_median_width", absent = 7, Whisper's).

Decoding: greedy (a batch at once) or beam search over one utterance. The beam loop is a small
encoder-decoder one written here; the engine's paged beam search (lmstack.infer.beam_search) serves
decoder-only LMs. It follows that engine's ranking convention: a finished hypothesis scores
cumulative_logprob / length ** length_penalty, length counting the generated tokens with <|endoftext|>.
Special tokens other than <|endoftext|> are never generated (Whisper suppresses them too).

Decoding guard (`DecodeGuard`, saved in config.json; off unless set): a decoder that has lost the audio (noise)
loops and invents text up to n_text_ctx. As Whisper does, two checks: (1) a cap on generated tokens
proportional to the audio's duration, `ceil(seconds * tokens_per_second) + extra_tokens`, the rate being the
99.9th percentile of the TRAINING transcripts' characters per second times a margin (`guard_from_transcripts`),
so a transcript the training data could hold is never cut; (2) Whisper's compression-ratio check: a transcript
whose zlib ratio (bytes / compressed bytes) is over `max_compression_ratio` (2.4) is treated as a loop and
decoded again with beam search (`fallback_beam`), kept only if its ratio is lower -- Whisper's fallback
re-decodes too (at a higher temperature); a deterministic beam keeps results reproducible. Greedy outputs
within the cap and under the ratio are unchanged (each row of a batch is decoded independently).

What is refused, each with an LmstackError naming the problem: a sample rate other than 16 kHz, audio that
is not 1-D mono float, empty, non-finite or over `max_seconds` audio, a directory that is not an ASR model.

Usage:
    from lmstack.multimodal.asr import SpeechRecognizer
    from lmstack.multimodal.whisper import WhisperConfig
    asr = SpeechRecognizer.random(WhisperConfig(d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=1))
    asr.save("runs/asr_tiny")                            # config.json + model.safetensors + tokenizer.json
    asr = SpeechRecognizer.from_dir("runs/bench/asr_whisper")
    text = asr.transcribe(samples)                       # float32 mono 16 kHz -> str
    asr.guard = guard_from_transcripts(texts, seconds)   # cap tokens by duration + compression-ratio fallback
    text = asr.transcribe(samples, beam=4)
    texts = asr.transcribe_batch([a, b, c])
    text, words = asr.transcribe_words(samples)          # + [(word, start_s, end_s)] (asr_timing: attention + DTW)
"""
from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from lmstack.config import ConfigError, atomic_write_bytes, atomic_write_text, from_dict, to_dict
from lmstack.errors import LmstackError
from lmstack.model.load_guard import check_model_dir, load_safetensors, load_state_checked, read_json
from lmstack.multimodal.asr_timing import (MEDIAN_WIDTH, alignment_matrix, check_heads, check_median_width,
                                            default_heads, word_times)
from lmstack.multimodal.audio import HOP, N_FFT, SAMPLE_RATE, log_mel
from lmstack.multimodal.whisper import Whisper, WhisperConfig
from lmstack.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from lmstack.tokenizer.vocab_ops import add_tokens

MODEL_TYPE = "lmstack_asr"
SOT, LANG, TRANSCRIBE, NO_TIMESTAMPS, EOT = ("<|startoftranscript|>", "<|en|>", "<|transcribe|>",
                                             "<|notimestamps|>", "<|endoftext|>")
TASK_TOKENS = (SOT, LANG, TRANSCRIBE, NO_TIMESTAMPS, EOT)
CHARSET = "".join(chr(c) for c in range(32, 127))
"""The characters a transcript may hold: printable ASCII. Others are dropped by `clean_text`."""


def asr_tokenizer() -> Tokenizer:
    """The char tokenizer (printable ASCII) with Whisper's task tokens as specials: 100 ids."""
    tok = train_tokenizer(type="char", vocab_size=len(CHARSET), texts=[CHARSET], show_progress=False)
    return add_tokens(tok, list(TASK_TOKENS), special=True)


def clean_text(text: str) -> str:
    """A transcript the tokenizer can spell: characters outside printable ASCII dropped, spaces collapsed."""
    return " ".join("".join(c for c in text if c in CHARSET).split())


class TaskIds:
    """The ids of the prompt, of <|endoftext|>, and of the specials never generated, for one tokenizer."""

    def __init__(self, tok: Tokenizer):
        ids = {t: tok.token_to_id(t) for t in TASK_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise LmstackError(f"the tokenizer has no {', '.join(missing)}: not an ASR tokenizer (asr_tokenizer())")
        self.prompt = [ids[SOT], ids[LANG], ids[TRANSCRIBE], ids[NO_TIMESTAMPS]]
        self.eot = ids[EOT]
        self.suppress = sorted(i for t, i in ids.items() if t != EOT)

    def target(self, tok: Tokenizer, text: str) -> list[int]:
        """Prompt + transcript + <|endoftext|>: what the decoder reads (all but the last) and predicts."""
        return self.prompt + tok.encode(clean_text(text)) + [self.eot]


@dataclass
class DecodeGuard:
    tokens_per_second: float = 0.0
    """Cap on generated tokens per second of audio (0 = no duration cap: only n_text_ctx bounds a transcript)."""
    extra_tokens: int = 4
    """Tokens allowed on top of the duration cap (a very short clip still gets a few)."""
    max_compression_ratio: float = 0.0
    """A transcript with a zlib compression ratio over this is re-decoded (0 = off; Whisper's is 2.4)."""
    fallback_beam: int = 4
    """Beam width of that re-decoding."""

    def __post_init__(self):
        for name in ("tokens_per_second", "extra_tokens", "max_compression_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"DecodeGuard.{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.fallback_beam, bool) or not isinstance(self.fallback_beam, int) or self.fallback_beam < 1:
            raise ConfigError(f"DecodeGuard.fallback_beam must be a positive integer, got {self.fallback_beam!r}")

    def cap(self, n_samples: int, ceiling: int) -> int:
        """Most tokens a clip of n_samples may generate (never above ceiling, the model's own limit)."""
        if not self.tokens_per_second:
            return ceiling
        return min(ceiling, math.ceil(n_samples / SAMPLE_RATE * self.tokens_per_second) + int(self.extra_tokens))


def compression_ratio(text: str) -> float:
    """Whisper's loop detector: UTF-8 bytes over zlib-compressed bytes (repetitive text compresses well)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def guard_from_transcripts(texts: list[str], seconds: list[float], quantile: float = 0.999, margin: float = 1.5,
                           max_compression_ratio: float = 2.4) -> DecodeGuard:
    """A DecodeGuard whose rate is the `quantile` of the transcripts' characters per second times `margin`
    (one character = one token of the char tokenizer). Pass TRAINING transcripts, never test ones."""
    if not texts or len(texts) != len(seconds):
        raise LmstackError(f"guard_from_transcripts needs one duration per transcript, got {len(texts)} texts "
                           f"and {len(seconds)} durations")
    if any(not s > 0 for s in seconds):
        raise LmstackError("every duration must be positive seconds")
    rates = np.array([len(clean_text(t)) / s for t, s in zip(texts, seconds)])
    return DecodeGuard(tokens_per_second=round(float(np.quantile(rates, quantile)) * margin, 3),
                       max_compression_ratio=max_compression_ratio)


def check_audio(samples, sample_rate: int, max_seconds: float) -> np.ndarray:
    """float32 mono samples, or an LmstackError naming what is wrong with them."""
    if sample_rate != SAMPLE_RATE:
        raise LmstackError(f"the audio is {sample_rate} Hz; the recogniser takes {SAMPLE_RATE} Hz "
                           "(lmstack.multimodal.audio.resample it first)")
    x = np.asarray(samples)
    if x.ndim != 1:
        raise LmstackError(f"the audio must be 1-D mono samples, got shape {x.shape}")
    if x.size == 0:
        raise LmstackError("the audio is empty (0 samples)")
    if not np.issubdtype(x.dtype, np.floating):
        raise LmstackError(f"the audio must be float samples in [-1, 1], got dtype {x.dtype}")
    if x.size < N_FFT // 2 + 1:
        raise LmstackError(f"the audio is {x.size} samples long; at least {N_FFT // 2 + 1} are needed")
    if x.size / SAMPLE_RATE > max_seconds:
        raise LmstackError(f"the audio is {x.size / SAMPLE_RATE:.2f} s long, over this model's limit of "
                           f"{max_seconds:g} s")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise LmstackError("the audio holds NaN or infinite samples")
    return x


def batch_features(clips: list[np.ndarray], n_mels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mels of each clip, zero-padded to the longest: (B, n_mels, frames) and the real frames (B,)."""
    mels = [log_mel(c, n_mels=n_mels) for c in clips]
    frames = torch.tensor([m.shape[1] for m in mels])
    out = torch.zeros(len(mels), n_mels, int(frames.max()))
    for i, m in enumerate(mels):
        out[i, :, : m.shape[1]] = m
    return out, frames


@torch.no_grad()
def greedy_decode(model: Whisper, mel: torch.Tensor, frames: torch.Tensor | None, ids: TaskIds,
                  max_tokens: int, caps: list[int] | None = None) -> list[list[int]]:
    """Greedy transcripts (token ids, no prompt or <|endoftext|>) of a batch, with the KV cache; row i stops
    after caps[i] tokens when caps is given."""
    enc, mask = model.encode(mel, frames)
    if caps is not None:
        max_tokens = min(max_tokens, max(caps))
    b = enc.shape[0]
    state = model.new_state(enc, mask, len(ids.prompt) + max_tokens)
    tokens = torch.tensor([ids.prompt] * b, device=enc.device)
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    for _ in range(max_tokens):
        logits = model.step(tokens, state)[:, -1]
        logits[:, ids.suppress] = float("-inf")
        nxt = logits.argmax(-1).cpu()
        for i in range(b):
            if not done[i]:
                if int(nxt[i]) == ids.eot:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
                    if caps is not None and len(out[i]) >= caps[i]:
                        done[i] = True
        if bool(done.all()):
            break
        tokens = nxt[:, None].to(enc.device)
    return out


@torch.no_grad()
def beam_decode(model: Whisper, mel: torch.Tensor, ids: TaskIds, beam: int, max_tokens: int,
                length_penalty: float = 1.0) -> list[int]:
    """Beam search over one utterance (mel (1, n_mels, frames)): the best finished hypothesis's ids."""
    enc, mask = model.encode(mel)
    state = model.new_state(enc, mask, len(ids.prompt) + max_tokens)
    logits = model.step(torch.tensor([ids.prompt], device=enc.device), state)[:, -1]
    alive: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []
    rows: list[tuple[float, list[int], int]] = []
    for t in range(max_tokens):
        logp = torch.log_softmax(logits.float(), -1)
        logp[:, ids.suppress] = float("-inf")
        scores = torch.tensor([s for s, _ in alive], device=logp.device)[:, None] + logp
        top_v, top_i = scores.flatten().topk(min(2 * beam, scores.numel()))
        rows, nxt = [], []
        for v, flat in zip(top_v.tolist(), top_i.tolist()):
            row, token = divmod(flat, logp.shape[1])
            seq = alive[row][1] + [token]
            if token == ids.eot:
                finished.append((v / len(seq) ** length_penalty, alive[row][1]))
            elif len(rows) < beam:
                rows.append((v, seq, row))
            if len(rows) == beam:
                break
        best_alive = max((v / (len(s) + 1) ** length_penalty for v, s, _ in rows), default=float("-inf"))
        # stop once `beam` hypotheses have finished and none alive can still beat the best of them
        if not rows or (len(finished) >= beam and max(f for f, _ in finished) >= best_alive) or t == max_tokens - 1:
            break
        state.reorder(torch.tensor([r for _, _, r in rows], device=enc.device))
        alive = [(v, s) for v, s, _ in rows]
        logits = model.step(torch.tensor([[s[-1]] for _, s in alive], device=enc.device), state)[:, -1]
    if not finished:  # ran out of tokens: the best open hypothesis
        finished = [(v / max(1, len(s)) ** length_penalty, s) for v, s, _ in rows] or [(0.0, [])]
    return max(finished, key=lambda f: f[0])[1]


class SpeechRecognizer:
    """A Whisper-style model plus its tokenizer: 16 kHz float32 mono samples in, text out."""

    sample_rate = SAMPLE_RATE

    def __init__(self, model: Whisper, tokenizer: Tokenizer, guard: DecodeGuard | None = None,
                 alignment_heads: list | None = None, median_width: int = MEDIAN_WIDTH):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.guard = guard or DecodeGuard()
        self.alignment_heads = alignment_heads
        self.median_width = check_median_width(median_width)
        self.ids = TaskIds(tokenizer)
        if model.config.n_text_ctx <= len(self.ids.prompt):
            raise LmstackError(f"n_text_ctx={model.config.n_text_ctx} leaves no room for a transcript after the "
                               f"{len(self.ids.prompt)}-token prompt")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise LmstackError(f"the tokenizer has {tokenizer.vocab_size} ids, the model only "
                               f"{model.config.vocab_size}")

    @property
    def config(self) -> WhisperConfig:
        return self.model.config

    @property
    def alignment_heads(self) -> list[tuple[int, int]]:
        """The (layer, head) cross-attention heads word timestamps average (asr_timing); when none were set,
        every head of the last half of the decoder blocks."""
        return self._heads or default_heads(self.config.n_decoder_layers, self.config.n_heads)

    @alignment_heads.setter
    def alignment_heads(self, heads) -> None:
        self._heads = None if heads is None else check_heads(heads, self.config.n_decoder_layers,
                                                             self.config.n_heads)

    @property
    def max_seconds(self) -> float:
        """Longest audio the encoder takes: 2 * n_audio_ctx mel frames of 10 ms."""
        return self.config.max_frames * HOP / SAMPLE_RATE

    @property
    def max_tokens(self) -> int:
        return self.config.n_text_ctx - len(self.ids.prompt)

    @classmethod
    def random(cls, config: WhisperConfig | None = None, seed: int = 0) -> "SpeechRecognizer":
        """An untrained recogniser (random weights from `seed`), e.g. for serving tests."""
        tok = asr_tokenizer()
        config = config or WhisperConfig()
        if config.vocab_size < tok.vocab_size:
            raise LmstackError(f"vocab_size={config.vocab_size} is below the ASR tokenizer's {tok.vocab_size} ids")
        torch.manual_seed(seed)
        return cls(Whisper(config), tok)

    def transcribe(self, samples: np.ndarray, beam: int = 1, sample_rate: int = SAMPLE_RATE,
                   length_penalty: float = 1.0, guard: bool = True) -> str:
        """The transcript of one recording (greedy for beam=1, beam search otherwise); guard=False ignores
        self.guard (no duration cap, no compression-ratio fallback)."""
        if not isinstance(beam, int) or beam < 1:
            raise LmstackError(f"beam must be a positive integer, got {beam!r}")
        if beam == 1:
            return self.transcribe_batch([samples], sample_rate=sample_rate, guard=guard)[0]
        x = check_audio(samples, sample_rate, self.max_seconds)
        return self._beam(x, beam, length_penalty, self.guard.cap(x.size, self.max_tokens) if guard else None)

    def _beam(self, x: np.ndarray, beam: int, length_penalty: float, cap: int | None) -> str:
        mel, _ = batch_features([x], self.config.n_mels)
        device = next(self.model.parameters()).device
        ids = beam_decode(self.model, mel.to(device), self.ids, beam, cap or self.max_tokens, length_penalty)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def transcribe_batch(self, clips: list[np.ndarray], sample_rate: int = SAMPLE_RATE,
                         guard: bool = True) -> list[str]:
        """Greedy transcripts of several recordings, decoded as one padded batch (self.guard applied unless
        guard=False)."""
        if not isinstance(clips, (list, tuple)) or not clips:
            raise LmstackError("transcribe_batch takes a non-empty list of sample arrays")
        xs = [check_audio(c, sample_rate, self.max_seconds) for c in clips]
        mel, frames = batch_features(xs, self.config.n_mels)
        device = next(self.model.parameters()).device
        caps = [self.guard.cap(x.size, self.max_tokens) for x in xs] if guard else None
        out = greedy_decode(self.model, mel.to(device), frames, self.ids, self.max_tokens, caps)
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out]
        limit = self.guard.max_compression_ratio
        if guard and limit:
            for i, text in enumerate(texts):
                if compression_ratio(text) > limit:  # a loop: re-decode with beam search, keep the less repetitive
                    retry = self._beam(xs[i], self.guard.fallback_beam, 1.0, caps[i])
                    if compression_ratio(retry) < compression_ratio(text):
                        texts[i] = retry
        return texts

    # ---- word timestamps
    @torch.no_grad()
    def cross_attention(self, samples: np.ndarray, text: str) -> tuple[list[np.ndarray], int]:
        """The teacher-forced cross-attention of `text` over the audio: per decoder block (heads, len(text) + 1,
        encoder positions), row r the query predicting character r (the last row <|endoftext|>), and the number
        of encoder positions the real audio covers."""
        x = check_audio(samples, SAMPLE_RATE, self.max_seconds)
        ids = self.tokenizer.encode(text)
        if len(ids) != len(text):
            raise LmstackError(f"word timestamps need one token per character; {text[:40]!r} gave {len(ids)} "
                               f"tokens for {len(text)} characters")
        mel, frames = batch_features([x], self.config.n_mels)
        device = next(self.model.parameters()).device
        enc, mask = self.model.encode(mel.to(device))
        tokens = torch.tensor([self.ids.prompt + ids], device=device)
        _, weights = self.model.decode_with_cross_weights(tokens, enc, mask)
        first = len(self.ids.prompt) - 1
        return [w[0, :, first:].float().cpu().numpy() for w in weights], (int(frames[0]) + 1) // 2

    def word_timestamps(self, samples: np.ndarray, text: str) -> list[tuple[str, float, float]]:
        """[(word, start_s, end_s)] of a transcript of `samples` (words split on spaces), by cross-attention
        and DTW over self.alignment_heads (median filter self.median_width); [] for an empty transcript."""
        if not text.split():
            return []
        weights, frames = self.cross_attention(samples, text)
        return word_times(text, alignment_matrix(weights, self.alignment_heads, frames,
                                                 median_width=self.median_width))

    def transcribe_words(self, samples: np.ndarray, beam: int = 1, sample_rate: int = SAMPLE_RATE,
                         guard: bool = True) -> tuple[str, list[tuple[str, float, float]]]:
        """`transcribe` plus word timestamps: (text, [(word, start_s, end_s)]) -- Whisper's word_timestamps."""
        x = check_audio(samples, sample_rate, self.max_seconds)
        text = self.transcribe(x, beam=beam, guard=guard)
        return text, self.word_timestamps(x, text)

    # ---- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write config.json (model_type lmstack_asr), model.safetensors and tokenizer.json, each atomically,
        config.json last. A directory holding another kind of model is refused, not overwritten."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise LmstackError(f"cannot save an ASR model to {path}: it is a file, not a directory")
        if (path / "config.json").is_file():
            old = read_json(path, "config.json", "ASR config", want_object=True)
            if old.get("model_type") != MODEL_TYPE:
                raise LmstackError(f"{path} holds another model (model_type={old.get('model_type')!r}); "
                                   "save the ASR model to an empty directory")
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        atomic_write_bytes(path / "model.safetensors", safetensors_bytes(tensors, metadata={"format": "pt"}))
        self.tokenizer.save(path)
        config = {"model_type": MODEL_TYPE, "asr": to_dict(self.config), "sample_rate": SAMPLE_RATE,
                  "prompt": [SOT, LANG, TRANSCRIBE, NO_TIMESTAMPS], "tokenizer": "char (printable ASCII)",
                  "guard": to_dict(self.guard)}
        if self._heads is not None:
            config["alignment_heads"] = [list(pair) for pair in self._heads]
        if self.median_width != MEDIAN_WIDTH:
            config["alignment_median_width"] = self.median_width
        atomic_write_text(path / "config.json", json.dumps(config, indent=2) + "\n")
        return path

    @classmethod
    def from_dir(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "SpeechRecognizer":
        """Load what `save` wrote; anything else is refused, naming what is missing."""
        path = check_model_dir(path, "an ASR model")
        data = read_json(path, "config.json", "ASR config", want_object=True)
        if data.get("model_type") != MODEL_TYPE or not isinstance(data.get("asr"), dict):
            raise LmstackError(f"{path}/config.json is not an ASR config: model_type={data.get('model_type')!r} "
                               f"(want {MODEL_TYPE!r}) with an 'asr' section")
        model = Whisper(from_dict(WhisperConfig, data["asr"]))
        tensors = load_safetensors(path, "model.safetensors", "ASR weights")
        load_state_checked(model, tensors, f"{path}/model.safetensors")
        guard = data.get("guard", {})  # models saved before the guard existed have none: no guard
        if not isinstance(guard, dict):
            raise LmstackError(f"{path}/config.json: 'guard' must be an object, got {type(guard).__name__}")
        heads = data.get("alignment_heads")  # models saved before word timestamps have none: default_heads
        width = data.get("alignment_median_width", MEDIAN_WIDTH)
        try:
            if heads is not None:
                check_heads(heads, model.config.n_decoder_layers, model.config.n_heads)
            check_median_width(width)
        except LmstackError as e:
            raise LmstackError(f"{path}/config.json: {e}") from None
        return cls(model.to(device), load_tokenizer(path), from_dict(DecodeGuard, guard), heads, width)

__all__ = ["SpeechRecognizer", "DecodeGuard", "compression_ratio", "guard_from_transcripts", "asr_tokenizer",
           "clean_text", "TaskIds", "check_audio", "batch_features",
           "greedy_decode", "beam_decode", "TASK_TOKENS", "MODEL_TYPE", "CHARSET"]
