"""Fine-tuning methods side by side from one pretrained checkpoint, plus curriculum vs random order.

1. Pretrain (or reuse, from benchmarks/.cache/finetune_base) a small llama-style model for ~2 minutes on the
   synthetic world's biographies, plain-text QA, city facts and worked arithmetic.
2. Knowledge QA in chat form: SFT on the QA chats of half of the world's train people, evaluate on the QA chats
   of the other half (their facts were in pretraining, never in chat form). Each method registered in
   lmstack.adapt.METHODS (full, lora, dora, qlora, prefix, prompt, adapter, ia3) trains the same number of
   steps in a fresh subprocess, which reports: trainable-parameter %, model bytes (quantized bases count
   smaller), peak RSS growth during training (gradients + optimizer state + activations), median seconds per
   step, and teacher-forced validation scores (token accuracy of the replies; exact = whole reply right, i.e.
   what greedy decoding would say). Methods not registered are skipped with a note.
3. Multi-task mixture: QA only vs arithmetic only vs a 1:1 mixture (mix_tasks), same steps, each scored on
   both tasks.
4. Curriculum: arithmetic chats (difficulty 1..5) with full fine-tuning in random order vs easy_to_hard vs
   competence-based order, same steps, scored on held-out problems.

The baseline of every method row is full fine-tuning in the same run; of the mixture row, the better
single-task run; of the curriculum rows, random order.

Usage:
    python benchmarks/finetune_methods.py                  # ~8 minutes on 2 cores (first run pretrains)
    python benchmarks/finetune_methods.py --steps 40 --methods full,lora   # quick look
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import peak_rss_mb, reset_peak_rss, result, rss_mb, write_result

CACHE = Path(__file__).resolve().parent / ".cache" / "finetune_base"
METHODS = ("full", "lora", "dora", "qlora", "prefix", "prompt", "adapter", "ia3")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# method -> (AdapterConfig fields, learning rate). LRs follow common practice: small for full fine-tuning,
# larger for low-rank updates, largest for the few parameters of soft prompts and scaling vectors.
SETTINGS = {
    "full": ({}, 1e-3),
    "lora": ({"r": 8, "alpha": 16, "target_modules": ALL_LINEAR}, 3e-3),
    "dora": ({"r": 8, "alpha": 16, "target_modules": ALL_LINEAR}, 3e-3),
    "qlora": ({"r": 8, "alpha": 16, "target_modules": ALL_LINEAR, "quant": "nf4"}, 3e-3),
    "prefix": ({"num_virtual_tokens": 16}, 1e-2),
    "prompt": ({"num_virtual_tokens": 16}, 3e-2),
    "adapter": ({"bottleneck_dim": 32}, 3e-3),
    "ia3": ({"target_modules": ["k_proj", "v_proj", "down_proj"]}, 1e-2),
}
SEQ, BATCH = 128, 16


def world():
    from lmstack.world import World

    return World(seed=0, n_people=60)


def pretrain_base(seconds: float) -> Path:
    """The cached base model directory (HF layout + tokenizer), pretraining it first if missing."""
    if (CACHE / "model.safetensors").exists():
        return CACHE
    from _tiny_lm import train_for

    from lmstack.model import ModelConfig, Transformer
    from lmstack.model.hf_io import save_model
    from lmstack.tokenizer import train_tokenizer

    w = world()
    texts = [r["text"] for r in w.corpus("pretrain", split="train") if r["kind"] in ("bio", "qa", "city", "country",
                                                                                      "arithmetic")]
    chats = [r["text"] for r in w.corpus("chat", split="train")]
    tok = train_tokenizer(texts=texts + chats, type="bpe", vocab_size=1024, show_progress=False, special_tokens="chat")
    ids: list[int] = []
    for one in tok.encode_batch(texts):
        ids.extend([tok.bos_id] + one + [tok.eos_id])
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
                      max_seq_len=256, hf_model_type="llama", bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                      pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    model = Transformer(cfg)
    print(f"pretraining the base for {seconds:.0f}s on {len(ids):,} tokens ...", flush=True)
    losses = train_for(model, torch.tensor(ids), seconds=seconds, batch=16, seq_len=SEQ, lr=3e-3)
    print(f"pretrained {len(losses)} steps, final loss {statistics.mean(losses[-20:]):.3f}")
    save_model(model, CACHE, tokenizer=tok)
    return CACHE


def qa_split(tok):
    """(SFT train examples, eval examples): QA chats of one half of the train people vs the other half."""
    from lmstack.adapt.sft import encode_rows

    rows = [r for r in world().corpus("chat", split="train") if r["kind"] == "qa"]
    people = sorted({r["person"] for r in rows})
    held = set(people[1::2])
    train, _ = encode_rows(tok, [r for r in rows if r["person"] not in held], max_len=SEQ + 1)
    evals, _ = encode_rows(tok, [r for r in rows if r["person"] in held], max_len=SEQ + 1)
    return train, evals


def run_method(method: str, steps: int, base: Path) -> dict:
    """Train one method in this process; returns its measurements (called in a fresh subprocess)."""
    from lmstack.adapt import AdapterConfig, get_peft_model, trainable_report
    from lmstack.adapt.finetune import UNPACKED_METHODS
    from lmstack.adapt.sft import SFTLoader, SFTObjective, pack_examples, score_examples
    from lmstack.model.hf_io import load_model
    from lmstack.tokenizer import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(base)
    train, evals = qa_split(tok)
    fields, lr = SETTINGS[method]
    model = get_peft_model(load_model(base, lazy=False), AdapterConfig(method=method, **fields))
    report = trainable_report(model)
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    packing = "none" if method in UNPACKED_METHODS else "best_fit"  # soft prompts / prefixes: one chat per row
    objective = SFTObjective(use_doc_ids=packing != "none")
    before = score_examples(model, evals, SEQ, tok.pad_id, objective=objective)
    loader = SFTLoader(pack_examples(train, SEQ, tok.pad_id, strategy=packing), BATCH, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    reset_peak_rss()
    rss0 = rss_mb()
    times = []
    model.train()
    for step in range(steps):
        for g in opt.param_groups:  # warmup, then linear decay to 10%
            g["lr"] = lr * min(1.0, (step + 1) / 10) * (1 - 0.9 * step / steps)
        t = time.perf_counter()
        loss, _ = objective.loss(model, next(loader))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times.append(time.perf_counter() - t)
    peak = peak_rss_mb() - rss0
    after = score_examples(model, evals, SEQ, tok.pad_id, objective=objective)
    return {"method": method, "lr": lr, **report, "model_mb": model_bytes / 2**20, "train_peak_rss_mb": peak,
            "step_s": statistics.median(times[2:] or times), "before": before, "after": after,
            "train_loss_last": float(loss.detach())}


def train_full(model, loader, steps: int, lr: float = 1e-3) -> None:
    """Full fine-tuning for `steps` steps (AdamW, warmup then linear decay to 10%)."""
    from lmstack.adapt.sft import SFTObjective

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    objective = SFTObjective()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 10) * (1 - 0.9 * step / steps)
        loss, _ = objective.loss(model, next(loader))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


def mixture_rows(base: Path, steps: int) -> dict:
    """QA only vs arithmetic only vs a 1:1 mixture (same steps): each scored on both tasks' held-out chats."""
    from lmstack.adapt.mixing import mix_tasks
    from lmstack.adapt.sft import SFTLoader, encode_rows, pack_examples, score_examples
    from lmstack.model.hf_io import load_model
    from lmstack.tokenizer import load_tokenizer

    tok = load_tokenizer(base)
    qa_train, qa_eval = qa_split(tok)
    w = world()
    ar_train, _ = encode_rows(tok, [r for r in w.corpus("chat", split="train") if r["kind"] == "arithmetic"],
                              max_len=SEQ + 1)
    ar_eval, _ = encode_rows(tok, [r for r in w.corpus("chat", split="val") if r["kind"] == "arithmetic"],
                             max_len=SEQ + 1)
    tasks = {"qa": qa_train, "arithmetic": ar_train}
    out = {}
    for name, weights in (("qa only", {"qa": 1.0}), ("arithmetic only", {"arithmetic": 1.0}),
                          ("mixture 1:1", {"qa": 1.0, "arithmetic": 1.0})):
        torch.manual_seed(0)
        model = load_model(base, lazy=False)
        mixed, counts = mix_tasks(tasks, weights, total=steps * BATCH * 2, seed=0)
        train_full(model, SFTLoader(pack_examples(mixed, SEQ, tok.pad_id), BATCH, seed=0), steps)
        qa = score_examples(model, qa_eval, SEQ, tok.pad_id)["token_acc"]
        ar = score_examples(model, ar_eval, SEQ, tok.pad_id)["token_acc"]
        out[name] = {"qa_token_acc": qa, "arithmetic_token_acc": ar, "mean": (qa + ar) / 2, "draws": counts}
        print(f"mixture {name:>16}: QA token acc {qa:.3f}, arithmetic token acc {ar:.3f} (draws {counts})")
    return out


