"""Bring-your-own-model, bring-your-own-task: lm-eval task YAMLs scored by `lmstack eval` and by lm-eval's `hf`.

A tiny random Llama built by transformers (save_pretrained) with a `tokenizers` BPE tokenizer.json and a
tokenizer_config.json is the model; two lm-eval YAMLs over local JSONL files are the tasks:
  - byo_arc: multiple_choice over the first N ARC-Easy test items from ../shared/data (Jinja doc_to_text,
    field doc_to_choice, field doc_to_target), acc and acc_norm;
  - byo_gen: generate_until (until "\\n", max_gen_toks 8) over N synthetic items whose target is a letter
    a-e, with a regex-extract-then-take-first filter and exact_match(ignore_case).
lm-eval runs them through lm_eval.simple_evaluate(model="hf", include_path=...); we run them through
evaluate() on the YAMLs (--include_path). Written: each task's metric ours vs lm-eval's (ratio 1 = the same),
with n, stderr, the max per-item log-likelihood difference and how many items agree exactly.

Usage:
    python benchmarks/eval_yaml_parity.py [--items 100]
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
import random
import sys
import tempfile

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")

from _common import result, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from hf_tiny import build_dir, random_lines  # noqa: E402  (the tests' builder of tiny HF directories)

ARC = ROOT.parent / "shared" / "data" / "arc" / "arc_easy_test.jsonl"

MC_YAML = """task: byo_arc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: gold
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
"""
GEN_YAML = """task: byo_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{q}}}}\\nA:"
doc_to_target: "{{{{a}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 8, do_sample: false}}
metric_list: [{{metric: exact_match, ignore_case: true}}]
filter_list:
  - name: letter
    filter: [{{function: regex, regex_pattern: "([a-e])"}}, {{function: take_first}}]
"""


def build_model(path: Path, texts: list[str]) -> None:
    """A base Llama (no chat template) whose tokenizer.json prepends <s>; a wide init so the random model has
    real preferences between choices."""
    build_dir(path, "llama", style="plain", texts=texts, vocab_size=1024, bos_in_text=True,
              tokenizer_kwargs={"model_max_length": 512}, hidden_size=64, intermediate_size=128,
              max_position_embeddings=512, initializer_range=0.3)


def stderr(values: list[float]) -> float:
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100)
    args = ap.parse_args()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmstack.eval.evaluator import evaluate
    from lmstack.eval.local_lm import LocalLM
    from lmstack.eval.task_args import resolve_tasks

    n = args.items
    arc = [json.loads(x) for x in ARC.read_text().splitlines()[:n]]
    rng = random.Random(0)
    gen = [{"q": q, "a": rng.choice("abcde")} for q in random_lines(n, seed=3)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf_cache")
        build_model(tmp / "model", [r["query"] + " " + " ".join(r["choices"]) for r in arc] + random_lines())
        tasks = tmp / "tasks"
        tasks.mkdir()
        for name, rows, yaml in (("arc", arc, MC_YAML), ("gen", gen, GEN_YAML)):
            (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (tasks / f"{name}.yaml").write_text(yaml.format(data=tasks / f"{name}.jsonl"))
        theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp / 'model'},dtype=float32",
                                         tasks=["byo_arc", "byo_gen"], device="cpu", batch_size=8,
                                         task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
        ours = evaluate(LocalLM(tmp / "model", batch_size=8, device="cpu"),
                        resolve_tasks("byo_arc,byo_gen", str(tasks)), bootstrap_iters=0, progress=False,
                        out_dir=tmp / "ours")
        mine = {t: [json.loads(x) for x in (tmp / "ours" / f"samples_{t}.jsonl").read_text().splitlines()]
                for t in ("byo_arc", "byo_gen")}
    other = {t: sorted(theirs["samples"][t], key=lambda s: s["doc_id"]) for t in ("byo_arc", "byo_gen")}
    worst = max(abs(ll - float(b_ll)) for a, b in zip(mine["byo_arc"], other["byo_arc"])
                for (ll, _), (b_ll, _) in zip(a["responses"], b["filtered_resps"]))
    same_requests = sum([(r["context"], r["continuation"]) for r in a["requests"]] == [tuple(x) for x in b["arguments"]]
                        for a, b in zip(mine["byo_arc"], other["byo_arc"]))
    same_gen = sum(a["responses"][0].rstrip("\ufffd") == b["resps"][0][0].rstrip("\ufffd")
                   for a, b in zip(mine["byo_gen"], other["byo_gen"]))
    out = []
    for task, metric, key in (("byo_arc", "acc", "acc,none"), ("byo_arc", "acc_norm", "acc_norm,none"),
                              ("byo_gen", "exact_match", "exact_match,letter")):
        values = [s["metrics"][metric] for s in mine[task]]
        same_items = sum(a["metrics"][metric] == float(b[metric]) for a, b in zip(mine[task], other[task]))
        out.append(result("eval_yaml_parity", f"{task}_{metric}", True, ours["results"][task]["metrics"][metric],
                          "lm-eval simple_evaluate (hf backend), same YAML and model directory",
                          float(theirs["results"][task][key]), goal=1.0, n=len(values), stderr=stderr(values),
                          items_with_equal_metric=same_items, max_abs_loglikelihood_diff=worst,
                          items_with_equal_requests=same_requests, generations_equal_up_to_trailing_fffd=same_gen,
                          model="transformers LlamaForCausalLM d64 2 layers, random (seed 0)",
                          machine="2 cores, shared"))
    write_result("eval_yaml_parity", out)


if __name__ == "__main__":
    main()
