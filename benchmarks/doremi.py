"""DoReMi-style adaptive domain weights (data.adaptive) against a fixed mix, at equal training tokens.

Three byte-level domains: "world" (the synthetic world's stories, dialogues, bios, QA and city facts),
"shakespeare" (Tiny Shakespeare paragraphs) and "arithmetic" (the world's worked arithmetic). The fixed mix
under-trains arithmetic: world 0.65, shakespeare 0.30, arithmetic 0.05. Runs, all with the same small model,
steps, batch and seed, through `lmstack.train.pretrain`:
1. reference: the uniform mix (1/3 each), as in DoReMi (its cost is an extra run of the same size);
2. fixed: the fixed mix above;
3. doremi: starts from the fixed mix; every `update_every` steps the weights move towards the domains whose
   loss exceeds the reference's (per-token excess clipped at 0, exponentiated gradient, smoothing 1e-3).
Runs 2 and 3 train on exactly the same number of tokens; DoReMi's probe forwards (probe_rows rows per domain,
model and reference, every update) are extra compute, reported in the JSON.
Score: per-domain validation loss (nats per byte token) on held-out documents, mean over n rows with stderr
across rows; the mean over domains; the worst domain.

Usage:
    python benchmarks/doremi.py [--steps 300]
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import result, write_result

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
FIXED = {"world": 0.65, "shakespeare": 0.30, "arithmetic": 0.05}
SEQ, BATCH = 128, 8


def domain_texts() -> dict[str, tuple[list[str], list[str]]]:
    """domain -> (train texts, validation texts)."""
    from lmstack.world import World

    w = World(seed=0, n_people=60)
    out = {}
    for name, kinds in (("world", ("story", "dialogue", "bio", "qa", "city", "country")), ("arithmetic", ("arithmetic",))):
        out[name] = tuple([r["text"] for r in w.corpus("pretrain", split=s) if r["kind"] in kinds]
                          for s in ("train", "val"))
    paras = [p.strip() for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    cut = int(len(paras) * 0.9)
    out["shakespeare"] = (paras[:cut], paras[cut:])
    return out


def write_domains(texts, root: Path) -> tuple[dict[str, str], dict[str, str]]:
    from lmstack.data.document import make_doc
    from lmstack.data.shards import ShardConfig, write_shards

    train, val = {}, {}
    for name, (tr, va) in texts.items():
        for split, docs, dest in (("train", tr, train), ("val", va, val)):
            d = root / f"{name}_{split}"
            write_shards([make_doc(t, str(i), name) for i, t in enumerate(docs)], d, ShardConfig(tokenizer="bytes"))
            dest[name] = str(d)
    return train, val


def model_config():
    from lmstack.model import ModelConfig

    return ModelConfig(vocab_size=258, d_model=64, n_layers=2, n_heads=4, d_ff=192, max_seq_len=SEQ,
                       hf_model_type="llama", name="doremi-bench")


def run(out: Path, domains: dict[str, str], steps: int, init: dict[str, float], reference: str = "",
        update_every: int = 10, step_size: float = 1.0, probe_rows: int = 4) -> dict:
    """Pretrain one model on the mixed domains; returns the summary, the final model and the weight history."""
    import json

    from lmstack.data.mixing import AdaptiveConfig
    from lmstack.model.hf_io import load_model
    from lmstack.train.config import TrainConfig
    from lmstack.train.optim import OptimizerConfig, ScheduleConfig
    from lmstack.train.pretrain import DataConfig, PretrainConfig, pretrain

    adaptive = AdaptiveConfig(enabled=bool(reference), domains=domains, reference=reference, init=init,
                              update_every=update_every, step_size=step_size, probe_rows=probe_rows)
    cfg = PretrainConfig(out=str(out), model=model_config(),
                         train=TrainConfig(steps=steps, eval_every=0, log_every=update_every, progress=False,
                                           device="cpu", threads=1, resume=False),
                         optim=OptimizerConfig(name="adamw", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
                         schedule=ScheduleConfig(name="cosine", warmup_steps=steps // 10, min_lr_ratio=0.1),
                         data=DataConfig(batch_size=BATCH, seq_len=SEQ, adaptive=adaptive))
    summary = pretrain(cfg, log=lambda m: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    history = [{k: v for k, v in r.items() if k.startswith(("domain_weight_", "excess_loss_")) or k == "step"}
               for r in rows if any(k.startswith("domain_weight_") for k in r)]
    return {"summary": summary, "model_dir": str(Path(summary["checkpoint"]) / "model"), "history": history,
            "model": load_model(Path(summary["checkpoint"]) / "model", lazy=False).eval()}


@torch.no_grad()
def domain_loss(model, val_dir: str, rows: int) -> dict:
    """Mean next-token loss over `rows` packed validation rows, stderr across rows."""
    from lmstack.data.loader import LoaderConfig, TokenLoader

    loader = TokenLoader(val_dir, LoaderConfig(batch_size=8, seq_len=SEQ, shuffle=False))
    per_row = []
    while len(per_row) < rows:
        x, y = next(loader)
        per_row += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(x.shape).mean(1).tolist()
    per_row = per_row[:rows]
    mean = sum(per_row) / rows
    sd = math.sqrt(sum((v - mean) ** 2 for v in per_row) / (rows - 1))
    return {"loss": mean, "stderr": sd / math.sqrt(rows), "n": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--val_rows", type=int, default=64)
    parser.add_argument("--update_every", type=int, default=10)
    parser.add_argument("--step_size", type=float, default=1.0)
    args = parser.parse_args()
    if not SHAKESPEARE.exists():
        print(f"skipping: {SHAKESPEARE} not found")
        return
    torch.set_num_threads(1)
    names = list(FIXED)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, val = write_domains(domain_texts(), tmp)
        ref = run(tmp / "reference", train, args.steps, {k: 1.0 for k in names})
        fixed = run(tmp / "fixed", train, args.steps, FIXED)
        dore = run(tmp / "doremi", train, args.steps, FIXED, reference=ref["model_dir"],
                   update_every=args.update_every, step_size=args.step_size)
        scores = {k: {d: domain_loss(r["model"], val[d], args.val_rows) for d in names}
                  for k, r in (("reference", ref), ("fixed", fixed), ("doremi", dore))}
    for k, s in scores.items():
        print(f"{k:>10}: " + ", ".join(f"{d} {v['loss']:.4f} ± {v['stderr']:.4f}" for d, v in s.items()))
    final_w = {d: dore["history"][-1][f"domain_weight_{d}"] for d in names}
    mean_w = {d: sum(h[f"domain_weight_{d}"] for h in dore["history"]) / len(dore["history"]) for d in names}
    print("DoReMi final weights: " + ", ".join(f"{d} {w:.3f}" for d, w in final_w.items()))
    probe_tokens = 2 * len(names) * 4 * SEQ * (args.steps // args.update_every)
    cfg = {"steps": args.steps, "batch": BATCH, "seq_len": SEQ, "tokens_per_run": dore["summary"]["tokens_seen"],
           "fixed_mix": FIXED, "doremi_init": FIXED, "reference_mix": "uniform", "update_every": args.update_every,
           "step_size": args.step_size, "smoothing": 1e-3, "probe_rows": 4,
           "probe_forward_tokens (extra, model + reference)": probe_tokens, "model": "llama-style d64 x2, bytes",
           "val_rows_per_domain": args.val_rows, "threads": 1, "machine": "2 cores, shared"}
    results = []
    for d in names:
        f, o = scores["fixed"][d], scores["doremi"][d]
        results.append(result("doremi", f"val_loss_{d}", False, o["loss"], "fixed mix, same tokens", f["loss"],
                              stderr=o["stderr"], baseline_stderr=f["stderr"], n=o["n"],
                              reference_loss=scores["reference"][d]["loss"], fixed_weight=FIXED[d],
                              final_weight=final_w[d], mean_weight=mean_w[d], **cfg))
    for label, agg in (("mean", lambda s: sum(v["loss"] for v in s.values()) / len(s)),
                       ("worst_domain", lambda s: max(v["loss"] for v in s.values()))):
        results.append(result("doremi", f"val_loss_{label}", False, agg(scores["doremi"]), "fixed mix, same tokens",
                              agg(scores["fixed"]), reference=agg(scores["reference"]), **cfg))
    results.append(result("doremi", "final_weight_arithmetic", True, final_w["arithmetic"], "fixed mix weight",
                          FIXED["arithmetic"], history=dore["history"], **cfg))
    write_result("doremi", results)


if __name__ == "__main__":
    main()
