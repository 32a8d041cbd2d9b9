"""DP-SGD against plain fine-tuning (issue 21 section 4, IX.6): canary exposure, the epsilon spent, the utility
cost and the step-time overhead, from three `lmstack finetune` runs at equal steps on the same data.

The data: world chat rows (the speedrun world's train split) plus random canaries -- fake SSNs and passkeys of
made-up people (lmstack.safety.canary) -- each inserted `repeats` times. Three fine-tunes of the same chat model
with the same steps, batch, learning rate and seed: no DP (the baseline), DP-SGD at epsilon 8 and at epsilon 1
(delta 1e-5, clip 1.0, sigma derived by the accountant). Measured on each result:
  - canary exposure: log2 |R| - log2 rank of the true secret among |R| candidates, mean over the canaries
    with n and stderr (lower = less memorised; an unseen secret shows about 1.44 bits);
  - utility: mean cross-entropy per assistant token and the greedy exact-match share of held-out world chat
    replies (the val split), each with n and stderr;
  - seconds per training step, DP vs plain (the per-sample-gradient overhead).
Every run packs one conversation per row, so the three see the same kind of batches (DP needs it: a row is a
privacy record). Ratios: baseline / ours for lower-is-better metrics, so a ratio > 1 means DP exposes less.

Usage:
    flock /tmp/lmstack-bench.lock .venv/bin/python benchmarks/dp_canary.py
    .venv/bin/python benchmarks/dp_canary.py --model runs/x/sft/run/model --world runs/x/world --steps 100
"""
from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import result, write_result
from lmstack.adapt.config import AdapterConfig
from lmstack.adapt.finetune import FinetuneConfig, finetune, load_result
from lmstack.adapt.sft import encode_rows, pack_examples
from lmstack.safety.canary import exposure_report, insert_canaries, make_canaries
from lmstack.safety.dp import DPConfig
from lmstack.tokenizer import load_tokenizer
from lmstack.train.config import TrainConfig
from lmstack.train.optim import OptimizerConfig, ScheduleConfig

RUN = "/tmp/sr9/runs/20261207-050757"


