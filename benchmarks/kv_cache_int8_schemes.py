"""Why the int8 KV cache scales per (token, KV head): its perplexity against a per-(block, KV head) scale.

Both schemes store int8 numbers; they differ in what shares a scale:
- per token (what infer/kv_quant.py ships): each token's head_dim numbers in one head get their own absmax
  scale, fixed when the token is written; measured with the engine's real int8 pool (kv_cache_dtype="int8").
- per block: the block_size tokens of a block share one scale per head. A block fills over many steps, so
  when a new token's max|x| exceeds the block's, the scale grows and the block's earlier tokens, already
  rounded, are rounded again at the coarser step (what such a cache must do; vLLM avoids it with a fixed
  per-tensor scale, KIVI by keeping the newest tokens unquantized). Simulated with an fp32 pool whose every
  write re-rounds the written blocks' filled slots (the numbers an int8 pool would hold, without packing them).

Perplexity is teacher-forced through the engine's paged cache exactly as in kv_cache_int8.py (prompt_logprobs,
windows of max_seq_len - 1 tokens prefilled in chunks of 64; every attention read goes through the cache). Rows:
ours = the scheme's perplexity, baseline = fp32 KV; config: relative change in %, paired per-token stderr, and
the scheme's KV bytes per token (int8 numbers + fp32 scales: per block, a scale serves 16 tokens).

Usage (the run that wrote results/kv_cache_int8_schemes.json; ~15 s on one thread):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv_cache_int8_schemes.py
"""
from __future__ import annotations

import argparse
import math

import torch

from _common import result, write_result
from kv_cache_int8 import find_checkpoint, held_out_ids

from lmstack.infer import LLMEngine, SamplingParams
from lmstack.infer.paged_attention import PagedKVCache
from lmstack.model.counting import kv_values_per_token
from lmstack.model.hf_io import load_model
from lmstack.tokenizer import load_tokenizer


class BlockScaleCache(PagedKVCache):
    """An fp32 pool holding what a per-(block, head) int8 cache would: after each write, every written block's
    filled slots (its first ones up to the newest written: prompts and decodes fill a block in order) are
    rounded to int8 steps of the block's current max|x| / 127, per head."""

    def attend(self, layer, q, k, v, attn, ctx):
        m, bs = self.meta, self.block_size
        hkv, d = self.k.shape[1], self.k.shape[-1]
        for pool, new in ((self.k[layer], k[0]), (self.v[layer], v[0])):
            pool.index_copy_(1, m.slots, new)
            blocks = torch.unique(m.slots // bs)
            filled = torch.zeros(self.num_blocks, dtype=torch.long)
            filled.scatter_reduce_(0, m.slots // bs, m.slots % bs + 1, reduce="amax")  # slots written so far
            view = pool.view(hkv, self.num_blocks, bs, d)
            x = view[:, blocks]  # (hkv, nb, bs, d)
            live = torch.arange(bs)[None, :] < filled[blocks][:, None]  # (nb, bs)
            x = torch.where(live[None, :, :, None], x, 0.0)
            scale = (x.abs().amax(dim=(2, 3)) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # (hkv, nb)
            rounded = (x / scale[..., None, None]).round().clamp(-127, 127) * scale[..., None, None]
            view[:, blocks] = torch.where(live[None, :, :, None], rounded, view[:, blocks])
        # attention reads the stored (rounded) numbers, a chunk's own keys included; storing them again is a no-op
        return super().attend(layer, q, self.k[layer][:, m.slots][None], self.v[layer][:, m.slots][None], attn, ctx)


def token_nlls(model, tok, windows: torch.Tensor, scheme: str, chunk: int) -> torch.Tensor:
    n, length = windows.shape
    engine = LLMEngine(model, tok, max_num_seqs=16, max_batched_tokens=chunk, block_size=16,
                       num_blocks=16 * -(-length // 16) + 16, kv_cache_dtype="int8" if scheme == "token" else "auto")
    if scheme == "block":
        old = engine.runner.cache
        engine.runner.cache = BlockScaleCache(old.cfg, old.num_blocks, old.block_size)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
    for i in range(n):
        engine.add_request(str(i), windows[i].tolist(), params)
    outs = {o.request_id: o for o in engine.run_to_completion()}
    return torch.tensor([[-outs[str(i)].prompt_logprobs[p][int(windows[i, p])] for p in range(1, length)]
                         for i in range(n)], dtype=torch.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--out", default="kv_cache_int8_schemes")
    args = ap.parse_args()
    torch.set_num_threads(1)
    found = find_checkpoint()
    if found is None:
        raise SystemExit("kv_cache_int8_schemes: no speedrun checkpoint under /tmp/sr7/runs")
    model_dir, run_dir = found
    model = load_model(model_dir, lazy=False).eval()
    tok = load_tokenizer(model_dir)
    length = model.config.max_seq_len - 1
    ids = held_out_ids(tok, run_dir, model.config.eos_token_id)
    n = min(args.windows, ids.numel() // length)
    windows = ids[:n * length].view(n, length)
    nll = {s: token_nlls(model, tok, windows, s, args.chunk) for s in ("fp32", "token", "block")}
    ppl = {s: math.exp(float(v.mean())) for s, v in nll.items()}
    cfg = model.config
    scales = 2 * cfg.n_layers * cfg.n_kv_heads * 4  # fp32 scales of one token (per token) or one block (per block)
    per_token_bytes = {"token": kv_values_per_token(cfg) + scales, "block": kv_values_per_token(cfg) + scales / 16}
    rows = []
    for scheme, label in (("token", "per (token, head) int8, engine pool"),
                          ("block", "per (block of 16, head) int8, re-rounded as blocks fill (simulated)")):
        diff = (nll[scheme] - nll["fp32"]).flatten()
        stderr = float(diff.std() / math.sqrt(diff.numel()))
        rel = 100 * (ppl[scheme] / ppl["fp32"] - 1)
        print(f"{scheme}: perplexity {ppl[scheme]:.4f} vs fp32 {ppl['fp32']:.4f} ({rel:+.4f}% +- {100 * stderr:.4f}%)")
        rows.append(result("kv_cache_int8_schemes", f"perplexity_{scheme}_scale", False, ppl[scheme], "fp32 KV cache",
                           ppl["fp32"], goal=round(1 / 1.005, 4), scheme=label, rel_change_pct=round(rel, 4),
                           nll_diff_stderr=stderr,
                           rel_change_pct_stderr=round(100 * stderr * ppl[scheme] / ppl["fp32"], 4),
                           n_windows=n, n_tokens=int(diff.numel()), window=length, prefill_chunk=args.chunk,
                           block_size=16, model=f"speedrun checkpoint {model_dir}", head_dim=model.config.head_dim,
                           kv_bytes_per_token=per_token_bytes[scheme]))
    write_result(args.out, rows)


if __name__ == "__main__":
    main()
