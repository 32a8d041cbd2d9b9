"""lm-evaluation-harness as the witness of our eval scores: lm-eval builds a multiple-choice task's requests
itself, its `hf` backend scores them, and our per-item samples (samples_<task>.jsonl of `lmstack eval --out`)
must hold the same requests, greedy flags and per-item metrics.

    from lmeval_witness import compare_multiple_choice     # tests/ is on sys.path under pytest
    task = ConfigurableTask(config=...); task.build_all_requests(rank=0, world_size=1)
    worst, metrics = compare_multiple_choice(samples, task, HFLM(pretrained=model_dir, ...))
"""
from __future__ import annotations


def compare_multiple_choice(samples: list[dict], task, hflm) -> tuple[float, dict[str, list]]:
    """Assert, item by item, that each of our samples has lm-eval's (context, continuation) requests, its greedy
    flags and the metrics task.process_results gives on HFLM's answers. Returns (the largest per-request
    log-likelihood difference, lm-eval's per-item metrics by name) for the caller's tolerance and aggregates."""
    by_doc: dict = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    answers = dict(zip(map(id, task.instances), hflm.loglikelihood(task.instances, disable_tqdm=True)))
    worst, metrics = 0.0, {}
    for item in samples:
        insts = sorted(by_doc[item["doc_id"]], key=lambda i: i.idx)
        assert [(q["context"], q["continuation"]) for q in item["requests"]] == [i.arguments for i in insts]
        theirs = [answers[id(i)] for i in insts]
        for (ll, greedy), (ll_b, greedy_b) in zip(item["responses"], theirs):
            worst = max(worst, abs(ll - ll_b))
            assert greedy == greedy_b, item["doc_id"]
        for name, value in task.process_results(insts[0].doc, theirs).items():
            assert item["metrics"][name] == value, (item["doc_id"], name, item["metrics"][name], value)
            metrics.setdefault(name, []).append(value)
    assert len(by_doc) == len(samples), (len(by_doc), len(samples))  # every item lm-eval built was compared
    return worst, metrics
