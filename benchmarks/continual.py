"""Catastrophic forgetting on the synthetic world, and what EWC and replay keep: train task A, then task B.

Task A: knowledge QA chats (facts about the world's people), learned to near-perfect recall.
Task B: arithmetic word-problem chats (step-by-step solutions), a different skill on the same weights.
A tiny llama-style model learns A, then trains on B with four settings from the same A checkpoint:
  plain     B only (the baseline: sequential fine-tuning)
  ewc       B + EWC penalty (diagonal empirical Fisher of A's loss, one example at a time)
  replay    B with 25% of each batch's examples replayed from a 200-example reservoir of A
  ewc+replay both
Reported: A's accuracy before and after B (teacher-forced: token accuracy of the assistant replies, and the
share of replies greedy decoding reproduces exactly) and B's accuracy on held-out problems.

Usage:
    python benchmarks/continual.py            # ~2 minutes on 2 CPU cores
    python benchmarks/continual.py --quick    # fewer steps (smoke run)
"""
from __future__ import annotations

import argparse
import time

import torch

from _common import result, write_result
from lmstack.adapt.continual import EWC, ReplayBuffer, WithPenalty, with_replay
from lmstack.adapt.sft import SFTLoader, SFTObjective, encode_rows, pack_examples, score_examples
from lmstack.data.world import World
from lmstack.model import ModelConfig, Transformer
from lmstack.tokenizer import train_tokenizer

SEQ = 128


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
    before = score_examples(model, task_a, SEQ, pad)
    b_before = score_examples(model, b_val, SEQ, pad)
    print(f"after A ({time.perf_counter() - start:.0f}s): A token acc {before['token_acc']:.3f}, exact {before['exact']:.3f}")
    t = time.perf_counter()
    fisher_batches = [pack_examples([e], SEQ, pad, strategy="none") for e in task_a[:200]]
    objective = SFTObjective()
    ewc = EWC.from_examples(model, fisher_batches, lambda m, b: objective.loss(m, b)[0], lam=args.lam)
    print(f"Fisher over {len(fisher_batches)} examples in {time.perf_counter() - t:.1f}s")
    buffer = ReplayBuffer(200, seed=0)
    buffer.add(task_a)
    rows = {}
    for name in ("plain", "ewc", "replay", "ewc+replay"):
        model.load_state_dict(state_a)
        data = with_replay(task_b, buffer, ratio=1 / 3, seed=1) if "replay" in name else task_b  # 25% of the mix
        obj = WithPenalty(SFTObjective(), ewc.penalty) if "ewc" in name else SFTObjective()
        t = time.perf_counter()
        train(model, data, steps_b, 3e-3, pad, obj, seed=1)
        after = score_examples(model, task_a, SEQ, pad)
        b_after = score_examples(model, b_val, SEQ, pad)
        rows[name] = (after, b_after, time.perf_counter() - t)
        print(f"{name:>11}: A token acc {before['token_acc']:.3f} -> {after['token_acc']:.3f}, exact "
              f"{before['exact']:.3f} -> {after['exact']:.3f}; B token acc {b_before['token_acc']:.3f} -> "
              f"{b_after['token_acc']:.3f} ({rows[name][2]:.0f}s)")
    print("\n| setting | A token acc before | A token acc after | A exact before | A exact after | B token acc after |")
    print("|---|---|---|---|---|---|")
    for name, (after, b_after, _) in rows.items():
        print(f"| {name} | {before['token_acc']:.3f} | {after['token_acc']:.3f} | {before['exact']:.3f} | "
              f"{after['exact']:.3f} | {b_after['token_acc']:.3f} |")
    plain = rows["plain"][0]["token_acc"]
    config = {"steps_a": steps_a, "steps_b": steps_b, "lam": args.lam, "replay_capacity": 200, "replay_share": 0.25,
              "model": "d128 x3 layers", "a_token_acc_before": before["token_acc"], "a_exact_before": before["exact"]}
    results = []
    for name in ("ewc", "replay", "ewc+replay"):
        after, b_after, _ = rows[name]
        results.append(result("continual", f"task_A_token_acc_after_B ({name})", True, after["token_acc"],
                              "plain sequential fine-tuning", plain, goal=1.0, a_exact_after=after["exact"],
                              plain_a_exact_after=rows["plain"][0]["exact"], b_token_acc_after=b_after["token_acc"],
                              plain_b_token_acc_after=rows["plain"][1]["token_acc"], **config))
    write_result("continual", results)
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
