"""FlashAttention-2 backward: forward+backward peak memory and time against naive attention and SDPA.

Part 1, T = 512 ... 8192 (B=1, H=8, D=64, causal, fp32, 1 thread): one forward and one backward of
  - blockwise: our FlashAttention-2 (flash_attention.py: tiled forward, own tiled backward),
  - naive: T×T scores under autograd (the reference),
  - sdpa: torch's scaled_dot_product_attention with is_causal=True, the default backend and the path a
    user really runs (on CPU it dispatches to torch's own flash kernel, forward and backward).
  Each (backend, T) runs in its own subprocess so its peak RSS growth is isolated; repeats alternate
  the backends so machine contention hits all alike, and we keep the median. Naive at T=8192 is not run
  (it needs several GiB); its saved bytes there are given by arithmetic, checked against counted bytes
  (saved-tensor hooks) at small T.
Part 2, one training step (forward, backward, AdamW) of a 1-layer d256 model (16 heads of 16) at T=16384 with the
  blockwise backend: measured peak RSS and time, beside naive's saved bytes at that length by
  arithmetic (more than 24 GiB, so it does not fit where blockwise does).

Ratios: baseline / ours for time and memory (>1 = blockwise is cheaper).

Usage:
    python benchmarks/flash_backward.py            # about 5 minutes on 2 shared cores
    python benchmarks/flash_backward.py --quick    # T up to 1024, training step at T=4096
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from _common import peak_and_seconds, peak_rss_mb, reset_peak_rss, result, rss_mb, write_result

B, H, D, BLOCK = 1, 8, 64, 128
GIB = 2 ** 30


def _attention_fn(kind: str):
    from lmstack.model.backends import naive_attention, sdpa_attention
    from lmstack.model.flash_attention import flash_attention

    if kind == "blockwise":
        return lambda q, k, v, m: flash_attention(q, k, v, m, D ** -0.5, block_q=BLOCK, block_k=BLOCK)
    if kind == "naive":
        return lambda q, k, v, m: naive_attention(q, k, v, m, D ** -0.5)
    return lambda q, k, v, m: sdpa_attention(q, k, v, m, D ** -0.5)  # plain causal -> is_causal=True


def worker(kind: str, t: int) -> dict:
    import torch

    from lmstack.model.masks import AttentionMask

    torch.set_num_threads(1)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, t, D, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, t, D)
    mask = AttentionMask(q_pos=torch.arange(t), k_pos=torch.arange(t), causal=True)
    fn = _attention_fn(kind)

    def step():
        for x in (q, k, v):
            x.grad = None
        fn(q, k, v, mask).backward(dout)

    return peak_and_seconds(step)


def naive_saved_bytes_counted(t: int, h: int) -> int:
    """Bytes naive attention's autograd graph keeps, counted with saved-tensor hooks (one distinct storage once)."""
    import torch

    from lmstack.model.backends import naive_attention
    from lmstack.model.masks import AttentionMask

    q, k, v = (torch.randn(1, h, t, D, requires_grad=True) for _ in range(3))
    seen = {}

    def pack(x):
        seen[(x.data_ptr(), tuple(x.shape))] = x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        naive_attention(q, k, v, AttentionMask(q_pos=torch.arange(t), k_pos=torch.arange(t)), D ** -0.5)
    return sum(seen.values())


def naive_saved_bytes_formula(t: int, h: int) -> int:
    """arithmetic: two fp32 T×T tensors per head (softmax output, and its NaN-cleaned copy that the P·V matmul
    keeps) plus one bool T×T mask, plus q, k, v (T×D each)."""
    return h * t * t * (4 + 4) + t * t + 3 * h * t * D * 4


TRAIN_HEADS = 16  # d_model 256 in 16 heads of 16: many heads make naive's T×T tensors large at a length we can run


def train_worker(t: int) -> dict:
    import torch

    from lmstack.model import ModelConfig, Transformer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=256, n_heads=TRAIN_HEADS, n_layers=1, vocab_size=256, max_seq_len=t,
                      attn_backend="blockwise", attn_block_size=256)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (1, t + 1))
    reset_peak_rss()
    base = rss_mb()
    start = time.perf_counter()
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": peak_rss_mb() - base, "loss": loss.item(), "n_heads": cfg.n_heads}


