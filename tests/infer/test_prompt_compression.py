"""Prompt compression drops the predictable tokens first; canonical reformatting unifies equivalent text."""
import pytest
import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.infer.prompt_compression import canonicalize, compress_ids, compress_text, self_information


class CountingLM(nn.Module):
    """A fake LM that is sure the next token is the current one + 1 (so runs like 3, 4, 5 are predictable)."""

    def __init__(self, vocab=64):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.full((*x.shape, self.vocab), -5.0)
        logits.scatter_(-1, ((x + 1) % self.vocab)[..., None], 5.0)
        return logits


def test_self_information_and_token_level_compression():
    lm = CountingLM()
    ids = [1, 2, 3, 4, 40, 41, 42, 7]
    info = self_information(lm, ids)
    assert info[0] == float("inf") and info[1] < 0.1 and info[4] > 5 and info[7] > 5
    kept, mask = compress_ids(lm, None, ids, rate=0.5, unit="token")
    assert set(kept) >= {1, 40, 7}  # the surprising tokens survive; predictable ones go first
    assert len(kept) == 4 and sum(mask) == 4
    assert compress_ids(lm, None, ids, rate=1.0)[0] == ids
    with pytest.raises(LmstackError, match="rate"):
        compress_ids(lm, None, ids, rate=0.0)


def test_word_level_compression_keeps_whole_words(tok):
    lm = CountingLM(tok.vocab_size)
    text = "The first man said that the other time was new"
    ids = tok.encode(text)
    kept, mask = compress_ids(lm, tok, ids, rate=0.6)
    assert 0 < len(kept) < len(ids)
    out = tok.decode(kept)
    words = set(text.split())
    assert all(w in words for w in out.split())  # no half words
    s = compress_text(lm, tok, text, rate=0.5, keep_suffix="\nQuestion: why?")
    assert s.endswith("\nQuestion: why?") and len(s) < len(text) + 20


def test_canonicalize():
    assert canonicalize("  \u201cHello\u201d\u00a0 world \u2014  ok \r\n\r\n\r\n\tnext  ") == '"Hello" world - ok\n\nnext'
    assert canonicalize("ﬁne") == "fine"
    assert canonicalize("a\n\n\n\nb") == "a\n\nb"


def test_streaming_chat_sink_cache_is_exact_then_bounded(tok):
    from lmstack.infer import LLM, SamplingParams
    from lmstack.infer.sink_cache_chat import SinkCacheChat

    from infer_helpers import tiny_model

    model = tiny_model(tok.vocab_size, seed=2)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    msg = "The first man said"
    # a window larger than the whole chat and no eviction: exactly the engine's answer
    chat = SinkCacheChat(model, tok, window=200, n_sink=0)
    want = LLM(model, tokenizer=tok, block_size=4, num_blocks=64).chat([{"role": "user", "content": msg}], params)
    assert chat.say(msg, params) == want[0].outputs[0].text
    # a long chat past max_seq_len (256) in a 24-token window: memory stays flat
    small = SinkCacheChat(model, tok, window=24, n_sink=4)
    sizes = []
    for i in range(12):
        small.say(f"turn {i}: " + msg, SamplingParams(max_tokens=20, temperature=0.8, seed=i, ignore_eos=True))
        sizes.append(small.cache.nbytes())
    assert small.tokens_seen > model.config.max_seq_len
    assert max(sizes) == sizes[-1] == sizes[3]
    assert small.cache.length == 4 + 24 - 1


def test_self_information_scores_prompts_longer_than_the_scorer_in_windows():
    from lmstack.model import Transformer
    from lmstack.model.presets import preset

    torch.manual_seed(0)
    lm = Transformer(preset("gpt2-tiny", vocab_size=64, max_seq_len=16)).eval()  # learned positions stop at 16
    ids = torch.randint(0, 64, (50,)).tolist()
    info = self_information(lm, ids)
    assert info.shape == (50,) and info[0] == float("inf") and torch.isfinite(info[1:]).all()
    # the first window is exactly one pass over the first 16 tokens; later tokens keep >= 8 tokens of context
    assert torch.allclose(info[:16], self_information(lm, ids[:16]))
    assert torch.allclose(info[16:24], self_information(lm, ids[8:24])[8:])
