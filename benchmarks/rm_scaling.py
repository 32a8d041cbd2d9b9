"""Reward-model scaling (size x data) and best-of-n over-optimisation against the world's gold checkers (Gao et al.
2022), from the speedrun's SFT checkpoint.

1. Reward models: from-scratch llama-style backbones of several sizes (--sizes dxL; the speedrun's tokenizer) and,
   as size "sft", the speedrun's SFT model itself (pretrained on the world: the usual RM init). A Bradley-Terry
   head on the last token, each trained the same way (AdamW lr --lr, --sft_lr for "sft", batch 8 pairs, --epochs
   passes over its data, warmup 10 then cosine) on a nested 25/50/100% share of the world's train preference
   pairs. Pairwise accuracy on the test pairs (n and binomial stderr), as a size x data table.
2. Best-of-n: the SFT policy samples a pool of 64 replies (temperature 1) to each held-out prompt of three kinds,
   each with a gold checker from the world:
     arithmetic   the number after the last #### equals the answer (MathReward)
     qa           the reply states the true fact (checkers.states_fact, what World.is_correct asks)
     safety       refuses a harmful request / does not refuse its benign look-alike (SafetyReward)
   Each 100%-data RM picks the best of the first n of the pool (nested, n = 1..64); the gold score of its pick
   (mean ± stderr over prompts) against KL_bon = log n - (n-1)/n, with the oracle (gold picks: pass@n) and the
   proxy's own score (z-scored over the pool) as reference lines. The all-subsets estimator
   (lmstack.align.best_of_n, estimator="expected") is reported beside the nested one.
Headline row: gold score at the best n for the largest from-scratch RM vs n = 1 (the policy's first sample; the
peak n is read off the same prompts, so the ratio is optimistic by the choice of n; n = 64 is in the config too).

Every piece (pool, each RM's accuracy and pool scores) is cached in --work, so an interrupted run resumes.
Writes benchmarks/results/rm_scaling.json, rm_scaling.png (gold vs KL and vs sqrt KL, proxy vs KL) and
rm_scaling_kinds.png (gold vs KL per prompt kind).

Usage:
    python benchmarks/rm_scaling.py --run runs/20261207-050757                 # ~15 min on 1 thread
    python benchmarks/rm_scaling.py --run RUN --smoke --work /tmp/rms_smoke   # ~1 min: the plumbing only, writes
                                                                               # its JSON and PNGs into --work
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import matplotlib
import torch
from _common import RESULTS, result, write_result

from lmstack.align.best_of_n import bon_curve, kl_bon, peak_n
from lmstack.align.config import AlignConfig
from lmstack.align.reward_model import RewardModel, pairwise_accuracy, train_reward_model
from lmstack.align.rewards.safety import SafetyReward
from lmstack.align.rewards.verifiable import MathReward
from lmstack.align.rollout import prompt_text, sample
from lmstack.config import atomic_save_figure, atomic_write_text
from lmstack.model import ModelConfig, Transformer
from lmstack.model.hf_io import load_model
from lmstack.stages.align import _data
from lmstack.tokenizer import load_tokenizer
from lmstack.world.checkers import states_fact
from lmstack.world.preferences import is_harmful_request

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

NS = (1, 2, 4, 8, 16, 32, 64)
MAX_NEW = {"arithmetic": 128, "qa": 48, "safety": 64}  # the SFT model's replies of each kind fit these


# ---- the pool: 64 samples per held-out prompt, each with its gold score ---------------------------------------
def gold_score(kind: str, record: dict, text: str) -> float:
    if kind == "arithmetic":
        return MathReward()(prompt_text(record), text, record)
    if kind == "qa":
        return float(states_fact(record["answer"], text))
    return SafetyReward()(record["prompt"], text, record)


def prompt_records(data: dict, per_kind: int, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    qa = [r for r in data["chat_test"] if r.get("kind") == "qa" and r.get("answer")]
    safety = [{"prompt": p, "label": "harmful" if is_harmful_request(p) else "benign"} for p in data["safety_test"]]
    harmful = [r for r in safety if r["label"] == "harmful"][:per_kind // 2]  # equal numbers of each side
    benign = [r for r in safety if r["label"] == "benign"][:per_kind - len(harmful)]
    return {"arithmetic": rng.sample(data["arithmetic_test"], per_kind), "qa": rng.sample(qa, per_kind),
            "safety": harmful + benign}


def build_pool(policy, tok, data: dict, args, path: Path) -> tuple[list[dict], float]:
    """(prompts with their samples and gold scores, the seconds sampling took), built once and cached at path."""
    if path.is_file():
        cached = json.loads(path.read_text())
        return cached["prompts"], cached["seconds"]
    out, start = [], time.perf_counter()
    for kind, records in prompt_records(data, args.prompts_per_kind, args.seed).items():
        ro = sample(policy, tok, records, n=args.pool, max_new_tokens=MAX_NEW[kind], temperature=args.temperature,
                    seed=args.seed)
        for i, record in enumerate(records):
            texts = ro.texts[i * args.pool:(i + 1) * args.pool]
            out.append({"kind": kind, "prompt": ro.prompts[i * args.pool], "texts": texts,
                        "gold": [gold_score(kind, record, t) for t in texts]})
        print(f"pool: {kind} {len(records)} prompts x {args.pool} in {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    atomic_write_text(path, json.dumps({"seconds": seconds, "prompts": out}) + "\n")
    return out, seconds


# ---- reward models --------------------------------------------------------------------------------------------
def backbone(size: str, vocab: int, seed: int, sft: Path) -> torch.nn.Module:
    """A from-scratch backbone for "dxL", or the speedrun's pretrained + SFT'd model itself for "sft"."""
    if size == "sft":
        return load_model(sft, lazy=False)
    d, layers = (int(x) for x in size.split("x"))
    torch.manual_seed(seed)
    heads = max(1, d // 32)  # head_dim 32 at every size, full multi-head attention
    return Transformer(ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=heads,
                                   d_ff=4 * d, max_seq_len=256))


def params(rm: RewardModel) -> dict[str, int]:
    total = sum(p.numel() for p in rm.parameters())
    emb = sum(p.numel() for n, p in rm.named_parameters() if "tok_emb" in n or "lm_head" in n)
    return {"total": total, "non_embedding": total - emb}


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def train_one(size: str, frac: float, tok, data: dict, pool: list[dict], args, work: Path) -> dict:
    """Train (or read back) one RM; a 100%-data RM also scores every sample of the pool."""
    path = work / f"rm_{size}_{int(round(frac * 100))}.json"
    if path.is_file():
        return json.loads(path.read_text())
    pairs = list(data["pairs_train"])
    random.Random(args.seed).shuffle(pairs)  # one order: the 25% share is inside the 50%, the 50% inside the 100%
    train = pairs[:max(1, round(frac * len(pairs)))]
    steps = max(1, math.ceil(args.epochs * len(train) / 8))
    cfg = AlignConfig(method="rm", batch_size=8, max_len=256, center_coef=0.01,
                      train={"steps": steps, "eval_every": 0, "log_every": 25, "progress": False, "seed": args.seed},
                      optim={"lr": args.sft_lr if size == "sft" else args.lr}, schedule={"warmup_steps": 10})
    rm = RewardModel(backbone(size, tok.vocab_size, args.seed, args.sft), seed=args.seed)
    summary = train_reward_model(rm, tok, train, [], cfg, log=print)
    test = pairwise_accuracy(rm, tok, data["pairs_test"])
    val = pairwise_accuracy(rm, tok, data["pairs_val"])
    row = {"size": size, "fraction": frac, "params": params(rm), "train_pairs": len(train), "steps": steps,
           "train_seconds": round(summary["train_seconds"], 1), "final_loss": summary["history"][-1]["loss"],
           "test_accuracy": test["accuracy"], "test_stderr": binomial_se(test["accuracy"], test["n_pairs"]),
           "test_n": test["n_pairs"], "val_accuracy": val["accuracy"], "val_n": val["n_pairs"],
           "test_per_kind": {k[9:]: v for k, v in test.items() if k.startswith("accuracy/")}}
    if frac == 1.0:
        t0 = time.perf_counter()
        prompts = [p["prompt"] for p in pool for _ in p["texts"]]
        texts = [t for p in pool for t in p["texts"]]
        scores = rm.rewards(tok, prompts, texts, max_len=256, batch_size=64).tolist()
        row["pool_scores"] = [scores[i * args.pool:(i + 1) * args.pool] for i in range(len(pool))]
        row["score_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"rm {size} @ {frac:.0%}: {row['params']['total']:,} params, {steps} steps in {row['train_seconds']} s, "
          f"test acc {row['test_accuracy']:.3f} ± {row['test_stderr']:.3f}", flush=True)
    atomic_write_text(path, json.dumps(row) + "\n")
    return row


# ---- curves and plots -----------------------------------------------------------------------------------------
def curves(pool: list[dict], scores: list[list[float]] | None, kinds: tuple[str, ...] | None = None) -> dict:
    keep = [i for i, p in enumerate(pool) if kinds is None or p["kind"] in kinds]
    gold = torch.tensor([pool[i]["gold"] for i in keep], dtype=torch.float64)
    if scores is None:  # the oracle: gold picks its own best
        return {"nested": bon_curve(gold, gold, NS), "expected": bon_curve(gold, gold, NS, "expected")}
    proxy = torch.tensor([scores[i] for i in keep], dtype=torch.float64)
    proxy = (proxy - proxy.mean()) / proxy.std()  # z-scored over the pool: RMs of different sizes on one axis
    return {"nested": bon_curve(proxy, gold, NS), "expected": bon_curve(proxy, gold, NS, "expected")}


def safety_picks(pool: list[dict], scores: list[list[float]], n: int) -> dict:
    """What the proxy's best of the first n picks on safety prompts: counts of right/wrong picks on harmful and
    benign requests, and one wrong pick (the text, truncated) to show what the proxy rewards."""
    counts, example = {}, None
    for p, s in zip(pool, scores):
        if p["kind"] != "safety":
            continue
        i = max(range(n), key=lambda j: (s[j], -j))  # the nested pick (first of ties)
        side = "harmful" if is_harmful_request(p["prompt"]) else "benign"
        key = f"{side}_{'right' if p['gold'][i] else 'wrong'}"
        counts[key] = counts.get(key, 0) + 1
        if example is None and not p["gold"][i]:
            example = {"prompt": p["prompt"], "pick": p["texts"][i][:160]}
    return {"n": n, **dict(sorted(counts.items())), "example_wrong_pick": example}


def plot(per_rm: dict, oracle: dict, png: Path) -> Path:
    """2 x 2: gold vs KL and vs sqrt(KL) (nested, with the oracle), the paired gold gain over n = 1 vs KL with the
    all-subsets estimator (RMs only: its small stderr shows where each RM peaks), and the proxy's own score."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, sqrt in ((axes[0, 0], False), (axes[0, 1], True)):
        for name, c in list(per_rm.items()) + [("oracle (gold picks)", oracle)]:
            rows = c["nested"]
            x = [math.sqrt(r["kl"]) if sqrt else r["kl"] for r in rows]
            ax.errorbar(x, [r["gold"] for r in rows], yerr=[r["gold_stderr"] for r in rows], marker="o", ms=3,
                        capsize=2, label=name, linestyle="--" if name.startswith("oracle") else "-")
        ax.axhline(oracle["nested"][0]["gold"], color="gray", linewidth=0.8, label="n = 1 (policy)")
        ax.set_xlabel("sqrt(KL_bon)" if sqrt else "KL_bon (nats)")
        ax.set_ylabel("gold score of the pick")
        ax.set_title("first n of the pool (nested), ± stderr over prompts", fontsize=9)
        ax.legend(fontsize=7)
    for name, c in per_rm.items():
        rows = c["expected"]
        axes[1, 0].errorbar([r["kl"] for r in rows], [r["gain"] for r in rows], yerr=[r["gain_stderr"] for r in rows],
                            marker="o", ms=3, capsize=2, label=name)
    axes[1, 0].axhline(0.0, color="gray", linewidth=0.8)
    axes[1, 0].set_xlabel("KL_bon (nats)")
    axes[1, 0].set_ylabel("gold gain over n = 1 (paired)")
    axes[1, 0].set_title("mean over all n-subsets of the pool, ± paired stderr", fontsize=9)
    axes[1, 0].legend(fontsize=7)
    for name, c in per_rm.items():
        rows = c["nested"]
        axes[1, 1].errorbar([r["kl"] for r in rows], [r["proxy"] for r in rows],
                            yerr=[r["proxy_stderr"] for r in rows], marker="o", ms=3, capsize=2, label=name)
    axes[1, 1].set_xlabel("KL_bon (nats)")
    axes[1, 1].set_ylabel("proxy RM score of the pick (z over pool)")
    axes[1, 1].set_title("proxy score (nested)", fontsize=9)
    axes[1, 1].legend(fontsize=7)
    fig.suptitle("best-of-n, n = 1..64, by reward model: gold score vs KL_bon = log n - (n-1)/n", fontsize=10)
    fig.tight_layout()
    return atomic_save_figure(fig, png, dpi=80)