def read_rows(path: Path, n: int, seed: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    return [{"messages": r["messages"], "kind": r.get("kind", "")} for r in rows[:n]]


def mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd / math.sqrt(n)


@torch.no_grad()
def utility(model, tok, rows: list[dict], seq_len: int) -> dict:
    """Per held-out reply: mean CE per assistant token and whether greedy reproduces it exactly; mean, stderr."""
    examples, _ = encode_rows(tok, rows, max_len=seq_len + 1)
    model.eval()
    losses, exact = [], []
    for i in range(0, len(examples), 32):
        chunk = examples[i:i + 32]
        batch = pack_examples(chunk, max(len(e) for e in chunk) - 1, tok.pad_id, strategy="none")
        logits = model(batch["input_ids"]).float()
        ce = F.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none")
        m = batch["loss_mask"]
        losses += ((ce * m).sum(1) / m.sum(1).clamp(min=1)).tolist()
        exact += (((logits.argmax(-1) == batch["targets"]) | ~m).all(1).float()).tolist()
    (loss, loss_se), (acc, acc_se) = mean_stderr(losses), mean_stderr(exact)
    return {"val_loss": loss, "val_loss_stderr": loss_se, "exact": acc, "exact_stderr": acc_se, "n": len(losses)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=f"{RUN}/sft/run/model", help="the chat model to fine-tune")
    ap.add_argument("--world", default=f"{RUN}/world", help="a world directory with chat/train.jsonl, chat/val.jsonl")
    ap.add_argument("--method", default="lora", help="full | lora (adapter on every linear layer)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train_rows", type=int, default=300)
    ap.add_argument("--val_rows", type=int, default=300)
    ap.add_argument("--canaries", type=int, default=5, help="canaries of each kind (ssn, passkey)")
    ap.add_argument("--repeats", type=int, default=8, help="copies of each canary in the training data")
    ap.add_argument("--candidates", type=int, default=500, help="|R|: candidates each secret is ranked among")
    ap.add_argument("--seq_len", type=int, default=80)
    ap.add_argument("--epsilons", default="8,1")
    args = ap.parse_args()
    torch.set_num_threads(2)

    chat = Path(args.world) / "chat"
    train_rows = read_rows(chat / "train.jsonl", args.train_rows, seed=0)
    val_rows = read_rows(chat / "val.jsonl", args.val_rows, seed=1)
    canaries = make_canaries(args.canaries, "ssn", seed=11) + make_canaries(args.canaries, "passkey", seed=12)
    rows = insert_canaries(train_rows, canaries, args.repeats, seed=0)
    tok = load_tokenizer(args.model)
    work = Path(tempfile.mkdtemp(prefix="dp_canary_"))
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    runs: dict[str, dict] = {}
    settings = [("no_dp", DPConfig())] + [(f"dp_eps{e}", DPConfig(epsilon=float(e), delta=1e-5, max_grad_norm=1.0))
                                         for e in args.epsilons.split(",")]
    for name, dp in settings:
        cfg = FinetuneConfig(
            method=args.method, data=str(data), model=args.model, out=str(work / name), val_fraction=0.0,
            adapter=AdapterConfig(method=args.method, r=16, alpha=32.0,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]),
            train=TrainConfig(steps=args.steps, eval_every=0, log_every=10, progress=False, seed=0, threads=2,
                              keep_checkpoints=1),
            optim=OptimizerConfig(name="adamw", lr=args.lr, weight_decay=0.0),
            schedule=ScheduleConfig(name="cosine", warmup_steps=10),
            batch_size=args.batch, seq_len=args.seq_len, packing="none", dp=dp)
        summary = finetune(cfg, log=lambda s: print(f"[{name}] {s}", flush=True))
        model = load_result(args.model, summary["result"])
        exp = exposure_report(model, tok, canaries, candidates=args.candidates)
        util = utility(model, tok, val_rows, args.seq_len)
        runs[name] = {"exposure": exp["mean"], "exposure_stderr": exp["stderr"], "n_canaries": exp["n"],
                      "exposure_max": exp["max"], "epsilon": summary.get("dp", {}).get("epsilon"),
                      "noise_multiplier": summary.get("dp", {}).get("noise_multiplier", 0.0),
                      "seconds_per_step": summary["train_seconds"] / summary["steps"], **util,
                      "final_train_loss": summary["final_loss"],
                      "ranks": [p["rank"] for p in exp["per_canary"]]}
        print(f"[{name}] {json.dumps({k: v for k, v in runs[name].items() if k != 'ranks'})}", flush=True)

    base = runs["no_dp"]
    common = dict(model=args.model, method=args.method, steps=args.steps, batch=args.batch, lr=args.lr,
                  train_rows=args.train_rows, canaries=len(canaries), canary_kinds=["ssn", "passkey"],
                  repeats=args.repeats, candidates=args.candidates, delta=1e-5, max_grad_norm=1.0,
                  sampling="poisson (DP) / shuffled epochs (no DP)", device="cpu", runs=runs)
    out = []
    for name in runs:
        if name == "no_dp":
            continue
        r = runs[name]
        tag = dict(common, dp_run=name, epsilon_spent=r["epsilon"], noise_multiplier=r["noise_multiplier"])
        out.append(result("dp_canary", f"canary_exposure_bits_{name}", False, r["exposure"], "no DP fine-tune",
                          base["exposure"], goal=None, **tag, stderr=r["exposure_stderr"],
                          baseline_stderr=base["exposure_stderr"], n=r["n_canaries"]))
        out.append(result("dp_canary", f"val_loss_{name}", False, r["val_loss"], "no DP fine-tune",
                          base["val_loss"], goal=None, **tag, stderr=r["val_loss_stderr"],
                          baseline_stderr=base["val_loss_stderr"], n=r["n"]))
        out.append(result("dp_canary", f"val_exact_{name}", True, r["exact"], "no DP fine-tune", base["exact"],
                          goal=None, **tag, stderr=r["exact_stderr"], baseline_stderr=base["exact_stderr"],
                          n=r["n"]))
        out.append(result("dp_canary", f"seconds_per_step_{name}", False, r["seconds_per_step"],
                          "no DP fine-tune", base["seconds_per_step"], goal=None, **tag))
    write_result("dp_canary", out)


if __name__ == "__main__":
    main()
