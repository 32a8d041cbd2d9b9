"""Passkey retrieval: documents, both scorings, the sink-cache LM, RoPE scaling and the table."""
import re

import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.eval.evaluator import evaluate
from lmstack.eval.lm import GenArgs
from lmstack.eval.tasks.long_context import PasskeyTask, SinkCacheLM, passkey_table, with_rope_scaling


def _key_in(context: str) -> str:
    return re.search(r"The pass key is (\d+)\.", context).group(1)


def test_passkey_documents_hide_one_key_among_distractor_choices():
    task = PasskeyTask(length_chars=600, depths=(0.1, 0.9), n_per_depth=3, n_choices=4, seed=1)
    docs = task.docs("test")
    assert len(docs) == 6 and {d["depth"] for d in docs} == {0.1, 0.9}
    for d in docs:
        assert d["choices"][d["gold"]] == d["answer"] and len(set(d["choices"])) == 4
        assert d["text"].count(d["answer"]) == 2  # only in the needle ("... is K. ... K is the pass key.")
        assert task.doc_to_text(d).endswith("What is the pass key? The pass key is")
        assert 500 <= len(d["text"]) <= 700
    early = docs[0]["text"].index(docs[0]["answer"]) / len(docs[0]["text"])
    late = docs[-1]["text"].index(docs[-1]["answer"]) / len(docs[-1]["text"])
    assert early < 0.3 < 0.7 < late
    assert task.docs("test") == docs  # seeded


def test_loglikelihood_scoring_rewards_the_key_in_context(fake_lm_factory):
    def ll(ctx, cont):  # a perfect retriever: the key that is in the context wins
        return 0.0 if cont.strip() == _key_in(ctx) else -5.0

    task = PasskeyTask(length_chars=400, depths=(0.5,), n_per_depth=4)
    res = evaluate(fake_lm_factory(loglikelihood=ll), [task], bootstrap_iters=0, progress=False)["results"]["passkey"]
    assert res["metrics"]["acc"] == 1.0 and res["chance"] == pytest.approx(0.2)
    blind = evaluate(fake_lm_factory(), [task], bootstrap_iters=0, progress=False)["results"]["passkey"]
    assert blind["metrics"]["acc"] < 1.0  # the default fake ignores the context: ties go to the first choice


def test_generate_scoring_is_exact_match_of_the_first_number(fake_lm_factory):
    task = PasskeyTask(scoring="generate", length_chars=400, depths=(0.5,), n_per_depth=3)
    good = fake_lm_factory(generate=lambda ctx, args: f" {_key_in(ctx)}. Done\nmore")
    bad = fake_lm_factory(generate=lambda ctx, args: " 12345")
    assert evaluate(good, [task], progress=False)["results"]["passkey"]["metrics"]["exact_match"] == 1.0
    assert evaluate(bad, [task], progress=False)["results"]["passkey"]["metrics"]["exact_match"] == 0.0
    with pytest.raises(LmstackError, match="scoring"):
        PasskeyTask(scoring="vibes")


def test_sink_cache_lm_matches_full_attention_while_everything_fits(tiny_lm):
    reqs = [("the cat sat on a mat and the dog ran to the park", " while birds sang"), ("", "one two three")]
    wide = SinkCacheLM(tiny_lm, window=128, n_sink=4)
    for (a, ga), (b, gb) in zip(wide.loglikelihood(reqs), tiny_lm.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    long_ctx = " ".join(["the cat sat on a mat"] * 12)
    narrow = SinkCacheLM(tiny_lm, window=8, n_sink=2)
    assert narrow.loglikelihood([(long_ctx, " and")])[0][0] != pytest.approx(tiny_lm.loglikelihood([(long_ctx, " and")])[0][0], abs=1e-3)
    [text] = wide.generate_until([("the cat", GenArgs(until=["\n"], max_gen_toks=4))])
    assert isinstance(text, str) and wide.stats["generated_tokens"] >= 1


def test_linear_rope_scaling_interpolates_positions(tiny_lm):
    model = tiny_lm.model
    scaled = with_rope_scaling(model, "linear", 2.0)
    cos_s, _ = scaled.rope(torch.tensor([6]))
    cos_o, _ = model.rope(torch.tensor([3]))
    assert torch.allclose(cos_s, cos_o, atol=1e-5)  # position 6 scaled by 2 looks like position 3
    assert model.config.rope_scaling == "none" and scaled.config.rope_scaling == "linear"
    assert scaled.tok_emb.weight.data_ptr() != model.tok_emb.weight.data_ptr()  # a copy, not an alias


def test_passkey_table_covers_variants_and_lengths(tiny_lm):
    out = passkey_table({"tiny": tiny_lm}, multiples=(1, 2), depths=(0.5,), n_per_cell=2, rope_scalings=("ntk",))
    names = list(out["variants"])
    assert names == ["tiny: RoPE", "tiny: RoPE + ntk x2", "tiny: RoPE + sink cache (4 sinks, window 124)"]
    for v in out["variants"].values():
        assert [r["multiple"] for r in v["rows"]] == [1, 2]
        for r in v["rows"]:
            assert abs(r["tokens"] - 128 * r["multiple"]) < 0.2 * 128 * r["multiple"]
            assert 0.0 <= r["scores"]["0.5"] <= 1.0
    assert out["variants"]["tiny: RoPE + ntk x2"]["position"] == "RoPE + ntk x2"
    assert out["markdown"].count("| 2x |") == 3 and "chance 0.20" in out["markdown"]
