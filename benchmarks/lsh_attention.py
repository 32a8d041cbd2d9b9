"""Reformer LSH attention against dense attention (torch SDPA, is_causal) at long T: time and peak memory.

B=1, H=8, D=64, causal, fp32, 1 thread. LSH uses the model defaults (lsh_n_hashes=4, lsh_chunk_size=64,
about T/64 buckets, shared-QK). Two passes per length: forward only (no_grad, inference) and
forward+backward (training). Each (kind, pass, T) runs in its own subprocess so its peak RSS growth is
isolated; repeats alternate the order and we keep the median. Ratios are SDPA / LSH (>1 = LSH cheaper).

A quality check rides along: on clustered queries (the case LSH is built for) at T=1024, the mean
absolute error of LSH against full shared-QK softmax attention, relative to the output's mean size,
for 1, 2, 4 and 8 hash rounds.

Usage:
    python benchmarks/lsh_attention.py            # a few minutes on 2 shared cores
    python benchmarks/lsh_attention.py --quick
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys

from _common import attention_worker, result, write_result

B, H, D = 1, 8, 64


def _lsh(n_hashes: int = 4):
    from lmstack.model import ModelConfig
    from lmstack.model.lsh_attention import LSHAttention

    cfg = ModelConfig(d_model=H * D, n_heads=H, attention="lsh", lsh_n_hashes=n_hashes)
    return LSHAttention(cfg).eval(), cfg


def worker(kind: str, mode: str, t: int) -> dict:
    att = _lsh()[0] if kind == "lsh" else None
    return attention_worker(lambda q, k, v: att(q, q, v, causal=True), "lsh" if att is not None else "sdpa", mode, t, B, H, D)


def quality(t: int = 1024) -> list[float]:
    import torch

    from lmstack.model.lsh_attention import SELF_SCORE

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(32, D, generator=g), dim=-1)
    # |q| = 8 sqrt(D): each query's own cluster outscores the rest by about 8 nats (sharp attention)
    q = centers[torch.randint(0, 32, (B, H, t), generator=g)] + 0.05 * torch.randn(B, H, t, D, generator=g)
    q = q * 8 * D ** 0.5
    v = torch.randn(B, H, t, D, generator=g)
    k = torch.nn.functional.normalize(q, dim=-1)
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    s = s.masked_fill(torch.eye(t, dtype=torch.bool), SELF_SCORE)
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.softmax(s, -1) @ v
    errors = []
    with torch.no_grad():
        for rounds in (1, 2, 4, 8):
            att, _ = _lsh(rounds)
            errors.append(((att(q, q, v, causal=True) - ref).abs().mean() / ref.abs().mean()).item())
    return errors


def _run(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(quick: bool = False) -> None:
    lengths = [1024, 2048] if quick else [1024, 4096, 16384]
    repeats = 2
    runs = {}
    for rep in range(repeats):
        for t in lengths:
            for mode in ("fwd", "fwd_bwd"):
                for kind in (("lsh", "sdpa") if rep % 2 == 0 else ("sdpa", "lsh")):
                    r = _run("--worker", kind, mode, str(t))
                    runs.setdefault((kind, mode, t), []).append(r)
                    print(f"rep {rep} T={t:5d} {mode:7s} {kind:4s} {r['seconds'] * 1e3:9.1f} ms  "
                          f"peak +{r['peak_mb']:8.1f} MB", flush=True)
    med = {key: {m: statistics.median(r[m] for r in rs) for m in ("seconds", "peak_mb")} for key, rs in runs.items()}
    _, cfg = _lsh()
    common = dict(B=B, H=H, D=D, mask="causal", dtype="float32", threads=1, repeats=repeats, n_hashes=cfg.lsh_n_hashes,
                  chunk=cfg.lsh_chunk_size, buckets="T/chunk", machine="2 cores, shared")
    results = []
    for t in lengths:
        for mode in ("fwd", "fwd_bwd"):
            for metric in ("seconds", "peak_mb"):
                results.append(result("lsh_attention", f"{metric}_{mode}_T{t}", False, med[("lsh", mode, t)][metric],
                                      "torch SDPA (is_causal)", med[("sdpa", mode, t)][metric], T=t, mode=mode,
                                      **common))
    errors = quality()
    print("relative error vs full attention by hash rounds 1, 2, 4, 8:", [round(e, 4) for e in errors])
    for rounds, err in zip((1, 2, 4, 8), errors):
        results.append(result("lsh_attention", f"relative_error_rounds{rounds}", False, err,
                              "1 hash round", errors[0], T=1024, H=H, D=D, clusters=32, causal=True,
                              note="mean |LSH - full shared-QK attention| / mean |full|, clustered queries"))
    write_result("lsh_attention", results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        main(quick="--quick" in sys.argv)