def plot_kinds(by_kind: dict, png: Path) -> Path:
    fig, axes = plt.subplots(1, len(by_kind), figsize=(4.3 * len(by_kind), 3.5), squeeze=False)
    for ax, (kind, lines) in zip(axes[0], by_kind.items()):
        for name, rows in lines.items():
            ax.errorbar([r["kl"] for r in rows], [r["gold"] for r in rows], yerr=[r["gold_stderr"] for r in rows],
                        marker="o", ms=3, capsize=2, label=name, linestyle="--" if name.startswith("oracle") else "-")
        ax.set_title(f"{kind} ({lines[next(iter(lines))][0]['prompts']} prompts)", fontsize=9)
        ax.set_xlabel("KL_bon (nats)")
        ax.set_ylabel("gold score of the pick")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return atomic_save_figure(fig, png, dpi=80)


def short(rows: list[dict]) -> list[dict]:
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a speedrun run directory (holds sft/run/model and world/)")
    ap.add_argument("--work", default="/tmp/lmstack_rm_scaling", help="cache of the pool and RMs (resumable)")
    ap.add_argument("--sizes", default="32x1,64x2,128x3,256x4,sft",
                    help="RM backbones: d_model x n_layers from scratch, or sft (the speedrun's SFT model)")
    ap.add_argument("--fractions", default="0.25,0.5,1.0", help="shares of the train preference pairs")
    ap.add_argument("--sft_fractions", default="1.0", help="the shares for the sft backbone (the costliest RM)")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=1e-3, help="RM learning rate of the from-scratch backbones")
    ap.add_argument("--sft_lr", type=float, default=3e-4, help="RM learning rate from the SFT model (as alignment.py)")
    ap.add_argument("--prompts_per_kind", type=int, default=80)
    ap.add_argument("--pool", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and counts, results under rm_scaling_smoke")
    args = ap.parse_args()
    name = "rm_scaling"
    if args.smoke:
        args.sizes, args.fractions, args.epochs, args.prompts_per_kind = "16x1,32x1,sft", "0.5,1.0", 0.1, 4
    if args.pool < max(NS):
        raise SystemExit(f"--pool must be at least {max(NS)}")
    torch.set_num_threads(1)  # tiny models on a shared 2-core box
    run, work = Path(args.run), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sft = args.sft = run / "sft" / "run" / "model"
    tok = load_tokenizer(sft)
    policy = load_model(sft, lazy=False)
    data = _data(run / "world", tok, policy.config.max_seq_len)
    start = time.perf_counter()
    pool, pool_seconds = build_pool(policy, tok, data, args, work / f"pool_{args.prompts_per_kind}_{args.pool}.json")
    sizes = args.sizes.split(",")
    shares = {s: [float(f) for f in (args.sft_fractions if s == "sft" else args.fractions).split(",")]
              for s in sizes}
    if any(1.0 not in f for f in shares.values()):
        raise SystemExit("--fractions and --sft_fractions must include 1.0 (the RMs that run best-of-n)")
    rms = {(s, f): train_one(s, f, tok, data, pool, args, work) for s in sizes for f in shares[s]}

    def label(s: str) -> str:
        return f"RM {'SFT-init' if s == 'sft' else s} ({rms[(s, 1.0)]['params']['total'] / 1e6:.2f}M)"

    oracle = curves(pool, None)
    per_rm = {label(s): curves(pool, rms[(s, 1.0)]["pool_scores"]) for s in sizes}
    kinds = ("arithmetic", "qa", "safety")
    by_kind = {k: {**{label(s): curves(pool, rms[(s, 1.0)]["pool_scores"], (k,))["nested"] for s in sizes},
                   "oracle (gold picks)": curves(pool, None, (k,))["nested"]} for k in kinds}
    out_dir = work if args.smoke else RESULTS  # a smoke run leaves benchmarks/results alone
    png = plot(per_rm, oracle, out_dir / f"{name}.png")
    png_kinds = plot_kinds(by_kind, out_dir / f"{name}_kinds.png")

    table = {s: {f"{int(f * 100)}%": {k: rms[(s, f)][k] for k in ("test_accuracy", "test_stderr", "test_n",
                                                                   "val_accuracy", "train_pairs", "steps",
                                                                   "train_seconds", "test_per_kind")}
                 for f in shares[s]} for s in sizes}
    common = {"start": "speedrun SFT checkpoint (policy); RM backbones from scratch (dxL, the speedrun tokenizer) "
                       "and, as 'sft', the SFT checkpoint itself (pretrained d256 x 4, lr --sft_lr)",
              "run": run.name, "rm_backbones": {s: rms[(s, 1.0)]["params"] for s in sizes},
              "rm_recipe": f"llama-style, head_dim 32, d_ff 4d; Bradley-Terry, AdamW lr {args.lr} (sft: "
                           f"{args.sft_lr}), batch 8 pairs, "
                           f"{args.epochs:g} epochs, warmup 10 + cosine, center_coef 0.01; nested data shares",
              "pool": f"{args.pool} samples/prompt, temperature {args.temperature}, {args.prompts_per_kind} test "
                      f"prompts per kind ({', '.join(kinds)}), n = {list(NS)} nested (first n of the pool)",
              "kl_bon": {n: round(kl_bon(n), 4) for n in NS}}
    scratch = [s for s in sizes if s != "sft"]
    big, small = scratch[-1], scratch[0]
    rows = [result(name, "rm_test_pairwise_accuracy", True, round(rms[(big, 1.0)]["test_accuracy"], 4),
                   f"smallest RM {small} at 100% data", round(rms[(small, 1.0)]["test_accuracy"], 4), goal=1.0,
                   ours_is=f"largest from-scratch RM {big} at 100% data",
                   stderr=round(rms[(big, 1.0)]["test_stderr"], 4),
                   n_test=rms[(big, 1.0)]["test_n"], table=table, **common)]
    if "sft" in sizes:
        rows.append(result(name, "rm_test_pairwise_accuracy_sft_init", True,
                           round(rms[("sft", 1.0)]["test_accuracy"], 4), f"from-scratch RM {big} at 100% data",
                           round(rms[(big, 1.0)]["test_accuracy"], 4), goal=1.0,
                           stderr=round(rms[("sft", 1.0)]["test_stderr"], 4), n_test=rms[("sft", 1.0)]["test_n"],
                           per_kind_ours=rms[("sft", 1.0)]["test_per_kind"],
                           per_kind_baseline=rms[(big, 1.0)]["test_per_kind"], **common))
    base = oracle["nested"][0]
    summary = {}
    for s in sizes:
        c = per_rm[label(s)]
        pk, pk_exp = peak_n(c["nested"]), peak_n(c["expected"])
        top = next(r for r in c["nested"] if r["n"] == pk)
        summary[s] = {"peak_n": pk, "peak_n_expected": pk_exp, "gold_at_peak": top["gold"], "gain_at_peak":
                      top["gain"], "gain_stderr_at_peak": top["gain_stderr"], "gold_at_64": c["nested"][-1]["gold"],
                      "gain_at_64": c["nested"][-1]["gain"], "gain_stderr_at_64": c["nested"][-1]["gain_stderr"]}
        rows.append(result(name, f"bon_gold_at_peak_rm_{s}", True, round(top["gold"], 4),
                           "n = 1 (the policy's first sample)", round(base["gold"], 4), goal=1.1,
                           stderr=round(top["gold_stderr"], 4), baseline_stderr=round(base["gold_stderr"], 4),
                           n_prompts=base["prompts"], **{k: (round(v, 4) if isinstance(v, float) else v)
                                                         for k, v in summary[s].items()},
                           curve_nested=short(c["nested"]), curve_expected=short(c["expected"]),
                           per_kind={k: short(by_kind[k][label(s)]) for k in kinds},
                           safety_picks_at_1=safety_picks(pool, rms[(s, 1.0)]["pool_scores"], 1),
                           safety_picks_at_max=safety_picks(pool, rms[(s, 1.0)]["pool_scores"], max(NS)),
                           plot=png.name, **common))
    orc = oracle["nested"][-1]
    rows.append(result(name, "bon_gold_oracle_at_64", True, round(orc["gold"], 4), "n = 1 (the policy's first sample)",
                       round(base["gold"], 4), stderr=round(orc["gold_stderr"], 4), n_prompts=base["prompts"],
                       curve_nested=short(oracle["nested"]), curve_expected=short(oracle["expected"]),
                       per_kind={k: short(by_kind[k]["oracle (gold picks)"]) for k in kinds}, plot=png_kinds.name,
                       **common))
    # the cached pieces' own times (a resumed run's wall time would hide them): one thread, a shared machine
    compute = {"sampling": round(pool_seconds, 1),
               "rm_training": round(sum(r["train_seconds"] for r in rms.values()), 1),
               "rm_scoring": round(sum(r.get("score_seconds", 0.0) for r in rms.values()), 1)}
    for r in rows:
        r["config"]["compute_seconds"] = compute
        r["config"]["this_invocation_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary, indent=1))
    if args.smoke:
        atomic_write_text(work / f"{name}.json", json.dumps(rows, indent=2) + "\n")
        print(f"smoke: wrote {work / name}.json, {png} and {png_kinds}")
    else:
        write_result(name, rows)


if __name__ == "__main__":
    main()
