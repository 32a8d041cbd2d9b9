"""TokenizerConfig: every switch of tokenizer training in one dataclass, with safe defaults.

Usage:
    cfg = TokenizerConfig(type="bpe", vocab_size=4096, split_digits=True, space_runs=16)   # hybrid code/math
    cfg = from_dict(TokenizerConfig, {"type": "unigram", "vocab_size": 2000, "sample_alpha": 0.1})
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmstack.config import ConfigError
from lmstack.runtime.validation import check_choice

# Which pre-tokenizers each model type accepts, the first being its default. WordPiece needs BERT's
# punctuation split and Unigram/char their own schemes; this also keeps special-token text from ever being
# one pre-token that the model could match as a whole.
ALLOWED_PRETOKENIZERS = {
    "bpe": ("gpt4", "gpt2", "metaspace"),
    "wordpiece": ("bert",),
    "unigram": ("metaspace",),
    "char": ("none",),
}


@dataclass
class TokenizerConfig:
    type: Literal["bpe", "wordpiece", "unigram", "char"] = "bpe"
    """Model: byte-level BPE, BERT WordPiece, SentencePiece-style Unigram LM, or characters (nanoGPT)."""
    vocab_size: int = 8192
    """Total vocabulary size, special tokens included (char: the alphabet decides; this is an upper bound)."""
    pretokenizer: Literal["default", "gpt4", "gpt2", "metaspace", "bert", "none"] = "default"
    """Pre-tokenization: gpt4/gpt2 regex + byte-level, metaspace (SentencePiece: whitespace kept as '▁',
    no whitespace assumption), bert (whitespace + punctuation), none. 'default' picks the type's own."""
    split_digits: bool = False
    """Hybrid code/math: every digit is its own piece (as LLaMA)."""
    space_runs: int = 0
    """Hybrid code/math: force single tokens for runs of 2..space_runs spaces (and tab runs up to a quarter
    of that), so indentation costs one token. 0 = off."""
    morphemes: Literal["none", "fi", "tr", "fi+tr"] = "none"
    """Morpheme-aware pre-tokenization: split common Finnish/Turkish suffixes off words (byte-level BPE only)."""
    special_tokens: Literal["default", "chat", "none"] = "default"
    """'chat': bos/eos/pad/mask + chat role and tool tokens; 'none': no specials; 'default': chat except for char."""
    min_frequency: int = 2
    """A pair (BPE/WordPiece) must occur this often to be merged."""
    lowercase: bool = False
    """WordPiece: lowercase and strip accents (BERT uncased)."""
    character_coverage: float = 1.0
    """metaspace BPE / Unigram: keep the most frequent characters covering this share of the corpus."""
    max_piece_length: int = 16
    """Unigram: longest piece considered, in characters."""
    seed_size: int = 100_000
    """Unigram: number of frequent substrings the EM starts from."""
    byte_fallback: bool = False
    """Unigram: add the 256 byte pieces <0x00>..<0xFF>, so characters never seen in training encode as their
    UTF-8 bytes instead of <|unk|> (SentencePiece's byte_fallback; metaspace BPE always has it)."""
    shrinking_factor: float = 0.75
    """Unigram: share of pieces kept by each pruning round."""
    em_iterations: int = 2
    """Unigram: EM sub-iterations between pruning rounds."""
    dropout: float = 0.0
    """BPE-dropout probability used by encode(train=True). 0 = off. Inference never drops merges."""
    sample_alpha: float | None = None
    """Unigram: sample segmentations with this smoothing in encode(train=True). None = off."""
    invalid_utf8: Literal["error", "skip"] = "error"
    """What to do with training files that are not valid UTF-8: stop with the byte offset, or skip bad lines."""
    num_workers: int = 1
    """Processes used to count words (the merge loop itself is sequential)."""
    seed: int = 0
    """Random seed for sampled encodings."""
    show_progress: bool = True
    """Show a progress bar during training."""

    def __post_init__(self):
        check_choice("type", self.type, ALLOWED_PRETOKENIZERS)
        allowed = ALLOWED_PRETOKENIZERS[self.type]
        if self.pretokenizer == "default":
            self.pretokenizer = allowed[0]
        if self.pretokenizer not in allowed:
            raise ConfigError(f"pretokenizer={self.pretokenizer!r} is not allowed for type={self.type!r}; "
                              f"choose one of {', '.join(allowed)}")
        if self.special_tokens == "default":
            self.special_tokens = "none" if self.type == "char" else "chat"
        checks = [
            ("vocab_size", self.vocab_size >= 1, "an integer >= 1"),
            ("min_frequency", self.min_frequency >= 1, "an integer >= 1"),
            ("space_runs", 0 <= self.space_runs <= 64, "an integer in [0, 64]"),
            ("character_coverage", 0.0 < self.character_coverage <= 1.0, "a number in (0, 1]"),
            ("max_piece_length", self.max_piece_length >= 1, "an integer >= 1"),
            ("seed_size", self.seed_size >= 1, "an integer >= 1"),
            ("shrinking_factor", 0.0 < self.shrinking_factor < 1.0, "a number in (0, 1)"),
            ("em_iterations", self.em_iterations >= 1, "an integer >= 1"),
            ("dropout", 0.0 <= self.dropout < 1.0, "a number in [0, 1)"),
            ("sample_alpha", self.sample_alpha is None or self.sample_alpha > 0, "None or a number > 0"),
            ("num_workers", self.num_workers >= 1, "an integer >= 1"),
        ]
        for name, ok, allowed_values in checks:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed; it must be {allowed_values}")
        if self.space_runs and self.pretokenizer not in ("gpt4", "gpt2"):
            raise ConfigError(f"space_runs={self.space_runs} needs a byte-level BPE (pretokenizer gpt4 or gpt2): "
                              "metaspace and bert split whitespace runs apart")
        if self.morphemes != "none" and self.pretokenizer not in ("gpt4", "gpt2"):
            raise ConfigError(f"morphemes={self.morphemes!r} needs a byte-level BPE (pretokenizer gpt4 or gpt2)")
        if self.dropout and self.type != "bpe":
            raise ConfigError(f"dropout={self.dropout} applies to type='bpe' only, not {self.type!r}")
        if self.byte_fallback and self.type != "unigram":
            raise ConfigError(f"byte_fallback applies to type='unigram' only, not {self.type!r}")
        if self.sample_alpha is not None and self.type != "unigram":
            raise ConfigError(f"sample_alpha applies to type='unigram' only, not {self.type!r}")
