"""µP learning-rate transfer (issue 23 §3): does the best Adam LR found at width 64 stay best at wider widths?

Each width (d_model 64, 128, 256, 512; 2 blocks, 4 heads, so head_dim grows with width) trains on Tiny Shakespeare
characters over a grid of LRs in powers of 2, once under the standard parametrisation and once under µP with
mup_base_width=64 (model/mup.py): Adam, linear warmup over the first 10% of steps, then cosine decay to 0, and the
figure is the validation loss at the end. A seed sets both the init and the order of the batches.

The grid is searched, not swept, to fit a CPU budget: each (parametrisation, width) starts from a 5-point window
centred on the previous width's best LR and widens it until its argmin has two points on either side (within
2^-14..2^-3), then every further seed runs at the argmin and its two neighbours (and at the LR that was best at
width 64), until the argmin of the seed means has all its seeds and neighbours. Finished runs are cached in a JSONL
file, so an interrupted run resumes where it stopped.

Baseline: the standard parametrisation, the usual way of training. Records (lower is better, ratio > 1 = µP ahead):
- val_loss_at_d512_with_lr_tuned_at_d64: the widest width trained at the LR that was best at width 64;
- max_best_lr_shift_grid_steps_plus_1: the largest |log2| move of the best LR from width 64 over the wider widths
  (+1 on both sides so a zero shift stays finite); the issue's goal is a µP shift of at most 1 at every width;
- base_width_loss_zero_readout: at width 64, µP's readout at the base init std (now) against a zero readout (the
  `mup` package's readout_zero_init, which model/mup.py used before), each at its own best LR.
Every loss carries its n (seeds) and stderr; the full curves are in each record's config and mup_transfer.png.

Measured (2026-12-07, 300 steps of 8x64 chars, 2 seeds at each argmin and its neighbours, 31 min on one core):
- best LR by width 64/128/256/512: standard 2^-8, 2^-9, 2^-10, 2^-11 (one grid step per doubling, 3 in all);
  µP 2^-8, 2^-8, 2^-7, 2^-8 (within one step; d256's 2^-7 and 2^-8 differ by 0.006 nats, inside the noise).
- at d512 with the LR tuned at d64 (2^-8): µP 2.163 ± 0.013 against standard 2.390 ± 0.016 (ratio 1.105).
- but tuned at its own width, the standard model is better at d512: 2.071 ± 0.009 against µP's 2.163: µP's loss
  improves little with width at this budget (2.199 -> 2.163 from d64 to d512; standard 2.199 -> 2.071). Swapping
  single µP pieces back at d256 (2 seeds, lr 2^-7; µP 2.163) did not close it: 1/sqrt(d) attention 2.164, the
  standard's hidden init std 2.173, embedding LR / m 2.262. What did, at d512 and 2^-8: the readout's init times m,
  so that its effective init (W0/m) is the standard's 0.02 rather than 0.02/m: 2.083 ± 0.007 (2 seeds), and over
  the LR grid 2^-9..2^-6: 2.168, 2.083, 2.063, 2.097 (1 seed but 2^-8), i.e. best at 2^-7, still one step from d64,
  and level with the tuned standard model. That is not µP (its init logits grow as sqrt(m)), so model/mup.py keeps
  µP's readout; µP's vanishing random readout slows wide models early, which a 300-step budget does not outgrow.
  (Side runs with this file's train loop, not in the JSON.)
- zero readout (the old model/mup.py) at d64: best 2.422 ± 0.093 at 2^-9 against 2.199 ± 0.014 at 2^-8.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mup_transfer.py    (about 31 minutes on one core)
     .venv/bin/python benchmarks/mup_transfer.py --smoke                (seconds; writes nothing under results/)
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import RESULTS, result, write_result

from lmstack.config import atomic_save_figure  # noqa: E402
from lmstack.model import ModelConfig, Transformer  # noqa: E402
from lmstack.train.optim.param_groups import param_groups  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
BASE = 64
GRID = (-14, -3)  # the LR grid's bounds, as powers of 2
ARMS = ("standard", "mup")
ZERO = "mup_zero_readout"  # the ablation arm, run at the base width only


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


def lr_factor(step: int, steps: int) -> float:
    """Linear warmup over the first 10% of steps, then cosine decay to 0."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_once(width: int, arm: str, lr: float, seed: int, args, data) -> float:
    train_ids, val, vocab = data
    train = batches(train_ids, args.steps, args.batch, args.seq_len, seed=100 + seed)
    torch.manual_seed(seed)
    mup = {"parametrization": "mup", "mup_base_width": BASE} if arm != "standard" else {}
    cfg = ModelConfig(vocab_size=vocab, d_model=width, n_layers=2, n_heads=4, max_seq_len=args.seq_len, **mup)
    model = Transformer(cfg)
    if arm == ZERO:
        torch.nn.init.zeros_(model.lm_head.weight)
    opt = torch.optim.Adam(param_groups(model, _Opt, lr))
    for step, xy in enumerate(train):
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, args.steps)
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


