"""lm-evaluation-harness's `local-completions` model runs a loglikelihood task against the live server.

The task is a local YAML over a JSONL written here (dataset_path: json), fully offline. lm-eval tokenizes
either through the server (its remote backend: /tokenizer_info + /tokenize) or with `transformers` on the
model directory; requests carry token ids, and every loglikelihood lm-eval reports is checked against the
model computed directly.
"""
import json
from pathlib import Path
import tomllib

import pytest
import torch

import lmstack

QUESTIONS = [
    ("the cat sat on the", ["mat", "sky", "dog"], 0),
    ("birds sang in old", ["trees", "one", "hello"], 0),
    ("one two three", ["four", "cat", "park"], 0),
    ("the dog ran to the", ["park", "yes", "nine"], 0),
    ("people walk each", ["day", "blue", "seven"], 0),
    ("hello", ["world", "mat", "no"], 0),
]

TASK_YAML = """task: lmstack_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

# lm-eval's api extra (lm_eval/models/api_models.py checks these four), which pyproject's `lmeval` extra pulls in.
API_EXTRA = ("aiohttp", "tqdm", "tenacity", "requests")
INSTALL_API_EXTRA = "pip install 'lmstack[lmeval]'"


def test_the_lmeval_extra_is_declared_and_documented_where_local_completions_is():
    root = Path(__file__).resolve().parents[2]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.replace(" ", "").startswith("lm-eval[api]") for req in extras["lmeval"])
    readme = (root / "README.md").read_text()
    around = readme[readme.index("`local-completions`") - 200:readme.index("`local-completions`") + 300]
    assert INSTALL_API_EXTRA in around and "lm-eval[api]" in around


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["remote", "huggingface"])
def test_lm_eval_local_completions_loglikelihood(server, model_dir, tmp_path, monkeypatch, backend):
    """remote: lm-eval tokenizes through the server; huggingface: through `transformers` on the model dir."""
    lm_eval = pytest.importorskip("lm_eval")
    for package in API_EXTRA:  # what lm-eval's api extra adds; without them local-completions cannot start
        pytest.importorskip(package, reason=f"lm-eval's local-completions needs {package}: {INSTALL_API_EXTRA}")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    data = tmp_path / "tiny_choice.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_choice.yaml").write_text(TASK_YAML.format(data=data))

    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(f"base_url={server.url}/v1/completions,model=tiny-llama,tokenizer_backend={backend},"
                    "tokenized_requests=True,max_length=256,num_concurrent=1,max_retries=1"
                    + (f",tokenizer={model_dir}" if backend == "huggingface" else "")),
        tasks=["lmstack_tiny_choice"], task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True, limit=None, bootstrap_iters=0)
    acc = out["results"]["lmstack_tiny_choice"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    samples = out["samples"]["lmstack_tiny_choice"]
    assert len(samples) == len(QUESTIONS)

    # The loglikelihoods lm-eval got from the server equal the model's, token for token.
    tok = lmstack.load_tokenizer(model_dir)
    model = lmstack.load_model(model_dir).eval()
    predicted = []
    for s in samples:
        doc = s["doc"]
        context = f"Q: {doc['question']}\nA:"
        lls = []
        for choice, resp in zip(doc["choices"], s["resps"]):
            whole = tok.encode(context + " " + choice)
            ctx = tok.encode(context)
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = model(torch.tensor([whole])).log_softmax(-1)[0]
            ll = sum(float(logp[len(ctx) + k - 1, t]) for k, t in enumerate(cont))
            served_ll, _ = resp[0]
            assert served_ll == pytest.approx(ll, abs=1e-3)
            lls.append(ll)
        predicted.append(int(max(range(len(lls)), key=lls.__getitem__) == doc["label"]))
    assert acc == pytest.approx(sum(predicted) / len(predicted))
