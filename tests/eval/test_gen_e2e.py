"""The generative tasks end to end on the tiny random model (LocalLM + the inference engine): they run, the
numbers are well-formed, and sampled chains are reproducible with their seeds."""
from __future__ import annotations

import math

import pytest

from lmstack.eval import evaluate, get_task


def _check(entry):
    assert "skipped" not in entry, entry.get("skipped")
    for name, value in entry["metrics"].items():
        if not name.endswith("_stderr"):
            assert 0.0 <= value <= 1.0, (name, value)


def test_world_tasks_on_the_tiny_model(tiny_lm, tmp_path):
    tasks = [get_task("world_qa", max_gen_toks=8), get_task("world_arithmetic", max_gen_toks=24),
             get_task("world_ifeval", max_gen_toks=16), get_task("world_refusal", max_gen_toks=12),
             get_task("world_jailbreak", max_gen_toks=8, wrappers=("none", "base64")),
             get_task("world_toxicity", max_gen_toks=8), get_task("world_code", max_gen_toks=24, timeout_s=5.0),
             "bigbench_world_birth_country", get_task("bigbench_world_river", max_gen_toks=8)]
    out = evaluate(tiny_lm, tasks, limit=4, progress=False, bootstrap_iters=20, out_dir=tmp_path)
    for name, entry in out["results"].items():
        _check(entry)
        assert entry["n"] == 4
    assert (tmp_path / "samples_world_code.jsonl").exists()
    assert out["results"]["world_code"]["perf"]["generated_tokens"] > 0


def test_sampled_chains_are_seeded(tiny_lm):
    task = lambda: get_task("world_arithmetic", k=3, temperature=1.0, max_gen_toks=12)  # noqa: E731
    a = evaluate(tiny_lm, [task()], limit=2, progress=False, bootstrap_iters=0, out_dir=None)
    b = evaluate(tiny_lm, [task()], limit=2, progress=False, bootstrap_iters=0, out_dir=None)
    ma, mb = a["results"]["world_arithmetic"]["metrics"], b["results"]["world_arithmetic"]["metrics"]
    assert set(ma) >= {"maj@3", "agreement"}
    assert ma == mb or all(math.isclose(ma[k], mb[k]) for k in ma)


def test_sampled_generations_differ_by_seed_and_repeat_with_it(tiny_lm):
    from lmstack.eval.lm import GenArgs

    reqs = [("Question: Where was Ada born?\nAnswer:", GenArgs(max_gen_toks=10, temperature=1.0, seed=s))
            for s in (0, 1, 2, 0)]
    outs = tiny_lm.generate_until(reqs)
    assert outs[0] == outs[3]
    assert len(set(outs[:3])) > 1


@pytest.mark.slow
def test_gsm8k_and_humaneval_on_the_tiny_model(tiny_lm):
    out = evaluate(tiny_lm, [get_task("gsm8k", max_gen_toks=32), get_task("humaneval", max_gen_toks=32)],
                   limit=5, progress=False, bootstrap_iters=0)
    for entry in out["results"].values():
        if "skipped" not in entry:
            _check(entry)