def curriculum_rows(base: Path, steps: int) -> dict:
    from lmstack.adapt.curriculum import order_examples
    from lmstack.adapt.sft import SFTLoader, encode_rows, pack_examples, score_examples
    from lmstack.model.hf_io import load_model
    from lmstack.tokenizer import load_tokenizer

    tok = load_tokenizer(base)
    w = world()
    train, _ = encode_rows(tok, [r for r in w.corpus("chat", split="train") if r["kind"] == "arithmetic"], max_len=SEQ + 1)
    val, _ = encode_rows(tok, [r for r in w.corpus("chat", split="val") if r["kind"] == "arithmetic"], max_len=SEQ + 1)
    out = {}
    n_rows = steps * BATCH
    for strategy in ("random", "easy_to_hard", "competence"):
        torch.manual_seed(0)
        model = load_model(base, lazy=False)
        ordered = order_examples(train, strategy, seed=0, length=None)
        packed = pack_examples(ordered, SEQ, tok.pad_id, strategy="greedy")
        # one pass in the curriculum's order; competence spreads its growth over exactly the rows trained on
        if strategy == "competence":
            packed = pack_examples(order_examples(train, strategy, seed=0, length=int(len(ordered) * n_rows /
                                                  max(packed["input_ids"].shape[0], 1))), SEQ, tok.pad_id, "greedy")
        train_full(model, SFTLoader(packed, BATCH, seed=0, shuffle=strategy == "random"), steps)
        scores = score_examples(model, val, SEQ, tok.pad_id)
        by_level = {d: score_examples(model, [e for e in val if e.difficulty == d], SEQ, tok.pad_id)["token_acc"]
                    for d in sorted({e.difficulty for e in val})}
        out[strategy] = {**scores, "by_difficulty": by_level, "rows_per_epoch": int(packed["input_ids"].shape[0])}
        print(f"curriculum {strategy:>12}: val token acc {scores['token_acc']:.3f}, exact {scores['exact']:.3f}, "
              f"loss {scores['loss']:.3f}; by difficulty " + ", ".join(f"{d:.0f}: {a:.3f}" for d, a in by_level.items()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per method")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--pretrain_seconds", type=float, default=120.0)
    parser.add_argument("--curriculum_steps", type=int, default=120)
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one method, print JSON
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.one:
        print("RESULT " + json.dumps(run_method(args.one, args.steps, CACHE)))
        return
    start = time.perf_counter()
    base = pretrain_base(args.pretrain_seconds)
    from lmstack.adapt import METHODS as REGISTERED

    rows, skipped = {}, []
    for method in args.methods.split(","):
        if method not in REGISTERED:
            skipped.append(method)
            print(f"{method}: not registered in lmstack.adapt.METHODS yet; skipped")
            continue
        proc = subprocess.run([sys.executable, __file__, "--one", method, "--steps", str(args.steps)],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{method}: failed\n{proc.stderr[-2000:]}")
            skipped.append(f"{method} (failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'})")
            continue
        r = json.loads(line[len("RESULT "):])
        rows[method] = r
        print(f"{method:>8}: trainable {r['trainable_pct']:7.3f}%  model {r['model_mb']:6.2f} MB  peak +{r['train_peak_rss_mb']:6.1f} MB"
              f"  {1000 * r['step_s']:6.1f} ms/step  val token acc {r['before']['token_acc']:.3f} -> "
              f"{r['after']['token_acc']:.3f}  exact {r['after']['exact']:.3f}", flush=True)
    print("\n| method | trainable % | model MB | train peak RSS +MB | ms/step | val token acc (before -> after) | val exact |")
    print("|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['trainable_pct']:.3f} | {r['model_mb']:.2f} | {r['train_peak_rss_mb']:.1f} | "
              f"{1000 * r['step_s']:.1f} | {r['before']['token_acc']:.3f} -> {r['after']['token_acc']:.3f} | "
              f"{r['after']['exact']:.3f} |")
    if skipped:
        print(f"skipped: {', '.join(skipped)}")
    results = []
    full = rows.get("full")
    config = {"steps": args.steps, "batch": BATCH, "seq_len": SEQ, "task": "world knowledge QA in chat form",
              "base": "llama-style d128 x4, pretrained on the world", "skipped": skipped}
    if full:
        for m, r in rows.items():
            if m == "full":
                continue
            extra = {"trainable_pct": r["trainable_pct"], "model_mb": r["model_mb"],
                     "train_peak_rss_mb": r["train_peak_rss_mb"], "step_ms": 1000 * r["step_s"], "lr": r["lr"],
                     "full_trainable_pct": full["trainable_pct"], "full_peak_rss_mb": full["train_peak_rss_mb"],
                     "full_step_ms": 1000 * full["step_s"], "exact": r["after"]["exact"],
                     "full_exact": full["after"]["exact"], **config}
            results.append(result("finetune_methods", f"val_token_acc ({m})", True, r["after"]["token_acc"],
                                  "full fine-tuning", full["after"]["token_acc"], goal=0.95, **extra))
            results.append(result("finetune_methods", f"trainable_params ({m})", False, r["trainable"],
                                  "full fine-tuning", full["trainable"], goal=10.0, **config))
    cur = curriculum_rows(base, args.curriculum_steps)
    for s in ("easy_to_hard", "competence"):
        results.append(result("finetune_methods", f"arithmetic_val_token_acc (curriculum {s})", True,
                              cur[s]["token_acc"], "random order", cur["random"]["token_acc"], goal=1.0,
                              steps=args.curriculum_steps, exact=cur[s]["exact"], random_exact=cur["random"]["exact"],
                              by_difficulty=cur[s]["by_difficulty"], random_by_difficulty=cur["random"]["by_difficulty"]))
    mix = mixture_rows(base, args.curriculum_steps)
    best_single = max(mix["qa only"]["mean"], mix["arithmetic only"]["mean"])
    results.append(result("finetune_methods", "mean_token_acc_qa_and_arithmetic (mixture 1:1)", True,
                          mix["mixture 1:1"]["mean"], "best single-task SFT", best_single, goal=1.0,
                          steps=args.curriculum_steps, rows=mix))
    write_result("finetune_methods", results)
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
