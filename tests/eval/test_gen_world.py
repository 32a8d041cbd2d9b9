"""Synthetic-world tasks: knowledge QA (+ hallucination flag), arithmetic CoT, IFEval-like instructions."""
from __future__ import annotations

import pytest

from lmstack.world import World, check_instruction
from lmstack.errors import LmstackError
from lmstack.eval import evaluate, get_task
from lmstack.eval.tasks.world import loose_variants


@pytest.fixture(scope="module")
def world():
    return World(seed=0, size="small")


def _last_question(ctx: str) -> str:
    return ctx.rsplit("Question: ", 1)[-1].split("\n")[0]


def test_world_qa_exact_match(world, fake_lm_factory):
    truth = {r["question"]: r["answer"] for r in world.corpus("qa", split="test")}
    right = fake_lm_factory(generate=lambda c, a: " " + truth[_last_question(c)] + ".")
    out = evaluate(right, ["world_qa"], num_fewshot=2, limit=20, progress=False, bootstrap_iters=0)
    m = out["results"]["world_qa"]["metrics"]
    assert m["exact_match"] == 1.0 and m["contains_fact"] == 1.0
    ctx = right.calls[0][1]
    assert ctx.count("Question: ") == 3 and ctx.endswith("\nAnswer:")
    wrong = fake_lm_factory(generate=lambda c, a: " I think it is Nowhere")
    m = evaluate(wrong, ["world_qa"], limit=20, progress=False, bootstrap_iters=0)["results"]["world_qa"]["metrics"]
    assert m["exact_match"] == 0.0 and m["contains_fact"] == 0.0


def test_world_qa_fewshot_comes_from_train_people(world):
    task = get_task("world_qa")
    doc = task.cached_docs("test")[0]
    shots = task.fewshot_docs(doc, 5)
    assert all(world.qa_split(s["person"]) == "train" for s in shots)
    assert world.qa_split(doc["person"]) == "test"


def test_world_qa_hallucination_flag_separates_known_from_guessed(world, fake_lm_factory):
    docs = get_task("world_qa").cached_docs("test")[:20]
    known = {d["question"] for d in docs[:10]}          # the model "knows" the first ten
    truth = {d["question"]: d["answer"] for d in docs}

    def gen(ctx, args):
        q = _last_question(ctx)
        if q in known:
            return " " + truth[q]
        # guessing: greedy says one thing, samples scatter with the seed
        return f" Guess{args.seed if args.seed is not None else 'X'}"

    out = evaluate(fake_lm_factory(generate=gen), [get_task("world_qa", k=4, threshold=0.5)], limit=20,
                   progress=False, bootstrap_iters=0)
    m = out["results"]["world_qa"]["metrics"]
    assert m["uncertain_rate"] == pytest.approx(0.5)
    assert m["acc_trusted"] == 1.0 and m["acc_flagged"] == 0.0
    assert m["agreement"] == pytest.approx((10 * 1.0 + 10 * 0.25) / 20)


def test_world_arithmetic_cot(world, fake_lm_factory):
    sol = {r["question"]: r["solution"] for r in world.corpus("arithmetic", split="test")}

    def gen(ctx, args):
        return sol[ctx.rstrip("\n").rsplit("\n\n", 1)[-1]] + "\n\nNext problem #### 99999"

    out = evaluate(fake_lm_factory(generate=gen), ["world_arithmetic"], num_fewshot=1, limit=10, progress=False,
                   bootstrap_iters=0)
    m = out["results"]["world_arithmetic"]["metrics"]
    assert m["exact_match"] == 1.0 and m["exact_match_strict"] == 1.0
    out = evaluate(fake_lm_factory(generate=lambda c, a: "#### 0"), ["world_arithmetic"], limit=10, progress=False,
                   bootstrap_iters=0)
    assert out["results"]["world_arithmetic"]["metrics"]["exact_match"] == 0.0


def test_world_ifeval_single_instruction_strict(world, fake_lm_factory):
    recs = {r["instruction"] + "\n": r for r in world.corpus("instructions", split="test")}
    good = fake_lm_factory(generate=lambda c, a: recs[c]["response"])
    task = get_task("world_ifeval", extra=0)
    m = evaluate(good, [task], progress=False, bootstrap_iters=0)["results"]["world_ifeval"]["metrics"]
    assert m["prompt_level_strict_acc"] == 1.0 and m["inst_level_strict_acc"] == 1.0
    bad = fake_lm_factory(generate=lambda c, a: recs[c]["bad_response"])
    m = evaluate(bad, [get_task("world_ifeval", extra=0)], progress=False,
                 bootstrap_iters=0)["results"]["world_ifeval"]["metrics"]
    assert m["prompt_level_strict_acc"] == 0.0


def test_world_ifeval_multi_instruction_levels(fake_lm_factory):
    task = get_task("world_ifeval", extra=2)
    docs = task.cached_docs("test")
    multi = [d for d in docs if len(d["instructions"]) > 1]
    assert multi and all(d["prompt"].startswith(d["instruction"]) for d in docs)
    # Follow only the primary instruction: some extras fail, and the two levels count them differently.
    by_prompt = {d["prompt"] + "\n": d for d in docs}
    lm = fake_lm_factory(generate=lambda c, a: by_prompt[c]["response"])
    out = evaluate(lm, [task], progress=False, bootstrap_iters=0)
    m = out["results"]["world_ifeval"]["metrics"]
    n_inst = sum(len(d["instructions"]) for d in docs)
    followed = sum(check_instruction({"checker": i["checker"], "args": i["args"]}, d["response"])
                   for d in docs for i in d["instructions"])
    assert m["inst_level_strict_acc"] == pytest.approx(followed / n_inst)   # micro-average over instructions
    all_followed = sum(all(check_instruction({"checker": i["checker"], "args": i["args"]}, d["response"])
                           for i in d["instructions"]) for d in docs)
    assert m["prompt_level_strict_acc"] == pytest.approx(all_followed / len(docs))
    assert m["prompt_level_strict_acc"] < 1.0 and m["inst_level_strict_acc"] < 1.0


def test_ifeval_loose_forgives_a_preamble_line():
    rec = {"checker": "starts_with", "args": {"prefix": "Indeed"}}
    response = "Sure! Here you go:\nIndeed, it is in Ostrelia."
    assert not check_instruction(rec, response)
    assert any(check_instruction(rec, v) for v in loose_variants(response))


def test_world_task_settings_are_checked():
    with pytest.raises(LmstackError, match="extra"):
        get_task("world_ifeval", extra=9)
    with pytest.raises(LmstackError, match="temperature"):
        get_task("world_qa", k=3, temperature=0.0)
    with pytest.raises(LmstackError, match="no setting"):
        get_task("world_qa", colour="red")