class Runs:
    """Val losses by (arm, width, log2 lr, seed), cached one JSON line per finished run."""

    def __init__(self, path: Path, args, data):
        self.path, self.args, self.data = path, args, data
        self.tag = {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len}
        self.loss: dict[tuple, float] = {}
        self.start = time.perf_counter()
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by an interrupted run
                    continue
                if row.get("tag") == self.tag:
                    self.loss[(row["arm"], row["width"], row["exp"], row["seed"])] = float(row["loss"])

    def get(self, arm: str, width: int, exp: int, seed: int) -> float:
        key = (arm, width, exp, seed)
        if key not in self.loss:
            loss = train_once(width, arm, 2.0**exp, seed, self.args, self.data)
            self.loss[key] = loss
            with self.path.open("a") as f:
                f.write(json.dumps({"tag": self.tag, "arm": arm, "width": width, "exp": exp, "seed": seed,
                                    "loss": loss}) + "\n")
            print(f"  {arm:16s} d={width:4d} lr=2^{exp:<3d} seed {seed}: {loss:.4f}"
                  f"  ({time.perf_counter() - self.start:.0f}s)", flush=True)
        return self.loss[key]

    def seeds(self, arm: str, width: int, exp: int) -> list[float]:
        return [v for (a, w, e, _), v in sorted(self.loss.items()) if (a, w, e) == (arm, width, exp)]

    def curve(self, arm: str, width: int) -> dict[int, list[float]]:
        exps = sorted({e for (a, w, e, _) in self.loss if (a, w) == (arm, width)})
        return {e: self.seeds(arm, width, e) for e in exps}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def stderr(xs: list[float]) -> float | None:
    finite = [x for x in xs if math.isfinite(x)]
    return statistics.stdev(finite) / math.sqrt(len(finite)) if len(finite) >= 2 else None


def argmin(curve: dict[int, list[float]]) -> int:
    return min(curve, key=lambda e: mean(curve[e]))


def search(runs: Runs, arm: str, width: int, center: int, n_seeds: int, must: int | None) -> int:
    """The argmin LR exponent of (arm, width), bracketed by two grid points on each side, with every seed at the
    argmin, its neighbours and `must` (the base width's argmin, so the transfer loss has all seeds too)."""
    lo, hi = max(GRID[0], center - 2), min(GRID[1], center + 2)
    while True:
        for e in range(lo, hi + 1):
            runs.get(arm, width, e, 0)
        best = argmin(runs.curve(arm, width))
        if best - lo < 2 and lo > GRID[0]:
            lo -= 1
        elif hi - best < 2 and hi < GRID[1]:
            hi += 1
        else:
            todo = [(e, s) for e in {best - 1, best, best + 1, must} if e is not None and lo <= e <= hi
                    for s in range(n_seeds) if (arm, width, e, s) not in runs.loss]
            if not todo:
                return best
            for e, s in sorted(todo):
                runs.get(arm, width, e, s)


def stats(xs: list[float]) -> dict:
    return {"mean": round(mean(xs), 4), "n": len(xs), "stderr": None if stderr(xs) is None else round(stderr(xs), 4),
            "seeds": [round(x, 4) for x in xs]}


