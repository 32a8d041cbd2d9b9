"""Training throughput on a shared machine: lmstack's auto thread count against torch's default.

- baseline: torch's default thread count (one per core: what every stage used before `--threads 0` = auto);
- ours: lmstack.threads.auto_threads(), decided with the competitor below already running;
- the machine is shared the way the issue found it: one extra process keeps a core busy for the whole
  measurement (on top of whatever else runs here).

Each measurement is a fresh process that trains a small Transformer for a fixed wall-clock time and counts
its optimizer steps. Ours and the baseline alternate (repeats), and the medians are compared, so contention
from other users hits both alike.

Usage:
    python benchmarks/threads.py                  # ~1 min: 3 repeats x 2 settings x 8 s
    python benchmarks/threads.py --seconds 15 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _common import result, write_result


def worker(threads: int, seconds: float) -> None:
    """Train for `seconds`; print the steps done (the first step is warm-up and not counted)."""
    import torch

    from lmstack.model.config import ModelConfig
    from lmstack.model.transformer import Transformer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, max_seq_len=128))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 512, (8, 129))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    print(steps / (time.perf_counter() - start))


def measure(threads: int, seconds: float) -> float:
    out = subprocess.run([sys.executable, __file__, "--worker", str(threads), str(seconds)], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", nargs=2)
    args = p.parse_args()
    if args.worker:
        worker(int(args.worker[0]), float(args.worker[1]))
        return
    import torch

    from lmstack.threads import auto_threads, available_cores, busy_cores

    default = torch.get_num_threads()  # what torch would use: one per core
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # the other busy process
    try:
        time.sleep(2.0)
        load = busy_cores()
        ours_threads = auto_threads()
        ours, base = [], []
        for _ in range(args.repeats):  # interleaved, so contention from others hits both alike
            base.append(measure(default, args.seconds))
            ours.append(measure(ours_threads, args.seconds))
    finally:
        busy.kill()
        busy.wait()
    cfg = dict(machine="2 cores, shared", cores=available_cores(), busy_cores_sampled=round(load, 2),
               competitor="one extra busy-loop process", ours_threads=ours_threads, baseline_threads=default,
               seconds=args.seconds, repeats=args.repeats, model="d_model 128, 2 layers, batch 8 x 128 tokens",
               ours_runs=[round(v, 2) for v in ours], baseline_runs=[round(v, 2) for v in base])
    write_result("threads", [result("threads", "train_steps_per_s", True, round(statistics.median(ours), 3),
                                    f"torch default ({default} threads)", round(statistics.median(base), 3),
                                    goal=1.0, **cfg)])


if __name__ == "__main__":
    main()
