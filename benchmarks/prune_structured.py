"""What structured pruning (lmstack.compress.prune_structured) buys in decode speed and costs in perplexity.

Two parts, each writing its rows into results/prune_structured.json (a run of one part, or of some --variants,
keeps the rows it did not make):

- speed: batch-1 greedy decode tokens/s through lmstack.LLM (64 new tokens after a 32-token prompt, EOS ignored,
  2 threads) of the llama-base shape (~123M parameters, random weights: speed does not depend on the values)
  pruned by 20/30/40% of its heads, MLP channels or layers, and heads + channels at 30%, against the unpruned
  model in the same process. Each pruned model and the unpruned one decode in alternation, best of --repeats, so
  both see the same machine noise. Which heads/channels/layers go does not matter for speed, so these are sliced
  without calibration (the first groups/channels/blocks are kept). Each model directory is written and opened by
  path, as a user would, so the engine fuses its projections for both; then the weights are copied out of the
  memory map (in_memory), so page eviction on the busy machine cannot slow one model and not the other.
- quality: perplexity on held-out world text (the speedrun's pretrain test split, documents joined by EOS,
  non-overlapping windows of max_seq_len) of the trained speedrun model pruned by the same fractions, scored on
  128 calibration windows of its own training text (a seeded shuffle of train.jsonl, as quant_quality.py does);
  then the same after --recover-steps (50) of LoRA recovery (r 8 on every projection, lr 1e-3, batch 8, merged;
  compress/recover.py) on 512 other training windows. Controls: the unpruned model after the same recovery (does
  the fine-tune alone move perplexity?), and at 30% a random choice of the same number of heads/channels/layers
  (do the importance scores matter?).

The speedrun model has 4 query heads in 2 K/V groups, so head pruning can only remove 50% there (ModelConfig
holds one head count for all layers, and a K/V head must keep the same number of queries); those rows say the
fraction actually removed (config.removed_fraction: of heads, channels, layers and parameters), as every row
does.

Rows: speed: metric decode_speedup, ours = the median over --repeats pairs of (pruned tok/s / tok/s of the unpruned
run right beside it), baseline 1.0, so ratio = the speed-up. On the busy shared machine single runs vary several-fold
and bursts hit one model's runs and not the other's, so only ratios of neighbouring runs are trusted; config has the
median tok/s of each, the ratio of the medians and of the best runs, and bandwidth_bound_ratio, the speed-up a
decode bound by reading the weights would get (weight bytes read per token before / after). quality: ours = pruned perplexity,
baseline = unpruned perplexity, ratio = baseline/ours (< 1: worse), config.rel_change_pct.

Usage (the runs that wrote results/prune_structured.json; each ~5 minutes on 2 cores):
    OMP_NUM_THREADS=2 flock /tmp/lmstack-bench.lock .venv/bin/python benchmarks/prune_structured.py --parts speed
    OMP_NUM_THREADS=2 flock /tmp/lmstack-bench.lock .venv/bin/python benchmarks/prune_structured.py --parts quality \\
        --model /tmp/sr7/runs/<stamp>/pretrain/checkpoints/step_<n>/model
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import RESULTS, result, write_result
from quant_quality import doc_stream, perplexity, read_jsonl_texts, windows

import lmstack
from lmstack.compress.prune_structured import (channel_count, drop_layers, head_shape, prune_structured,
                                               slice_channels, slice_heads)
from lmstack.compress.recover import RecoverConfig, recover
from lmstack.infer import LLM, SamplingParams
from lmstack.model import Transformer, preset

NAME = "prune_structured"
FRACTIONS = (0.2, 0.3, 0.4)


def first_heads(model: Transformer, sparsity: float) -> Transformer:
    cfg = model.config
    kv, q = head_shape(cfg.n_heads, cfg.n_kv_heads, sparsity)
    g = cfg.n_heads // cfg.n_kv_heads
    keep = ([k * g + j for k in range(kv) for j in range(q)], list(range(kv)))
    return slice_heads(model, [keep] * len(model.blocks))


def first_channels(model: Transformer, sparsity: float) -> Transformer:
    n = channel_count(model.config.d_ff, sparsity)
    return slice_channels(model, [list(range(n))] * len(model.blocks))


def last_layers(model: Transformer, sparsity: float) -> Transformer:
    n = model.config.n_layers
    drop = min(max(int(sparsity * n + 0.5), 1), n - 1)
    return drop_layers(model, list(range(n - drop, n)))


ONLY: list[str] = []  # --variants: run only these names (empty: all)


def variants() -> dict[str, tuple[str, float]]:
    """name -> (kind, sparsity) of every pruned row; heads+channels is heads then channels at the same fraction."""
    rows = {f"{kind}{int(s * 100)}": (kind, s) for kind in ("heads", "channels", "layers") for s in FRACTIONS}
    rows["heads30+channels30"] = ("heads+channels", 0.3)
    unknown = [n for n in ONLY if n not in rows]
    if unknown:
        sys.exit(f"{NAME}: unknown --variants {unknown}; choose from {list(rows)}")
    return {k: v for k, v in rows.items() if not ONLY or k in ONLY}


def sliced(model: Transformer, kind: str, s: float) -> Transformer:
    if kind == "heads+channels":
        return first_channels(first_heads(model, s), s)
    return {"heads": first_heads, "channels": first_channels, "layers": last_layers}[kind](model, s)


def read_bytes(model: Transformer) -> int:
    """Weight bytes a decode step reads: every parameter but the embedding table (one row of it is read), plus
    the table again when it is the tied LM head. A purely bandwidth-bound decode speeds up by the ratio of these."""
    emb = model.tok_emb.weight
    n = sum(p.numel() * p.element_size() for p in model.parameters()) - emb.numel() * emb.element_size()
    return n + (emb.numel() * emb.element_size() if model.lm_head is None else 0)


def removed(before: Transformer, after: Transformer) -> dict:
    """The shapes before and after, and the fraction removed of heads, channels, layers and parameters."""
    b, a = before.config, after.config
    pb, pa = (sum(p.numel() for p in m.parameters()) for m in (before, after))
    return {"n_heads": [b.n_heads, a.n_heads], "n_kv_heads": [b.n_kv_heads, a.n_kv_heads], "d_ff": [b.d_ff, a.d_ff],
            "n_layers": [b.n_layers, a.n_layers], "params": [pb, pa],
            "removed_fraction": {"heads": round(1 - a.n_heads / b.n_heads, 4), "channels": round(1 - a.d_ff / b.d_ff, 4),
                                 "layers": round(1 - a.n_layers / b.n_layers, 4), "params": round(1 - pa / pb, 4)}}


def in_memory(llm: LLM) -> LLM:
    """Copy the engine's weights out of the memory-mapped files into the process's own memory: a shared machine
    under memory pressure evicts clean file pages, and the model loaded first (the unpruned one, used for the
    whole run) would then re-read its weights from disk while each freshly loaded pruned model would not."""
    with torch.no_grad():
        for p in llm.engine.model.parameters():
            p.data = p.data.clone()
    return llm


def speed_rows(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = Transformer(preset(args.preset)).eval()
    prompt = torch.randint(0, base.config.vocab_size, (32,)).tolist()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    work = tempfile.TemporaryDirectory()
    lmstack.save_model(base, Path(work.name) / "base")
    base_llm = in_memory(LLM(str(Path(work.name) / "base"), max_num_seqs=1, enable_prefix_caching=False))

    def tok_s(llm) -> float:
        start = time.perf_counter()
        llm.generate([prompt], params)
        return args.new_tokens / (time.perf_counter() - start)

    tok_s(base_llm)  # warm-up: the decode kernels' first call
    rows, done = [], {}
    for name, (kind, s) in variants().items():
        small = sliced(base, kind, s)
        facts = removed(base, small)
        bound = read_bytes(base) / read_bytes(small)
        shape = (small.config.n_heads, small.config.n_kv_heads, small.config.d_ff, small.config.n_layers)
        if shape in done:  # another fraction rounded to the same shape: the same model, so the same row
            r = copy.deepcopy(done[shape])
            r["config"].update(sparsity_requested=s, same_model_as=r["benchmark"].rsplit("/", 1)[1])
            r["benchmark"] = f"{NAME}/speed/{name}"
            rows.append(r)
            continue
        path = Path(work.name) / name
        lmstack.save_model(small, path)
        del small
        llm = in_memory(LLM(str(path), max_num_seqs=1, enable_prefix_caching=False))
        tok_s(llm)
        ours, theirs = [], []
        for i in range(args.repeats):  # alternate (who goes first too), so both share the machine's noise
            if i % 2:
                ours.append(tok_s(llm))
                theirs.append(tok_s(base_llm))
            else:
                theirs.append(tok_s(base_llm))
                ours.append(tok_s(llm))
        del llm
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
        med_ours, med_theirs = statistics.median(ours), statistics.median(theirs)
        pair = statistics.median(o / t for o, t in zip(ours, theirs))
        print(f"speed {name:20s} median {med_ours:6.1f} tok/s vs unpruned {med_theirs:6.1f} ({med_ours / med_theirs:.3f}x; "
              f"median pair {pair:.3f}x, best {max(ours) / max(theirs):.3f}x, bytes bound {bound:.3f}x) {facts}",
              flush=True)
        rows.append(result(f"{NAME}/speed/{name}", "decode_speedup", True, round(pair, 4),
                           f"unpruned {args.preset} (1.0: each run's tok/s over the unpruned run beside it)", 1.0,
                           goal=None, median_tok_s={"pruned": round(med_ours, 2), "unpruned": round(med_theirs, 2)},
                           kind=kind, sparsity_requested=s, **facts, preset=args.preset, weights="random",
                           statistic=f"median over {args.repeats} pairs of alternating runs of pruned/unpruned tok/s",
                           ratio_of_medians=round(med_ours / med_theirs, 4), best_ratio=round(max(ours) / max(theirs), 4),
                           bandwidth_bound_ratio=round(bound, 4),
                           prompt_len=len(prompt), new_tokens=args.new_tokens, threads=args.threads, dtype="float32",
                           repeats=args.repeats, all_tok_s={"pruned": [round(x, 2) for x in ours],
                                                            "unpruned": [round(x, 2) for x in theirs]},
                           seed_claim="20-40% faster inference from pruning"))
        done[shape] = rows[-1]
    work.cleanup()
    return rows


def random_prune(model: Transformer, kind: str, s: float, seed: int = 0) -> Transformer:
    """The same shapes as the scored choice, with random heads/channels/layers."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    if kind == "heads":
        kv, q = head_shape(cfg.n_heads, cfg.n_kv_heads, s)
        g = cfg.n_heads // cfg.n_kv_heads
        keep = []
        for _ in model.blocks:
            groups = sorted(torch.randperm(cfg.n_kv_heads, generator=gen)[:kv].tolist())
            keep.append((sorted(k * g + j for k in groups for j in torch.randperm(g, generator=gen)[:q].tolist()),
                         groups))
        return slice_heads(model, keep)
    if kind == "channels":
        n = channel_count(cfg.d_ff, s)
        return slice_channels(model, [sorted(torch.randperm(cfg.d_ff, generator=gen)[:n].tolist())
                                      for _ in model.blocks])
    n_drop = min(max(int(s * cfg.n_layers + 0.5), 1), cfg.n_layers - 1)
    return drop_layers(model, torch.randperm(cfg.n_layers, generator=gen)[:n_drop].tolist())


