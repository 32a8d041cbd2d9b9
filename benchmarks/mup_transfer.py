"""µP learning-rate transfer (issue 23 §3): does the best Adam LR found at width 64 stay best at wider widths?

Each width (d_model 64, 128, 256; 2 blocks, 4 heads, so head_dim grows with width) trains on Tiny Shakespeare
characters at every LR of a 2x grid, once under the standard parametrisation and once under µP with
mup_base_width=64 (model/mup.py), same seed, same batches, constant LR after a short warmup. The figure is the
validation loss at equal steps. Baseline: the standard parametrisation, the usual way of training.

Records (lower is better, ratio > 1 means µP ahead):
- transfer_loss: val loss at the widest width when trained at the LR that was best at width 64;
- best_lr_shift: how many grid steps the best LR moves from width 64 to the widest width (|log2 ratio|; +1 in the
  ratio's both sides so a zero shift stays finite).
The full loss-vs-LR curves of both parametrisations are in each record's config.

Measured (120 steps, one seed, 2026-12-07): the standard best LR moves 2^-8 -> 2^-9 -> 2^-10 as width doubles; µP's
is 2^-9 at both 128 and 256 (near-identical curves) but 2^-7 at 64, where its curve is noisy (an outlier at 2^-9),
so both records come out even (ratio 0.99 and 1.0); µP's zero readout also costs about 0.15 nats at this short
budget. More steps and several seeds would be needed to settle the claim.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mup_transfer.py    (about five minutes on one core)
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import result, write_result

from lmstack.model import ModelConfig, Transformer  # noqa: E402
from lmstack.train.optim.param_groups import param_groups  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
BASE = 64


class _Opt:  # the few OptimizerConfig fields param_groups reads
    layer_lr_decay, no_decay_norms_biases_embeddings, weight_decay = 1.0, True, 0.0


def load_chars() -> tuple[torch.Tensor, torch.Tensor, int]:
    text = DATA.read_text(encoding="utf-8")
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], len(vocab)


def batches(data: torch.Tensor, n: int, b: int, t: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - t - 1, (n, b), generator=g)
    return [torch.stack([data[s:s + t + 1] for s in row.tolist()]) for row in starts]


def train_once(width: int, param: str, lr: float, train: list[torch.Tensor], val: list[torch.Tensor],
               vocab: int, warmup: int) -> float:
    torch.manual_seed(0)
    mup = {"parametrization": "mup", "mup_base_width": BASE} if param == "mup" else {}
    cfg = ModelConfig(vocab_size=vocab, d_model=width, n_layers=2, n_heads=4, max_seq_len=train[0].shape[1], **mup)
    model = Transformer(cfg)
    opt = torch.optim.Adam(param_groups(model, _Opt, lr))
    for step, xy in enumerate(train):
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * min(1.0, (step + 1) / warmup)
        logits = model(xy[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), xy[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(xy[:, :-1]).flatten(0, 1), xy[:, 1:].flatten()) for xy in val]
    loss = float(torch.stack(losses).mean())
    return loss if math.isfinite(loss) else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,128,256")
    ap.add_argument("--lr-exps", default="-12,-11,-10,-9,-8,-7,-6,-5", help="the LR grid as powers of 2")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    widths = [int(w) for w in args.widths.split(",")]
    exps = [int(e) for e in args.lr_exps.split(",")]
    train_ids, val_ids, vocab = load_chars()
    train = batches(train_ids, args.steps, args.batch, args.seq_len, seed=1)
    val = batches(val_ids, 8, 32, args.seq_len, seed=2)
    curves: dict[str, dict[int, list[float]]] = {"standard": {}, "mup": {}}
    start = time.perf_counter()
    for width in widths:
        for param in curves:
            curves[param][width] = [round(train_once(width, param, 2.0 ** e, train, val, vocab, warmup=10), 4)
                                    for e in exps]
            best = exps[min(range(len(exps)), key=curves[param][width].__getitem__)]
            print(f"{param:8s} d={width:4d} best lr=2^{best}  " + " ".join(f"{x:.3f}" for x in curves[param][width]),
                  f"({time.perf_counter() - start:.0f}s)", flush=True)

    def best_exp(param: str, width: int) -> int:
        return exps[min(range(len(exps)), key=curves[param][width].__getitem__)]

    wide = widths[-1]
    transfer = {p: curves[p][wide][exps.index(best_exp(p, widths[0]))] for p in curves}
    shift = {p: abs(best_exp(p, wide) - best_exp(p, widths[0])) for p in curves}
    config = {"widths": widths, "lr_grid_log2": exps, "base_width": BASE, "steps": args.steps, "batch": args.batch,
              "seq_len": args.seq_len, "n_layers": 2, "n_heads": 4, "data": "tinyshakespeare chars",
              "optimizer": "Adam, constant LR after 10 warmup steps",
              "val_loss_curves": {p: {str(w): c for w, c in curves[p].items()} for p in curves},
              "best_lr_log2": {p: {str(w): best_exp(p, w) for w in widths} for p in curves}}
    write_result("mup_transfer", [
        result("mup_transfer", f"val_loss_at_d{wide}_with_lr_tuned_at_d{widths[0]}", False, transfer["mup"],
               "standard parametrisation", transfer["standard"], goal=1.0, **config),
        result("mup_transfer", "best_lr_shift_grid_steps_plus_1", False, shift["mup"] + 1,
               "standard parametrisation", shift["standard"] + 1, goal=1.0, **config),
    ])


if __name__ == "__main__":
    main()
