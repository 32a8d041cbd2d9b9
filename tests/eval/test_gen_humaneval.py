"""HumanEval-format code tasks: stop strings, sandboxed tests, unbiased pass@k; the real file when present."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lmstack.world import World
from lmstack.eval import evaluate, get_task
from lmstack.eval import metrics as M
from lmstack.eval.tasks.humaneval import STOP_STRINGS, program_for, read_problems

HUMANEVAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz"


def _solutions(docs):
    return {d["prompt"]: d["canonical_solution"] for d in docs}


def _answer_from(table, default="    return None\n"):
    def gen(ctx, args):
        for prompt, body in table.items():
            if ctx.endswith(prompt):
                return body
        return default
    return gen


def test_world_code_canonical_solutions_pass_and_wrong_ones_fail(fake_lm_factory):
    docs = World(seed=0, size="small").corpus("code", split="test")
    good = evaluate(fake_lm_factory(generate=_answer_from(_solutions(docs))), ["world_code"], progress=False,
                    bootstrap_iters=0)
    assert good["results"]["world_code"]["metrics"]["pass@1"] == 1.0
    assert good["results"]["world_code"]["n"] == len(docs)
    bad = evaluate(fake_lm_factory(generate=lambda c, a: "    return None\n"), ["world_code"], limit=3,
                   progress=False, bootstrap_iters=0)
    assert bad["results"]["world_code"]["metrics"]["pass@1"] == 0.0


def test_requests_use_stop_strings_and_sampling_seeds(fake_lm_factory):
    lm = fake_lm_factory(generate=lambda c, a: "    return None\n")
    task = get_task("world_code", n=3, ks=(1, 2), temperature=0.8)
    evaluate(lm, [task], limit=1, progress=False, bootstrap_iters=0)
    args = [call[2] for call in lm.calls]
    assert len(args) == 3 and all(list(STOP_STRINGS) == a.until for a in args)
    assert len({a.seed for a in args}) == 3 and all(a.temperature == 0.8 for a in args)


def test_pass_at_k_counts_passing_samples(fake_lm_factory):
    doc = World(seed=0, size="small").corpus("code", split="test")[0]

    calls = []

    def gen(ctx, args):  # the first two samples are right, the other two wrong: c = 2 of n = 4
        calls.append(args.seed)
        return doc["canonical_solution"] if len(calls) <= 2 else "    return None\n"

    task = get_task("world_code", n=4, ks=(1, 2, 10))
    out = evaluate(fake_lm_factory(generate=gen), [task], limit=1, progress=False, bootstrap_iters=0)
    metrics = out["results"]["world_code"]["metrics"]
    assert metrics["pass@1"] == pytest.approx(0.5)
    assert metrics["pass@2"] == pytest.approx(M.pass_at_k(4, 2, 2)) == pytest.approx(1 - 1 / 6)
    assert "pass@10" not in metrics  # k > n is not reported


def test_hanging_completion_is_a_timeout_failure(fake_lm_factory):
    task = get_task("world_code", timeout_s=1.0)
    out = evaluate(fake_lm_factory(generate=lambda c, a: "    while True:\n        pass\n"), [task], limit=2,
                   progress=False, bootstrap_iters=0)
    metrics = out["results"]["world_code"]["metrics"]
    assert metrics["pass@1"] == 0.0 and metrics["timeout_rate"] == 1.0


def test_bad_settings_are_errors():
    from lmstack.errors import LmstackError

    with pytest.raises(LmstackError, match="n must be"):
        get_task("humaneval", n=0)
    with pytest.raises(LmstackError, match="temperature"):
        get_task("humaneval", n=5, temperature=0.0)


def test_missing_file_skips_the_task(fake_lm_factory, tmp_path):
    out = evaluate(fake_lm_factory(), [get_task("humaneval", path=str(tmp_path / "none.jsonl.gz"))], progress=False)
    assert "missing" in out["results"]["humaneval"]["skipped"]


def test_read_problems_reads_gzip_and_rejects_bad_records(tmp_path):
    rec = {"task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
           "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    assert read_problems(path) == [rec]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "T/1"}) + "\n")
    from lmstack.errors import LmstackError

    with pytest.raises(LmstackError, match="bad.jsonl:1"):
        read_problems(bad)
    assert "check(f)" in program_for(rec, rec["canonical_solution"])


def _real_problems(n=None):
    if not HUMANEVAL.exists():
        pytest.skip("HumanEval data not present")
    return read_problems(HUMANEVAL)[:n]


def test_real_humaneval_canonical_solutions_pass(fake_lm_factory, monkeypatch):
    docs = _real_problems(6)
    out = evaluate(fake_lm_factory(generate=_answer_from(_solutions(docs))),
                   [get_task("humaneval", path=str(HUMANEVAL))], limit=6, progress=False, bootstrap_iters=0)
    assert out["results"]["humaneval"]["metrics"]["pass@1"] == 1.0


@pytest.mark.slow
def test_all_real_humaneval_canonical_solutions_pass(fake_lm_factory):
    docs = _real_problems()
    assert len(docs) == 164
    out = evaluate(fake_lm_factory(generate=_answer_from(_solutions(docs))),
                   [get_task("humaneval", path=str(HUMANEVAL))], progress=False, bootstrap_iters=0)
    assert out["results"]["humaneval"]["metrics"]["pass@1"] == 1.0
