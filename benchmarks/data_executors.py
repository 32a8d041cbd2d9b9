"""Docs/s of `lmstack data run` with each executor: local (process pool) vs Ray Data, same data, same output.

Data: the small built-in world's pretraining text (train + val + test splits, three files), generated
here with seed 0. Config: the pipeline's defaults (all filters, exact + MinHash dedup, mixing,
shards with the byte-level tokenizer), workers=2 for both executors: on this 2-core machine
that is the best local setting, and Ray gets the same 2 CPUs.

Ray is measured two ways:
    ray_cold      what `lmstack data run --executor ray` costs here: ray.init of a private instance,
                  the run, ray.shutdown, all timed.
    ray_attached  what a job on an already running Ray instance costs: ray.init and shutdown untimed.
Repeats are interleaved (local, ray_cold, ray_attached, local, ...) so that load from other jobs on
the shared machine hits each alike; the median is reported, and the median of the per-repeat
ratios (config.paired_ratio_median). Every run's shards are checked to be
byte-identical to the first local run's.

Usage:
    python benchmarks/data_executors.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import result, write_result

from lmstack.config import from_dict
from lmstack.data.pipeline import PipelineConfig, run_pipeline
from lmstack.world import generate_world


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted((out / "shards").rglob("*")):
        if f.is_file():
            h.update(f.relative_to(out).as_posix().encode() + b"\0" + f.read_bytes())
    h.update((out / "clean.jsonl").read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="data_executors_"))
    world = tmp / "world"
    generate_world(world, size="small", seed=0, progress=False)
    inputs = [{"path": str(world / "pretrain" / f"{split}.jsonl")} for split in ("train", "val", "test")]

    def cfg(name: str, executor: str) -> PipelineConfig:
        return from_dict(PipelineConfig, {"inputs": inputs, "out": str(tmp / name), "workers": 2,
                                          "progress": False, "executor": executor})

    times: dict[str, list[float]] = {"local": [], "ray_cold": [], "ray_attached": []}
    load: list[float] = []  # 1-minute load average after each repeat: how busy the shared machine was
    phases: dict = {}
    n_docs, reference = 0, None
    for r in range(args.repeat):
        for mode in times:
            c = cfg(f"{mode}{r}", "local" if mode == "local" else "ray")
            if mode == "ray_attached":
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
            t0 = time.perf_counter()
            report = run_pipeline(c)
            times[mode].append(time.perf_counter() - t0)
            if mode == "ray_attached":
                ray.shutdown()
                phases = report.sections["ray"]
            n_docs = report.steps["read"].seen
            d = digest(Path(c.out))
            reference = reference or d
            if d != reference:
                sys.exit(f"{mode} run {r}: output differs from the local executor's")
            print(f"repeat {r} {mode}: {times[mode][-1]:.2f} s ({n_docs / times[mode][-1]:.0f} docs/s)", flush=True)
        load.append(round(os.getloadavg()[0], 2))

    rate = {m: n_docs / statistics.median(t) for m, t in times.items()}
    # The load from other jobs drifts over minutes; the ratio within one repeat (runs seconds apart)
    # is steadier than the ratio of medians, so both are kept.
    paired = {m: round(statistics.median(b / a for a, b in zip(times[m], times["local"])), 4)
              for m in ("ray_cold", "ray_attached")}
    common = dict(machine="2 cores, shared", data="small world pretrain train+val+test (seed 0)", docs=n_docs,
                  workers=2, repeats=args.repeat, ray_version=ray.__version__, identical_output=True,
                  seconds={m: [round(x, 2) for x in t] for m, t in times.items()}, load_avg_1min=load)
    write_result("data_executors", [
        result("data_executors", "docs_per_s_ray_cold", True, rate["ray_cold"], "local executor, workers=2",
               rate["local"], paired_ratio_median=paired["ray_cold"], **common),
        result("data_executors", "docs_per_s_ray_attached", True, rate["ray_attached"], "local executor, workers=2",
               rate["local"], paired_ratio_median=paired["ray_attached"], ray_phase_seconds=phases, **common),
    ])


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
