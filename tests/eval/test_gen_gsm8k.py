"""GSM8K: answer extraction and normalisation, few-shot from train, exact match, maj@k self-consistency."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmstack.errors import LmstackError
from lmstack.eval import evaluate, get_task
from lmstack.eval.tasks.gsm8k import THE_ANSWER_IS, extract, gold_answer, plain_chain

REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"

TRAIN = [{"question": f"Tom has {i} apples and buys 2 more. How many apples does he have?",
          "answer": f"He has {i} + 2 = <<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}"} for i in range(10)]
TEST = [{"question": "Ann has 1,000 dollars and spends 250. How much is left?",
         "answer": "1000 - 250 = <<1000-250=750>>750\n#### 750"},
        {"question": "A box holds 6 eggs. How many eggs are in 3 boxes?",
         "answer": "6 * 3 = <<6*3=18>>18\n#### 18"}]


@pytest.fixture
def gsm_dir(tmp_path, monkeypatch):
    d = tmp_path / "gsm8k"
    d.mkdir()
    for name, rows in (("train", TRAIN), ("test", TEST)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("LMSTACK_DATA", str(tmp_path))
    return d


@pytest.mark.parametrize("text,flexible,strict", [
    ("so 5 + 2 = 7\n#### 7", "7", "7"),
    ("#### 1,234\nQuestion: next one #### 9", "1234", "1234"),      # the first #### answer wins
    ("#### $18.", "18", "18"),
    ("#### 5.0", "5", "5"),
    ("she ends with 12 apples, then 13.", "13", None),              # fallback: the last number
    ("no numbers here", None, None),
    ("#### -4", "-4", "-4"),
])
def test_extract(text, flexible, strict):
    assert extract(text) == (flexible, strict)


def test_cot_format_and_extraction():
    chain = plain_chain(TEST[0]["answer"])
    assert chain == "1000 - 250 = 750 The answer is 750."
    assert extract(chain, THE_ANSWER_IS) == ("750", "750")
    assert gold_answer(TEST[0]["answer"]) == "750"
    with pytest.raises(LmstackError, match="####"):
        gold_answer("no answer line")


def test_exact_match_with_fewshot_from_train(gsm_dir, fake_lm_factory):
    answers = {"Ann": "Ann spends 250 so 1000 - 250 = 750.\n#### 750", "box": "6 * 3 = 18 so the answer is 18"}

    def gen(ctx, args):
        last = ctx.rsplit("Question:", 1)[-1]
        return next(v for k, v in answers.items() if k in last)

    lm = fake_lm_factory(generate=gen)
    out = evaluate(lm, ["gsm8k"], num_fewshot=3, progress=False, bootstrap_iters=0)
    metrics = out["results"]["gsm8k"]["metrics"]
    assert metrics["exact_match"] == 1.0             # the second answer needs the last-number fallback
    assert metrics["exact_match_strict"] == 0.5
    ctx = lm.calls[0][1]
    assert ctx.count("Question:") == 4 and "Tom has" in ctx and ctx.endswith("How much is left?\nAnswer:")
    assert all(call[2].temperature == 0.0 and "Question:" in call[2].until for call in lm.calls)
    # Fixed seed: the same shots every run.
    lm2 = fake_lm_factory(generate=gen)
    evaluate(lm2, ["gsm8k"], num_fewshot=3, progress=False, bootstrap_iters=0)
    assert [c[1] for c in lm2.calls] == [c[1] for c in lm.calls]


def test_maj_at_k_votes_over_sampled_chains(gsm_dir, fake_lm_factory):
    votes = ["#### 750", "so 750", "#### 700", "#### 750.00", "#### 3"]

    def gen(ctx, args):
        if args.temperature == 0:
            return "#### 1"                      # greedy is wrong
        return votes.pop(0)

    lm = fake_lm_factory(generate=gen)
    out = evaluate(lm, [get_task("gsm8k", k=5, temperature=0.7)], limit=1, progress=False, bootstrap_iters=0)
    metrics = out["results"]["gsm8k"]["metrics"]
    assert metrics["exact_match"] == 0.0 and metrics["maj@5"] == 1.0
    assert metrics["agreement"] == pytest.approx(3 / 5)
    sampled = [c[2] for c in lm.calls if c[2].temperature > 0]
    assert len(sampled) == 5 and len({a.seed for a in sampled}) == 5


def test_maj_at_k_needs_temperature():
    with pytest.raises(LmstackError, match="temperature"):
        get_task("gsm8k", k=4, temperature=0.0)
    with pytest.raises(LmstackError, match="k must be"):
        get_task("gsm8k_cot", k=0)


def test_gsm8k_cot_prompt(gsm_dir, fake_lm_factory):
    lm = fake_lm_factory(generate=lambda c, a: "1000 - 250 = 750. The answer is 750.")
    out = evaluate(lm, ["gsm8k_cot"], num_fewshot=1, limit=1, progress=False, bootstrap_iters=0)
    assert out["results"]["gsm8k_cot"]["metrics"]["exact_match_strict"] == 1.0
    ctx = lm.calls[0][1]
    assert ctx.startswith("Q: Tom has") and "The answer is" in ctx and ctx.endswith("How much is left?\nA:")


def test_missing_data_skips(tmp_path, monkeypatch, fake_lm_factory):
    monkeypatch.setenv("LMSTACK_DATA", str(tmp_path))
    out = evaluate(fake_lm_factory(), ["gsm8k"], progress=False)
    assert "gsm8k" in out["results"]["gsm8k"]["skipped"]


def test_real_gsm8k_golds_parse():
    if not REAL.exists():
        pytest.skip("GSM8K data not present")
    task = get_task("gsm8k")
    docs = task.docs("test")
    assert len(docs) == 1319
    golds = [task.gold(d) for d in docs]
    assert all(g is not None and g.lstrip("-").replace(".", "").isdigit() for g in golds)
    assert extract(docs[0]["answer"])[1] == golds[0]
