"""Do the explanations point at the right token? lmstack.safety.explain on a copy task, against a random token.

A 2-layer model is trained (seconds) to answer the token that follows a marker: 'ckdMgbnah=' -> 'g' (random
filler). The n held-out prompts each carry a decoy: the answer also appears at another place, so pointing at the
answer's identity is not enough, only the marked occurrence counts. For each prompt, each method's
largest attribution (argmax over every prompt position, the query '=' and BOS included) is scored a hit when it
lands on the copied token:
  grad_x_input                  gradient×input of the answer's logit
  integrated_gradients          from the pad token's embedding at every position, 32 trapezoid steps
  grad_x_input_content          the same with the structure tokens (BOS, marker, '=') held (keep_ids): they get
  integrated_gradients_content  0 and stay at their input in the baseline, so the credit goes to the content
  rollout                       attention rollout, the last position's row (Abnar & Zuidema 2020)
  last_layer_attention          the last layer's head-averaged attention from the last position
Baseline: a uniformly random position (hit rate 1/T, exact); the same method on the untrained model (same seed,
no steps) is the control in the config (untrained_rate). Each rate carries n and its binomial stderr. How often
each method's top lands on the marker instead goes in the config (marker_rate): with every token free to move,
integrated gradients give part of the copy's credit to the marker that gates it.

Speed: seconds per integrated-gradients attribution (32 steps), ours against captum's IntegratedGradients on the
same model, embeddings, baseline and step count (riemann_trapezoid with 33 points is our 32-interval
trapezoid); skipped, with the reason, when captum is not installed. The seconds of one whole explain() call
(maps, rollout, gradient×input, integrated gradients) go in the config, on the copy model and, when the
speedrun's SFT model is on this machine (--chat-model), on a chat-formatted question to it.

Usage:
    python benchmarks/explain_attribution.py                 # ~1-2 minutes on 2 shared cores
    python benchmarks/explain_attribution.py --n 100 --train-steps 400
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import result, timeit, write_result

from lmstack.model import ModelConfig, Transformer
from lmstack.model.hf_io import load_model
from lmstack.safety.explain import (attention_maps, explain, gradient_x_input, integrated_gradients, rollout)
from lmstack.tokenizer import load_tokenizer, train_tokenizer

ALPHABET = "abcdefghijklmnop"
# the speedrun's SFT model, when this machine has it: explain()'s seconds on a real chat model
SFT_MODEL = "/tmp/sr9/runs/20261207-050757/sft/run/model"
CHAT_PROMPT = "What is the capital of the country where the river Nile ends? Answer in one word."


def sample(rng: random.Random, length: int, decoy: bool = False) -> tuple[str, str]:
    answer = rng.choice(ALPHABET)
    text = [rng.choice(ALPHABET) for _ in range(length)]
    at = rng.randrange(length - 1)
    text[at], text[at + 1] = "M", answer
    if decoy:  # the answer once more, somewhere else
        text[rng.choice([i for i in range(length) if i not in (at, at + 1)])] = answer
    return "".join(text) + "=", answer


def train_copy_model(tok, length: int, steps: int, seed: int = 0) -> tuple[Transformer, float]:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("llama-tiny", vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4,
                                  max_seq_len=32)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)

    def batch(n, decoy=False):
        pairs = [sample(rng, length, decoy) for _ in range(n)]
        return (torch.tensor([tok.encode_prompt(p) for p, _ in pairs]),
                torch.tensor([tok.token_to_id(a) for _, a in pairs]))

    held, acc = batch(512, decoy=True), 0.0
    for step in range(1, steps + 1):
        ids, y = batch(64)
        loss = F.cross_entropy(model(ids, logits_to_keep=1)[:, -1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps:  # stop once it has learned the task
            with torch.no_grad():
                acc = (model(held[0], logits_to_keep=1)[:, -1].argmax(-1) == held[1]).float().mean().item()
            if acc >= 0.98:
                break
    return model.eval(), acc


def captum_ig(model, ids: list[int], target: int, base_id: int, steps: int):
    """captum's IntegratedGradients over the token embeddings, summed per token (None when captum is absent)."""
    try:
        from captum.attr import IntegratedGradients  # lazy: optional peer, only for the speed comparison
    except ImportError:
        return None
    x_ids = torch.tensor([ids])
    emb = model.tok_emb(x_ids).detach()
    base = model.tok_emb(torch.full_like(x_ids, base_id)).detach()

    def forward(e):
        handle = model.tok_emb.register_forward_hook(lambda m, a, out: e)
        try:
            return model(x_ids.expand(e.shape[0], -1), logits_to_keep=1)[:, -1, target]
        finally:
            handle.remove()

    ig = IntegratedGradients(forward)
    return lambda: ig.attribute(emb, baselines=base, n_steps=steps + 1, method="riemann_trapezoid",
                                internal_batch_size=16).sum(-1)[0]


NAMES = ("grad_x_input", "integrated_gradients", "grad_x_input_content", "integrated_gradients_content",
         "rollout", "last_layer_attention")


