"""Routing Transformer attention (model/routing_attention.py) against full causal attention (torch SDPA, the path
a softmax model runs): cost at long T, and quality at equal training steps on a recall task (copy).

Cost: B=1, H=8, D=64, causal, fp32, 1 thread; routing with 16 clusters and a window of w=128 keys per query
(routing_window=128), no local heads. Two passes per length: forward only (no_grad) and forward+backward. Each
(kind, pass, T) runs in its own subprocess so its peak RSS growth is isolated; repeats alternate the order and
the median is kept. Ratios are SDPA / routing (> 1 = routing cheaper).

Quality: copy, a recall task where attention must find content far away. Each sequence is 64 random tokens
(vocabulary 64) followed by the same 64 again; only the second half's next tokens are scored, and each needs
the token after the previous occurrence of the current one, 64 positions back. The routing model has 8
clusters, so w = 16: its 2 local heads see 16 keys, 2 layers of them reach 32 positions, and anything above
chance must come through the 2 routing heads. Tiny models (2 layers, 4 heads, d_model 64) with the same init,
the same batches and the same number of steps (400, batch 16, 3 seeds): full attention (SDPA), routing
attention with the paper's centroid decay 0.999 (the default) and with 0.9 (faster k-means), and a sliding
window of 16 keys (what the local heads alone can do). Accuracy on held-out
sequences; n = scored answers, stderr over sequences (answers in one sequence are not independent).

Usage:
    python benchmarks/routing_attention.py            # about 5 min on 2 idle cores
    python benchmarks/routing_attention.py --quick
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _common import attention_worker, result, write_result

from lmstack.model import ModelConfig, Transformer
from lmstack.model.routing_attention import RoutingAttention

B, H, D = 1, 8, 64
N_CLUSTERS, WINDOW = 16, 128


def _routing(h: int = H) -> RoutingAttention:
    cfg = ModelConfig(d_model=h * D, n_heads=h, attention="routing", routing_n_clusters=N_CLUSTERS,
                      routing_window=WINDOW)
    return RoutingAttention(cfg).eval()


def worker(kind: str, mode: str, t: int) -> dict:
    att = _routing() if kind == "routing" else None
    return attention_worker(lambda q, k, v: att(q, k, v, causal=True), "routing" if att is not None else "sdpa", mode, t, B, H, D)


def _run(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cost(lengths: list[int], repeats: int = 2) -> list[dict]:
    runs = {}
    for rep in range(repeats):
        for t in lengths:
            for mode in ("fwd", "fwd_bwd"):
                for kind in (("routing", "sdpa") if rep % 2 == 0 else ("sdpa", "routing")):
                    r = _run("--worker", kind, mode, str(t))
                    runs.setdefault((kind, mode, t), []).append(r)
                    print(f"rep {rep} T={t:5d} {mode:7s} {kind:7s} {r['seconds'] * 1e3:9.1f} ms  "
                          f"peak +{r['peak_mb']:8.1f} MB", flush=True)
    med = {key: {m: statistics.median(r[m] for r in rs) for m in ("seconds", "peak_mb")} for key, rs in runs.items()}
    common = dict(B=B, H=H, D=D, mask="causal", dtype="float32", threads=1, repeats=repeats, n_clusters=N_CLUSTERS,
                  window=WINDOW, local_heads=0, machine="2 cores, shared")
    out = []
    for t in lengths:
        for mode in ("fwd", "fwd_bwd"):
            for metric in ("seconds", "peak_mb"):
                ours, base = med[("routing", mode, t)][metric], med[("sdpa", mode, t)][metric]
                out.append(result("routing_attention", f"{metric}_{mode}_T{t}", False, ours, "torch SDPA (is_causal)",
                                  base, T=t, mode=mode, **common))
    return out


# ---- quality: copy (associative recall of the token HALF positions back) ------------------------------------
VOCAB, HALF, BATCH, CLUSTERS_Q, LOCAL_Q = 64, 64, 16, 8, 2
FAST_DECAY = 0.9  # the paper's 0.999 moves centroids slowly; in a 400-step run a faster average helps


def copy_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of 2*HALF tokens whose second half repeats the first; the targets are the second half's next
    tokens (the first half's are -100: random). Each answer sits HALF positions back, found by its content."""
    first = torch.randint(0, VOCAB, (n, HALF), generator=gen)
    full = torch.cat([first, first], dim=1)
    targets = full[:, 1:].clone()
    targets[:, :HALF - 1] = -100
    return full[:, :-1], targets


