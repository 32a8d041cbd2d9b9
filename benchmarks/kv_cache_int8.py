"""What the int8 KV cache (kv_cache_dtype="int8", infer/kv_quant.py) buys and costs, fp32 KV vs int8 KV in one process.

Rows (ours = int8 KV, baseline = the fp32 KV pool of the same engine and model):
- kv_bytes_per_token: 2 * n_layers * n_kv_heads * head_dim * 4 (fp32) against
  2 * n_layers * n_kv_heads * (head_dim + 4) (int8 numbers + one fp32 scale per token and head); config also
  has the measured pool tensor bytes (PagedKVCache.nbytes() / slots) of both.
- max_concurrent_seqs: a pool budget of exactly what 8 fp32 sequences of C tokens need (C: whole blocks of 16
  within the context); 64 requests of C tokens (prompt C - 8, 8 generated) are queued and the peak number of
  sequences the scheduler runs at once is counted (config: the arithmetic count too).
- perplexity: held-out text teacher-forced through the engine (prompt_logprobs), windows of L tokens
  prefilled in chunks of 64, so every attention read (a chunk's own keys included: kv_quant.py) goes through the
  cache. config: relative change in %, and the standard error of the per-token NLL difference (paired).
- decode_tokens_per_s at batch 1 and 8: greedy generation, fp32-KV and int8-KV engines alternated,
  median of 5; prefill of the short prompts included.

The model: the newest speedrun pretrain checkpoint under /tmp/sr7/runs (its world/pretrain/test.jsonl as held-out
text), or --model/--run-dir; without one, a 2-layer llama trained here for 300 steps on synthetic text (the
held-out text is more of the same generator with another seed).

Usage (the run that wrote results/kv_cache_int8.json):
    flock /tmp/lmstack-bench.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv_cache_int8.py
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import result, write_result

from lmstack.infer import LLMEngine, SamplingParams
from lmstack.infer.kv_quant import kv_cache_bytes_per_token
from lmstack.model.hf_io import load_model
from lmstack.tokenizer import load_tokenizer

KINDS = ("auto", "int8")


def find_checkpoint() -> tuple[Path, Path] | None:
    """(model dir, run dir) of the newest speedrun pretrain checkpoint under /tmp/sr7/runs, or None."""
    found = sorted(glob.glob("/tmp/sr7/runs/*/pretrain/checkpoints/step_*/model"))
    if not found:
        return None
    model = Path(found[-1])
    return model, model.parents[3]


def held_out_ids(tok, run_dir: Path, eos: int) -> torch.Tensor:
    ids: list[int] = []
    for line in (run_dir / "world" / "pretrain" / "test.jsonl").read_text().splitlines():
        if line.strip():
            ids.extend(tok.encode(json.loads(line)["text"]))
            ids.append(eos)
    return torch.tensor(ids)


def trained_fallback():
    """A 2-layer llama trained on the test helpers' synthetic text (no speedrun checkpoint here)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "infer"))
    from infer_helpers import make_text, tiny_model
    from lmstack.tokenizer import train_tokenizer

    tok = train_tokenizer(texts=[make_text()], type="bpe", vocab_size=400, show_progress=False, special_tokens="chat")
    model = tiny_model(tok.vocab_size, seed=0, n_kv_heads=2).train()
    ids = torch.tensor(tok.encode(make_text(600, seed=1)))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=g).tolist()
        x = torch.stack([ids[s:s + 65] for s in starts])
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok, torch.tensor(tok.encode(make_text(400, seed=9)))


