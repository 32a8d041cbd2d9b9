"""Padded vocabularies through the engine: every path samples, scores and proposes tokenizer ids only.

Two padded models, both with "loud" padded rows (large random LM-head rows that would win most draws if
they were sampled): a legacy one (vocab_size past the tokenizer, no real_vocab_size: the engine must cut),
and one with real_vocab_size set (the head masks them). The regression: a padded draft model at temperature
1 used to propose ids past the tokenizer, and verify indexed past the end of the cut target logits.
"""
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.infer import LLM, SamplingParams
from lmstack.infer.lora_hook import LinearLoRA

from infer_helpers import tiny_model

PAD = 40  # padded rows past the tokenizer


def loud_padded(n_tok: int, masked: bool, seed: int = 0, **kw):
    if masked:
        kw["real_vocab_size"] = n_tok
    model = tiny_model(n_tok + PAD, seed=seed, **kw)
    with torch.no_grad():
        w = model.lm_head.weight
        w[n_tok:] = torch.randn(PAD, w.shape[1]) * w[:n_tok].std() * 40
    return model


@pytest.fixture(scope="module", params=["legacy", "masked"])
def padded(request, tok):
    masked = request.param == "masked"
    return loud_padded(tok.vocab_size, masked), loud_padded(tok.vocab_size, masked, seed=1, n_layers=1)


def _ids(outs):
    return [t for o in outs for c in o.outputs for t in c.token_ids]


def test_the_padded_rows_would_win_if_not_cut(tok, padded):
    target, _ = padded
    with torch.no_grad():
        logits = target.head(target(torch.tensor([[5, 6, 7]]), return_hidden=True))[0, -1]
    if getattr(target.config, "real_vocab_size", None) is None:
        assert int(logits.argmax()) >= tok.vocab_size  # so a missing cut shows up in the tests below
    else:
        assert int(logits.argmax()) < tok.vocab_size


def test_draft_speculation_at_temperature_1_with_padded_draft_and_target(tok, padded):
    target, draft = padded
    llm = LLM(target, tokenizer=tok, speculative={"method": "draft", "draft_model": draft, "num_tokens": 3},
              block_size=4, num_blocks=128)
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=3, ignore_eos=True)
    outs = llm.generate(["the of and", "it was with", "a is that for"], params)
    ids = _ids(outs)
    assert len(ids) == 72 and max(ids) < tok.vocab_size
    stats = llm.engine.stats()
    assert stats["spec_proposed_tokens"] > 0


@pytest.mark.parametrize("path", ["sample", "beam", "ngram", "logprobs", "prompt_logprobs", "lora", "choice"])
def test_every_engine_path_emits_and_scores_tokenizer_ids_only(tok, padded, path):
    target, _ = padded
    n_tok = tok.vocab_size
    kwargs, params = {}, dict(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    if path == "beam":
        params = dict(max_tokens=8, use_beam_search=True, beam_width=3, n=2, ignore_eos=True)
    if path == "ngram":
        kwargs["speculative"] = {"method": "ngram", "num_tokens": 3}
        params.update(top_k=3, max_tokens=24)  # few candidates: the sampled text repeats, so lookups find matches
    if path == "logprobs":
        params["logprobs"] = 5
    if path == "prompt_logprobs":
        params["prompt_logprobs"] = 3
    if path == "lora":
        kwargs["lora_adapters"] = {"a": LinearLoRA.random(target, rank=2, std=0.4, seed=1)}
        params["lora"] = "a"
    if path == "choice":
        pytest.importorskip("llguidance")
        params = dict(max_tokens=12, temperature=1.0, seed=5, choice=["the one", "all of them"])
    llm = LLM(target, tokenizer=tok, block_size=4, num_blocks=256, **kwargs)
    prompt = "the of and to in a is the of and to in a is"
    out = llm.generate([prompt], SamplingParams(**params))[0]
    ids = _ids([out])
    assert ids and max(ids) < n_tok
    if path == "choice":
        assert out.outputs[0].text in ("the one", "all of them")
    if path == "logprobs":
        for step in out.outputs[0].logprobs:
            assert max(step) < n_tok
            assert sum(torch.tensor(list(step.values())).exp()) <= 1 + 1e-5
    if path == "prompt_logprobs":
        scored = [d for d in out.prompt_logprobs if d is not None]
        assert scored and all(max(d) < n_tok for d in scored)
    if path == "ngram":
        assert llm.engine.stats()["spec_proposed_tokens"] > 0


def test_prompt_ids_in_padded_rows_are_refused(tok, padded):
    target, _ = padded
    llm = LLM(target, tokenizer=tok)
    with pytest.raises(LmstackError, match=f"prompt token id {tok.vocab_size + 1} is outside the vocabulary "
                                           rf"\[0, {tok.vocab_size}\)"):
        llm.generate([[1, 2, tok.vocab_size + 1]], SamplingParams(max_tokens=2))


def test_engine_refuses_a_tokenizer_larger_than_the_model(tok, tmp_path):
    import lmstack

    small = tiny_model(tok.vocab_size - 10)
    path = lmstack.save_model(small, tmp_path / "small", tokenizer=tok)   # its tokenizer.json does not fit it
    with pytest.raises(LmstackError) as e:
        LLM(str(path))
    msg = str(e.value)
    assert f"has {tok.vocab_size} tokens" in msg and f"has {tok.vocab_size - 10} tokens" in msg
    assert str(path) in msg and "\n" not in msg