def train_copy(arm: str, steps: int, seed: int, eval_rows: int) -> dict:
    torch.set_num_threads(1)
    routing = dict(attention="routing", routing_n_clusters=CLUSTERS_Q, routing_local_heads=LOCAL_Q)
    extra = {"full": {}, "routing": routing, "routing_fast_kmeans": dict(routing, routing_ema_decay=FAST_DECAY),
             "window": dict(sliding_window=2 * HALF // CLUSTERS_Q)}[arm]
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=2 * HALF,
                                    **extra))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1000 + seed)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        ids, targets = copy_batch(BATCH, gen)
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        ids, targets = copy_batch(eval_rows, torch.Generator().manual_seed(10_000 + seed))
        hit = (model(ids).argmax(-1) == targets).float()
        scored = targets != -100
        per_row = (hit * scored).sum(1) / scored.sum(1)
    return {"per_row": per_row.tolist(), "answers": int(scored.sum()), "train_seconds": seconds}


def quality(steps: int, seeds: int, eval_rows: int) -> list[dict]:
    arms = {}
    for arm in ("full", "routing", "routing_fast_kmeans", "window"):
        rows, answers, secs = [], 0, 0.0
        for seed in range(seeds):
            r = train_copy(arm, steps, seed, eval_rows)
            rows += r["per_row"]
            answers += r["answers"]
            secs += r["train_seconds"]
        acc = statistics.fmean(rows)
        stderr = statistics.stdev(rows) / math.sqrt(len(rows))
        arms[arm] = dict(acc=acc, stderr=stderr, n=answers, sequences=len(rows), train_seconds=secs)
        print(f"copy {arm:19s} accuracy {acc:.3f} ± {stderr:.3f} (n={answers} answers, {len(rows)} sequences) "
              f"train {secs:.1f}s", flush=True)
    w = 2 * HALF // CLUSTERS_Q
    common = dict(task="copy: second half repeats the first", T=2 * HALF - 1, distance=HALF, vocab=VOCAB,
                  steps=steps, seeds=seeds, batch=BATCH, d_model=64, n_layers=2, n_heads=4, lr=3e-3,
                  n_clusters=CLUSTERS_Q, window=w, local_heads=LOCAL_Q, chance=1 / VOCAB,
                  stderr_note="stderr of the mean over held-out sequences")
    full, rout, fast, win = arms["full"], arms["routing"], arms["routing_fast_kmeans"], arms["window"]
    out = [result("routing_attention", "copy_accuracy", True, rout["acc"], "full attention (SDPA)", full["acc"],
                  ours_stderr=rout["stderr"], baseline_stderr=full["stderr"], n=rout["n"], ema_decay=0.999,
                  **common),
           result("routing_attention", "copy_accuracy_fast_kmeans", True, fast["acc"], "full attention (SDPA)",
                  full["acc"], ours_stderr=fast["stderr"], baseline_stderr=full["stderr"], n=fast["n"],
                  ema_decay=FAST_DECAY, **common),
           result("routing_attention", "copy_accuracy_vs_window", True, rout["acc"],
                  f"sliding window of {w} keys (the local heads alone)", win["acc"], ours_stderr=rout["stderr"],
                  baseline_stderr=win["stderr"], n=rout["n"], ema_decay=0.999, **common),
           result("routing_attention", "copy_train_seconds", False, rout["train_seconds"], "full attention (SDPA)",
                  full["train_seconds"], ema_decay=0.999, **common)]
    return out


def main(quick: bool = False) -> None:
    lengths = [1024, 2048] if quick else [1024, 2048, 4096, 8192]
    results = cost(lengths, repeats=1 if quick else 2)
    results += quality(steps=100 if quick else 400, seeds=1 if quick else 3, eval_rows=32 if quick else 128)
    write_result("routing_attention", results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        main(quick="--quick" in sys.argv)
