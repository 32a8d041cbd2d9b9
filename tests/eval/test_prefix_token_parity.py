"""The token an empty context is conditioned on, on HF directories built with transformers + tokenizers only,
against lm-eval's hf backend (per-item loglikelihood_rolling and empty-context loglikelihood within 1e-4):
- a tokenizer with EOS but no BOS: both use its EOS (lm-eval's prefix_token_id);
- a tokenizer with neither: we use the ids in generation_config.json / config.json, and lm-eval, which would
  have none, is given the same id as its prefix_token_id.
"""
import json

import pytest

import hf_tiny
from lmstack.eval.local_lm import LocalLM

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

TOL = 1e-4
WORDS = "the cat sat on a mat and dog ran to park while birds sang in old trees near green hills".split()
TEXTS = ["the cat sat on the mat and the dog ran to the park while birds sang in old trees near green hills",
         "birds sang", "old trees near the park and a cat on a mat while the dog ran to green hills again and again"]


def corpus(n: int = 300) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 9)) + "." for i in range(n)]


def make_dir(path, specials: list[str], tok_config: dict, model_ids: dict, gen_ids: dict):
    """A Llama directory whose tokenizer and configs name only the given special tokens and ids (written by hand:
    the missing fields are the point)."""
    t = hf_tiny.bpe(corpus(), specials, vocab_size=300, byte_alphabet=False)
    model = hf_tiny.random_model("llama", t.get_vocab_size(), max_position_embeddings=64,
                                 **{"bos_token_id": None, "eos_token_id": None, **model_ids})
    model.save_pretrained(path)
    t.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            **tok_config}))
    (path / "generation_config.json").write_text(json.dumps(gen_ids))
    return path


def compare(path, **hflm_kwargs):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    theirs = HFLM(pretrained=str(path), dtype="float32", device="cpu", batch_size=2, max_length=16, **hflm_kwargs)
    ours = LocalLM(path, batch_size=2, max_length=16, device="cpu")
    assert ours.prefix_token_id == theirs.prefix_token_id
    got = theirs.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(TEXTS)],
                                       disable_tqdm=True)
    for a, b in zip(ours.loglikelihood_rolling(TEXTS), got):
        assert a == pytest.approx(b, abs=TOL)
    pairs = [("", " the cat sat"), ("", "birds")]
    got = theirs.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ours.loglikelihood(pairs), got):
        assert a == pytest.approx(b, abs=TOL) and ga == gb
    return ours


def test_eos_without_bos_conditions_on_eos_as_lm_eval(tmp_path):
    path = make_dir(tmp_path / "m", ["</s>"], {"eos_token": "</s>"}, {"eos_token_id": 0}, {"eos_token_id": 0})
    assert compare(path).prefix_token_id == 0


def test_no_bos_or_eos_in_the_tokenizer_uses_the_config_ids(tmp_path):
    # generation_config.json's bos first (then config.json's), as eval/lm.py documents
    path = make_dir(tmp_path / "m", [], {}, {"bos_token_id": 7, "eos_token_id": 9}, {"bos_token_id": 5})
    assert compare(path, prefix_token_id=5).prefix_token_id == 5
