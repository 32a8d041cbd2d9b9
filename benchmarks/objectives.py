"""What the objective add-ons buy, measured on synthetic corpora where the answer is known.

Four experiments, each ours vs a baseline trained in the same run with the same seeds and batches:
1. Adaptive token sampling (III.10). A Zipf "pair" corpus: rows are word pairs (a, g(a)) with a drawn
   from a Zipf law over N word ids and g a fixed bijection, so the second token of each pair is
   fully predictable from the first, but rare words are seen rarely. After a short CLM run we
   measure the held-out CE on the predictable partner tokens of rare words (Zipf rank in the bottom
   half) and of frequent ones (top 10 ranks), plus the irreducible first-token CE, for plain CE
   (baseline) vs inverse_freq and focal re-weighting.
2. Distillation (III.13 / S.18). A random sparse Markov chain: a 2-layer teacher is trained with CLM,
   then a 1-layer student is trained for the same steps with CE only (baseline) or with KD (ours);
   metric: the student's held-out CE on the true next token (the chain's entropy rate is the floor).
3. Contrastive auxiliary (III.6). Topic corpus: each row draws its tokens from one of 32 topic-specific
   vocabularies. Metric: top-1 retrieval of a row's own continuation among the batch's continuations
   and corrupted ones (64 candidates), with contrastive_weight 0.5 during pretraining (ours) vs a trained
   alternative: CLM alone, then the same projection heads trained with the same InfoNCE loss for the same
   steps on the frozen CLM trunk (a post-hoc probe; it gets the steps on top, so it has more compute, not
   less). Untrained heads (chance) and the held-out CLM loss of the runs are reported too.
4. ELECTRA (III.3). Rows are arithmetic progressions, so a replaced token breaks its neighbours' pattern.
   Metric: ROC AUC of replaced-vs-original scores on held-out batches corrupted by the trained generator.
   Baseline: a trained alternative at equal compute, an MLM encoder of the discriminator's size trained for
   steps x (discriminator + generator parameters) / (discriminator parameters) steps (FLOPs per token scale with
   parameters), scoring each position by 1 - p(observed token) with nothing masked (BERT's 10% random
   replacements teach it to spot a wrong token). The discriminator at initialisation is reported too.

5. Speed: the LM head runs only on scored positions (scored_logits) vs computing every position's
   logits and selecting afterwards, for an MLM training step (15% of positions scored).

Usage:
    python benchmarks/objectives.py            # ~1-3 minutes on 2 CPU cores
    python benchmarks/objectives.py --steps 100   # quicker, noisier
    python benchmarks/objectives.py --only contrastive,electra   # rerun those, keep the other rows
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from _common import result, write_result

from lmstack.model import ModelConfig, Transformer
from lmstack.train.objectives import OBJECTIVES, Contrastive, ObjectiveConfig, build_objective


def train(obj, model, batches, lr=3e-3):
    opt = torch.optim.AdamW(list(model.parameters()) + obj.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    model.train()
    for tokens in batches:
        loss, _ = obj.loss(model, obj.prepare(tokens, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + obj.parameters(), 1.0)
        opt.step()
    model.eval()
    return model


# ---------------------------------------------------------------- 1. token re-weighting on a Zipf corpus
def zipf_pairs(n_words: int, s: float, b: int, t: int, g: torch.Generator, offset: int = 4) -> torch.Tensor:
    p = torch.arange(1, n_words + 1, dtype=torch.float).pow(-s)
    words = torch.multinomial(p / p.sum(), b * ((t + 1) // 2 + 1), replacement=True, generator=g).view(b, -1)
    pairs = torch.stack((offset + words, offset + n_words + words), -1).view(b, -1)  # a, g(a) = a + N
    return pairs[:, :t]


def token_weighting(steps: int) -> list[dict]:
    n_words, s, t, b = 400, 1.1, 65, 16
    cfg = ModelConfig(vocab_size=2 * n_words + 8, d_model=64, n_layers=2, n_heads=4, max_seq_len=t)
    g = torch.Generator().manual_seed(0)
    batches = [zipf_pairs(n_words, s, b, t, g) for _ in range(steps)]
    held = zipf_pairs(n_words, s, 512, t, torch.Generator().manual_seed(99))
    x, y = held[:, :-1], held[:, 1:]
    partner = y >= 4 + n_words                    # predicting g(a) from a: learnable
    rank = torch.where(partner, y - 4 - n_words, y - 4)   # Zipf rank of the word (0 = most frequent)
    rare, frequent = rank >= n_words // 2, rank < 10
    out = {}
    for method in ("none", "inverse_freq", "focal"):
        torch.manual_seed(0)
        obj = build_objective(ObjectiveConfig(name="clm", token_weighting=method), cfg)
        start = time.perf_counter()
        model = train(obj, Transformer(cfg), batches)
        with torch.no_grad():
            ce = torch.nn.functional.cross_entropy(model(x).transpose(1, 2), y, reduction="none")
        out[method] = {
            "rare_partner_ce": float(ce[partner & rare].mean()),
            "frequent_partner_ce": float(ce[partner & frequent].mean()),
            "rare_first_ce": float(ce[~partner & rare].mean()),
            "frequent_first_ce": float(ce[~partner & frequent].mean()),
            "all_ce": float(ce.mean()), "seconds": time.perf_counter() - start}
        print(f"token_weighting={method:13s} " + " ".join(f"{k}={v:.3f}" for k, v in out[method].items()))
    config = {"corpus": f"Zipf(s={s}) word pairs (a, g(a)), {n_words} words", "steps": steps, "batch": [b, t - 1],
              "model": "2 layers, d_model 64", "rare": "Zipf rank >= 200", "frequent": "Zipf rank < 10",
              "all_methods": out}
    return [result("objectives_token_weighting_" + m, "rare_token_partner_ce", False, out[m]["rare_partner_ce"],
                   "plain CE (token_weighting=none)", out["none"]["rare_partner_ce"], goal=1.0, **config)
            for m in ("inverse_freq", "focal")]


# ---------------------------------------------------------------- 2. distillation on a Markov chain
def random_chain(n: int, alpha: float = 0.1) -> torch.Tensor:
    """A Markov chain whose rows are Dirichlet(alpha) draws: a few likely successors per state."""
    return torch.distributions.Dirichlet(torch.full((n,), alpha)).sample((n,))


def sample_chain(trans: torch.Tensor, b: int, t: int, g: torch.Generator, offset: int = 4) -> torch.Tensor:
    state = torch.randint(0, trans.shape[0], (b,), generator=g)
    rows = [state]
    for _ in range(t - 1):
        state = torch.multinomial(trans[state], 1, generator=g).squeeze(1)
        rows.append(state)
    return offset + torch.stack(rows, 1)


def distillation(steps: int) -> list[dict]:
    n, t, b = 64, 65, 16
    torch.manual_seed(0)
    trans = random_chain(n)
    entropy_rate = float(-(trans * trans.clamp_min(1e-12).log()).sum(1).mean())
    g = torch.Generator().manual_seed(0)
    teacher_batches = [sample_chain(trans, b, t, g) for _ in range(2 * steps)]
    batches = [sample_chain(trans, b, t, g) for _ in range(steps)]
    held = sample_chain(trans, 256, t, torch.Generator().manual_seed(99))
    big = ModelConfig(vocab_size=n + 8, d_model=64, n_layers=2, n_heads=4, max_seq_len=t)
    small = big.replace(n_layers=1, d_model=32, n_heads=2, n_kv_heads=0, d_ff=0, head_dim=0)
    torch.manual_seed(0)
    teacher = train(build_objective(ObjectiveConfig(), big), Transformer(big), teacher_batches)

    def val(model):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(held[:, :-1]).transpose(1, 2), held[:, 1:]))

    torch.manual_seed(1)
    ce_student = train(build_objective(ObjectiveConfig(), small), Transformer(small), batches)
    torch.manual_seed(1)
    kd = OBJECTIVES["distill"](ObjectiveConfig(name="distill"), small, teacher=teacher)
    kd_student = train(kd, Transformer(small), batches)
    figures = {"teacher": val(teacher), "student_ce_only": val(ce_student), "student_kd": val(kd_student),
               "entropy_rate": entropy_rate}
    print("distillation " + " ".join(f"{k}={v:.4f}" for k, v in figures.items()))
    return [result("objectives_distillation", "student_val_ce", False, figures["student_kd"],
                   "student trained with CE only", figures["student_ce_only"], goal=1.0,
                   corpus=f"Dirichlet(0.1) Markov chain over {n} states", steps=steps,
                   teacher="2 layers d64 (2x steps)", student="1 layer d32", alpha=0.5, temperature=2.0,
                   figures=figures)]


# ---------------------------------------------------------------- 3. contrastive auxiliary
def topic_rows(b: int, t: int, g: torch.Generator, n_topics: int = 32, per_topic: int = 8) -> torch.Tensor:
    topic = torch.randint(0, n_topics, (b, 1), generator=g)
    return 4 + topic * per_topic + torch.randint(0, per_topic, (b, t), generator=g)


def contrastive(steps: int) -> list[dict]:
    t, b = 33, 32
    cfg = ModelConfig(vocab_size=4 + 32 * 8 + 4, d_model=64, n_layers=2, n_heads=4, max_seq_len=t)
    g = torch.Generator().manual_seed(0)
    batches = [topic_rows(b, t, g) for _ in range(steps)]
    held = [topic_rows(b, t, torch.Generator().manual_seed(99 + i)) for i in range(4)]
    figures, models = {}, {}

    def evaluate(obj, model) -> dict[str, float]:
        acc, ce = [], []
        with torch.no_grad():
            for i, tokens in enumerate(held):
                _, m = obj.loss(model, obj.prepare(tokens, torch.Generator().manual_seed(i)))
                acc.append(m["contrastive_acc"])
                ce.append(m["ce"])
        return {"retrieval_top1": sum(acc) / len(acc), "clm_val_ce": sum(ce) / len(ce)}

    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        # weight 0 keeps the heads (to measure retrieval) but gives them no gradient: they stay at init
        ocfg = ObjectiveConfig(name="clm", contrastive_weight=weight)
        obj = Contrastive(OBJECTIVES["clm"](ocfg, cfg), ocfg, cfg)
        models[weight] = train(obj, Transformer(cfg), batches)
        figures[weight] = evaluate(obj, models[weight])
        print(f"contrastive_weight={weight}: " + " ".join(f"{k}={v:.4f}" for k, v in figures[weight].items()))
    # The trained alternative: heads fitted afterwards on the frozen CLM-only trunk, same loss, same steps.
    torch.manual_seed(0)
    ocfg = ObjectiveConfig(name="clm", contrastive_weight=0.5)
    probe = Contrastive(OBJECTIVES["clm"](ocfg, cfg), ocfg, cfg)
    trunk = models[0.0]
    for p in trunk.parameters():
        p.requires_grad_(False)
    figures["probe"] = evaluate(probe, train(probe, trunk, batches))
    print("post-hoc heads on the frozen CLM trunk: " + " ".join(f"{k}={v:.4f}" for k, v in figures["probe"].items()))
    return [result("objectives_contrastive", "retrieval_top1", True, figures[0.5]["retrieval_top1"],
                   "CLM, then the same heads trained for the same steps on the frozen trunk",
                   figures["probe"]["retrieval_top1"], goal=1.0,
                   corpus="32 topics x 8 ids, one topic per row", candidates=2 * b, chance=1 / (2 * b), steps=steps,
                   untrained_heads_top1=figures[0.0]["retrieval_top1"],
                   clm_val_ce={"weight_0": figures[0.0]["clm_val_ce"], "weight_0.5": figures[0.5]["clm_val_ce"]})]


# ---------------------------------------------------------------- 4. ELECTRA discriminator
def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random replaced token scores above a random original one (ties count half)."""
    pos, neg = scores[labels], scores[~labels]
    order = torch.cat((pos, neg)).argsort().argsort().float() + 1
    return float((order[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def progressions(b: int, t: int, g: torch.Generator, n: int = 40) -> torch.Tensor:
    """Arithmetic progressions mod n: a replaced token breaks the pattern its neighbours set."""
    start, step = torch.randint(0, n, (b, 1), generator=g), torch.randint(1, 4, (b, 1), generator=g)
    return 4 + (start + step * torch.arange(t)) % n


def electra(steps: int) -> list[dict]:
    t, b, n = 65, 16, 40
    g = torch.Generator().manual_seed(0)
    batches = [progressions(b, t, g) for _ in range(steps)]
    held = [progressions(64, t, torch.Generator().manual_seed(99 + i)) for i in range(2)]
    cfg = ModelConfig(vocab_size=n + 8, d_model=64, n_layers=2, n_heads=4, max_seq_len=t, causal=False)
    torch.manual_seed(0)
    obj = build_objective(ObjectiveConfig(name="electra"), cfg)
    model = Transformer(cfg)

    def measure():
        """AUC of the discriminator head's scores (read with hooks) against which inputs were replaced."""
        model.eval()
        seen, scores, labels, inputs = {}, [], [], []
        hooks = [obj.extra["disc_head"].register_forward_hook(lambda m, i, o: seen.__setitem__("score", o.squeeze(-1))),
                 model.register_forward_pre_hook(lambda m, args: seen.__setitem__("input", args[0]))]
        with torch.no_grad():
            for i, tokens in enumerate(held):
                batch = obj.prepare(tokens, torch.Generator().manual_seed(i))
                obj.loss(model, batch)
                scores.append(seen["score"].flatten())
                labels.append((seen["input"] != batch["targets"]))
                inputs.append(seen["input"].clone())
        for h in hooks:
            h.remove()
        return auc(torch.cat(scores), torch.cat([lab.flatten() for lab in labels])), list(zip(inputs, labels))

    before, _ = measure()
    train(obj, model, batches)
    after, corrupted = measure()
    print(f"electra replaced-token AUC: init {before:.4f} -> trained {after:.4f}")

    # The trained alternative at equal compute: MLM on an encoder of the discriminator's size.
    n_disc = sum(p.numel() for p in model.parameters())
    n_extra = sum(p.numel() for p in obj.parameters())
    mlm_steps = round(steps * (n_disc + n_extra) / n_disc)
    extra = [progressions(b, t, g) for _ in range(mlm_steps - steps)]
    torch.manual_seed(0)
    mlm_obj = build_objective(ObjectiveConfig(name="mlm"), cfg)
    mlm = train(mlm_obj, Transformer(cfg), batches + extra)
    with torch.no_grad():
        scores = [1 - torch.softmax(mlm(inp), -1).gather(-1, inp[..., None]).squeeze(-1) for inp, _ in corrupted]
    mlm_auc = auc(torch.cat([s.flatten() for s in scores]), torch.cat([lab.flatten() for _, lab in corrupted]))
    print(f"MLM at equal compute ({mlm_steps} steps), 1 - p(observed) AUC: {mlm_auc:.4f}")
    return [result("objectives_electra", "replaced_token_auc", True, after,
                   "MLM encoder at equal compute, scored by 1 - p(observed token)", mlm_auc, goal=1.0,
                   corpus=f"arithmetic progressions mod {n}", steps=steps, mlm_steps=mlm_steps,
                   params_discriminator=n_disc, params_generator_and_head=n_extra, auc_at_init=before,
                   model="encoder 2 layers d64, generator 2 layers d32")]


# ---------------------------------------------------------------- 5. LM head on scored positions only
class Wrapped(torch.nn.Module):
    """Hides the Transformer's type, so the objective takes the generic path (full logits, then select)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, **kw):
        return self.model(idx, **kw)


def scored_head_speed(repeat: int = 8) -> list[dict]:
    cfg = ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, max_seq_len=256, causal=False)
    obj = build_objective(ObjectiveConfig(name="mlm"), cfg)
    model = Transformer(cfg).train()
    batch = obj.prepare(torch.randint(0, 8000, (8, 257), generator=torch.Generator().manual_seed(0)),
                        torch.Generator().manual_seed(0))

    def step(m):
        loss, _ = obj.loss(m, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    wrapped = Wrapped(model)
    ours, base = [], []
    for _ in range(repeat + 1):  # alternate, so both share the machine's noise; the first round warms up
        for fn, out in ((lambda: step(model), ours), (lambda: step(wrapped), base)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    ours_s, base_s = sorted(ours[1:])[repeat // 2], sorted(base[1:])[repeat // 2]
    print(f"mlm train step: head on scored positions {ours_s * 1e3:.1f} ms, full logits {base_s * 1e3:.1f} ms")
    return [result("objectives_mlm_scored_head", "seconds_per_step", False, ours_s,
                   "full-vocab logits at every position, then select", base_s, goal=1.1,
                   model="encoder 4 layers d256 vocab 8192", batch=[8, 256], mask_prob=0.15)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--only", default="", help="comma-separated experiments to rerun; the other rows are kept")
    args = ap.parse_args()
    torch.set_num_threads(2)
    runs = {"objectives_token_weighting": lambda: token_weighting(args.steps),
            "objectives_distillation": lambda: distillation(args.steps),
            "objectives_contrastive": lambda: contrastive(args.steps),
            "objectives_electra": lambda: electra(args.steps),
            "objectives_mlm_scored_head": scored_head_speed}
    only = {f"objectives_{name.strip()}" for name in args.only.split(",") if name.strip()}
    if not only:
        write_result("objectives", [r for run in runs.values() for r in run()])
        return
    unknown = only - set(runs)
    if unknown:
        raise SystemExit(f"--only: unknown experiment(s) {sorted(unknown)}; choose from "
                         f"{sorted(k.removeprefix('objectives_') for k in runs)}")
    previous = json.loads((Path(__file__).resolve().parent / "results" / "objectives.json").read_text())
    fresh = {name: runs[name]() for name in only}
    merged = []
    for r in previous:  # keep the order; replace the rerun experiments' rows
        name = r["benchmark"]
        if name.startswith("objectives_token_weighting"):  # two rows (inverse_freq, focal), one experiment
            name = "objectives_token_weighting"
        if name in fresh:
            merged += fresh.pop(name)
        elif name not in only:
            merged.append(r)
    write_result("objectives", merged + [r for rows in fresh.values() for r in rows])


if __name__ == "__main__":
    main()