def quality_rows(args) -> list[dict]:
    model_dir = Path(args.model)
    run_dir = Path(args.run_dir) if args.run_dir else model_dir.resolve().parents[3]
    world = run_dir / "world" / "pretrain"
    for f in (world / "train.jsonl", world / "test.jsonl"):
        if not f.is_file():
            sys.exit(f"{NAME}: {f} not found; pass --run-dir (the speedrun's run directory)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = lmstack.load_model(model_dir, lazy=False).eval()
    tok = lmstack.load_tokenizer(model_dir)
    cfg = model.config
    train = read_jsonl_texts(world / "train.jsonl")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    stream = doc_stream(tok, [train[i] for i in order[:8000]], cfg.eos_token_id)
    all_train = windows(stream, cfg.max_seq_len, args.calib_samples + args.recover_windows)
    if all_train.shape[0] < args.calib_samples + args.recover_windows:
        sys.exit(f"{NAME}: only {all_train.shape[0]} training windows")
    calib, train_wins = all_train[:args.calib_samples], all_train[args.calib_samples:]
    test = windows(doc_stream(tok, read_jsonl_texts(world / "test.jsonl"), cfg.eos_token_id), cfg.max_seq_len,
                   args.max_windows)
    base_ppl = perplexity(model, test)
    print(f"calibration {tuple(calib.shape)}, recovery {tuple(train_wins.shape)}, held-out {tuple(test.shape)}; "
          f"unpruned perplexity {base_ppl:.4f}", flush=True)
    common = dict(model=str(model_dir), eval_tokens=int(test[:, 1:].numel()), calib_samples=int(calib.shape[0]),
                  seq_len=cfg.max_seq_len, threads=args.threads, text="world pretrain test split")
    rec_cfg = RecoverConfig(steps=args.recover_steps)

    def row(name, ppl, kind, s, facts, **extra):
        rel = 100.0 * (ppl / base_ppl - 1.0)
        print(f"quality {name:34s} ppl {ppl:8.4f} ({rel:+.2f}%) {extra}", flush=True)
        return result(f"{NAME}/quality/{name}", "perplexity", False, round(ppl, 4), "unpruned speedrun model",
                      round(base_ppl, 4), goal=None, rel_change_pct=round(rel, 3), kind=kind, sparsity_requested=s,
                      **facts, **common, **extra)

    rows, done = [], {}
    if args.recover_steps:  # control: the same fine-tune on the unpruned model
        tuned, log = recover(copy.deepcopy(model), train_wins, rec_cfg)
        rows.append(row("unpruned+recover", perplexity(tuned, test), "none", 0.0, removed(model, tuned),
                        recover=log))
        del tuned
    for name, (kind, s) in variants().items():
        t = time.perf_counter()
        if kind == "heads+channels":
            small, _ = prune_structured(model, "heads", s, calib)
            small, _ = prune_structured(small, "channels", s, calib)
        else:
            small, _ = prune_structured(model, kind, s, calib)
        spent = time.perf_counter() - t
        facts = removed(model, small)
        shape = (kind, small.config.n_heads, small.config.n_kv_heads, small.config.d_ff, small.config.n_layers)
        if kind != "heads+channels" and s == 0.3:  # control: the same shapes, chosen at random
            rows.append(row(f"{name}_random", perplexity(random_prune(model, kind, s), test), kind, s, facts,
                            choice="random (seed 0), same shapes", recover_steps=0))
        if shape in done:  # another fraction rounded to the same model (e.g. every head row here): reuse its rows
            first, earlier = done[shape]
            for r in earlier:
                r = copy.deepcopy(r)
                r["benchmark"] = r["benchmark"].replace(f"/{first}", f"/{name}", 1)
                r["config"].update(sparsity_requested=s, same_model_as=first)
                rows.append(r)
            continue
        mine = [row(name, perplexity(small, test), kind, s, facts, prune_seconds=round(spent, 2), recover_steps=0)]
        if args.recover_steps:
            tuned, log = recover(small, train_wins, rec_cfg)
            mine.append(row(f"{name}+recover", perplexity(tuned, test), kind, s, facts, recover_steps=args.recover_steps,
                            recover=log, recover_windows=int(train_wins.shape[0])))
            del tuned
        done[shape] = (name, mine)
        rows += mine
        del small
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="speed,quality", help="comma-separated: speed, quality")
    ap.add_argument("--model", help="the trained speedrun model directory (quality part)")
    ap.add_argument("--run-dir", help="the speedrun's run directory (default: four levels above --model)")
    ap.add_argument("--preset", default="llama-base", help="model shape of the speed part (random weights)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--recover-steps", type=int, default=50)
    ap.add_argument("--recover-windows", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=256)
    ap.add_argument("--variants", default="", help="comma-separated row names to run (default: all)")
    args = ap.parse_args()
    ONLY.extend(v for v in args.variants.split(",") if v)
    parts = args.parts.split(",")
    if not set(parts) <= {"speed", "quality"}:
        sys.exit(f"{NAME}: --parts takes speed and/or quality; got {args.parts}")
    if "quality" in parts and not args.model:
        sys.exit(f"{NAME}: the quality part needs --model (the speedrun's pretrain checkpoint model directory)")
    rows = []
    if "speed" in parts:
        rows += speed_rows(args)
    if "quality" in parts:
        rows += quality_rows(args)
    old = RESULTS / f"{NAME}.json"
    if old.is_file():  # keep the rows this run did not make (the other part, other --variants)
        made = {r["benchmark"] for r in rows}
        rows = [r for r in json.loads(old.read_text()) if r["benchmark"] not in made] + rows
        rows.sort(key=lambda r: r["benchmark"].split("/")[1])  # quality rows, then speed rows
    write_result(NAME, rows)


if __name__ == "__main__":
    main()
