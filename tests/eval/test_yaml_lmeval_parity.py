"""lm-eval task YAMLs scored by our harness and by lm-evaluation-harness's `hf` backend agree.

One tiny random transformers Llama (save_pretrained) with a `tokenizers` BPE tokenizer.json and a
tokenizer_config.json; two custom YAML tasks over local JSONL files: a multiple_choice task (Jinja
doc_to_text, a field doc_to_choice) and a generate_until task with a regex-extract-then-take-first filter
and exact_match(ignore_case). Both harnesses load the same directory and the same YAML files.

Fast: lm-eval's own ConfigurableTask (built from our YAML) and HFLM in-process: the same requests, per-item
log-likelihoods within 1e-4, the same greedy flags, generations, filtered answers and per-item metrics.
Slow: lm_eval.simple_evaluate(model="hf", include_path=...) end to end against `lmstack eval`.
"""
import json
from pathlib import Path
import random

import pytest

import hf_tiny
from lmeval_witness import compare_multiple_choice

TOL = 1e-4
N = 20


def _mc_yaml(data: Path) -> str:
    return f"""task: byo_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: options
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def _gen_yaml(data: Path) -> str:
    return f"""task: byo_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{q}}}}\\nA:"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
filter_list:
  - name: letter
    filter:
      - function: regex
        regex_pattern: "([a-e])"
      - function: take_first
"""


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    """(model dir, task dir): a transformers-built Llama + BPE tokenizer, and the two task YAMLs."""
    root = tmp_path_factory.mktemp("byo")
    model_dir, task_dir = root / "model", root / "tasks"
    task_dir.mkdir()
    # A base model (no chat template) whose tokenizer.json prepends <s>; a wide init so the random model has
    # real preferences between choices.
    hf_tiny.build_dir(model_dir, "llama", style="plain", texts=hf_tiny.random_lines(), vocab_size=300,
                      bos_in_text=True, tokenizer_kwargs={"model_max_length": 128}, max_position_embeddings=128,
                      initializer_range=0.3)

    rng = random.Random(0)
    lines = hf_tiny.random_lines(2 * N, seed=3)
    mc = [{"question": q, "options": [rng.choice(lines)[:20] for _ in range(3)], "label": rng.randrange(3)}
          for q in lines[:N]]
    gen = [{"q": q, "a": rng.choice("abcde")} for q in lines[N:]]
    (task_dir / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (task_dir / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (task_dir / "mc.yaml").write_text(_mc_yaml(task_dir / "mc.jsonl"))
    (task_dir / "gen.yaml").write_text(_gen_yaml(task_dir / "gen.jsonl"))
    return model_dir, task_dir


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _ours(model_dir, task_dir, out):
    from lmstack.eval.evaluator import evaluate
    from lmstack.eval.local_lm import LocalLM
    from lmstack.eval.task_args import resolve_tasks

    tasks = resolve_tasks("byo_mc,byo_gen", str(task_dir))
    result = evaluate(LocalLM(model_dir, batch_size=4, device="cpu"), tasks, bootstrap_iters=0, progress=False,
                      out_dir=out)
    samples = {name: [json.loads(x) for x in (out / f"samples_{name}.jsonl").read_text().splitlines()]
               for name in ("byo_mc", "byo_gen")}
    return result["results"], samples, {t.name: t for t in tasks}


def _same_text(ours: str, theirs: str) -> bool:
    """Equal, but for U+FFFD at the end: when max_gen_toks cuts a multi-byte character, HF decodes the partial
    bytes as U+FFFD while our engine's incremental detokenizer holds them back."""
    return ours.rstrip("\ufffd") == theirs.rstrip("\ufffd")


def test_yaml_tasks_match_lm_eval_task_and_hflm_in_process(byo, offline, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks._yaml_loader import load_yaml

    model_dir, task_dir = byo
    results, samples, tasks = _ours(model_dir, task_dir, tmp_path / "ours")
    hf = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4)

    # multiple choice: lm-eval builds its own requests from the same YAML
    theirs = ConfigurableTask(config=load_yaml(task_dir / "mc.yaml", resolve_func=False))
    theirs.build_all_requests(rank=0, world_size=1)
    worst, metrics = compare_multiple_choice(samples["byo_mc"], theirs, hf)
    acc = metrics["acc"]
    assert worst < TOL, worst
    assert results["byo_mc"]["metrics"]["acc"] == pytest.approx(sum(acc) / len(acc))

    # generate_until + regex filter: lm-eval's generations, filters and exact_match per item
    theirs = ConfigurableTask(config=load_yaml(task_dir / "gen.yaml", resolve_func=False))
    theirs.build_all_requests(rank=0, world_size=1)
    outs = hf.generate_until(theirs.instances, disable_tqdm=True)
    for inst, text in zip(theirs.instances, outs):
        inst.resps.append(text)
    theirs.apply_filters()
    task, em = tasks["byo_gen"], []
    for mine, inst in zip(samples["byo_gen"], sorted(theirs.instances, key=lambda i: i.doc_id)):
        assert mine["requests"][0]["context"] == inst.arguments[0]
        assert _same_text(mine["responses"][0], inst.resps[0]), (mine["responses"][0], inst.resps[0])
        assert task._filter(task.filters[0][1], mine["responses"][0]) == inst.filtered_resps["letter"]
        m = theirs.process_results(inst.doc, [inst.filtered_resps["letter"]])
        assert mine["metrics"]["exact_match"] == m["exact_match"]
        em.append(m["exact_match"])
    assert results["byo_gen"]["metrics"]["exact_match"] == pytest.approx(sum(em) / len(em))
    assert 0 < sum(em) < len(em)   # the check saw both hits and misses


