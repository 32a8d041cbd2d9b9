"""The long-context memory table: one row per technique, the same tiny model, data and steps, scored at 1x-8x L.

Every trained row is the same tiny Transformer (d_model 64, 4 layers, RoPE, a 2048-token BPE with one digit per
token), started from the same seed and trained for the same steps on the same batches: documents of the
three lmstack.world.long_memory tasks at the training length L (loss on every token, the answer's tokens
weighted 10x). Each row is then scored at 1x, 2x, 4x and 8x L on held-out documents: the true answer ranked by
log-likelihood against distractors from the same world (chance: passkey 1/5, multi-hop 1/4, cross-conversation
1/4; accuracy with n and stderr = sqrt(p(1-p)/n)).

Rows (ROWS below; each is a builder, and one whose code is not on main yet is written as missing, with why):
  full             full causal attention, RoPE, SDPA; beyond L it extrapolates. The baseline of every row.
  sliding_window   the full row's weights with sliding_window = L (nothing changes up to L).
  sink             the full row's weights through a StreamingLLM sink cache (4 sinks + a window of L - 4).
  xl               Transformer-XL, ModelConfig(memory='xl'): segments of L/2, a memory of L/2 per layer.
  knn              kNN memory (Memorizing Transformer), ModelConfig(memory='knn'): the second-to-last layer
                   retrieves the top 32 of earlier segments (L/2 each); on cross-conversation each earlier
                   conversation is its own call, the store is saved after them and loaded (KNNMemory.save/load)
                   for the question.
  compressive      Compressive Transformer: XL's memory of L/2 plus L/4 slots compressed 4:1 by a learned conv
                   (run by hand with CompressiveMemory until memory='compressive' is wired into the model).
  routing          Routing Transformer attention (4 k-means clusters, 2 of 4 heads local).
  mod              Mixture-of-Depths, capacity 0.125 on blocks 1 and 3 (whole sequences only; scored with the
                   causal threshold routing its auxiliary loss trains).
  gist             summary-vector / gist compression (brief G): a hook, listed as missing until it is on main.
  yarn_finetune    position interpolation / YaRN + fine-tune: measured by benchmarks/context_extension.py on its
                   own passkey setup; cited from its JSON, not rerun.
  hierarchical     the hierarchical encoder's long-document classification: cited from
                   benchmarks/results/hierarchical_attention.json, not rerun.
Per row also: training tokens/s, peak resident memory above the start (RSS high-water mark, not tracemalloc:
torch's CPU tensors live outside Python's allocator) of scoring one 8L document, and decode tokens/s after an
8L prompt (full / sliding: KV cache; sink: sink cache; xl/knn: generate_with_memory, the prompt's time
subtracted; compressive: its segment forward one token at a time; mod: the KV cache, routed by its causal
predictor; routing: recompute, as it refuses a KV cache). Each row's `paths` say which ran.

    flock /tmp/lmstack-bench.lock python benchmarks/long_memory.py      # ~10 min on 2 shared cores
    python benchmarks/long_memory.py --quick                               # a smoke run, ~1 min
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import random
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import RESULTS, peak_and_seconds, result

import lmstack
from lmstack.model import memory as lm_memory
from lmstack.model.config import ModelConfig
from lmstack.model.memory import KNNMemory
from lmstack.model.memory.compressive import CompressiveMemory, attach_compressor
from lmstack.model.mixture_of_depths import mod_forward_flops
from lmstack.tokenizer import train_tokenizer
from lmstack.world import World
from lmstack.world.long_memory import TASKS, task_records

ROOT = Path(__file__).resolve().parents[1]
MULTIPLES = (1, 2, 4, 8)
# passkey with the classic repeated filler (world/passkey.py's 'repeat'): a tiny model learns to copy the key in
# a few hundred steps; with world sentences full of other numbers it stays at chance at this budget
TASK_KWARGS = {"passkey": {"filler": "repeat"}}
ANSWER_WEIGHT = 10.0


# ---- data ------------------------------------------------------------------------------------------------
class Data:
    """The tokenizer, the training sequences at L, and the scored records at every multiple of L."""

    def __init__(self, world, ctx: int, n_train: int, n_eval: int, seed: int = 0):
        probe = [r["context"] + r["prompt"] + " " + r["answer"] for t in TASKS
                 for r in task_records(t, world, 3000, 40, seed=99)]
        self.tok = train_tokenizer(texts=probe, type="bpe", vocab_size=2048, split_digits=True,
                                   special_tokens="chat", show_progress=False)
        self.bos, self.eos = self.tok.special_id("bos"), self.tok.special_id("eos")
        count = self.count
        # a training sequence (bos, document, answer) must fit L + 1: each slot takes the first of its drafts, at
        # shrinking targets, that fits (the generators land within a few tokens of a target, above or below)
        self.train, self.train_by_task = [], {}
        for t in TASKS:
            before = len(self.train)
            drafts = [task_records(t, world, ctx - cut, n_train, seed=seed, count=count, **TASK_KWARGS.get(t, {}))
                      for cut in (8, 14, 20, 28)]
            for options in zip(*drafts):
                fits = [e for e in (self.encode(r, r["answer"]) for r in options) if len(e[0]) <= ctx + 1]
                if fits:
                    self.train.append(fits[0])
            self.train_by_task[t] = len(self.train) - before
        self.eval = {(t, m): task_records(t, world, ctx * m - 10, n_eval, seed=seed + 1000 + m, count=count,
                                          **TASK_KWARGS.get(t, {})) for t in TASKS for m in MULTIPLES}

    def count(self, text: str) -> int:
        return len(self.tok.encode(text))

    def encode(self, rec: dict, choice: str, context: str | None = None) -> tuple[list[int], int]:
        """[bos] + context + prompt, then " choice" tokenized apart (the same split in training and scoring)."""
        ctx = [self.bos] + self.tok.encode((rec["context"] if context is None else context) + rec["prompt"])
        ans = self.tok.encode(" " + choice)
        return ctx + ans, len(ans)


def batch_of(items: list[tuple[list[int], int]], pad: int, weighted: bool = True):
    """(x, y, w): right-padded inputs, next-token targets (-100 on padding), weights (answer tokens up-weighted)."""
    n = max(len(ids) for ids, _ in items) - 1
    x = torch.full((len(items), n), pad)
    y = torch.full((len(items), n), -100)
    w = torch.ones(len(items), n)
    for i, (ids, n_ans) in enumerate(items):
        x[i, :len(ids) - 1], y[i, :len(ids) - 1] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
        if weighted:
            w[i, len(ids) - 1 - n_ans:len(ids) - 1] = ANSWER_WEIGHT
    return x, y, w


# ---- rows ------------------------------------------------------------------------------------------------
class Missing(Exception):
    """A row whose code is not on main (yet): the reason goes into the JSON instead of a number."""


class Row:
    """A trained (or derived) model plus how it runs a batch of rows, decodes, and takes a conversation history."""

    def __init__(self, name: str, model, forward, paths: dict, note: str = ""):
        self.name, self.model, self.forward, self.paths, self.note = name, model, forward, paths, note

    def history(self, rec: dict):
        """(context text, forward) for scoring cross-conversation: by default the history is in the prompt."""
        return rec["context"], self.forward


def tracked(path: str) -> bool:
    """Whether `path` is committed (a row's code must be on main, not a peer's work in progress)."""
    return subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=ROOT, capture_output=True).returncode == 0


def base_config(vocab: int, ctx: int) -> ModelConfig:
    # max_seq_len covers 8L so RoPE has positions to extrapolate to; training never goes past L
    return ModelConfig(vocab_size=vocab, d_model=64, n_layers=4, n_heads=4, max_seq_len=8 * ctx, mlp="swiglu",
                       norm="rmsnorm", position="rope")


def plain(model, x, **kw):
    return model(x, **kw)


def build_full(cfg, ctx):
    return Row("full", lmstack.Transformer(cfg), plain, {"scoring": "one forward (SDPA)", "decode": "kv cache"})


def run_segments(model, x, memory, seg_len: int, **kw):
    """Logits of x run segment by segment through a given memory (kept after), as model(ids) does with a fresh one."""
    attach = getattr(memory, "attach", None)
    outs, aux = [], 0.0
    with attach() if attach is not None else contextlib.nullcontext():
        for segment in x.split(seg_len, dim=1):
            outs.append(model(segment, cache=memory, **kw))
            extra = getattr(memory, "aux_loss", None)
            aux = aux + model.aux_loss + (extra if torch.is_tensor(extra) else 0.0)
    model.aux_loss = aux / len(outs)  # what train() adds, as segment_forward leaves it
    return torch.cat(outs, dim=1)


def build_xl(cfg, ctx):
    seg = mem = ctx // 2
    model = lmstack.Transformer(cfg.replace(memory="xl", seg_len=seg, mem_len=mem))
    return Row("xl", model, plain, {"scoring": f"model(ids): ModelConfig(memory='xl', seg_len={seg}, mem_len={mem})"})


def build_knn(cfg, ctx):
    seg = ctx // 2
    model = lmstack.Transformer(cfg.replace(memory="knn", seg_len=seg, knn_top_k=32, knn_capacity=4096))
    row = Row("knn", model, plain, {
        "scoring": f"model(ids): ModelConfig(memory='knn', seg_len={seg}, layer {model.config.memory_layer()}, top 32)",
        "cross_conversation": "one call per earlier conversation into a store, saved (KNNMemory.save) and loaded "
                              "(KNNMemory.load) for the question"})

    def history(rec):
        memory = lm_memory.new_memory(model)
        with torch.no_grad():
            for conv in rec["conversations"]:  # one call per conversation, as a chat would make them
                run_segments(model, torch.tensor([[row.data.bos] + row.data.tok.encode(conv)]), memory, seg)
        loaded = KNNMemory.load(memory.save(row.tmp / "knn_store"), model)

        def forward_loaded(m, x, **kw):
            fresh = lm_memory.new_memory(m)  # the loaded store, one row per candidate
            fresh.store.add(loaded.store.keys.expand(x.shape[0], -1, -1, -1),
                            loaded.store.values.expand(x.shape[0], -1, -1, -1))
            return run_segments(m, x, fresh, seg, **kw)
        return "", forward_loaded
    row.history = history
    return row


def build_mod(cfg, ctx):
    model = lmstack.Transformer(cfg.replace(mod_capacity=0.125))
    return Row("mod", model, plain, {"scoring": "one forward, threshold routing (causal)",
                                     "decode": "KV cache (the routed layers keep keys of the tokens they took)"})


def build_compressive(cfg, ctx):
    if not tracked("src/lmstack/model/memory/compressive.py"):
        raise Missing("memory='compressive' (brief C): src/lmstack/model/memory/compressive.py is not on main")
    seg, mem, cmem, rate = ctx // 2, ctx // 2, ctx // 4, 4
    model = lmstack.Transformer(cfg)
    attach_compressor(model, fn="conv", rate=rate)

    def forward(m, x, **kw):
        return run_segments(m, x, CompressiveMemory(m, mem, cmem, rate), seg, **kw)
    row = Row("compressive", model, forward, {
        "scoring": f"CompressiveMemory segments (seg_len={seg}, mem_len={mem}, cmem_len={cmem}, rate {rate}, conv)"
                   " run by hand: memory='compressive' is not wired into the Transformer yet",
        "decode": "segment forward, one token per segment (memories kept)"})
    row.new_memory = lambda m: CompressiveMemory(m, mem, cmem, rate)
    return row


def build_routing(cfg, ctx):
    if not tracked("src/lmstack/model/routing_attention.py"):
        raise Missing("attention='routing' (brief R): src/lmstack/model/routing_attention.py is not on main")
    model = lmstack.Transformer(cfg.replace(attention="routing", routing_n_clusters=4, routing_local_heads=2))
    return Row("routing", model, plain, {"scoring": "one forward, attention='routing' (4 clusters, 2 local heads)",
                                         "decode": "recompute per token (routing attention refuses a KV cache)"})


def build_gist(cfg, ctx):
    if not tracked("src/lmstack/model/memory/summary.py"):
        raise Missing("summary-vector / gist compression (brief G): src/lmstack/model/memory/summary.py is not on main")
    from lmstack.model.memory.summary import AutoCompressor  # lazy: brief G's module is landing this session
    seg, k = ctx // 2, 8
    comp = AutoCompressor(lmstack.Transformer(cfg), k=k, accumulate=True, bptt=2)

    def forward(m, x, return_hidden=False):
        if return_hidden:  # the peak-memory probe: compress the document without computing logits
            return m.compress(x, seg)
        return m(x, seg_len=seg)[0]
    row = Row("gist", comp, forward, {
        "scoring": f"AutoCompressor: segments of {seg}, {k} summary vectors each, accumulated (the question "
                   "segment reads the summaries, never the raw earlier tokens)",
        "decode": "AutoCompressor.generate after compress(prompt): a KV cache of the soft vectors and new text"})
    row.seg = seg
    return row


# Trained rows: the same init seed, steps and batches. Derived rows reuse a trained row's weights.
ROWS = {"full": build_full, "xl": build_xl, "knn": build_knn, "mod": build_mod,
        "compressive": build_compressive, "routing": build_routing, "gist": build_gist}
RECOMPUTE = ("routing",)  # rows that refuse a KV cache: each decoded token re-runs the whole sequence


def derived_rows(full: Row, ctx: int) -> list[Row]:
    window = lmstack.Transformer(full.model.config.replace(sliding_window=ctx))
    window.load_state_dict(full.model.state_dict())
    window.eval()

    def sink_forward(m, x, **kw):
        return m(x, cache=m.new_cache(x.shape[0], kind="sink", window=ctx - 4, n_sink=4), **kw)
    return [Row("sliding_window", window, plain, {"scoring": f"one forward, sliding_window={ctx}", "decode": "kv cache"}),
            Row("sink", full.model, sink_forward, {"scoring": f"sink cache (4 sinks, window {ctx - 4})",
                                                   "decode": "sink cache"})]


# ---- training, scoring, cost -----------------------------------------------------------------------------
def train(row: Row, data: Data, steps: int, batch: int, lr: float = 3e-3) -> dict:
    rng = random.Random(0)  # every row sees the same batches
    model = row.model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses, tokens, start = [], 0, time.perf_counter()
    for step in range(steps):
        x, y, w = batch_of(rng.sample(data.train, batch), data.eos)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * (1 + math.cos(math.pi * step / steps)) / 2)
        logits = row.forward(model, x)
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none", ignore_index=-100)
        weight = w.flatten() * (y.flatten() != -100)
        loss = (per_token * weight).sum() / weight.sum() + getattr(model, "aux_loss", 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        tokens += int((y != -100).sum())
    seconds = time.perf_counter() - start
    model.eval()
    tail = losses[-20:]
    return {"steps": steps, "batch": batch, "first_loss": round(losses[0], 3),
            "final_loss": round(sum(tail) / len(tail), 3), "seconds": round(seconds, 1),
            "train_tokens_per_s": round(tokens / seconds, 1)}


@torch.no_grad()
def score(row: Row, data: Data, rec: dict) -> bool:
    """Whether the true choice has the highest log-likelihood (summed over its tokens)."""
    forward = row.forward
    context = None
    if rec["task"] == "cross_conversation":
        context, forward = row.history(rec)
    items = [data.encode(rec, c, context) for c in rec["choices"]]
    x, y, _ = batch_of(items, data.eos, weighted=False)
    logp = forward(row.model, x).float().log_softmax(-1)
    totals = []
    for i, (ids, n_ans) in enumerate(items):
        span = slice(len(ids) - 1 - n_ans, len(ids) - 1)
        totals.append(float(logp[i, span].gather(1, y[i, span, None]).sum()))
    return max(range(len(totals)), key=totals.__getitem__) == rec["label"]


def accuracy(row: Row, data: Data) -> dict:
    out = {}
    for (task, m), recs in data.eval.items():
        hits = [score(row, data, r) for r in recs]
        p, n = sum(hits) / len(hits), len(hits)
        out.setdefault(task, {})[f"{m}x"] = {"acc": round(p, 4), "stderr": round(math.sqrt(p * (1 - p) / n), 4),
                                             "n": n, "tokens": round(sum(r["size"] for r in recs) / n),
                                             "chance": recs[0]["chance"]}
    return out


@torch.no_grad()
def decode_rate(row: Row, data: Data, ctx: int, new: int) -> tuple[float, str, int | None]:
    """(tokens/s of greedy decoding `new` tokens after an 8L prompt, the path it took, the bytes of the cache or
    memory it decodes with after the prompt: None where nothing is cached and every step re-runs the sequence)."""
    model = row.model
    prompt = torch.randint(5, data.tok.vocab_size, (1, 8 * ctx - new))
    if row.name in RECOMPUTE:
        ids = prompt
        start = time.perf_counter()
        for _ in range(new):
            ids = torch.cat((ids, model(ids)[:, -1].argmax(-1)[:, None]), dim=1)
        return new / (time.perf_counter() - start), row.paths["decode"], None
    if row.name == "gist":
        soft = model.compress(prompt[:, :-1], row.seg)
        start = time.perf_counter()
        model.generate(soft, prompt[:, -1:], new)
        return new / (time.perf_counter() - start), row.paths["decode"], soft.nbytes
    if model.config.memory != "none":  # xl / knn through the config: the library's decoder
        seg = model.config.memory_seg_len()
        memory = lm_memory.new_memory(model)
        run_segments(model, prompt[:, :prompt.shape[1] // seg * seg], memory, seg)  # whole segments into the memory
        start = time.perf_counter()
        lm_memory.generate_with_memory(model, prompt[:, -1:], new, memory=memory)
        return (new / (time.perf_counter() - start), "generate_with_memory, after the prompt ran into the memory",
                memory.nbytes())
    if row.name == "compressive":  # by hand: the prompt in segments, then one token per segment
        cache = row.new_memory(model)
        scope = cache.attach()
        steps = prompt.split(ctx // 2, dim=1)
    else:
        cache = model.new_cache(1, kind="sink", window=ctx - 4, n_sink=4) if row.name == "sink" else \
            model.new_cache(1, max_len=8 * ctx)
        scope = contextlib.nullcontext()
        steps = (prompt,)
    with scope:
        for part in steps:
            logits = model(part, cache=cache)[:, -1]
        start = time.perf_counter()
        for _ in range(new):
            logits = model(logits.argmax(-1)[:, None], cache=cache)[:, -1]
        seconds = time.perf_counter() - start
    return new / seconds, row.paths["decode"], cache.nbytes()


def exact_rss() -> str:
    """Make glibc return every freed block over 64 KiB to the OS (a fixed mmap threshold), so the RSS high-water
    mark of a phase shows what it allocated, not pages an earlier phase left in the heap."""
    try:
        ok = ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    except OSError:
        ok = 0
    return "mallopt(M_MMAP_THRESHOLD, 64 KiB)" if ok else "default malloc (peaks may read low)"


def peak_memory(row: Row, data: Data, malloc: str) -> dict:
    """Peak resident memory above the start of one 8L passkey document's forward to the final hidden states (the
    (T, vocab) logits would dominate every row alike)."""
    rec = data.eval[("passkey", MULTIPLES[-1])][0]
    x, _, _ = batch_of([data.encode(rec, rec["answer"])], data.eos, weighted=False)
    with torch.no_grad():
        out = peak_and_seconds(lambda: row.forward(row.model, x, return_hidden=True))
    return {"peak_rss_kb": round(out["peak_mb"] * 1024), "forward_seconds": round(out["seconds"], 3),
            "shape": list(x.shape), "measure": f"RSS high-water mark (VmHWM) above the start; {malloc}"}


# ---- claims ----------------------------------------------------------------------------------------------
def pooled(acc: dict, task: str, multiples=MULTIPLES) -> tuple[float, float, int]:
    """Accuracy over the given multiples together: (p, stderr, n)."""
    cells = [acc[task][f"{m}x"] for m in multiples]
    n = sum(c["n"] for c in cells)
    p = sum(c["acc"] * c["n"] for c in cells) / n
    return p, math.sqrt(p * (1 - p) / n), n


def compare(a: dict, b: dict, task: str, multiples=MULTIPLES) -> dict:
    """a - b pooled over multiples, its stderr (independent samples) and whether it is > 1.96 stderr either way."""
    pa, sa, n = pooled(a, task, multiples)
    pb, sb, _ = pooled(b, task, multiples)
    se = math.sqrt(sa ** 2 + sb ** 2)
    diff = pa - pb
    return {"ours": round(pa, 4), "full": round(pb, 4), "diff": round(diff, 4), "stderr": round(se, 4), "n": n,
            "significant_gain": diff > 1.96 * se, "significant_loss": diff < -1.96 * se}


def claims(table: dict, flops_ratio: float | None) -> list[dict]:
    out = []
    full = table["full"]["accuracy"]
    xl = table.get("xl", {}).get("accuracy")
    if xl:
        c = compare(xl, full, "multi_hop")
        out.append({"claim": "Transformer-XL improves cross-document reasoning (multi-hop; summarisation is not "
                    "measured here)", "confirmed":
                    bool(c["significant_gain"]), "rule": "XL multi-hop accuracy pooled over 1x-8x L exceeds full "
                    "attention's by > 1.96 stderr", **c})
    p, se, _ = pooled(full, "multi_hop")
    chance = full["multi_hop"]["1x"]["chance"]
    learned = p - chance > 1.96 * se  # without it there is no reasoning to maintain, and the check says nothing
    mod = table.get("mod", {}).get("accuracy")
    if mod:
        c = compare(mod, full, "multi_hop")
        out.append({"claim": "Mixture-of-Depths reduces compute while maintaining reasoning", "confirmed":
                    bool(flops_ratio is not None and flops_ratio < 1 and not c["significant_loss"]) if learned else None,
                    **({} if learned else {"reason": f"full attention's multi-hop accuracy {p:.3f} is not above chance "
                                           f"{chance:.2f} at this scale: no reasoning to maintain, not decided"}),
                    "rule": "forward FLOPs ratio < 1 and multi-hop accuracy pooled over 1x-8x L not below full "
                    "attention's by > 1.96 stderr", "forward_flops_ratio": flops_ratio, **c})
    books = [name for name in ("compressive", "gist") if "accuracy" in table.get(name, {})]
    if books:
        best = {}
        for name in books:
            for task in ("passkey", "multi_hop"):
                best[f"{name}/{task}"] = compare(table[name]["accuracy"], full, task, (4, 8))
        out.append({"claim": "compression handles books (long documents)", "confirmed":
                    any(c["significant_gain"] for c in best.values()), "rule": "a compression row beats full "
                    "attention at 4x-8x L on passkey or multi-hop by > 1.96 stderr", "by_row_task": best})
    else:
        out.append({"claim": "compression handles books (long documents)", "confirmed": None,
                    "reason": "no compression row (compressive or gist) was on main when this ran: not measured"})
    return out


# ---- main ------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=128, help="training length L in tokens")
    ap.add_argument("--steps", type=int, default=600, help="training steps, the same for every row")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n", type=int, default=20, help="scored documents per (task, length)")
    ap.add_argument("--merge", action="store_true", help="keep the rows of the existing results JSON (same settings) "
                    "and run only --rows, e.g. a row whose code landed after the last full run")
    ap.add_argument("--quick", action="store_true", help="a smoke run: L=96, 20 steps, n=4")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated trained rows to run")
    args = ap.parse_args()
    if args.quick:
        args.ctx, args.steps, args.n = 96, 20, 4
    torch.set_num_threads(1)  # 2 threads on 2 shared cores spin against the other jobs: several times slower
    malloc = exact_rss()
    start = time.perf_counter()
    world = World(seed=0, n_people=200)
    data = Data(world, args.ctx, n_train=max(200, args.steps * args.batch // 3), n_eval=args.n)
    print(f"data: {data.train_by_task} training sequences, {time.perf_counter() - start:.0f} s", flush=True)
    cfg = base_config(data.tok.vocab_size, args.ctx)
    table, rows = (earlier_rows(args) if args.merge else {}), []
    tmp = Path(tempfile.mkdtemp(prefix="long_memory_"))
    for name in [n for n in args.rows.split(",") if n]:  # --merge --rows "" only recomputes the claims
        torch.manual_seed(0)
        try:
            row = ROWS[name](cfg, args.ctx)
        except Missing as e:
            table[name] = {"missing": str(e)}
            print(f"{name}: missing ({e})", flush=True)
            continue
        row.data, row.tmp = data, tmp
        table[name] = {"training": train(row, data, args.steps, args.batch), "paths": row.paths}
        print(f"{name}: {table[name]['training']}", flush=True)
        rows.append(row)
        for block in getattr(row.model, "blocks", ()):  # MoD scores with the causal rule its auxiliary loss trained
            if getattr(block, "router", None) is not None:
                block.router.routing = "threshold"
        if name == "full":
            for derived in derived_rows(row, args.ctx):
                derived.data, derived.tmp = data, tmp
                table[derived.name] = {"training": {"same weights as": "full"}, "paths": derived.paths}
                rows.append(derived)
    for row in rows:
        t = time.perf_counter()
        entry = table[row.name]
        entry["accuracy"] = accuracy(row, data)
        entry["peak_memory_8x"] = peak_memory(row, data, malloc)
        rate, path, state = decode_rate(row, data, args.ctx, new=4 if row.name in RECOMPUTE or args.quick else 32)
        entry["decode_8x"] = {"tokens_per_s": round(rate, 1), "path": path, "cache_or_memory_bytes": state}
        brief = {task: [c["acc"] for c in cells.values()] for task, cells in entry["accuracy"].items()}
        print(f"{row.name}: {brief} peak {entry['peak_memory_8x']['peak_rss_kb']} kB, decode "
              f"{entry['decode_8x']['tokens_per_s']} tok/s, state {entry['decode_8x']['cache_or_memory_bytes']} B ({time.perf_counter() - t:.0f} s)", flush=True)
    flops_ratio = None
    if "mod" in table and "accuracy" in table["mod"]:
        flops_ratio = round(mod_forward_flops(cfg.replace(mod_capacity=0.125))["ratio"], 4)
        table["mod"]["forward_flops_ratio"] = flops_ratio
    table.update(cited_rows())
    found = claims(table, flops_ratio)
    write_json(table, found, args, data, time.perf_counter() - start)


CITED = {  # techniques measured by their own benchmarks on their own tasks: cited, not rerun here
    "yarn_finetune": ("context_extension", "position interpolation / YaRN + a short fine-tune at 4x, measured on "
                      "that benchmark's passkey setup (another model and data)"),
    "hierarchical": ("hierarchical_attention", "the HAN-style hierarchical encoder, on long-document topic "
                     "classification (an encoder task: no row of this decoder table)"),
}


def cited_rows() -> dict:
    """Each cited technique with the headline numbers of its own results JSON (or why there are none)."""
    out = {}
    for name, (bench, what) in CITED.items():
        path = RESULTS / f"{bench}.json"
        row = {"cited": f"benchmarks/results/{bench}.json", "reason": f"{what}; not rerun in this table"}
        if path.is_file():
            entries = json.loads(path.read_text())
            row["numbers"] = [{"metric": r["metric"], "ours": r["ours"], "baseline": r["baseline"],
                               "ratio": r.get("ratio")} for r in (entries if isinstance(entries, list) else [entries])
                              if "ours" in r]
        out[name] = row
    return out


def earlier_rows(args) -> dict:
    """The rows of the existing results JSON, less the ones this run redoes; refused when its settings differ."""
    path = RESULTS / "long_memory.json"
    if not path.is_file():
        raise SystemExit(f"--merge: {path} does not exist; run the whole table first")
    entry = next(r for r in json.loads(path.read_text()) if r.get("metric") == "table")
    want = {"train_len": args.ctx, "steps": args.steps, "batch": args.batch, "n_per_cell": args.n}
    have = {k: entry["config"].get(k) for k in want}
    if have != want or entry["config"].get("quick"):
        raise SystemExit(f"--merge: {path} was made with {have}, this run asks {want}")
    redo = {n for n in args.rows.split(",") if n} | set(CITED)
    return {name: row for name, row in entry["rows"].items() if name not in redo}


def write_json(table: dict, found: list[dict], args, data: Data, seconds: float) -> None:
    config = {"train_len": args.ctx, "multiples": list(MULTIPLES), "steps": args.steps, "batch": args.batch,
              "n_per_cell": args.n, "model": "d64 L4 H4 swiglu rmsnorm rope, BPE 2048 (digits split)",
              "scoring": "true answer ranked by log-likelihood among choices", "quick": args.quick,
              "train_sequences": data.train_by_task,
              "total_seconds": round(seconds),
              **({"merged": f"rows {args.rows} rerun and merged into the earlier table" if args.rows else
                  "claims recomputed from the earlier table (no row rerun)"} if args.merge else {})}
    full = table["full"]
    out = []
    for name, entry in table.items():
        if "accuracy" not in entry:
            out.append({"benchmark": "long_memory", "metric": f"row[{name}]", "missing": "cited" not in entry,
                        "reason": entry.get("missing") or entry.get("reason"),
                        **{k: entry[k] for k in ("cited", "numbers") if k in entry}})
            continue
        longest = f"{MULTIPLES[-1]}x"
        for task, cells in entry["accuracy"].items():
            base = full["accuracy"][task]
            vs_chance = name == "full"
            out.append(result("long_memory", f"acc[{name}, {task}, {longest} L]", True, cells[longest]["acc"],
                              "chance" if vs_chance else f"full attention ({longest} L)",
                              cells[longest]["chance"] if vs_chance else base[longest]["acc"], goal=None,
                              by_length=cells, full_by_length=base, paths=entry["paths"], **config))
        for metric, value, base, hib in (
                ("train_tokens_per_s", entry["training"].get("train_tokens_per_s"),
                 full["training"]["train_tokens_per_s"], True),
                ("decode_tokens_per_s_8x", entry["decode_8x"]["tokens_per_s"], full["decode_8x"]["tokens_per_s"], True),
                ("peak_rss_kb_8x", entry["peak_memory_8x"]["peak_rss_kb"], full["peak_memory_8x"]["peak_rss_kb"], False),
                ("decode_state_bytes_8x", entry["decode_8x"]["cache_or_memory_bytes"],
                 full["decode_8x"]["cache_or_memory_bytes"], False)):
            if value is None or name == "full" or not value or not base:
                continue  # the table keeps it; a zero makes no ratio (a peak under the RSS resolution)
            out.append(result("long_memory", f"{metric}[{name}]", hib, value, "full attention", base, goal=None,
                              detail={"decode": entry["decode_8x"], "peak": entry["peak_memory_8x"]}, **config))
    for c in found:
        out.append({"benchmark": "long_memory", "metric": "claim", **c})
    out.append({"benchmark": "long_memory", "metric": "table", "rows": table, "config": config})
    write_quiet("long_memory_quick" if args.quick else "long_memory", out)


def write_quiet(name: str, out: list[dict]) -> None:
    """Write the entries atomically (a --quick run to the temp folder, never over the real results) and print
    them (write_result's printing needs a ratio, which claim / missing / table entries do not have)."""
    scored = [r for r in out if "ratio" in r]
    path = RESULTS / f"{name}.json" if name == "long_memory" else Path(tempfile.gettempdir()) / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    for r in scored:
        print(f"{r['metric']}: ours={r['ours']:.4g} {r['baseline']['name']}={r['baseline']['value']:.4g} "
              f"ratio={r['ratio']:.3f}")
    for r in out:
        if r["metric"] == "claim" or r["metric"].startswith("row["):
            print(json.dumps({k: v for k, v in r.items() if k not in ("by_row_task", "numbers")}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
