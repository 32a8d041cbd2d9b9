"""evaluate() with scripted LMs: metrics, stderr, chance, ECE, skipped tasks, transforms, per-item logs."""
import json
import math

import pytest

from lmstack.errors import LmstackError
from lmstack.eval import metrics as M
from lmstack.eval.evaluator import evaluate
from lmstack.eval.lm import GenArgs
from lmstack.eval.task import Task, TaskDataMissing, register_task

ITEMS = [{"q": f"q{i}", "choices": ["yes", "no", "maybe"], "gold": i % 3} for i in range(12)]


@register_task("core_eval_mc")
class EvalMC(Task):
    def docs(self, split):
        return [dict(d) for d in ITEMS]

    def doc_to_text(self, doc):
        return f"{doc['q']}?"

    def doc_to_choice(self, doc):
        return doc["choices"]

    def doc_to_target(self, doc):
        return doc["gold"]


@register_task("core_eval_missing")
class Missing(EvalMC):
    def docs(self, split):
        raise TaskDataMissing("task 'core_eval_missing': data file /nowhere/x.jsonl is missing")


@register_task("core_eval_gen")
class EvalGen(Task):
    output_type = "generate_until"
    default_metrics = ("exact_match",)

    def docs(self, split):
        return [{"q": "2+2", "a": "4"}, {"q": "3+3", "a": "6"}, {"q": "1+1", "a": "2"}]

    def doc_to_text(self, doc):
        return f"Q: {doc['q']}\nA:"

    def doc_to_target(self, doc):
        return doc["a"]

    def gen_args(self, doc):
        return GenArgs(until=["\n"], max_gen_toks=8)


def _scripted_ll(correct_for):
    """Log-likelihoods that prefer choice `correct_for(q)` for question q."""
    def ll(ctx, cont):
        q = ctx.split("?")[-2].split()[-1] if "?" in ctx else ctx
        i = int(q[1:])
        want = ITEMS[i]["choices"][correct_for(i)]
        return -1.0 if cont.strip() == want else -3.0
    return ll


def test_multiple_choice_metrics_chance_and_stderr(fake_lm_factory, tmp_path):
    # Right on items 0..8, wrong (picks the next choice) on 9..11: acc = 9/12.
    lm = fake_lm_factory(loglikelihood=_scripted_ll(lambda i: i % 3 if i < 9 else (i + 1) % 3))
    out = evaluate(lm, ["core_eval_mc"], bootstrap_iters=200, progress=False, out_dir=tmp_path)
    res = out["results"]["core_eval_mc"]
    assert res["n"] == 12 and res["chance"] == pytest.approx(1 / 3)
    assert res["metrics"]["acc"] == pytest.approx(0.75)
    values = [1.0] * 9 + [0.0] * 3
    assert res["metrics"]["acc_stderr"] == pytest.approx(M.bootstrap_stderr(M.mean, values, 200, 1234))
    assert 0 < res["metrics"]["acc_stderr"] < 0.25
    # ECE: every item has softmax confidence e^-1/(e^-1 + 2e^-3) in its prediction, 75% of them right.
    conf = math.exp(-1) / (math.exp(-1) + 2 * math.exp(-3))
    assert res["metrics"]["ece"] == pytest.approx(abs(0.75 - conf), abs=1e-9)
    assert res["higher_is_better"]["acc"] is True and res["higher_is_better"]["ece"] is False
    assert len([c for c in lm.calls if c[0] == "loglikelihood"]) == 36


