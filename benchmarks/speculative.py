"""Speculative decoding, a fair fight: a real trained target, a smaller draft trained on the same data,
prompt lookup (n-gram), and Medusa / EAGLE draft heads on the target's hidden states, on real text, each
against the same engine without speculation.

- data: the synthetic world's pretrain corpus and chat corpus (train splits) plus the first 90% of
  Tiny Shakespeare (when /work/shared/data/tinyshakespeare is present), one BPE tokenizer (4,096 ids).
- target: the speedrun's model shape (4 layers x 256, 4 heads / 2 KV heads, SwiGLU, RMSNorm, RoPE,
  qk-norm, tied embeddings) trained for `--target_steps` steps of 16 x 256 tokens (default 280: the
  speedrun's pretraining reaches about that many such steps in its 420 s budget).
- draft: 2 layers x 128 (about 1/6 of the target's parameters), trained from scratch on the same token
  stream for the same steps (no distillation), so acceptance is what two honest models agree on.
- both are cached under benchmarks/.cache/speculative/ (gitignored) keyed by their training config;
  the JSON records steps, tokens, wall time, final train loss and held-out loss of each.
- draft heads (lmstack.infer.draft_heads): one Medusa set (k heads) and one EAGLE layer, trained for
  `--heads_steps` steps on the frozen target's own features and distributions over the same training
  stream (draft_heads_train.py), cached beside the pair; the JSON records their steps, tokens, seconds.
- prompts: held-out text the models never trained on: world chat conversations (QA and others, in the
  chat template's text form), world stories and dialogues, and the last 10% of Tiny Shakespeare. Each
  prompt is the first `--prompt_tokens` tokens; the engines generate `--new_tokens` greedily.
- baseline: the same engine without speculation, same prompts, batch 1; runs alternate (baseline,
  draft, n-gram, medusa, eagle, in a rotating order, prompt by prompt, repeat) and each engine's time is the
  sum over prompts of its best repeat, so load bursts on a shared machine hit no engine alone. Greedy
  outputs must be token-identical (asserted; the run fails otherwise).
- token trees (methods medusa_tree / eagle_tree, spec_tree.py): the same heads propose a tree of
  `--tree_nodes` nodes up to `--tree_depth` deep (`--tree_topk` candidates per expanded node; eagle expands
  `--tree_width` nodes per depth), verified in one target forward; acceptance rate is accepted / proposed tree
  nodes, so compare mean accepted per verify. Greedy output is asserted identical, as for every method.
  The defaults (10 nodes, 8 deep, top-2 children, one node expanded per depth: the draft's chain plus its
  runner-up at each depth) came from a sweep on the wide target with EAGLE heads trained 1000 steps, 2 shared
  cores: verifying a row costs the target ~0.7 ms at one thread, so wide trees (16 nodes, 4 expanded per
  depth) accepted more but ran slower than the chain.
- per row: acceptance rate, mean accepted guesses per verify step, tokens per target forward, and where a
  step's time goes (the timed runs themselves are instrumented: proposing, the target's forward, the
  draft's forwards, and the rest: scheduling, verification, output processing, Python), in ms per engine
  step, over each prompt's best repeat.

How results/speculative.json was made: `python benchmarks/speculative.py --target_steps 280` (the speedrun's
step count): the pair trained earlier on a quiet 2-core machine (target 465 s, draft 152 s, one thread), the
heads trained (`--heads_steps 400`) and everything measured on a 2-core machine shared with other jobs.
results/speculative_wide.json: `python benchmarks/speculative.py --target wide --target_steps 150
--heads_steps 1000` (the 8x384 target's 150 steps took 1072 s on a shared machine; the heads 797 s (EAGLE) and
1416 s (Medusa), shared), measured on a quiet 2-core machine with every method, token trees included.

Usage:
    python benchmarks/speculative.py                      # trains (or loads) the pair and heads, then measures
    python benchmarks/speculative.py --target wide --target_steps 150 --heads_steps 300   # the wider target
    python benchmarks/speculative.py --train_only         # only build the cache
    python benchmarks/speculative.py --pair DIR           # measure an already trained pair
    python benchmarks/speculative.py --target wide --target_steps 150 --heads_steps 1000 \
        --methods eagle,eagle_tree --out /tmp/tree.json      # chain vs tree, EAGLE heads trained 1000 steps
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import RESULTS, result, write_result

import lmstack
from lmstack.world import World
from lmstack.infer import LLM, SamplingParams
from lmstack.infer.draft_heads import DraftHeads, HeadsConfig, frequent_ids, load_heads
from lmstack.infer.draft_heads_train import train_heads
from lmstack.model import ModelConfig, Transformer
from lmstack.tokenizer import load_tokenizer, train_tokenizer

CACHE = Path(__file__).resolve().parent / ".cache" / "speculative"
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
TARGETS = {  # --target: the speedrun's shape, or a wider and deeper one trained the same way (--target_steps)
    "speedrun": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, qk_norm=True),
    "wide": dict(d_model=384, n_layers=8, n_heads=6, n_kv_heads=2, qk_norm=True),
}
SHAPES = {
    "target": TARGETS["speedrun"],
    "draft": dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True),
}


def shakespeare() -> tuple[list[str], list[str]]:
    """Tiny Shakespeare as speeches (blank-line separated): first 90% of the text train, rest held out."""
    if not SHAKESPEARE.is_file():
        return [], []
    text = SHAKESPEARE.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    split = lambda s: [p.strip() for p in s.split("\n\n") if p.strip()]  # noqa: E731
    return split(text[:cut]), split(text[cut:])


def corpora() -> tuple[list[str], dict[str, list[str]]]:
    world = World(seed=0, size="small")
    train = [r["text"] for r in world.corpus("pretrain", split="train")]
    train += [r["text"] for r in world.corpus("chat", split="train")]
    sh_train, sh_val = shakespeare()
    train += sh_train
    chat_val = world.corpus("chat", split="val")
    held_out = {
        "chat_qa": [r["text"] for r in chat_val if r["kind"] == "qa"],
        "chat_other": [r["text"] for r in chat_val if r["kind"] != "qa"],
        "world_story_dialogue": [r["text"] for r in world.corpus("pretrain", split="val")
                                 if r["kind"] in ("story", "dialogue")],
    }
    if sh_val:
        # speeches are short; join neighbours so each prompt has enough context
        held_out["shakespeare"] = ["\n\n".join(sh_val[i:i + 6]) for i in range(0, len(sh_val) - 6, 6)]
    return train, held_out


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    order = list(texts)
    random.Random(0).shuffle(order)
    ids: list[int] = []
    for one in tok.encode_batch(order):
        ids.extend(one + [tok.eos_id])
    return torch.tensor(ids)


def train(model: Transformer, data: torch.Tensor, val: torch.Tensor, steps: int, batch: int, seq_len: int,
          lr: float) -> dict:
    """AdamW, 50 warmup steps, cosine to 10%; returns what the JSON states about the training."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g).tolist()
        x = torch.stack([data[i:i + seq_len] for i in idx])
        y = torch.stack([data[i + 1:i + seq_len + 1] for i in idx])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"  step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    model.eval()
    with torch.no_grad():  # held-out loss on 16 fixed windows of the validation stream
        n = (min(len(val) - 1, 16 * seq_len) // seq_len) * seq_len
        x, y = val[:n].view(-1, seq_len), val[1:n + 1].view(-1, seq_len)
        val_loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    return dict(steps=steps, tokens=steps * batch * seq_len, batch=batch, seq_len=seq_len, lr=lr,
                optimizer="AdamW, 50 warmup steps, cosine to 10%", train_seconds=round(time.perf_counter() - start),
                final_train_loss=round(statistics.mean(losses[-20:]), 3), held_out_loss=round(val_loss, 3),
                params=model.num_parameters())


def pair_key(steps: int) -> dict:
    return dict(shapes=SHAPES, steps=steps, batch=16, seq_len=256, vocab=4096, lr=3e-3,
                shakespeare=SHAKESPEARE.is_file(), version=1)


def pair_tag(steps: int) -> str:
    """The pair's cache directory name: a hash of its training config."""
    return hashlib.sha256(json.dumps(pair_key(steps), sort_keys=True).encode()).hexdigest()[:12]


def trained_pair(steps: int, threads: int):
    """(tokenizer, target, draft, held-out texts, training info): from the cache when its key matches."""
    key = pair_key(steps)
    root = CACHE / pair_tag(steps)
    train_texts, held_out = corpora()
    if (root / "info.json").is_file():
        info = json.loads((root / "info.json").read_text())
        tok = load_tokenizer(root / "tokenizer")
        models = {n: lmstack.load_model(root / n) for n in SHAPES}
        print(f"loaded cached pair {root}", flush=True)
        return tok, models["target"], models["draft"], held_out, info
    torch.set_num_threads(threads)
    tok = train_tokenizer(texts=train_texts[:: max(1, len(train_texts) // 4000)], type="bpe", vocab_size=4096,
                          show_progress=False, special_tokens="chat")
    data = token_stream(tok, train_texts)
    val = token_stream(tok, [t for texts in held_out.values() for t in texts])
    info = dict(cache_key=key, train_tokens_available=len(data))
    models = {}
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=512, eos_token_id=tok.eos_id, norm="rmsnorm",
                          position="rope", mlp="swiglu", tie_embeddings=True, **shape)
        models[name] = Transformer(cfg)
        print(f"training {name} ({models[name].num_parameters():,} params) for {steps} steps", flush=True)
        info[name] = train(models[name], data, val, steps, batch=16, seq_len=256, lr=3e-3)
        print(f"{name}: {info[name]}", flush=True)
    tmp = root.with_name(root.name + ".tmp")
    for name, model in models.items():
        lmstack.save_model(model, tmp / name)
    tok.save(tmp / "tokenizer")
    (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(root)  # atomic: a half-written cache is never picked up
    return tok, models["target"], models["draft"], held_out, info


def load_pair(root: Path):
    """A pair directory: target/, draft/, tokenizer/ and {target,draft}_info.json (see --pair)."""
    info = {n: json.loads((root / f"{n}_info.json").read_text()) for n in SHAPES}
    tok = load_tokenizer(root / "tokenizer")
    models = {n: lmstack.load_model(root / n) for n in SHAPES}
    for n, m in models.items():
        shape = {k: getattr(m.config, k) for k in SHAPES[n]}
        if shape != SHAPES[n]:
            raise SystemExit(f"{root / n} has shape {shape}, expected {SHAPES[n]}")
    _, held_out = corpora()
    print(f"loaded pair {root}", flush=True)
    return tok, models["target"], models["draft"], held_out, info


def trained_heads(method: str, root: Path, tok, target, steps: int, k: int) -> tuple[DraftHeads, dict]:
    """Medusa or EAGLE heads for `target`, trained on its own training stream; cached under root."""
    cfg = HeadsConfig(method, d_model=target.config.d_model, vocab_size=target.config.vocab_size, num_heads=k,
                      n_heads=target.config.n_heads, d_ff=2 * target.config.d_model, window=32)
    # proposal_vocab is applied after training (restrict), so it is no part of what was trained
    key = dict(config={k: v for k, v in cfg.__dict__.items() if k != "proposal_vocab"}, steps=steps, batch=8,
               seq_len=160, lr=3e-3, version=1)
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = root / f"heads_{method}_{tag}"
    if (path / "train_info.json").is_file():
        print(f"loaded cached {method} heads {path}", flush=True)
        return load_heads(path, target), json.loads((path / "train_info.json").read_text())
    train_texts, _ = corpora()
    data = token_stream(tok, train_texts)
    heads = DraftHeads(cfg)
    print(f"training {method} heads ({sum(p.numel() for p in heads.parameters()):,} params) for {steps} steps",
          flush=True)
    info = train_heads(heads, target, data, steps=steps, batch=8, seq_len=160, lr=3e-3)
    heads.save(path)
    (path / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")  # last: marks the cache complete
    return heads, info


def instrument(llm: LLM) -> dict:
    """Time where an engine's steps go: seconds spent proposing, in the target's forward, and in the draft's
    forwards (inside proposing), accumulated in the returned dict (wrappers cost ~1 us a call)."""
    eng = llm.engine
    spent = {"propose": 0.0, "target_forward": 0.0, "draft_forward": 0.0}
    wrapped = [(eng.runner, "run", "target_forward")]
    if eng.spec is not None:
        wrapped.append((eng.spec, "propose", "propose"))
        if eng.spec.runner is not None:
            wrapped.append((eng.spec.runner, "run", "draft_forward"))
    for obj, name, key in wrapped:
        def timed(*a, _f=getattr(obj, name), _k=key, **kw):
            t0 = time.perf_counter()
            try:
                return _f(*a, **kw)
            finally:
                spent[_k] += time.perf_counter() - t0
        setattr(obj, name, timed)
    return spent


def timed_run(llm: LLM, spent: dict, prompt, params) -> tuple[dict, list[int]]:
    """One prompt through an instrumented engine: (its seconds, steps and where they went, its tokens)."""
    before, steps0 = dict(spent), llm.engine.counters["steps"]
    total, outs = generate_all(llm, [prompt], params)
    run = {k: spent[k] - before[k] for k in spent}
    return dict(run, total=total, steps=llm.engine.counters["steps"] - steps0, tokens=len(outs[0])), outs[0]


def step_profile(runs: list[dict]) -> dict:
    """ms per engine step spent proposing, in the target's forward, in the draft's forwards, and the rest
    (scheduling, verification, output processing, Python), over the given runs."""
    tot = {k: sum(r[k] for r in runs) for k in runs[0]}
    ms = lambda x: round(1000 * x / tot["steps"], 3)  # noqa: E731
    return dict(engine_steps=tot["steps"], tokens_per_step=round(tot["tokens"] / tot["steps"], 3),
                ms_per_step=ms(tot["total"]), propose_ms=ms(tot["propose"]),
                target_forward_ms=ms(tot["target_forward"]), draft_forward_ms=ms(tot["draft_forward"]),
                rest_ms=ms(tot["total"] - tot["propose"] - tot["target_forward"]))


def prompts_of(tok, texts: list[str], n: int, prompt_tokens: int, new_tokens: int) -> list[list[int]]:
    """The first n held-out texts long enough to hold the prompt; each cut to prompt_tokens tokens."""
    out = []
    for ids in tok.encode_batch(texts):
        if len(ids) >= prompt_tokens:
            out.append(ids[:prompt_tokens])
        if len(out) == n:
            break
    return out


def generate_all(llm: LLM, prompts, params) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outs = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    return time.perf_counter() - start, outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target_steps", type=int, default=280)
    ap.add_argument("--target", choices=sorted(TARGETS), default="speedrun",
                    help="target shape; 'wide' writes results/speculative_wide.json")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--prompt_tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=6, help="prompts per text kind")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--heads_steps", type=int, default=400, help="training steps of the medusa and eagle heads")
    ap.add_argument("--methods", default="draft,ngram,medusa,eagle,medusa_tree,eagle_tree",
                    help="comma-separated proposers to measure (X_tree: heads X with token-tree verification)")
    ap.add_argument("--tree_nodes", type=int, default=10, help="token trees: nodes per tree")
    ap.add_argument("--tree_depth", type=int, default=8, help="token trees: deepest guess (num_tokens)")
    ap.add_argument("--tree_topk", type=int, default=2, help="token trees: candidates per expanded node")
    ap.add_argument("--tree_width", type=int, default=1, help="token trees, eagle: nodes expanded per depth (0: topk)")
    ap.add_argument("--tree_min_prob", type=float, default=0.0,
                    help="token trees: leave out nodes the draft gives a path probability below this")
    ap.add_argument("--merge", action="store_true",
                    help="keep the results file's rows of other metrics (e.g. when measuring only tree rows)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here instead of benchmarks/results/")
    ap.add_argument("--proposal_vocab", type=int, default=1024,
                    help="heads guess (greedy) among the training stream's N most frequent ids; 0: all ids")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train_only", action="store_true")
    ap.add_argument("--pair", type=Path, default=None,
                    help="use an already trained pair: a directory with target/, draft/, tokenizer/ and "
                         "target_info.json / draft_info.json (as train() reports them)")
    args = ap.parse_args()
    SHAPES["target"] = TARGETS[args.target]
    torch.set_num_threads(args.threads)
    if args.pair is not None:
        tok, target, draft, held_out, info = load_pair(args.pair)
        root = args.pair
    else:
        tok, target, draft, held_out, info = trained_pair(args.target_steps, args.threads)
        root = CACHE / pair_tag(args.target_steps)
    methods = args.methods.split(",")
    heads = {m: trained_heads(m, root, tok, target, args.heads_steps, args.k) for m in ("medusa", "eagle")
             if m in methods or f"{m}_tree" in methods}
    coverage = None
    if heads and args.proposal_vocab:
        train_texts, _ = corpora()
        data = token_stream(tok, train_texts)
        ids = frequent_ids(data, args.proposal_vocab, target.config.vocab_size)
        coverage = round(float(torch.isin(data, ids).float().mean()), 4)  # share of training tokens covered
        for h, _ in heads.values():
            h.restrict(ids)
    if args.train_only:
        return
    torch.set_num_threads(args.threads)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    common = dict(tokenizer=tok, max_num_seqs=1, enable_prefix_caching=False)
    specs = {"draft": {"method": "draft", "draft_model": draft, "num_tokens": args.k},
             "ngram": {"method": "ngram", "num_tokens": args.k, "ngram_max": 3},
             **{m: {"method": m, "heads": h, "num_tokens": args.k} for m, (h, _) in heads.items()},
             **{f"{m}_tree": {"method": m, "heads": h, "num_tokens": args.tree_depth, "tree_nodes": args.tree_nodes,
                              "tree_topk": args.tree_topk, "tree_width": args.tree_width,
                              "tree_min_prob": args.tree_min_prob}
                for m, (h, _) in heads.items()}}
    engines = {"none": LLM(target, **common),
               **{m: LLM(target, speculative=specs[m], **common) for m in methods}}
    spent = {m: instrument(llm) for m, llm in engines.items()}
    # the chat prompts (QA and others) are reported together as "world chat"
    kinds = {"world_chat": held_out["chat_qa"][: args.prompts // 2] + held_out["chat_other"],
             "world_story_dialogue": held_out["world_story_dialogue"]}
    if "shakespeare" in held_out:
        kinds["shakespeare"] = held_out["shakespeare"]
    results = []
    for kind, texts in kinds.items():
        ps = prompts_of(tok, texts, args.prompts, args.prompt_tokens, args.new_tokens)
        for llm in engines.values():
            llm.generate([ps[0]], SamplingParams(max_tokens=4, temperature=0.0))  # warm up
        # times[m][i]: prompt i's seconds on engine m, one per repeat. Engines alternate prompt by prompt
        # (in a rotating order), so a burst of load on the shared machine hits all of them alike, and each
        # engine's time is the sum over prompts of the best repeat (the least disturbed one).
        times = {m: [[] for _ in ps] for m in engines}
        before = {m: dict(llm.engine.stats(), calls=llm.engine.spec.steps) for m, llm in engines.items()
                  if m != "none"}
        names = list(engines)
        for r in range(args.repeats):
            outs = {m: [] for m in engines}
            for i, prompt in enumerate(ps):
                shift = (r + i) % len(names)
                for m in names[shift:] + names[:shift]:
                    run, out = timed_run(engines[m], spent[m], prompt, params)
                    times[m][i].append(run)
                    outs[m].append(out)
            for m in methods:
                if outs[m] != outs["none"]:
                    raise SystemExit(f"{kind}/{m}: speculative output differs from plain greedy decoding")
        fastest = {m: [min(runs, key=lambda x: x["total"]) for runs in per_prompt] for m, per_prompt in times.items()}
        best = {m: sum(r["total"] for r in runs) for m, runs in fastest.items()}
        n_tok = sum(len(o) for o in outs["none"])
        base = n_tok / best["none"]
        afters = {m: dict(engines[m].engine.stats(), calls=engines[m].engine.spec.steps) for m in methods}
        profile = {m: step_profile(runs) for m, runs in fastest.items()}  # the very runs timed above
        for m in methods:
            after = afters[m]
            proposed = after["spec_proposed_tokens"] - before[m]["spec_proposed_tokens"]
            accepted = after["spec_accepted_tokens"] - before[m]["spec_accepted_tokens"]
            calls = after["calls"] - before[m]["calls"]  # verify steps (one proposal each)
            ours = n_tok / best[m]
            acc = accepted / max(proposed, 1)
            print(f"{kind}/{m}: {base:.1f} -> {ours:.1f} tok/s ({ours / base:.2f}x), acceptance {acc:.2f}",
                  flush=True)
            extra = dict(target={**SHAPES["target"], **info["target"]})
            if m == "draft":
                extra.update(draft={**SHAPES["draft"], **info["draft"]},
                             draft_to_target_params=round(info["draft"]["params"] / info["target"]["params"], 3))
            elif m == "ngram":
                extra.update(ngram_max=3)
            else:
                h = heads[m.removesuffix("_tree")]
                if m.endswith("_tree"):
                    extra.update(tree_nodes=args.tree_nodes, tree_depth=args.tree_depth, tree_topk=args.tree_topk,
                                 tree_width=args.tree_width, tree_min_prob=args.tree_min_prob)
                extra.update(heads={**h[1], **{k: v for k, v in h[0].config.__dict__.items() if k != "method"}},
                             features="target's top hidden state after the final norm",
                             proposal_vocab=args.proposal_vocab, proposal_vocab_token_coverage=coverage)
            results.append(result(
                "speculative", f"tokens_per_s_{m}_{kind}", True, round(ours, 2), "same engine without speculation",
                round(base, 2), goal=2.0, method=m, text=kind, k=args.k if not m.endswith("_tree") else args.tree_depth,
                acceptance_rate=round(acc, 3),
                proposed=proposed, accepted=accepted,
                mean_accepted_per_verify=round(accepted / max(calls, 1), 3),
                identical_greedy_output=True, new_tokens=args.new_tokens,
                prompt_tokens=args.prompt_tokens, prompts=len(ps), repeats=args.repeats,
                timing="per prompt best of repeats, summed; engines alternate prompt by prompt",
                threads=args.threads, machine="2 cores, shared", step_profile=profile[m],
                baseline_step_profile=profile["none"], **extra))
    name = {"speedrun": "speculative", "wide": "speculative_wide"}[args.target]
    if args.merge:  # the file's rows of metrics not measured now stay, in their order; measured ones are replaced
        old = args.out if args.out is not None else RESULTS / f"{name}.json"
        if old.is_file():
            new = {r["metric"]: r for r in results}
            kept = [new.pop(r["metric"], r) for r in json.loads(old.read_text())]
            results = kept + list(new.values())
    if args.out is not None:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(args.out)
        print(f"wrote {args.out}")
    else:
        write_result(name, results)


if __name__ == "__main__":
    main()
