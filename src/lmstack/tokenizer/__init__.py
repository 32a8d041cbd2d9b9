"""lmstack.tokenizer: BPE (byte-level), WordPiece, Unigram and char tokenizers in HF tokenizer.json form.

Usage:
    from lmstack.tokenizer import load_tokenizer, train_tokenizer, Tokenizer, TokenizerConfig
    tok = train_tokenizer(["input.txt"], type="bpe", vocab_size=4096)
    ids = tok.encode("Hello world")              # Python reference encoder, deterministic
    batch = tok.encode_batch(["a", "b"])         # same ids through the `tokenizers` runtime
    ids, mask = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok.save("tok/")
    tok = load_tokenizer("tok/")                 # ours or HF's tokenizer.json (BPE / WordPiece / Unigram)
"""
from lmstack.tokenizer.config import TokenizerConfig
from lmstack.tokenizer.core import Tokenizer, load_tokenizer
from lmstack.tokenizer.train import train_tokenizer

__all__ = ["Tokenizer", "TokenizerConfig", "load_tokenizer", "train_tokenizer"]