def test_results_and_per_item_logs_are_written(fake_lm_factory, tmp_path):
    lm = fake_lm_factory(loglikelihood=_scripted_ll(lambda i: i % 3))
    out = evaluate(lm, ["core_eval_mc", "core_eval_missing"], limit=5, progress=False, out_dir=tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["core_eval_mc"]["metrics"]["acc"] == 1.0 == out["results"]["core_eval_mc"]["metrics"]["acc"]
    assert saved["config"]["limit"] == 5 and saved["config"]["tasks"] == ["core_eval_mc", "core_eval_missing"]
    lines = [json.loads(x) for x in (tmp_path / "samples_core_eval_mc.jsonl").read_text().splitlines()]
    assert len(lines) == 5
    first = lines[0]
    assert first["doc_id"] == 0 and first["prompt"] == "q0?" and first["target"] == 0
    assert [r["continuation"] for r in first["requests"]] == [" yes", " no", " maybe"]
    assert first["responses"][0][0] == -1.0 and first["metrics"]["acc"] == 1.0
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_data_is_skipped_with_a_message_and_the_run_goes_on(fake_lm_factory, capsys):
    lm = fake_lm_factory()
    out = evaluate(lm, ["core_eval_missing", "core_eval_mc"], limit=3, progress=False)
    assert "missing" in out["results"]["core_eval_missing"]["skipped"]
    assert out["results"]["core_eval_mc"]["n"] == 3
    assert "skipping core_eval_missing" in capsys.readouterr().out


def test_generation_task_exact_match_and_stop_strings(fake_lm_factory):
    answers = {"Q: 2+2\nA:": " 4\nQ: next", "Q: 3+3\nA:": " 7", "Q: 1+1\nA:": "2"}
    lm = fake_lm_factory(generate=answers)
    out = evaluate(lm, ["core_eval_gen"], progress=False, bootstrap_iters=0)
    res = out["results"]["core_eval_gen"]
    assert res["metrics"] == {"exact_match": pytest.approx(2 / 3)}
    assert res["chance"] is None
    assert all(c[2].until == ["\n"] for c in lm.calls)


def test_fewshot_prompt_and_doc_transforms_reach_the_lm(fake_lm_factory):
    lm = fake_lm_factory()
    evaluate(lm, ["core_eval_mc"], num_fewshot=2, limit=2, progress=False, bootstrap_iters=0,
             prompt_transform=str.upper, doc_transform=lambda d: dict(d, q=d["q"] + "x"))
    ctxs = {c[1] for c in lm.calls}
    assert len(ctxs) == 2
    for ctx in ctxs:
        assert ctx == ctx.upper() and ctx.count("?") == 3            # two shots + the question
        assert ctx.endswith("X?")                                      # the transformed doc
    with pytest.raises(LmstackError, match="num_fewshot"):
        evaluate(lm, ["core_eval_mc"], num_fewshot=-1)
    with pytest.raises(LmstackError, match="limit"):
        evaluate(lm, ["core_eval_mc"], limit=0)


def test_unknown_task_fails_before_any_work(fake_lm_factory):
    lm = fake_lm_factory()
    with pytest.raises(LmstackError, match="available tasks"):
        evaluate(lm, ["core_eval_mc", "nope_task"], progress=False)
    assert lm.calls == []


def test_chat_template_needs_a_renderer(fake_lm_factory, tiny_lm):
    with pytest.raises(LmstackError, match="no chat template"):
        evaluate(fake_lm_factory(), ["core_eval_mc"], chat_template=True)
    out = evaluate(tiny_lm, ["core_eval_mc"], limit=2, chat_template=True, progress=False, bootstrap_iters=0)
    assert out["config"]["chat_template"] is True
    assert out["results"]["core_eval_mc"]["n"] == 2


def test_real_model_end_to_end_with_perf(tiny_lm, tmp_path):
    out = evaluate(tiny_lm, ["core_eval_mc"], limit=6, progress=False, bootstrap_iters=50, out_dir=tmp_path)
    res = out["results"]["core_eval_mc"]
    assert 0.0 <= res["metrics"]["acc"] <= 1.0 and "acc_norm" in res["metrics"] and "ece" in res["metrics"]
    assert res["perf"]["wall_s"] > 0
    samples = [json.loads(x) for x in (tmp_path / "samples_core_eval_mc.jsonl").read_text().splitlines()]
    again = tiny_lm.loglikelihood([(r["context"], r["continuation"]) for r in samples[0]["requests"]])
    assert [a[0] for a in again] == pytest.approx([r[0] for r in samples[0]["responses"]], abs=1e-5)
