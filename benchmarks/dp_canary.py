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
  - seconds per training step, DP vs plain (the per-sample-gradient overhead), timed interleaved in one process
    on the same batch (the three runs' own seconds per step are kept in the config).
The chat model before any fine-tune is measured the same way (config.before_finetune): the reference that shows
how far each fine-tune moved it.
Every run packs one conversation per row, so the three see the same kind of batches (DP needs it: a row is a
privacy record). Ratios: baseline / ours for lower-is-better metrics, so a ratio > 1 means DP exposes less.

Usage:
    flock /tmp/lmstack-bench.lock .venv/bin/python benchmarks/dp_canary.py
    .venv/bin/python benchmarks/dp_canary.py --model runs/x/sft/run/model --world runs/x/world --steps 100
    .venv/bin/python benchmarks/dp_canary.py --model runs/x/pretrain/checkpoints/step_N/model --name dp_canary_from_base
    .venv/bin/python benchmarks/dp_canary.py --update   # keep the runs; re-measure the base model and the step time
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import RESULTS, result, write_result
from lmstack.adapt.config import AdapterConfig
from lmstack.adapt.finetune import FinetuneConfig, finetune, load_result
from lmstack.adapt.registry import get_peft_model
from lmstack.adapt.sft import SFTObjective, encode_rows, pack_examples
from lmstack.model.hf_io import load_model
from lmstack.safety.canary import exposure_report, insert_canaries, make_canaries
from lmstack.safety.dp import DPSGD, DPConfig
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


def step_overhead(args, rows: list[dict], repeats: int = 7) -> dict:
    """Seconds of one plain step (batched forward + backward) and one DP-SGD step (per-sample gradients, clip,
    noise) of the same LoRA model on the same batch, interleaved in this process (median of `repeats`), so a
    busy shared machine slows both alike; the three runs' train_seconds are kept in the config as well."""
    tok = load_tokenizer(args.model)
    model = get_peft_model(load_model(args.model, lazy=False), adapter_config(args)).train()
    examples, _ = encode_rows(tok, rows, max_len=args.seq_len + 1)
    batch = pack_examples(examples[:args.batch], args.seq_len, tok.pad_id, strategy="none")
    batch.pop("doc_ids")
    objective, gen = SFTObjective(use_doc_ids=False), torch.Generator().manual_seed(0)
    dp = DPSGD(sigma=1.0, max_grad_norm=1.0, sample_rate=0.02, expected_batch=args.batch, delta=1e-5)

    def plain():
        model.zero_grad(set_to_none=True)
        objective.loss(model, batch)[0].backward()

    def private():
        model.zero_grad(set_to_none=True)
        dp.privatize(model, batch, gen, chunk=args.batch)

    times: dict[str, list[float]] = {"plain": [], "dp": []}
    plain(), private()  # warm-up
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("dp", private)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def all_canaries(args) -> list:
    return make_canaries(args.canaries, "ssn", seed=11) + make_canaries(args.canaries, "passkey", seed=12)


def before_finetune(args, tok, canaries, val_rows: list[dict]) -> dict:
    """The chat model as it was before any fine-tune: exposure of the canaries (it never saw them) and utility,
    the reference that says how much each fine-tune moved."""
    model = load_model(args.model, lazy=False)
    exp = exposure_report(model, tok, canaries, candidates=args.candidates)
    return {"exposure": exp["mean"], "exposure_stderr": exp["stderr"], "n_canaries": exp["n"],
            **utility(model, tok, val_rows, args.seq_len)}


def adapter_config(args) -> AdapterConfig:
    return AdapterConfig(method=args.method, r=16, alpha=32.0,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


RUNS = ("dp_canary", "dp_canary_from_base")
"""The results files this script writes: from the speedrun SFT model (default) and from the pretrained base."""


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
    ap.add_argument("--name", default="dp_canary", choices=RUNS, help="results file: benchmarks/results/<name>.json")
    ap.add_argument("--update", action="store_true",
                    help="keep the runs of an existing results file; re-measure the model before fine-tuning and "
                         "re-time the DP vs plain step")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.update:
        update(args)
        return

    chat = Path(args.world) / "chat"
    train_rows = read_rows(chat / "train.jsonl", args.train_rows, seed=0)
    val_rows = read_rows(chat / "val.jsonl", args.val_rows, seed=1)
    canaries = all_canaries(args)
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
            adapter=adapter_config(args),
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
    reference = before_finetune(args, tok, canaries, val_rows)
    print(f"[before fine-tuning] {json.dumps(reference)}", flush=True)
    common = dict(before_finetune=reference, model=args.model, method=args.method, steps=args.steps, batch=args.batch, lr=args.lr,
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
    # step time: interleaved in one process (the runs' own seconds per step, under a shared machine's changing
    # load, are in config.runs)
    out.append(overhead_result(args, train_rows, common))
    write_result(args.name, out)


def overhead_result(args, rows: list[dict], config: dict) -> dict:
    timing = step_overhead(args, rows)
    return result("dp_canary", "seconds_per_step_dp", False, timing["dp"], "plain step (same LoRA model, same batch)",
                  timing["plain"], goal=None, **dict(config, batch_rows=args.batch, seq_len=args.seq_len, repeats=7,
                                                     timing="median, interleaved"))


def update(args) -> None:
    """Keep the exposure and utility rows of benchmarks/results/dp_canary.json (the three runs); measure the model
    before fine-tuning into their config and re-time the step overhead."""
    path = RESULTS / f"{args.name}.json"
    rows = json.loads(path.read_text())
    kept = [r for r in rows if not r["metric"].startswith("seconds_per_step")]
    chat = Path(args.world) / "chat"
    reference = before_finetune(args, load_tokenizer(args.model), all_canaries(args),
                                read_rows(chat / "val.jsonl", args.val_rows, seed=1))
    print(f"[before fine-tuning] {json.dumps(reference)}", flush=True)
    for r in kept:
        r["config"]["before_finetune"] = reference
    config = {k: v for k, v in kept[0]["config"].items()
              if k not in ("dp_run", "epsilon_spent", "noise_multiplier", "stderr", "baseline_stderr", "n")}
    train_rows = read_rows(chat / "train.jsonl", args.train_rows, seed=0)
    write_result(args.name, kept + [overhead_result(args, train_rows, config)])


if __name__ == "__main__":
    main()
