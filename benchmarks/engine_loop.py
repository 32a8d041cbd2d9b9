"""Engine loop overhead: 8 concurrent requests through LLMEngine, this tree against an older copy of lmstack.

The refactor of issue 18 §1 (schedule -> run -> postprocess, the Sampler, the step plan built once) must
not make the engine slower. This runs the same workload through two source trees in separate processes,
alternating them `--repeats` times so that load from other processes hits both alike, and keeps each
side's best run (the medians and the median of the per-round ratios are recorded too). Each workload is
reported as wall-clock tokens/s and as tokens per CPU-second of the worker process (its one thread):
the second hardly moves when other processes share the cores, so it is the steadier comparison here.
- greedy: 8 requests (random prompts of 16..64 tokens, 64 output tokens each, EOS ignored);
- sampled: the same with temperature 0.8, top_p 0.9, repetition_penalty 1.1 and frequency_penalty 0.2 (the
  logits processors' path), unseeded.
The model is llama-small (random weights, seed 0; ~6M parameters), small enough that the engine's Python
per step, not the matmuls, sets the pace: what a refactor of the loop changes. Greedy outputs of both
trees are compared token for token (`greedy_outputs_equal`).

The baseline tree is a copy of src/ from before the change, e.g.
    mkdir -p /tmp/before && git archive <commit> src/lmstack | tar -x -C /tmp/before

Usage:
    python benchmarks/engine_loop.py --baseline_src /tmp/before/src [--repeats 3] [--max_tokens 64]
    python benchmarks/engine_loop.py --baseline_src /tmp/before/src --ours_src /tmp/clean/src   # another tree as ours
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _common import result, write_result

SRC = Path(__file__).resolve().parents[1] / "src"
WORKLOADS = {"greedy": dict(temperature=0.0),
             "sampled": dict(temperature=0.8, top_p=0.9, repetition_penalty=1.1, frequency_penalty=0.2)}


def worker(max_tokens: int, requests: int) -> dict:
    """Runs in a subprocess whose sys.path starts with the tree under test."""
    import random  # lazy: worker-only (the parent process never runs the engine)
    import time  # lazy: worker-only

    import torch  # lazy: worker-only
    from lmstack.infer import LLMEngine, SamplingParams  # lazy: the tree under test comes from sys.path
    from lmstack.model import Transformer, preset  # lazy: as above

    torch.manual_seed(0)
    model = Transformer(preset("llama-small"))
    engine = LLMEngine(model, max_num_seqs=requests, seed=0)
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 8000) for _ in range(rng.randint(16, 64))] for _ in range(requests)]
    out = {"lmstack": str(Path(sys.modules["lmstack"].__file__).parent)}
    for name, kw in WORKLOADS.items():
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)
        for warm in (True, False):
            for i, p in enumerate(prompts):
                engine.add_request(f"{name}-{warm}-{i}", p[:8] if warm else p, params)
            start, cpu = time.perf_counter(), time.process_time()
            done = engine.run_to_completion()
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        tokens = sum(len(o.outputs[0].token_ids) for o in done)
        out[name] = {"tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu_seconds, "tokens": tokens}
        if name == "greedy":
            out["greedy_tokens"] = {o.request_id: o.outputs[0].token_ids for o in done}
    return out


def run_tree(src: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": str(args.threads)}
    code = (f"import sys; sys.path.insert(0, {src!r}); sys.path.insert(1, {str(Path(__file__).parent)!r}); "
            f"import json, engine_loop; print(json.dumps(engine_loop.worker({args.max_tokens}, {args.requests})))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the run on {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline_src", required=True, help="src/ folder of the lmstack copy to compare against")
    ap.add_argument("--ours_src", default=str(SRC), help="src/ folder of the lmstack under test (default: this one)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each tree; the best counts")
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not (Path(args.baseline_src) / "lmstack" / "infer").is_dir():
        raise SystemExit(f"--baseline_src {args.baseline_src} has no lmstack/infer package")
    runs = {"ours": [], "baseline": []}
    for _ in range(args.repeats):
        runs["ours"].append(run_tree(args.ours_src, args))
        runs["baseline"].append(run_tree(args.baseline_src, args))
    equal = runs["ours"][0]["greedy_tokens"] == runs["baseline"][0]["greedy_tokens"]
    config = dict(model="llama-small (random weights)", requests=args.requests, max_tokens=args.max_tokens,
                  repeats=args.repeats, threads=args.threads, timing="best of alternating runs",
                  baseline_src=args.baseline_src, ours_src=args.ours_src, machine="2 cores, shared",
                  greedy_outputs_equal=equal)
    results = []
    for name, unit in [(w, u) for u in ("tokens_per_s", "tokens_per_cpu_s") for w in WORKLOADS]:
        ours = [r[name][unit] for r in runs["ours"]]
        base = [r[name][unit] for r in runs["baseline"]]
        results.append(result("engine_loop", f"{unit}_{name}", True, round(max(ours), 1),
                              "engine before the change", round(max(base), 1), goal=1.0, **config,
                              all_ours=[round(x, 1) for x in ours], all_baseline=[round(x, 1) for x in base],
                              median_ours=round(statistics.median(ours), 1),
                              median_baseline=round(statistics.median(base), 1),
                              median_round_ratio=round(statistics.median(o / b for o, b in zip(ours, base)), 3)))
    write_result("engine_loop", results)
    print(f"greedy outputs equal: {equal}")


if __name__ == "__main__":
    main()