def plot(curves: dict[str, dict[int, dict[int, list[float]]]], best: dict, path: Path) -> Path:
    import matplotlib  # lazy: plotting only, after the runs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as matplotlib above

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, arm in zip(axes, ARMS):
        for i, (width, curve) in enumerate(sorted(curves[arm].items())):
            exps = sorted(curve)
            ys = [mean(curve[e]) for e in exps]
            errs = [stderr(curve[e]) or 0.0 for e in exps]
            ax.errorbar(exps, ys, yerr=errs, fmt="o-", ms=3, lw=1, capsize=2, color=f"C{i}", label=f"d={width}")
            b = best[arm][width]
            ax.plot([b], [mean(curve[b])], "*", ms=11, color=f"C{i}", mec="k", mew=0.5)
        if arm == "mup" and ZERO in curves:
            for width, curve in curves[ZERO].items():
                exps = sorted(curve)
                ax.plot(exps, [mean(curve[e]) for e in exps], ":", color="C0", lw=1,
                        label=f"d={width}, zero readout")
        ax.axvline(best[arm][min(best[arm])], color="grey", ls="--", lw=0.8)
        ax.set(xlabel="log2 Adam LR", title={"standard": "standard parametrisation", "mup": "µP (base width 64)"}[arm])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("val loss (mean over seeds, ±stderr)")
    finite = [mean(v) for c in curves.values() for cv in c.values() for v in cv.values() if math.isfinite(mean(v))]
    axes[0].set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.0))
    fig.suptitle("Tiny Shakespeare chars: val loss vs LR per width (star: argmin; dashed: width 64's argmin)",
                 fontsize=9)
    fig.tight_layout()
    return atomic_save_figure(fig, path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,128,256,512")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=2, help="seeds at each curve's argmin and its neighbours")
    ap.add_argument("--cache", default="/tmp/lmstack_mup_transfer_runs.jsonl", help="JSONL of finished runs")
    ap.add_argument("--smoke", action="store_true", help="widths 64,128, 20 steps; writes nothing under results/")
    args = ap.parse_args()
    if args.smoke:
        args.widths, args.steps, args.cache = "64,128", 20, "/tmp/lmstack_mup_transfer_smoke.jsonl"
    torch.set_num_threads(1)
    widths = [int(w) for w in args.widths.split(",")]
    train_ids, val_ids, vocab = load_chars()
    data = (train_ids, batches(val_ids, 8, 32, args.seq_len, seed=2), vocab)
    runs = Runs(Path(args.cache), args, data)
    best: dict[str, dict[int, int]] = {arm: {} for arm in ARMS}
    for width in widths:
        for arm in ARMS:
            prev = best[arm][max(best[arm])] if best[arm] else -8
            base = best[arm].get(widths[0])
            best[arm][width] = search(runs, arm, width, prev, args.seeds, base)
            curve = runs.curve(arm, width)
            print(f"{arm:8s} d={width:4d} best lr=2^{best[arm][width]}  "
                  + " ".join(f"2^{e}:{mean(v):.3f}" for e, v in curve.items()), flush=True)
    zero_best = search(runs, ZERO, widths[0], best["mup"][widths[0]], args.seeds, None)
    curves = {arm: {w: runs.curve(arm, w) for w in widths} for arm in ARMS}
    curves[ZERO] = {widths[0]: runs.curve(ZERO, widths[0])}

    wide, base = widths[-1], widths[0]
    transfer = {arm: runs.seeds(arm, wide, best[arm][base]) for arm in ARMS}
    own = {arm: runs.seeds(arm, wide, best[arm][wide]) for arm in ARMS}
    shifts = {arm: {w: best[arm][w] - best[arm][base] for w in widths} for arm in ARMS}
    max_shift = {arm: max(abs(s) for s in shifts[arm].values()) for arm in ARMS}
    config = {
        "widths": widths, "base_width": BASE, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
        "seeds_near_argmin": args.seeds, "n_layers": 2, "n_heads": 4, "data": "tinyshakespeare chars",
        "optimizer": "Adam (eps 1e-8), linear warmup 10% then cosine to 0", "lr_grid": f"2^{GRID[0]}..2^{GRID[1]}",
        "best_lr_log2": {arm: {str(w): best[arm][w] for w in widths} for arm in ARMS},
        "best_lr_shift_from_base": {arm: {str(w): s for w, s in shifts[arm].items()} for arm in ARMS},
        "mup_within_one_grid_step_at_every_width": max_shift["mup"] <= 1,
        "standard_drifts_more_than_one_step": max_shift["standard"] > 1,
        "val_loss_at_widest_with_own_best_lr": {arm: stats(own[arm]) for arm in ARMS},
        "val_loss_at_widest_with_base_lr": {arm: stats(transfer[arm]) for arm in ARMS},
        "val_loss_curves": {arm: {str(w): {str(e): stats(v) for e, v in c.items()} for w, c in cs.items()}
                            for arm, cs in curves.items()},
    }
    zero = runs.seeds(ZERO, base, zero_best)
    ours_base = runs.seeds("mup", base, best["mup"][base])
    records = [
        result("mup_transfer", f"val_loss_at_d{wide}_with_lr_tuned_at_d{base}", False, round(mean(transfer["mup"]), 4),
               "standard parametrisation", round(mean(transfer["standard"]), 4), goal=1.0,
               ours_stats=stats(transfer["mup"]), baseline_stats=stats(transfer["standard"]), **config),
        result("mup_transfer", "max_best_lr_shift_grid_steps_plus_1", False, max_shift["mup"] + 1,
               "standard parametrisation", max_shift["standard"] + 1, goal=1.0,
               goal_note="µP's best LR within 1 grid step of width 64's at every width (ours <= 2)", **config),
        result("mup_transfer", f"base_width_loss_zero_readout_d{base}", False, round(mean(ours_base), 4),
               "µP with a zero-initialised readout (readout_zero_init)", round(mean(zero), 4), goal=1.0,
               ours_stats=stats(ours_base), baseline_stats=stats(zero), ours_best_lr_log2=best["mup"][base],
               baseline_best_lr_log2=zero_best, widths=[base], steps=args.steps, batch=args.batch),
    ]
    for arm in ARMS:
        print(f"{arm}: best lr by width " + ", ".join(f"d{w}: 2^{best[arm][w]}" for w in widths)
              + f"  (max shift {max_shift[arm]})")
    if args.smoke:
        print(json.dumps(records[0]["config"]["best_lr_log2"]))
        plot(curves, best, Path("/tmp/lmstack_mup_transfer_smoke.png"))
        return
    write_result("mup_transfer", records)
    print("wrote", plot(curves, best, RESULTS / "mup_transfer.png"))


if __name__ == "__main__":
    main()