def token_nlls(model, tok, windows: torch.Tensor, kind: str, chunk: int) -> torch.Tensor:
    """-log p(token | prefix) of every window token after the first, read through the engine's paged cache."""
    n, length = windows.shape
    engine = LLMEngine(model, tok, max_num_seqs=16, max_batched_tokens=chunk, block_size=16,
                       num_blocks=16 * -(-length // 16) + 16, kv_cache_dtype=kind)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
    for i in range(n):
        engine.add_request(str(i), windows[i].tolist(), params)
    outs = {o.request_id: o for o in engine.run_to_completion()}
    rows = []
    for i in range(n):
        lps = outs[str(i)].prompt_logprobs
        rows.append([-lps[p][int(windows[i, p])] for p in range(1, length)])
    return torch.tensor(rows, dtype=torch.float64)


def peak_concurrency(model, tok, kind: str, length: int, budget: int) -> tuple[int, int]:
    """(peak running sequences, pool blocks) for 64 requests of `length` tokens in a pool of `budget` bytes."""
    per_block = kv_cache_bytes_per_token(model.config, torch.float32, kind) * 16
    blocks = budget // per_block
    engine = LLMEngine(model, tok, max_num_seqs=64, max_batched_tokens=4096, block_size=16, num_blocks=blocks,
                       enable_prefix_caching=False, kv_cache_dtype=kind)
    g = torch.Generator().manual_seed(1)
    vocab = engine.emit_vocab
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i in range(64):
        engine.add_request(str(i), torch.randint(3, vocab, (length - 8,), generator=g).tolist(), params)
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, len(engine.scheduler.running))
    if engine.bm.num_free_blocks != blocks:
        raise RuntimeError(f"{kind}: {blocks - engine.bm.num_free_blocks} blocks leaked")
    return peak, blocks


def decode_rate(model, tok, kind: str, batch: int, prompt_len: int, new_tokens: int) -> float:
    engine = LLMEngine(model, tok, max_num_seqs=max(batch, 1), block_size=16, kv_cache_dtype=kind)
    g = torch.Generator().manual_seed(2)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(str(i), torch.randint(3, engine.emit_vocab, (prompt_len,), generator=g).tolist(), params)
    start = time.perf_counter()
    outs = engine.run_to_completion()
    secs = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory (default: the newest /tmp/sr7 speedrun pretrain checkpoint)")
    ap.add_argument("--run-dir", help="run directory holding world/pretrain/test.jsonl (default: from --model)")
    ap.add_argument("--windows", type=int, default=64, help="held-out windows of max_seq_len - 1 tokens")
    ap.add_argument("--chunk", type=int, default=64, help="prefill chunk (max_batched_tokens) of the perplexity run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="decode runs per KV dtype (alternated), median taken")
    ap.add_argument("--out", default="kv_cache_int8", help="results/<out>.json (another name for trial runs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    found = (Path(args.model), Path(args.run_dir) if args.run_dir else Path(args.model).resolve().parents[3]) \
        if args.model else find_checkpoint()
    if found is not None:
        model_dir, run_dir = found
        model = load_model(model_dir, lazy=False).eval()
        tok = load_tokenizer(model_dir)
        ids = held_out_ids(tok, run_dir, model.config.eos_token_id)
        source = f"speedrun checkpoint {model_dir}"
    else:
        model, tok, ids = trained_fallback()
        source = "2-layer llama trained 300 steps in this script (no speedrun checkpoint found)"
    cfg = model.config
    length = cfg.max_seq_len - 1  # a prompt plus one generated token must fit the context
    common = dict(model=source, n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                  threads=args.threads, device="cpu", model_dtype="float32")
    print(f"model: {source}; max_seq_len {length}, head_dim {cfg.head_dim}")
    rows = []

    # 1. bytes per token: the formula and the pool tensors
    measured = {}
    for kind in KINDS:
        e = LLMEngine(model, tok, num_blocks=64, block_size=16, kv_cache_dtype=kind)
        measured[kind] = e.runner.cache.nbytes() / (64 * 16)
    formula = {kind: kv_cache_bytes_per_token(cfg, torch.float32, kind) for kind in KINDS}
    assert measured == {k: float(v) for k, v in formula.items()}, (measured, formula)
    rows.append(result("kv_cache_int8", "kv_bytes_per_token", False, formula["int8"], "fp32 KV cache",
                       formula["auto"], goal=3.5,
                       formula_fp32="2 * n_layers * n_kv_heads * head_dim * 4",
                       formula_int8="2 * n_layers * n_kv_heads * (head_dim * 1 + 4)  (int8 numbers + fp32 scale "
                                    "per token and head)",
                       measured_pool_bytes_per_token_fp32=measured["auto"],
                       measured_pool_bytes_per_token_int8=measured["int8"],
                       bf16_bytes_per_token=kv_cache_bytes_per_token(cfg, torch.bfloat16, "auto"),
                       ratio_vs_bf16=round(kv_cache_bytes_per_token(cfg, torch.bfloat16, "auto") / formula["int8"], 4),
                       **common))

    # 2. concurrency in one budget
    seq_len = 16 * (length // 16)
    budget = 8 * seq_len * formula["auto"]
    conc = {kind: peak_concurrency(model, tok, kind, seq_len, budget) for kind in KINDS}
    rows.append(result("kv_cache_int8", "max_concurrent_seqs", True, conc["int8"][0], "fp32 KV cache",
                       conc["auto"][0], goal=3.5, seq_len=seq_len, pool_budget_bytes=budget,
                       pool_blocks_fp32=conc["auto"][1], pool_blocks_int8=conc["int8"][1], block_size=16,
                       arithmetic_seqs_fp32=conc["auto"][1] // (seq_len // 16),
                       arithmetic_seqs_int8=conc["int8"][1] // (seq_len // 16), **common))

    # 3. perplexity through the cache
    n = min(args.windows, ids.numel() // length)
    windows = ids[:n * length].view(n, length)
    t = time.perf_counter()
    nll = {kind: token_nlls(model, tok, windows, kind, args.chunk) for kind in KINDS}
    ppl = {kind: math.exp(float(nll[kind].mean())) for kind in KINDS}
    diff = (nll["int8"] - nll["auto"]).flatten()
    stderr = float(diff.std() / math.sqrt(diff.numel()))
    rel = 100 * (ppl["int8"] / ppl["auto"] - 1)
    rows.append(result("kv_cache_int8", "perplexity", False, ppl["int8"], "fp32 KV cache", ppl["auto"],
                       goal=round(1 / 1.005, 4), rel_change_pct=round(rel, 4),
                       mean_nll_diff=float(diff.mean()), nll_diff_stderr=stderr,
                       rel_change_pct_stderr=round(100 * stderr * ppl["int8"] / ppl["auto"], 4),
                       n_windows=n, n_tokens=int(diff.numel()), window=length, prefill_chunk=args.chunk,
                       seconds=round(time.perf_counter() - t, 1), **common))
    print(f"perplexity fp32 {ppl['auto']:.4f} int8 {ppl['int8']:.4f} ({rel:+.3f}% +- {100 * stderr:.3f}%)")

    # 4. decode speed
    for batch, new in ((1, 128), (8, 64)):
        rates = {kind: [] for kind in KINDS}
        for _ in range(args.repeats):
            for kind in KINDS:
                rates[kind].append(decode_rate(model, tok, kind, batch, 16, new))
        med = {kind: statistics.median(rates[kind]) for kind in KINDS}
        rows.append(result("kv_cache_int8", f"decode_tokens_per_s_batch{batch}", True, med["int8"],
                           "fp32 KV cache", med["auto"], goal=1.0, batch=batch, prompt_tokens=16,
                           new_tokens=new, runs=rates, **common))
    write_result(args.out, rows)


if __name__ == "__main__":
    main()
