"""Adaptive layer freezing (XI.15): what freezing the leading blocks buys in step time, and what it costs in loss.

Speed: a 6-block llama-style model (d256, T=256, batch 8, fp32, 1 thread) trains with 0, 2 and 4 leading blocks
frozen (`freeze_layers`); each repeat times one forward+backward+AdamW step of every setting in turn, so machine
contention hits all alike; the figure is the median over repeats. Frozen blocks need no weight gradients and,
below the lowest trainable block, no backward at all.

Quality: the same model trained for STEPS steps on Tiny Shakespeare characters, plain vs a LayerFreezer schedule
that freezes up to 4 blocks between 20% and 80% of training; validation loss at equal steps.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/layer_freezing.py    (about two minutes)
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import result, write_result

from lmstack.adapt.sparse import FreezeSchedule, LayerFreezer, freeze_layers  # noqa: E402
from lmstack.model import ModelConfig, Transformer  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
REPEATS, STEPS, B, T = 7, 150, 8, 256


def make_model(vocab: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, d_model=256, n_layers=6, n_heads=8, max_seq_len=T))


def batch(data: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(data) - T - 1, (B,), generator=gen)
    x = torch.stack([data[i:i + T] for i in ix])
    y = torch.stack([data[i + 1:i + T + 1] for i in ix])
    return x, y


def step(model, opt, x, y) -> float:
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def main() -> None:
    torch.set_num_threads(1)
    text = DATA.read_text(encoding="utf-8")
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    gen = torch.Generator().manual_seed(0)

    # --- speed: one model per setting, steps interleaved across settings
    settings = {n: make_model(len(chars)) for n in (0, 2, 4)}
    for n, m in settings.items():
        freeze_layers(m, n)
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for n, m in settings.items()}
    times = {n: [] for n in settings}
    x, y = batch(train, gen)
    for n in settings:  # warm-up
        step(settings[n], opts[n], x, y)
    for _ in range(REPEATS):
        for n in settings:
            t0 = time.perf_counter()
            step(settings[n], opts[n], x, y)
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    cfg = dict(model="llama-style d256 x 6 blocks", batch=B, seq_len=T, threads=1, repeats=REPEATS,
               interleaved=True, machine="2 cores, shared", all_seconds={str(n): [round(t, 4) for t in v]
                                                                          for n, v in times.items()})
    out = [result("layer_freezing", f"step_seconds_{n}_of_6_frozen", False, med[n], "no block frozen", med[0], **cfg)
           for n in (2, 4)]

    # --- quality at equal steps
    def train_run(schedule: FreezeSchedule | None) -> float:
        model = make_model(len(chars))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        freezer = LayerFreezer(model, schedule) if schedule else None
        g = torch.Generator().manual_seed(1)
        for s in range(STEPS):
            if freezer:
                freezer.step(s)
            step(model, opt, *batch(train, g))
        model.eval()
        vg = torch.Generator().manual_seed(2)
        with torch.no_grad():
            losses = [float(F.cross_entropy(model(xv).flatten(0, 1), yv.flatten()))
                      for xv, yv in (batch(val, vg) for _ in range(8))]
        return statistics.mean(losses)

    t0 = time.perf_counter()
    plain = train_run(None)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    frozen = train_run(FreezeSchedule(total_steps=STEPS, max_frozen=4, start_frac=0.2, end_frac=0.8))
    t_frozen = time.perf_counter() - t0
    out.append(result("layer_freezing", "val_loss_with_freezing_schedule", False, frozen, "no freezing", plain,
                      steps=STEPS, schedule="max_frozen 4, start 0.2, end 0.8", seconds_ours=round(t_frozen, 1),
                      seconds_baseline=round(t_plain, 1), corpus="Tiny Shakespeare chars, last 10% held out",
                      machine="2 cores, shared"))
    write_result("layer_freezing", out)


if __name__ == "__main__":
    main()