@pytest.mark.slow
def test_yaml_tasks_match_lm_eval_simple_evaluate(byo, offline, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_dir, task_dir = byo
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32",
                                  tasks=["byo_mc", "byo_gen"], task_manager=TaskManager(include_path=str(task_dir)),
                                  device="cpu", batch_size=4, log_samples=True)
    results, samples, _ = _ours(model_dir, task_dir, tmp_path / "ours")
    worst = 0.0
    for mine, b in zip(samples["byo_mc"], sorted(res["samples"]["byo_mc"], key=lambda s: s["doc_id"])):
        assert [(r["context"], r["continuation"]) for r in mine["requests"]] == [tuple(a) for a in b["arguments"]]
        for (ll, greedy), (ll_b, greedy_b) in zip(mine["responses"], b["filtered_resps"]):
            worst = max(worst, abs(ll - float(ll_b)))
            assert greedy == bool(greedy_b)
        assert mine["metrics"]["acc"] == b["acc"] and mine["metrics"]["acc_norm"] == b["acc_norm"]
    assert worst < TOL
    for mine, b in zip(samples["byo_gen"], sorted(res["samples"]["byo_gen"], key=lambda s: s["doc_id"])):
        assert _same_text(mine["responses"][0], b["resps"][0][0])
        assert mine["metrics"]["exact_match"] == b["exact_match"]
    agg = res["results"]
    assert results["byo_mc"]["metrics"]["acc"] == pytest.approx(agg["byo_mc"]["acc,none"])
    assert results["byo_mc"]["metrics"]["acc_norm"] == pytest.approx(agg["byo_mc"]["acc_norm,none"])
    assert results["byo_gen"]["metrics"]["exact_match"] == pytest.approx(float(agg["byo_gen"]["exact_match,letter"]))


FEWSHOT_YAMLS = {
    # shots written in the YAML, with their own target field and delimiters
    "fs_samples": """task: fs_samples
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
description: "Answer with a letter.\\n\\n"
doc_to_text: "Q: {{{{q}}}}\\nA:"
doc_to_target: "{{{{a}}}}"
target_delimiter: " "
fewshot_config:
  sampler: first_n
  samples:
    - {{q: "one two", a: "b", why: "because b"}}
    - {{q: "three", a: "c", why: "because c"}}
  doc_to_target: "{{{{why}}}}"
  fewshot_delimiter: "\\n###\\n"
""",
    # shots from a training split, first_n, multiple choice with an index target
    "fs_split": """task: fs_split
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}, train: {data}}}}}
test_split: test
training_split: train
fewshot_split: train
output_type: multiple_choice
doc_to_text: "{{{{q}}}}?"
doc_to_choice: ["a", "b", "c", "d", "e"]
doc_to_target: "{{{{['a', 'b', 'c', 'd', 'e'].index(a)}}}}"
fewshot_delimiter: "\\n"
fewshot_config: {{sampler: first_n}}
""",
}


def test_fewshot_prompts_match_lm_eval(byo, offline, tmp_path):
    """fewshot_config (first_n, inline samples, per-shot doc_to_target and delimiters) and a training split as
    the shot pool give lm-eval's exact prompts."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    from lmstack.eval.task_args import resolve_tasks

    _, task_dir = byo
    d = tmp_path / "fs"
    d.mkdir()
    for name, text in FEWSHOT_YAMLS.items():
        (d / f"{name}.yaml").write_text(text.format(data=task_dir / "gen.jsonl"))
    for name in FEWSHOT_YAMLS:
        [ours] = resolve_tasks(name, str(d))
        theirs = ConfigurableTask(config=load_yaml(d / f"{name}.yaml", resolve_func=False))
        docs = ours.cached_docs(ours.eval_split)
        for i, doc in enumerate(list(theirs.test_docs())[:5]):
            assert dict(doc) == docs[i]
            assert ours.fewshot_context(docs[i], 2) == theirs.fewshot_context(doc, 2), name
