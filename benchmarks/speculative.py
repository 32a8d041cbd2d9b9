"""Speculative decoding speedup at identical greedy output: a draft model, and prompt lookup (n-gram).

Batch 1, greedy; baseline: the same engine without speculation on the same prompts; outputs must be
token-identical (checked, the run fails otherwise). Goal: speedup >= 1.8.

- draft: a random-weight target never agrees with any draft, so the target is trained inside the
  benchmark on synthetic-world text (bios + QA) for a fixed time budget, then the draft is distilled
  from it on the same text (KL to the target's next-token distributions): target 6 layers x 192
  wide, draft 2 layers x 128 wide (~4x fewer parameters). Prompts are the openings of held-out
  bios. On a CPU a model this small is overhead-bound, not bandwidth-bound, so what speculation saves
  is mostly the target's per-step layer overhead; the acceptance rate is reported as measured.
- ngram (prompt lookup): target = the llama-base preset (~123M, random init, bandwidth-bound like a
  real model), prompt = a random 16-token motif repeated; proposals come from the sequence itself.

Usage:
    python benchmarks/speculative.py [--new_tokens 64] [--k 4] [--train_seconds 150]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from _common import result, write_result
from _tiny_lm import make_tokenizer, token_stream, train_for, world_texts

import lmstack
from lmstack.infer import LLM, SamplingParams
from lmstack.model import ModelConfig, Transformer, preset


def weight_bytes_read(model: Transformer) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - model.tok_emb.weight.numel() * model.tok_emb.weight.element_size()


def timed(llm: LLM, prompts, params, repeats: int) -> tuple[float, list[list[int]]]:
    """Best-of-`repeats` wall time of generating every prompt one after the other (batch 1)."""
    best, outs = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        outs = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
        best = min(best, time.perf_counter() - start)
    return best, outs


def trained_pair(train_seconds: float, threads: int):
    texts = world_texts(kinds=("bio", "qa"))
    tok = make_tokenizer(texts, vocab_size=1024)
    data = token_stream(tok, texts)
    base = dict(vocab_size=tok.vocab_size, max_seq_len=256, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    target = Transformer(ModelConfig(d_model=192, n_layers=6, n_heads=6, n_kv_heads=2, **base))
    draft = Transformer(ModelConfig(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, **base))
    torch.set_num_threads(threads)
    t_loss = train_for(target, data, train_seconds, batch=8, seq_len=96, lr=3e-3)
    d_loss = train_for(draft, data, train_seconds / 2, batch=8, seq_len=96, lr=5e-3, teacher=target)
    held_out = world_texts(kinds=("bio",), split="val")
    prompts = [" ".join(t.split()[:8]) for t in held_out[:4]]
    info = dict(target_params=target.num_parameters(), draft_params=draft.num_parameters(),
                target_steps=len(t_loss), target_final_loss=round(sum(t_loss[-10:]) / 10, 3),
                draft_steps=len(d_loss), draft_final_kl=round(sum(d_loss[-10:]) / 10, 3))
    print(f"trained: {info}", flush=True)
    return tok, target, draft, prompts, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train_seconds", type=float, default=240)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    common = dict(max_num_seqs=1, enable_prefix_caching=False)
    # draft model: a trained pair
    tok, target, draft, prompts, info = trained_pair(args.train_seconds, args.threads)
    draft_runs = (LLM(target, tokenizer=tok, **common),
                  LLM(target, tokenizer=tok, speculative={"method": "draft", "draft_model": draft,
                                                          "num_tokens": args.k}, **common),
                  [tok.encode(p) for p in prompts],
                  dict(target="6x192 llama trained on world bios+QA", draft="2x128 llama distilled from the target",
                       draft_to_target_params=round(info["draft_params"] / info["target_params"], 3), **info))
    # prompt lookup on a big random target
    torch.manual_seed(0)
    cfg = preset("llama-base")
    with tempfile.TemporaryDirectory() as d:
        lmstack.save_model(Transformer(cfg), d)
        big = lmstack.load_model(d)
    g = torch.Generator().manual_seed(1)
    motif = torch.randint(0, cfg.vocab_size, (16,), generator=g).tolist()
    ngram_runs = (LLM(big, **common),
                  LLM(big, speculative={"method": "ngram", "num_tokens": args.k, "ngram_max": 3}, **common),
                  [motif * 4 + motif[:5]], dict(target="llama-base (random init)", prompt="16-token motif x4"))
    results = []
    for name, (base, llm, ps, extra) in (("draft", draft_runs), ("ngram", ngram_runs)):
        base.generate([ps[0]], SamplingParams(max_tokens=4, temperature=0.0))  # warm up both
        llm.generate([ps[0]], SamplingParams(max_tokens=4, temperature=0.0))
        t_base, t_spec = float("inf"), float("inf")
        before = dict(llm.engine.stats())
        for _ in range(args.repeats):  # alternate, so both see the same machine noise
            tb, want = timed(base, ps, params, 1)
            ts, got = timed(llm, ps, params, 1)
            t_base, t_spec = min(t_base, tb), min(t_spec, ts)
            if got != want:
                raise SystemExit(f"{name}: speculative output differs from plain greedy decoding")
        after = llm.engine.stats()
        proposed = after["spec_proposed_tokens"] - before["spec_proposed_tokens"]
        accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
        n_tok = sum(len(o) for o in got)
        print(f"{name}: baseline {n_tok / t_base:.1f} tok/s, speculative {n_tok / t_spec:.1f} tok/s, "
              f"speedup {t_base / t_spec:.2f}x, acceptance {accepted / max(proposed, 1):.2f}, identical=True",
              flush=True)
        results.append(result(
            "speculative", f"tokens_per_s_{name}", True, n_tok / t_spec, "same engine without speculation",
            n_tok / t_base, goal=1.8, method=name, k=args.k, acceptance_rate=round(accepted / max(proposed, 1), 3),
            proposed=proposed, accepted=accepted, identical_greedy_output=True, new_tokens=args.new_tokens,
            prompts=len(ps), threads=args.threads, **extra))
    write_result("speculative", results)


if __name__ == "__main__":
    main()
