"""Catastrophic forgetting on the synthetic world, and what EWC and replay keep: train task A, then task B.

Task A: knowledge QA chats (facts about the world's people), learned to near-perfect recall.
Task B: arithmetic word-problem chats (step-by-step solutions), a different skill on the same weights.
A tiny llama-style model learns A, then trains on B with four settings from the same A checkpoint:
  plain     B only (the baseline: sequential fine-tuning)
  ewc       B + EWC penalty (diagonal empirical Fisher of A's loss, one example at a time)
  replay    B with 25% of each batch's examples replayed from a 200-example reservoir of A
  ewc+replay both
A is scored on held-out A items: trained on in phase A, but in neither the replay reservoir nor the Fisher set
(lmstack.adapt.continual.continual_sets: 150 items set aside by content first; the Fisher's 200 items and the
replay reservoir come from the rest). Scoring on the replayed items themselves would flatter replay, which
retrains on them; that number is reported beside, as the contrast.
Reported: A's held-out accuracy before and after B (teacher-forced: mean per-item token accuracy of the
assistant replies, and the share of replies greedy decoding reproduces exactly; each with n and stderr) and
B's token accuracy on held-out problems.

Usage:
    python benchmarks/continual.py            # ~2 minutes on 2 quiet CPU cores
    python benchmarks/continual.py --quick    # fewer steps (smoke run)
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from _common import result, write_result
from lmstack.adapt.continual import EWC, WithPenalty, continual_sets, with_replay
from lmstack.adapt.sft import SFTLoader, SFTObjective, encode_rows, pack_examples, score_examples
from lmstack.world import World
from lmstack.model import ModelConfig, Transformer
from lmstack.tokenizer import train_tokenizer

SEQ = 128
N_HELDOUT, N_FISHER, REPLAY = 150, 200, 200


def build(seed: int = 0):
    world = World(seed=seed, n_people=40)
    rows = world.corpus("chat", split="train")
    val = world.corpus("chat", split="val")
    tok = train_tokenizer(texts=[r["text"] for r in rows], type="bpe", vocab_size=1000, show_progress=False,
                          special_tokens="chat")
    a, _ = encode_rows(tok, [r for r in rows if r["kind"] == "qa"], max_len=SEQ + 1)
    b, _ = encode_rows(tok, [r for r in rows if r["kind"] == "arithmetic"], max_len=SEQ + 1)
    b_val, _ = encode_rows(tok, [r for r in val if r["kind"] == "arithmetic"][:100], max_len=SEQ + 1)
    return tok, a, b, b_val


def train(model, examples, steps, lr, pad_id, objective=None, seed=0, batch=16):
    loader = SFTLoader(pack_examples(examples, SEQ, pad_id), batch, seed=seed)
    objective = objective or SFTObjective()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20)
        loss, _ = objective.loss(model, next(loader))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


def score_items(model, examples, pad) -> dict:
    """Per item: token accuracy and exact reproduction; their means with stderr over the n items."""
    per = [score_examples(model, [e], SEQ, pad) for e in examples]
    out = {"n": len(per)}
    for key in ("token_acc", "exact"):
        vals = [p[key] for p in per]
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1)
        out[key], out[f"{key}_stderr"] = mean, math.sqrt(var / len(vals))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--lam", type=float, default=2000.0, help="EWC strength")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    tok, task_a, task_b, b_val = build()
    pad = tok.pad_id
    steps_a, steps_b = (150, 100) if args.quick else (600, 300)
    print(f"task A: {len(task_a)} QA chats; task B: {len(task_b)} arithmetic chats ({len(b_val)} held out)")
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=384,
                      max_seq_len=256)
    model = Transformer(cfg)
    train(model, task_a, steps_a, 3e-3, pad)
    state_a = {k: v.clone() for k, v in model.state_dict().items()}
    sets = continual_sets(task_a, N_HELDOUT, N_FISHER, REPLAY, seed=0)
    held = {tuple(e.ids) for e in sets.heldout}
    assert not held & {tuple(e.ids) for e in sets.fisher + sets.replay.items}, "held-out A items leaked"
    before = score_items(model, sets.heldout, pad)
    b_before = score_examples(model, b_val, SEQ, pad)
    print(f"after A ({time.perf_counter() - start:.0f}s): held-out A token acc {before['token_acc']:.3f}, exact "
          f"{before['exact']:.3f} (n={before['n']})")
    t = time.perf_counter()
    fisher_batches = [pack_examples([e], SEQ, pad, strategy="none") for e in sets.fisher]
    objective = SFTObjective()
    ewc = EWC.from_examples(model, fisher_batches, lambda m, b: objective.loss(m, b)[0], lam=args.lam)
    print(f"Fisher over {len(fisher_batches)} examples in {time.perf_counter() - t:.1f}s")
    buffer = sets.replay
    replayed = list(buffer.items)  # the reservoir's contents, scored only as the contrast
    rows = {}
    for name in ("plain", "ewc", "replay", "ewc+replay"):
        model.load_state_dict(state_a)
        data = with_replay(task_b, buffer, ratio=1 / 3, seed=1) if "replay" in name else task_b  # 25% of the mix
        obj = WithPenalty(SFTObjective(), ewc.penalty) if "ewc" in name else SFTObjective()
        t = time.perf_counter()
        train(model, data, steps_b, 3e-3, pad, obj, seed=1)
        after = score_items(model, sets.heldout, pad)
        after["replayed_token_acc"] = score_examples(model, replayed, SEQ, pad)["token_acc"]
        b_after = score_examples(model, b_val, SEQ, pad)
        rows[name] = (after, b_after, time.perf_counter() - t)
        print(f"{name:>11}: A token acc {before['token_acc']:.3f} -> {after['token_acc']:.3f}, exact "
              f"{before['exact']:.3f} -> {after['exact']:.3f}; B token acc {b_before['token_acc']:.3f} -> "
              f"{b_after['token_acc']:.3f} ({rows[name][2]:.0f}s)")
    print("\n| setting | held-out A token acc after B | held-out A exact after B | replayed A token acc | B token acc |")
    print("|---|---|---|---|---|")
    for name, (after, b_after, _) in rows.items():
        print(f"| {name} | {after['token_acc']:.3f} ± {after['token_acc_stderr']:.3f} | {after['exact']:.3f} ± "
              f"{after['exact_stderr']:.3f} | {after['replayed_token_acc']:.3f} | {b_after['token_acc']:.3f} |")
    plain = rows["plain"][0]
    config = {"steps_a": steps_a, "steps_b": steps_b, "lam": args.lam, "replay_capacity": REPLAY, "replay_share": 0.25,
              "fisher_items": N_FISHER, "heldout_items": len(sets.heldout), "model": "d128 x3 layers",
              "heldout": "A items trained in phase A, in neither the replay reservoir nor the Fisher set (by content)",
              "a_token_acc_before": round(before["token_acc"], 4), "a_token_acc_before_stderr":
              round(before["token_acc_stderr"], 4), "a_exact_before": round(before["exact"], 4),
              "a_exact_before_stderr": round(before["exact_stderr"], 4), "b_token_acc_before": round(b_before["token_acc"], 4),
              "machine": "2 cores, shared"}
    results = []
    for name in ("ewc", "replay", "ewc+replay"):
        after, b_after, _ = rows[name]
        results.append(result("continual", f"heldout_task_A_token_acc_after_B ({name})", True,
                              round(after["token_acc"], 4), "plain sequential fine-tuning", round(plain["token_acc"], 4),
                              goal=1.0, n=after["n"], stderr=round(after["token_acc_stderr"], 4),
                              baseline_stderr=round(plain["token_acc_stderr"], 4),
                              a_exact_after=round(after["exact"], 4), a_exact_after_stderr=round(after["exact_stderr"], 4),
                              plain_a_exact_after=round(plain["exact"], 4),
                              plain_a_exact_after_stderr=round(plain["exact_stderr"], 4),
                              replayed_a_token_acc_after=round(after["replayed_token_acc"], 4),
                              plain_replayed_a_token_acc_after=round(plain["replayed_token_acc"], 4),
                              b_token_acc_after=round(b_after["token_acc"], 4),
                              plain_b_token_acc_after=round(rows["plain"][1]["token_acc"], 4), **config))
    write_result("continual", results)
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
