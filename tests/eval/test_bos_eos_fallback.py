"""A tokenizer with neither BOS nor EOS: eval borrows the ids of config.json / generation_config.json, and
refuses only when an empty context actually needs one and none exists anywhere."""
import json

import pytest
import torch
import torch.nn.functional as F

import lmstack
from lmstack.errors import LmstackError
from lmstack.eval.local_lm import LocalLM
from lmstack.eval.openai_lm import OpenAICompletionsLM
from lmstack.model.presets import preset
from lmstack.tokenizer import train_tokenizer

WORDS = "the cat sat on a mat and dog ran to park while birds sang in old trees near green hills".split()


def make_corpus(n: int = 300) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 9)) + "." for i in range(n)]


@pytest.fixture(scope="module")
def bare_tok():
    tok = train_tokenizer(texts=make_corpus(), type="bpe", vocab_size=300, special_tokens="none",
                          show_progress=False)
    assert tok.bos_id is None and tok.eos_id is None
    return tok


def _dir(tok, path, **ids):
    torch.manual_seed(0)
    model = lmstack.Transformer(preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=64, init_std=0.1, **ids))
    return lmstack.save_model(model.eval(), path, tokenizer=tok), model


def _direct(model, ctx, cont):
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ctx + cont]))[0], -1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_empty_context_uses_the_config_eos(bare_tok, tmp_path):
    path, model = _dir(bare_tok, tmp_path / "m", eos_token_id=5)
    lm = LocalLM(path, device="cpu")
    assert lm.prefix_token_id == 5
    cont = bare_tok.encode(" the cat", add_special_tokens=False)
    [(ll, _)] = lm.loglikelihood([("", " the cat")])
    assert ll == pytest.approx(_direct(model, [5], cont), abs=1e-4)
    remote = OpenAICompletionsLM("http://127.0.0.1:9", "m", tokenizer=path)   # no request is sent
    assert remote.rules.prefix_token_id == 5
    remote.close()


def test_generation_config_comes_first(bare_tok, tmp_path):
    path, _ = _dir(bare_tok, tmp_path / "m", eos_token_id=5)
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "bos_token_id": 7}))
    assert LocalLM(path, device="cpu").prefix_token_id == 7       # BOS (from generation_config) before EOS


def test_no_ids_anywhere_fails_only_for_an_empty_context(bare_tok, tmp_path):
    path, model = _dir(bare_tok, tmp_path / "m")
    lm = LocalLM(path, device="cpu")                              # used to raise here, for every task
    ctx = bare_tok.encode("the dog ran", add_special_tokens=False)
    cont = bare_tok.encode(" to the park", add_special_tokens=False)
    [(ll, _)] = lm.loglikelihood([("the dog ran", " to the park")])
    assert ll == pytest.approx(_direct(model, ctx, cont), abs=1e-4)
    with pytest.raises(LmstackError, match="neither the tokenizer nor the model's config.json"):
        lm.loglikelihood([("", " the cat")])
