"""Parity with lm-evaluation-harness's `hf` backend on a tiny model exported in the HF layout.

Fast: lm-eval's HFLM in-process and our LocalLM score the same raw requests (trailing spaces, empty
context, left truncation, greedy flags, rolling windows) on the same model directory.
Slow: lm-eval's CLI on local task YAMLs (dataset_path: json, --include_path, offline) over the first 200
items of ARC-Easy and HellaSwag from ../shared/data, against our arc_easy / hellaswag tasks through
evaluate(): the same prompts, per-item log-likelihoods equal to 1e-4, identical acc and acc_norm.
"""
import glob
import json
import os
import subprocess
import sys

import pytest

N_ITEMS = 200
TOL = 1e-4


def _hflm(model_dir, **kwargs):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", **kwargs)


def test_raw_requests_match_lm_eval_hf(tiny_model_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from lmstack.eval.local_lm import LocalLM

    theirs = _hflm(tiny_model_dir, batch_size=4, max_length=16)
    ours = LocalLM(tiny_model_dir, batch_size=3, max_length=16, device="cpu")
    pairs = [("the cat sat on", " the mat"), ("the cat sat on ", "the mat"), ("", "hello world"),
             ("the cat sat on the mat and the dog ran to the park while birds sang", " in old trees"),
             ("one two", " three")]
    got_theirs = theirs.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)],
                                      disable_tqdm=True)
    with pytest.warns(UserWarning, match="truncated"):
        got_ours = ours.loglikelihood(pairs)
    for (a, ga), (b, gb) in zip(got_ours, got_theirs):
        assert a == pytest.approx(b, abs=TOL) and ga == gb
    text = "the cat sat on the mat and the dog ran to the park while birds sang in old trees near green hills"
    [r_theirs] = theirs.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    [r_ours] = ours.loglikelihood_rolling([text])
    assert r_ours == pytest.approx(r_theirs, abs=TOL)


ARC_YAML = """task: lmstack_parity_arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""

# lm-eval's own hellaswag preprocess (imported from lm-eval) on our file's fields.
HS_YAML = """task: lmstack_parity_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
process_docs: !function parity_hs_utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_choice: "choices"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

HS_UTILS = '''from lm_eval.tasks.hellaswag.utils import preprocess


def process_docs(dataset):
    def one(doc):
        return {"query": preprocess(doc["ctx"]), "choices": [preprocess(e) for e in doc["endings"]],
                "label": int(doc["label"])}
    return dataset.map(one)
'''


def _parity_model(shared_data, path):
    """A fixed tiny llama (seed 0) with a BPE tokenizer trained on the evaluated text, in the HF layout."""
    import torch

    import lmstack
    from lmstack.model.presets import preset
    from lmstack.tokenizer import train_tokenizer

    arc = [json.loads(x) for x in (shared_data / "arc/arc_easy_test.jsonl").read_text().splitlines()[:N_ITEMS]]
    hs = [json.loads(x) for x in
          (shared_data / "hellaswag/hellaswag_val_first1000.jsonl").read_text().splitlines()[:N_ITEMS]]
    texts = [r["query"] + " " + " ".join(r["choices"]) for r in arc]
    texts += [r["ctx"] + " " + " ".join(r["endings"]) for r in hs]
    tok = train_tokenizer(texts=texts, type="bpe", vocab_size=1024, special_tokens="chat", show_progress=False)
    torch.manual_seed(0)
    model = lmstack.Transformer(preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=512, init_std=0.2))
    lmstack.save_model(model.eval(), path, tokenizer=tok)
    return arc, hs


@pytest.mark.slow
def test_arc_easy_and_hellaswag_match_lm_eval_hf(shared_data, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    for f in ("arc/arc_easy_test.jsonl", "hellaswag/hellaswag_val_first1000.jsonl"):
        if not (shared_data / f).is_file():
            pytest.skip(f"{f} is not in {shared_data}")
    from lmstack.eval import LocalLM, evaluate

    model_dir = tmp_path / "model"
    arc, hs = _parity_model(shared_data, model_dir)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tmp_path / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    (tmp_path / "hs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hs))
    (tasks / "arc.yaml").write_text(ARC_YAML.format(data=tmp_path / "arc.jsonl"))
    (tasks / "hs.yaml").write_text(HS_YAML.format(data=tmp_path / "hs.jsonl"))
    (tasks / "parity_hs_utils.py").write_text(HS_UTILS)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf_cache"), PYTHONPATH=str(tasks))
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
           "--device", "cpu", "--tasks", "lmstack_parity_arc_easy,lmstack_parity_hellaswag",
           "--include_path", str(tasks), "--batch_size", "16", "--log_samples", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    monkeypatch.setenv("LMSTACK_DATA", str(shared_data))
    lm = LocalLM(model_dir, batch_size=16, device="cpu")
    ours = evaluate(lm, ["arc_easy", "hellaswag"], limit=N_ITEMS, bootstrap_iters=0, progress=False,
                    out_dir=tmp_path / "ours")
    worst = {}
    for name in ("arc_easy", "hellaswag"):
        mine = [json.loads(x) for x in (tmp_path / "ours" / f"samples_{name}.jsonl").read_text().splitlines()]
        [path] = glob.glob(str(tmp_path / "out" / "*" / f"samples_lmstack_parity_{name}_*.jsonl"))
        theirs = sorted((json.loads(x) for x in open(path)), key=lambda s: s["doc_id"])
        assert len(mine) == len(theirs) == N_ITEMS
        worst[name] = 0.0
        for a, b in zip(mine, theirs):
            args = [(v["arg_0"], v["arg_1"]) for v in b["arguments"].values()]
            assert [(r["context"], r["continuation"]) for r in a["requests"]] == args   # the same prompts
            for (ll, greedy), (ll_b, greedy_b) in zip(a["responses"], b["filtered_resps"]):
                worst[name] = max(worst[name], abs(ll - float(ll_b)))
                assert greedy == (greedy_b == "True")
            assert a["metrics"]["acc"] == b["acc"] and a["metrics"]["acc_norm"] == b["acc_norm"]
        print(f"{name}: max |ll ours - ll lm-eval| over {N_ITEMS} items = {worst[name]:.2e}")
        assert worst[name] < TOL
        agg = json.loads(open(glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))[0]).read())["results"]
        assert ours["results"][name]["metrics"]["acc"] == pytest.approx(agg[f"lmstack_parity_{name}"]["acc,none"])
        assert ours["results"][name]["metrics"]["acc_norm"] == pytest.approx(
            agg[f"lmstack_parity_{name}"]["acc_norm,none"])