def _run(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(quick: bool = False) -> None:
    lengths = [512, 1024] if quick else [512, 1024, 2048, 4096, 8192]
    repeats = 2 if quick else 3
    kinds = ("blockwise", "sdpa", "naive")
    runs = {}
    for rep in range(repeats):
        order = kinds if rep % 2 == 0 else kinds[::-1]  # alternate who goes first
        for t in lengths:
            for kind in order:
                if kind == "naive" and t > 4096:
                    continue
                r = _run("--worker", kind, str(t))
                runs.setdefault((kind, t), []).append(r)
                print(f"rep {rep} T={t:5d} {kind:9s} {r['seconds'] * 1e3:9.1f} ms  peak +{r['peak_mb']:8.1f} MB",
                      flush=True)
    med = {key: {m: statistics.median(r[m] for r in rs) for m in ("seconds", "peak_mb")} for key, rs in runs.items()}
    common = dict(B=B, H=H, D=D, block=BLOCK, mask="causal", dtype="float32", threads=1, repeats=repeats,
                  pass_="forward+backward", machine="2 cores, shared")
    results = []
    for t in lengths:
        ours = med[("blockwise", t)]
        for base in ("naive", "sdpa"):
            if (base, t) not in med:
                continue
            for metric in ("peak_mb", "seconds"):
                results.append(result("flash_backward", f"{metric}_blockwise_vs_{base}_T{t}", False, ours[metric],
                                      f"{base} attention" if base == "naive" else "torch SDPA (is_causal)",
                                      med[(base, t)][metric], T=t, **common))
    # naive's saved bytes: formula checked against the count at small T, then extrapolated (arithmetic)
    for t in (256, 512):
        counted, formula = naive_saved_bytes_counted(t, H), naive_saved_bytes_formula(t, H)
        print(f"naive saved bytes T={t}: counted {counted}, formula {formula}")
        results.append(result("flash_backward", f"naive_saved_bytes_counted_T{t}", False, formula, "hook count",
                               counted, T=t, H=H, D=D, note="ratio 1.0 means the formula matches the count"))
    t_big = max(lengths) * 2 if quick else 8192
    results.append(result("flash_backward", f"naive_saved_gib_arithmetic_T{t_big}", False,
                          naive_saved_bytes_formula(t_big, H) / GIB, "24 GiB", 24.0, T=t_big, H=H, D=D,
                          note="arithmetic: naive_saved_bytes_formula, not run"))
    # Part 2: a training step where naive cannot fit in 24 GiB
    t_train = 2048 if quick else 16384
    tr = _run("--train", str(t_train))
    naive_gib = naive_saved_bytes_formula(t_train, tr["n_heads"]) / GIB
    print(f"train step T={t_train}: blockwise peak +{tr['peak_mb']:.0f} MB in {tr['seconds']:.1f} s "
          f"(loss {tr['loss']:.3f}); naive would save {naive_gib:.1f} GiB in attention alone (arithmetic)")
    results.append(result("flash_backward", f"train_step_peak_gib_T{t_train}", False, tr["peak_mb"] / 1024,
                          "naive attention's saved tensors, arithmetic", naive_gib, T=t_train, d_model=256,
                          n_heads=tr["n_heads"], n_layers=1, vocab=256, block=256, threads=1,
                          seconds=round(tr["seconds"], 2), machine="2 cores, shared",
                          note="ours measured (peak RSS growth of forward+backward+AdamW); baseline by arithmetic"))
    results.append(result("flash_backward", f"train_step_seconds_T{t_train}", False, tr["seconds"], "none",
                          tr["seconds"],
                          T=t_train, note="time of the blockwise step; no baseline can run at this length in 24 GiB"))
    write_result("flash_backward", results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--train":
        print(json.dumps(train_worker(int(sys.argv[2]))))
    else:
        main(quick="--quick" in sys.argv)