def score(model, tok, args) -> tuple[dict, dict, list, int]:
    """Hits on the copied token and on the marker per method over n decoy prompts, IG completeness gaps, T."""
    rng = random.Random(12345)
    hits, on_marker = dict.fromkeys(NAMES, 0), dict.fromkeys(NAMES, 0)
    gaps, t_len = [], 0
    keep = [tok.bos_id, tok.token_to_id("M"), tok.token_to_id("=")]
    for _ in range(args.n):
        text, answer = sample(rng, args.length, decoy=True)
        ids = tok.encode_prompt(text)
        t_len = len(ids)
        pos = ids.index(tok.token_to_id("M")) + 1
        target = tok.token_to_id(answer)
        probs, _ = attention_maps(model, ids)
        tops = {"grad_x_input": gradient_x_input(model, ids, target),
                "grad_x_input_content": gradient_x_input(model, ids, target, keep_ids=keep),
                "rollout": rollout(probs)[-1], "last_layer_attention": probs[-1].mean(0)[-1]}
        for name, kept in (("integrated_gradients", ()), ("integrated_gradients_content", keep)):
            ig, fx, fb = integrated_gradients(model, ids, target, args.steps, baseline=tok.pad_id, keep_ids=kept)
            gaps.append(abs(float(ig.sum()) - (fx - fb)) / max(abs(fx - fb), 1e-9))
            tops[name] = ig
        for name, values in tops.items():
            hits[name] += int(values.argmax()) == pos
            on_marker[name] += int(values.argmax()) == pos - 1
    return hits, on_marker, gaps, t_len


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="held-out prompts scored")
    ap.add_argument("--length", type=int, default=10, help="characters before '='")
    ap.add_argument("--train-steps", type=int, default=600, help="at most; training stops at 98%% accuracy")
    ap.add_argument("--steps", type=int, default=32, help="integrated-gradients steps")
    ap.add_argument("--chat-model", default=SFT_MODEL,
                    help="a trained chat model directory: one explain() on it is timed too (skipped when absent)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    tok = train_tokenizer(texts=[ALPHABET + "M="], type="char", special_tokens="chat", show_progress=False)
    start = time.perf_counter()
    model, acc = train_copy_model(tok, args.length, args.train_steps)
    train_s = time.perf_counter() - start
    print(f"copy model: held-out accuracy {acc:.3f} ({train_s:.1f} s of training)")

    hits, on_marker, gaps, t_len = score(model, tok, args)
    untrained, _ = train_copy_model(tok, args.length, 0)
    control, _, _, _ = score(untrained, tok, args)
    chance = 1.0 / t_len
    config = dict(task=f"copy the token after a marker, {args.length} chars + '=' (+BOS), one decoy of the answer",
                  n=args.n,
                  model="llama-style 2 layers, d_model 64, 4 heads", max_train_steps=args.train_steps,
                  copy_accuracy=round(acc, 4), ig_steps=args.steps, ig_baseline="pad token",
                  ig_median_relative_completeness_gap=round(statistics.median(gaps), 5),
                  marker_rate={k: round(v / args.n, 4) for k, v in on_marker.items()})
    results = []
    for name, k in hits.items():
        rate = k / args.n
        stderr = math.sqrt(rate * (1 - rate) / args.n)
        results.append(result("explain_attribution", f"top1_on_copied_token_{name}", True, round(rate, 4),
                               "random position (1/T)", round(chance, 4), goal=5.0, stderr=round(stderr, 4),
                               untrained_rate=round(control[name] / args.n, 4), **config))

    # seconds per explanation
    text, answer = sample(random.Random(7), args.length)
    ids, target = tok.encode_prompt(text), tok.token_to_id(answer)
    ours = timeit(lambda: integrated_gradients(model, ids, target, args.steps, baseline=tok.pad_id), repeat=7)
    whole = timeit(lambda: explain(model, ids, target, steps=args.steps, baseline=tok.pad_id), repeat=7)
    peer = captum_ig(model, ids, target, tok.pad_id, args.steps)
    speed = dict(config, explain_seconds=round(whole, 5), prompt_tokens=len(ids))
    if peer is None:
        speed["skipped_baseline"] = "captum is not installed"
        results.append(result("explain_attribution", "seconds_per_integrated_gradients", False, round(ours, 5),
                              "none (captum not installed)", float("nan"), goal=1.0, **speed))
    else:
        theirs_attr = peer()
        ours_attr, _, _ = integrated_gradients(model, ids, target, args.steps, baseline=tok.pad_id)
        # captum's riemann_trapezoid weighs its n points 1/n (they sum to (n-1)/n): the same points, scaled
        scale = args.steps / (args.steps + 1)
        speed["max_abs_diff_vs_captum_scaled"] = float((theirs_attr - scale * ours_attr).abs().max())
        theirs = timeit(peer, repeat=7)
        results.append(result("explain_attribution", "seconds_per_integrated_gradients", False, round(ours, 5),
                              "captum IntegratedGradients", round(theirs, 5), goal=1.0, **speed))
    chat = chat_model_seconds(args.chat_model, args.steps)
    for r in results:
        r["config"]["chat_model_explain"] = chat
    write_result("explain_attribution", results)


def chat_model_seconds(path: str, steps: int) -> dict:
    """Seconds of one whole explain() on a trained chat model's chat-formatted prompt (or why it was skipped)."""
    if not path or not Path(path).is_dir():
        return {"skipped": f"no model directory at {path!r}"}
    model, tok = load_model(path), load_tokenizer(path)
    ids, _ = tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True)
    keep = tok.special_ids  # as `lmstack explain` does by default
    seconds = timeit(lambda: explain(model, ids, steps=steps, baseline=tok.pad_id, keep_ids=keep), repeat=3)
    ex = explain(model, ids, steps=steps, baseline=tok.pad_id, keep_ids=keep)
    return {"model": path, "prompt_tokens": len(ids), "n_layers": model.config.n_layers,
            "d_model": model.config.d_model, "seconds": round(seconds, 4),
            "ig_relative_gap": round(ex.ig_relative_gap, 5), "target": tok.decode([ex.target_id])}


if __name__ == "__main__":
    main()
