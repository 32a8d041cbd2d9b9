"""Shared eval fixtures: a tiny random lmstack model + BPE tokenizer on disk, a LocalLM on it, and a FakeLM.

Fixture names are stable (other eval test files use them):
  tiny_model_dir  -- a session-wide model directory (HF layout, llama-tiny, 128-token context, tokenizer.json)
  tiny_lm         -- a LocalLM on it (session-wide; its stats are shared, so compare deltas)
  fake_lm_factory -- make a FakeLM with scripted answers:
        lm = fake_lm_factory(loglikelihood={("Q:", " a"): -1.0}, generate=lambda ctx, args: "42",
                             rolling=lambda text: -len(text))
     loglikelihood / generate / rolling may be dicts or callables; a (context, continuation) not in the dict
     scores -len(continuation) (so shorter choices win, deterministically). Every request is recorded in
     lm.calls as ("loglikelihood", ctx, cont) / ("rolling", text) / ("generate", ctx, args).
"""
from __future__ import annotations

import random

import pytest

WORDS = ("the cat sat on a mat and dog ran to park while birds sang in old trees near green hills under "
         "blue sky where people walk each day with friends who talk about time work life water sun moon "
         "plant animal energy heat light rock soil rain question answer yes no true false one two three four "
         "five six seven eight nine ten what which is are of for it this that").split()


def make_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ":", ","]))
    return lines


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    import torch

    import lmstack
    from lmstack.model.presets import preset
    from lmstack.tokenizer import train_tokenizer

    tok = train_tokenizer(texts=make_corpus(), type="bpe", vocab_size=400, special_tokens="chat",
                          show_progress=False)
    torch.manual_seed(0)
    # A larger init std than usual, so the random model has real preferences (not near-uniform logits).
    cfg = preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=128, init_std=0.2)
    model = lmstack.Transformer(cfg)
    path = tmp_path_factory.mktemp("eval_model") / "tiny"
    lmstack.save_model(model.eval(), path, tokenizer=tok)
    return path


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from lmstack.eval.local_lm import LocalLM

    return LocalLM(tiny_model_dir, batch_size=8, device="cpu")


class FakeLM:
    """An LM with scripted answers, for testing tasks and the evaluator without a model."""

    def __init__(self, loglikelihood=None, generate=None, rolling=None, max_length: int = 2048, config=None):
        self._ll, self._gen, self._roll = loglikelihood or {}, generate or {}, rolling
        self.max_length = max_length
        self.config = config
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "requests": 0, "ttft_s": []}
        self.calls: list[tuple] = []

    def _lookup(self, table, key, default):
        if callable(table):
            return table(*key)
        return table.get(key[0] if len(key) == 1 else key, default) if isinstance(table, dict) else default

    def loglikelihood(self, requests):
        out = []
        for ctx, cont in requests:
            self.calls.append(("loglikelihood", ctx, cont))
            r = self._lookup(self._ll, (ctx, cont), -float(len(cont)))
            if not isinstance(r, tuple):
                r = (float(r), False)
            out.append((float(r[0]), bool(r[1])))
            self.stats["prompt_tokens"] += self.token_count(ctx + cont)
        self.stats["requests"] += len(requests)
        return out

    def loglikelihood_rolling(self, texts):
        out = []
        for text in texts:
            self.calls.append(("rolling", text))
            out.append(float(self._roll(text)) if callable(self._roll) else -float(len(text)))
            self.stats["prompt_tokens"] += self.token_count(text)
        self.stats["requests"] += len(texts)
        return out

    def generate_until(self, requests):
        out = []
        for ctx, args in requests:
            self.calls.append(("generate", ctx, args))
            if callable(self._gen):
                text = self._gen(ctx, args)
            else:
                text = self._gen.get(ctx, "")
            for stop in args.until:  # honour stop strings like a real backend
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
            self.stats["prompt_tokens"] += self.token_count(ctx)
            self.stats["generated_tokens"] += self.token_count(text)
            self.stats["ttft_s"].append(0.001)
        self.stats["requests"] += len(requests)
        return out

    def token_count(self, text):
        return len(text.split())


@pytest.fixture
def fake_lm_factory():
    return FakeLM
