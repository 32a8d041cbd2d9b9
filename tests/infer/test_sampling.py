"""SamplingParams validation and every logits processor, on hand-made logits."""
import math

import pytest
import torch

from lmstack.infer import SamplingParams, SamplingParamsError
from lmstack.infer import logits_processors as lp
from lmstack.infer.detokenizer import find_stop, held_back


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.2),
    ("repetition_penalty", 0.0), ("frequency_penalty", 2.5), ("presence_penalty", -3.0), ("max_tokens", -1),
    ("min_tokens", -1), ("logprobs", 21), ("prompt_logprobs", -1), ("beam_width", 0), ("logit_bias", {1: 200}),
    ("logit_bias", {"x": 1.0}), ("stop", [""]), ("stop_token_ids", [-1]), ("bad_words", [3]), ("choice", []),
    ("best_of", 0), ("output_kind", "all"), ("regex", ""), ("json_schema", "{not json"),
    ("temperature", float("nan")), ("n", True),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams(**{field: value})
    with pytest.raises(ValueError):  # servers map ValueError to HTTP 400
        SamplingParams(**{field: value})


def test_cross_field_rules_and_normalisation():
    with pytest.raises(SamplingParamsError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=2)
    with pytest.raises(SamplingParamsError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(SamplingParamsError, match="only one of"):
        SamplingParams(regex="a", choice=["a"])
    with pytest.raises(SamplingParamsError, match="n="):
        SamplingParams(use_beam_search=True, beam_width=2, n=3)
    p = SamplingParams(stop="x", top_k=-1, logit_bias={"5": 1})
    assert p.stop == ["x"] and p.top_k == 0 and p.logit_bias == {5: 1.0}
    assert SamplingParams(response_format={"type": "json_object"}).json_schema == {"type": "object"}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}
    assert SamplingParams(response_format=rf).json_schema == {"type": "integer"}
    assert SamplingParams(json_schema='{"type": "string"}').json_schema == {"type": "string"}
    assert SamplingParams(n=2, best_of=4).num_sequences == 4


def row(params=None, prompt=(), out=(), eos=frozenset({0}), bad=()):
    return lp.SamplingRow(params or SamplingParams(), list(prompt), list(out), None, eos, [list(b) for b in bad])


def test_min_tokens_bans_eos_and_stop_tokens_until_reached():
    logits = torch.zeros(2, 6)
    p = SamplingParams(min_tokens=2, stop_token_ids=[3])
    out = lp.min_tokens(logits, [row(p, out=[1]), row(p, out=[1, 2])])
    assert out[0, 0] == -math.inf and out[0, 3] == -math.inf and out[0, 1] == 0
    assert torch.isfinite(out[1]).all()


def test_bad_words_ban_the_last_token_after_its_prefix():
    logits = torch.zeros(3, 6)
    rows = [row(out=[4], bad=[[4, 5], [2]]), row(out=[1], bad=[[4, 5]]), row(bad=[[3]])]
    out = lp.bad_words(logits, rows)
    assert out[0, 5] == -math.inf and out[0, 2] == -math.inf and out[0, 4] == 0
    assert torch.isfinite(out[1]).all()
    assert out[2, 3] == -math.inf


def test_logit_bias_adds():
    out = lp.logit_bias(torch.zeros(1, 4), [row(SamplingParams(logit_bias={2: 3.5, 9: 1.0}))])
    assert out.tolist() == [[0, 0, 3.5, 0]]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 2.0, 1.0]])
    out = lp.repetition_penalty(logits, [row(SamplingParams(repetition_penalty=2.0), prompt=[0], out=[1])])
    assert out.tolist() == [[1.0, -4.0, 2.0, 1.0]]


def test_frequency_and_presence_penalties_follow_openai():
    logits = torch.zeros(1, 4)
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)
    out = lp.frequency_presence(logits, [row(p, prompt=[3], out=[1, 1, 2])])
    assert out.tolist() == [[0.0, -2.0, -1.5, 0.0]]  # prompt tokens are not penalised


def test_top_k_top_p_min_p_and_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    def kept(**kw):
        out = lp.process(logits.clone(), [row(SamplingParams(**kw))])
        return torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.5) == [0]            # 0.5 alone reaches 0.5
    assert kept(top_p=0.7) == [0, 1]
    assert kept(top_p=0.76) == [0, 1, 2]
    assert kept(min_p=0.35) == [0, 1]        # 0.15 < 0.35 * 0.5
    assert kept(top_k=3, top_p=0.6, min_p=0.0) == [0, 1]
    hot = lp.process(logits.clone(), [row(SamplingParams(temperature=2.0))])
    assert torch.allclose(hot, logits / 2)
    greedy = lp.process(logits.clone(), [row(SamplingParams(temperature=0.0, top_k=1))])
    assert lp.sample(greedy, [row(SamplingParams(temperature=0.0))]) == [0]


def test_sampling_follows_the_distribution_and_seeds():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    g = torch.Generator().manual_seed(0)
    r = lp.SamplingRow(SamplingParams(temperature=1.0), [], [], g)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[lp.sample(logits, [r])[0]] += 1
    assert torch.allclose(counts / 3000, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)
    a = [lp.sample(logits, [lp.SamplingRow(SamplingParams(), [], [], torch.Generator().manual_seed(7))])[0]
         for _ in range(5)]
    assert len(set(a)) == 1


def test_guided_mask_and_probabilities():
    logits = torch.zeros(2, 4)
    allowed = torch.tensor([False, True, False, True])
    rows = [lp.SamplingRow(SamplingParams(), [], [], allowed=allowed), row(SamplingParams(temperature=0.0))]
    out = lp.process(logits, rows)
    assert torch.isfinite(out[0]).tolist() == allowed.tolist()
    probs = lp.probabilities(out, rows)
    assert probs[0].tolist() == [0, 0.5, 0, 0.5] and probs[1].tolist() == [1, 0, 0, 0]


def test_stop_strings_across_token_boundaries():
    text = "hello wor"
    assert find_stop(text + "ld!", len(text), ["world"], include=False) == (6, "world")
    assert find_stop(text + "ld!", len(text), ["world"], include=True) == (11, "world")
    assert find_stop("abc", 1, ["zz"], include=False) is None
    assert held_back("the end of wo", ["world"]) == 2
    assert held_back("nothing", ["world"]) == 0
