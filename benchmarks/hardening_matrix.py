"""Run the server's bad-input matrix (tests/serve/test_bad_input_matrix.py) once against live servers and
count the outcomes -> results/hardening_matrix.json.

Each case is handled when it comes back as expected (a 4xx JSON error in OpenAI's shape, or a correct 200
for valid input), the keep-alive connection still works, /health answered within the test's limit all
through it (250 ms for the heavy, large-list cases, whose median and worst over 5 runs each are also
reported against issue 15's 100 ms target; 1 s for the rest), and the engine is idle again without a
failed step. The baseline is the issue-15 campaign (109 of its 122 cases handled). Then a greedy stream
and chat run beside the engine-poisoning cases: their text must equal a lone greedy run.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/hardening_matrix.py            # ~2 min on 2 busy cores
    python benchmarks/hardening_matrix.py --only surrogate             # ids containing a substring
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import result, write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
HEAVY_REPEATS = 4  # extra runs of each heavy case, for a latency median and max over more than one sample


def tiny_model_dir(root: Path) -> Path:
    """The same tiny random llama + 300-token BPE as tests/serve/conftest.py's model_dir fixture."""
    import torch

    import lmstack
    from lmstack.model.presets import preset
    from lmstack.tokenizer import train_tokenizer
    from serve_helpers import make_text

    tok = train_tokenizer(texts=make_text(), type="bpe", vocab_size=300, special_tokens="chat", show_progress=False)
    torch.manual_seed(0)
    cfg = preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=256)
    path = root / "tiny-llama"
    lmstack.save_model(lmstack.Transformer(cfg).eval(), path, tokenizer=tok)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None, help="run only the cases whose id contains this (no JSON written)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from test_bad_input_matrix import (CASES, HEALTH_LIMIT_S, HEAVY_HEALTH_LIMIT_S, HEAVY_HEALTH_TARGET_S, POISON,
                                       ServerPool, poisoned_beside_healthy, run_case)

    cases = [c for c in CASES if args.only is None or args.only in c.id]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model_dir(Path(tmp))
        pool = ServerPool(model_dir)
        outcomes, start = [], time.perf_counter()
        heavy_reps: dict[str, list[float]] = {}
        try:
            for case in cases:
                out = run_case(pool.get(case.auth), case)
                outcomes.append(out)
                mark = "ok " if not out["problems"] else "BAD"
                print(f"{mark} {case.id:45s} {out['status']} health {out['health_worst_s']:.3f}s "
                      f"{'; '.join(out['problems'])[:150]}", flush=True)
            seconds = time.perf_counter() - start
            # One pass is one sample of a noisy machine: the heavy cases run HEAVY_REPEATS more times each
            # (round-robin), and their /health latency is reported as the median and the max of every run.
            heavy = [c for c in cases if c.heavy]
            for o in outcomes:
                if o["id"] in {c.id for c in heavy}:
                    heavy_reps[o["id"]] = [o["health_worst_s"]]
            for _ in range(HEAVY_REPEATS if args.only is None else 0):
                for case in heavy:
                    heavy_reps[case.id].append(run_case(pool.get(case.auth), case)["health_worst_s"])
        finally:
            pool.close()
        healthy = poisoned_beside_healthy(model_dir) if args.only is None else None
    handled = sum(not o["problems"] for o in outcomes)
    five = sum(o["status"] is not None and o["status"] >= 500 for o in outcomes)
    no_answer = sum(o["status"] is None for o in outcomes)
    worst = max(o["health_worst_s"] for o in outcomes)
    heavy_all = [x for reps in heavy_reps.values() for x in reps]
    failing = {o["id"]: "; ".join(o["problems"])[:200] for o in outcomes if o["problems"]}
    print(f"{handled}/{len(outcomes)} handled, {five} answered 5xx, {no_answer} unanswered, "
          f"worst /health {worst:.3f} s, {seconds:.0f} s")
    if args.only is not None:
        return
    poison_5xx = sorted(k for k, v in healthy["poison_statuses"].items() if not isinstance(v, int) or v >= 500)
    config = dict(machine="2 cores, shared", model="random llama-tiny, 300-token BPE, context 256",
                  max_num_seqs=8, health_limit_s=HEALTH_LIMIT_S, heavy_health_limit_s=HEAVY_HEALTH_LIMIT_S,
                  seconds=round(seconds, 1), load_average_1min=round(os.getloadavg()[0], 2))
    write_result("hardening_matrix", [
        result("hardening_matrix", "handled_fraction", True, handled / len(outcomes), "issue-15 campaign",
               round(109 / 122, 4), goal=1.0, cases=len(outcomes), handled=handled, server_5xx=five,
               unanswered=no_answer, failing=failing, **config),
        result("hardening_matrix", "health_worst_latency_s", False, worst, "limit", HEALTH_LIMIT_S,
               goal=HEALTH_LIMIT_S, per_case_worst={o["id"]: o["health_worst_s"] for o in outcomes
                                                    if o["health_worst_s"] > 0.1}),
        result("hardening_matrix", "heavy_health_worst_latency_s", False, max(heavy_all), "issue-15 target",
               HEAVY_HEALTH_TARGET_S, goal=HEAVY_HEALTH_TARGET_S, test_limit_s=HEAVY_HEALTH_LIMIT_S,
               runs_per_case=1 + HEAVY_REPEATS, per_case_runs=heavy_reps),
        result("hardening_matrix", "heavy_health_median_latency_s", False, statistics.median(heavy_all),
               "issue-15 target", HEAVY_HEALTH_TARGET_S, goal=HEAVY_HEALTH_TARGET_S,
               runs=len(heavy_all), over_target=sum(x > HEAVY_HEALTH_TARGET_S for x in heavy_all)),
        result("hardening_matrix", "healthy_stream_identical", True, float(healthy["stream_identical"]),
               "lone greedy run", 1.0, goal=1.0, chat_identical=healthy["chat_identical"],
               poison_cases=len(POISON), poison_5xx=poison_5xx, **config),
    ])


if __name__ == "__main__":
    main()
