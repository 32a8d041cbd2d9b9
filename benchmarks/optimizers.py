"""Optimizers and schedules vs AdamW + cosine, trained side by side on a task with a known optimum.

Task: next-token prediction on sequences from a random order-2 Markov chain (vocab 32, each
two-token context has 3 possible successors with Dirichlet weights; fixed seed). The Bayes-optimal
loss is the chain's conditional entropy on the validation rows, which we print as the floor. Every
run trains the same Transformer(preset("llama-tiny", vocab_size=32)) from the same init on the same
batches (fresh rows each step, so it is generalisation, not memorisation), with warmup + cosine,
gradient clipping at 1.0 and weight decay 0.1, and is scored by held-out CE on positions that have
their full two-token context.

1. Optimizers (S.8, VII.1, VII.2, VII.10 and the extras): each optimizer gets a 3-value LR sweep
   (seed 0); its best LR is re-run with a second seed (other init, other batches) and the figure is
   the mean held-out loss of the two seeds, because when a tiny model "finds" the order-2 circuit
   varies from run to run. The baseline is AdamW at the best LR of its own sweep, also 2 seeds.
   Muon sweeps muon_lr with its AdamW part at AdamW's best LR.
   loss ratio = AdamW loss / ours (> 1: ours is ahead); time ratio = AdamW s/step / ours.
   We also count optimizer state elements (Adafactor's factored moments vs AdamW's two full ones).
   Times are medians over rounds in which the optimizers take turns (fairer on a shared machine),
   for the whole training step and for optimizer.step() alone; torch AdamW's fused and foreach
   kernels are timed against its CPU default, the per-tensor for-loop.
2. Schedules (S.8): AdamW at its best LR with wsd, linear, inverse_sqrt and constant vs cosine
   (2 seeds each).
3. Layer-wise LR decay (III.9), where it is meant to help: fine-tuning. Both AdamW models are
   fine-tuned on a shifted chain (a quarter of the contexts get new successors) with
   layer_lr_decay 0.7 vs 1.0; we report the new chain's loss and the old chain's (forgetting).

Usage:
    python benchmarks/optimizers.py              # ~6 CPU-minutes (1 thread); ~10 min wall on a busy shared box
    python benchmarks/optimizers.py --steps 100  # quicker, noisier
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from _common import result, write_result
from lmstack.model import Transformer, preset
from lmstack.train.optim import OptimizerConfig, ScheduleConfig, build_optimizer, lr_multiplier, param_groups

VOCAB, SUCCESSORS, SEQ, BATCH = 32, 3, 64, 32
GRIDS = {  # LR sweeps: 3 values each, placed (after a first wider run) so that the best is inside (muon: muon_lr)
    "adamw": (3e-3, 1e-2, 3e-2),
    "lamb": (1e-2, 3e-2, 1e-1),
    "adafactor": (1e-3, 3e-3, 1e-2),
    "shampoo": (3e-3, 1e-2, 3e-2),
    "soap": (1e-2, 3e-2, 1e-1),
    "lion": (1e-3, 3e-3, 1e-2),
    "muon": (0.02, 0.05, 0.1),
}


def markov_chain(seed: int, base: torch.Tensor | None = None, shift: float = 0.0) -> torch.Tensor:
    """trans[a, b] = distribution of the token after (a, b). With `base`, a fraction `shift` of the
    contexts get new successors and the rest are copied."""
    g = torch.Generator().manual_seed(seed)
    trans = torch.zeros(VOCAB, VOCAB, VOCAB)
    for a in range(VOCAB):
        for b in range(VOCAB):
            if base is not None and torch.rand(1, generator=g).item() >= shift:
                trans[a, b] = base[a, b]
                continue
            succ = torch.randperm(VOCAB, generator=g)[:SUCCESSORS]
            weights = -torch.log(torch.rand(SUCCESSORS, generator=g))  # Dirichlet(1) via normalised exponentials
            trans[a, b, succ] = weights / weights.sum()
    return trans


def sample(trans: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (rows, SEQ + 1), generator=g)
    for t in range(2, SEQ + 1):
        x[:, t] = torch.multinomial(trans[x[:, t - 2], x[:, t - 1]], 1, generator=g).squeeze(1)
    return x


def optimal_loss(trans: torch.Tensor, rows: torch.Tensor) -> float:
    return float(-torch.log(trans[rows[:, :-2], rows[:, 1:-1], rows[:, 2:]]).mean())


@torch.no_grad()
def val_loss(model, rows: torch.Tensor) -> float:
    logits = model(rows[:, :-1])[:, 1:]  # predictions of tokens 2.. (full order-2 context)
    return float(F.cross_entropy(logits.flatten(0, 1), rows[:, 2:].flatten()))


def new_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("llama-tiny", vocab_size=VOCAB, max_seq_len=SEQ))


def train(model, opt_cfg: OptimizerConfig, sched: ScheduleConfig, data: torch.Tensor, steps: int):
    """Train in place; returns (optimizer state elements, whether a non-finite loss was seen)."""
    opt = build_optimizer(model, opt_cfg)
    diverged = False
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_multiplier(sched, step, steps)
        x = data[step * BATCH:(step + 1) * BATCH]
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        if not math.isfinite(loss.item()):
            diverged = True
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    return state, diverged


def time_steps(makers: dict[str, Callable], data: torch.Tensor, rounds: int = 5, per_round: int = 6):
    """Median seconds per (whole training step, optimizer.step() alone) for each optimizer maker
    (model -> optimizer). The optimizers take turns round by round, so load from other processes
    hits them all alike."""
    setups = {}
    for name, make in makers.items():
        model = new_model()
        setups[name] = (model, make(model))
    times = {name: ([], []) for name in makers}
    for r in range(rounds + 1):  # round 0 warms up (first-call allocations, eigh workspaces)
        for name, (model, opt) in setups.items():
            for i in range(per_round):
                x = data[i * BATCH:(i + 1) * BATCH]
                t0 = time.perf_counter()
                F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                t1 = time.perf_counter()
                opt.step()
                opt.zero_grad(set_to_none=True)
                t2 = time.perf_counter()
                if r:
                    times[name][0].append(t2 - t0)
                    times[name][1].append(t2 - t1)
    return {name: (statistics.median(a), statistics.median(b)) for name, (a, b) in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--finetune_steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings steady on a shared box)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    steps, seeds = args.steps, (0, 1)
    chain = markov_chain(0)
    data = {s: sample(chain, steps * BATCH, seed=1 + 100 * s) for s in seeds}
    val = sample(chain, 256, seed=2)
    floor = optimal_loss(chain, val)
    sched = ScheduleConfig(name="cosine", warmup_steps=max(steps // 15, 1), min_lr_ratio=0.1)
    print(f"order-2 Markov chain, vocab {VOCAB}: optimal loss {floor:.4f}, uniform {math.log(VOCAB):.4f}; "
          f"{steps} steps x {BATCH}x{SEQ} tokens")
    common = dict(steps=steps, batch=BATCH, seq_len=SEQ, vocab=VOCAB, model="llama-tiny", schedule="cosine",
                  warmup=sched.warmup_steps, clip=1.0, weight_decay=0.1, optimal_loss=round(floor, 4),
                  seeds=len(seeds), threads=args.threads)

    def run(cfg: OptimizerConfig, seed: int, schedule: ScheduleConfig = sched):
        model = new_model(seed)
        state, diverged = train(model, cfg, schedule, data[seed], steps)
        return model, (float("inf") if diverged else val_loss(model, val)), state

    # ---- 1. optimizers: LR sweep on seed 0, the best LR again on seed 1
    best: dict[str, dict] = {}
    models = {}
    for name, grid in GRIDS.items():
        runs = []
        for lr in grid:
            if name == "muon":
                cfg = OptimizerConfig(name="muon", lr=best["adamw"]["lr"], muon_lr=lr)
            else:
                cfg = OptimizerConfig(name=name, lr=lr)
            model, loss, state = run(cfg, seeds[0])
            runs.append(dict(lr=lr, loss=loss, state=state, cfg=cfg, model=model))
            print(f"  {name:9s} lr={lr:<7g} val loss {loss:.4f}")
        top = min(runs, key=lambda r: r["loss"])
        model, loss2, _ = run(top["cfg"], seeds[1])
        if name == "adamw":
            models = {seeds[0]: top["model"], seeds[1]: model}
        top.update(seed_losses=[round(top["loss"], 4), round(loss2, 4)], loss=(top["loss"] + loss2) / 2,
                   sweep={f"{r['lr']:g}": round(r["loss"], 4) for r in runs}, edge=top["lr"] in (grid[0], grid[-1]))
        print(f"  {name:9s} best lr={top['lr']:<7g} seeds {top['seed_losses']} mean {top['loss']:.4f}")
        best[name] = top
    base = best["adamw"]
    kernels = {  # torch's AdamW kernels vs its CPU default, the per-tensor for-loop
        "adamw_fused": lambda m: build_optimizer(m, OptimizerConfig(lr=base["lr"], fused=True)),
        "adamw_foreach": lambda m: build_optimizer(m, OptimizerConfig(lr=base["lr"], fused=False)),
        "adamw_forloop": lambda m: torch.optim.AdamW(param_groups(m, OptimizerConfig(), lr=base["lr"]),
                                                     lr=base["lr"], betas=(0.9, 0.95), foreach=False, fused=False),
    }
    makers = {name: (lambda m, c=r["cfg"]: build_optimizer(m, c)) for name, r in best.items()}
    timing = time_steps({**makers, **kernels}, data[0])
    for name, r in best.items():
        r["s_per_step"], r["s_opt_step"] = timing[name]
    for name, (step_s, opt_s) in timing.items():
        print(f"  {name:13s} {step_s * 1e3:6.2f} ms/step, of which optimizer.step {opt_s * 1e3:6.2f} ms")
    results = []
    for name, r in best.items():
        if name == "adamw":
            continue
        lr_note = {"muon_lr": r["lr"], "lr": base["lr"]} if name == "muon" else {"lr": r["lr"]}
        cfg = dict(common, optimizer=name, **lr_note, lr_sweep_seed0=r["sweep"], best_lr_at_sweep_edge=r["edge"],
                   seed_losses=r["seed_losses"], adamw_lr=base["lr"], adamw_seed_losses=base["seed_losses"],
                   adamw_lr_sweep_seed0=base["sweep"], state_elements=r["state"],
                   adamw_state_elements=base["state"], optimizer_step_ms=round(r["s_opt_step"] * 1e3, 3),
                   adamw_optimizer_step_ms=round(base["s_opt_step"] * 1e3, 3))
        results.append(result("optimizers", f"val_loss_{name}", False, r["loss"], "AdamW (torch) + cosine",
                              base["loss"], goal=1.0, **cfg))
        results.append(result("optimizers", f"seconds_per_step_{name}", False, r["s_per_step"], "AdamW (torch)",
                              base["s_per_step"], **cfg))
    for kernel in ("adamw_fused", "adamw_foreach"):
        results.append(result("optimizers", f"seconds_optimizer_step_{kernel}", False, timing[kernel][1],
                              "AdamW for-loop (torch's CPU default)", timing["adamw_forloop"][1],
                              **dict(common, optimizer=kernel)))

    # ---- 2. schedules, AdamW at its best LR
    for name in ("wsd", "linear", "inverse_sqrt", "constant"):
        s = ScheduleConfig(name=name, warmup_steps=sched.warmup_steps, min_lr_ratio=0.1, decay_fraction=0.2)
        losses = [run(base["cfg"], seed, s)[1] for seed in seeds]
        loss = sum(losses) / len(losses)
        print(f"  schedule {name:12s} val loss {loss:.4f} {[round(x, 4) for x in losses]}  (cosine {base['loss']:.4f})")
        results.append(result("optimizers", f"val_loss_schedule_{name}", False, loss, "AdamW + warmup-cosine",
                              base["loss"], **dict(common, schedule=name, lr=base["lr"], decay_fraction=0.2,
                                                   seed_losses=[round(x, 4) for x in losses],
                                                   cosine_seed_losses=base["seed_losses"])))

    # ---- 3. layer-wise LR decay when fine-tuning the AdamW models on a shifted chain
    shifted = markov_chain(1, base=chain, shift=0.25)
    ft_steps, ft_lr = args.finetune_steps, base["lr"] / 3
    ft_data, ft_val = sample(shifted, ft_steps * BATCH, seed=3), sample(shifted, 256, seed=4)
    ft_sched = ScheduleConfig(name="cosine", warmup_steps=5, min_lr_ratio=0.1)
    ft = {}
    for decay in (1.0, 0.7):
        new, old = [], []
        for seed in seeds:
            model = copy.deepcopy(models[seed])
            train(model, OptimizerConfig(lr=ft_lr, layer_lr_decay=decay), ft_sched, ft_data, ft_steps)
            new.append(val_loss(model, ft_val))
            old.append(val_loss(model, val))
        ft[decay] = (sum(new) / len(new), sum(old) / len(old))
        print(f"  fine-tune layer_lr_decay={decay}: shifted-chain loss {ft[decay][0]:.4f}, "
              f"original-chain loss {ft[decay][1]:.4f}")
    ft_cfg = dict(common, finetune_steps=ft_steps, finetune_lr=ft_lr, layer_lr_decay=0.7, shifted_contexts=0.25,
                  shifted_optimal_loss=round(optimal_loss(shifted, ft_val), 4))
    results.append(result("optimizers", "finetune_val_loss_layer_lr_decay", False, ft[0.7][0],
                          "fine-tune without layer decay", ft[1.0][0], **ft_cfg))
    results.append(result("optimizers", "forgetting_val_loss_layer_lr_decay", False, ft[0.7][1],
                          "fine-tune without layer decay", ft[1.0][1], **ft_cfg))
    write_result("optimizers", results)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
