"""Speculative decoding is lossless: greedy output is token-identical, and sampled outputs follow the
target's distribution exactly (chi-square test on a 4-token vocabulary)."""
import itertools

import pytest
import torch
from scipy.stats import chi2

from lmstack.errors import LmstackError
from lmstack.infer import LLM, SamplingParams
from lmstack.infer import logits_processors as lp

from infer_helpers import random_prompts, tiny_model


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_speculation_is_token_identical(model, method):
    vocab = model.config.vocab_size
    base = LLM(model, block_size=4, num_blocks=256)
    spec = {"method": method, "num_tokens": 3}
    if method == "draft":
        spec["draft_model"] = tiny_model(vocab, seed=7, n_layers=1)
    fast = LLM(model, block_size=4, num_blocks=256, speculative=spec, max_num_seqs=4)
    motif = random_prompts(1, 5, 5, vocab, seed=20)[0]
    prompts = [motif * 4, *random_prompts(3, 4, 12, vocab, seed=21)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in base.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in fast.generate(prompts, params)]
    assert got == want
    stats = fast.engine.stats()
    assert stats["spec_proposed_tokens"] > 0
    assert fast.engine.bm.num_free_blocks == 256
    if method == "draft":  # a draft identical to the target is always right
        same = LLM(model, block_size=4, num_blocks=256, speculative={"method": "draft", "draft_model": model,
                                                                        "num_tokens": 3})
        assert [o.outputs[0].token_ids for o in same.generate(prompts, params)] == want
        assert same.engine.stats()["spec_acceptance_rate"] == pytest.approx(1.0)


@torch.no_grad()
def exact_distribution(model, prompt, params, steps):
    """P(t1..t_steps) under the target after logits processing, by enumeration."""
    vocab = model.config.vocab_size
    out = {}
    for seq in itertools.product(range(vocab), repeat=steps):
        logits = model(torch.tensor([prompt + list(seq[:-1])]))[0, len(prompt) - 1:]
        rows = [lp.SamplingRow(params, prompt, list(seq[:j])) for j in range(steps)]
        probs = lp.process(logits, rows).softmax(-1)
        out[seq] = float(torch.prod(probs[torch.arange(steps), torch.tensor(seq)]))
    return out


def chi_square_p(counts: dict, probs: dict, n: int) -> float:
    stat, dof, small_o, small_e = 0.0, -1, 0, 0.0
    for k, p in probs.items():
        e, o = p * n, counts.get(k, 0)
        if e < 5:  # pool rare outcomes so the chi-square approximation holds
            small_o, small_e = small_o + o, small_e + e
            continue
        stat += (o - e) ** 2 / e
        dof += 1
    if small_e > 0:
        stat += (small_o - small_e) ** 2 / small_e
        dof += 1
    return float(chi2.sf(stat, dof))


def sample_many(llm, prompt, params, n_req, n_each):
    outs = llm.generate([prompt] * n_req, [params.clone(seed=s, n=n_each) for s in range(n_req)])
    counts = {}
    for o in outs:
        for c in o.outputs:
            counts[tuple(c.token_ids)] = counts.get(tuple(c.token_ids), 0) + 1
    return counts


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_sampled_distribution_is_unchanged(method):
    target = tiny_model(4, seed=11)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    params = SamplingParams(max_tokens=4, temperature=1.0, top_p=0.95, ignore_eos=True)
    spec = {"method": method, "num_tokens": 2, "ngram_max": 2}
    if method == "draft":
        spec["draft_model"] = tiny_model(4, seed=12, n_layers=1)
    llm = LLM(target, block_size=4, num_blocks=2048, max_num_seqs=64, max_batched_tokens=4096, speculative=spec)
    n = 3000
    counts = sample_many(llm, prompt, params, 30, n // 30)
    stats = llm.engine.stats()
    assert stats["spec_proposed_tokens"] > 1000
    assert 0.05 < stats["spec_acceptance_rate"] < 0.95  # both branches of the rule ran many times
    probs = exact_distribution(target, prompt, params, 4)
    assert chi_square_p(counts, probs, n) > 1e-3
    # the same test has power: samples from another model are rejected
    other = LLM(tiny_model(4, seed=12, n_layers=1), block_size=4, num_blocks=2048, max_num_seqs=64,
                max_batched_tokens=4096)
    assert chi_square_p(sample_many(other, prompt, params, 30, n // 30), probs, n) < 1e-6


def test_speculative_config_errors(model):
    with pytest.raises(LmstackError, match="method"):
        LLM(model, speculative={"method": "magic"})
    with pytest.raises(LmstackError, match="draft_model"):
        LLM(model, speculative={"method": "draft"})
    with pytest.raises(LmstackError, match="vocab_size"):
        LLM(model, speculative={"method": "draft", "draft_model": tiny_model(77)})
