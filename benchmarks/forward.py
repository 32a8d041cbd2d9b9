"""Forward pass throughput: our Transformer vs transformers' LlamaForCausalLM, same ~123M weights.

The llama-base preset (12 layers, d_model 768, 12 heads / 3 KV heads, vocab 32000) is initialised
once, saved in HF layout, and loaded by both libraries, so both run the identical function (we check
the logits agree). Timings alternate between the two to share the machine's noise.
Goal: ratio >= 1.0 (never slower than the reference implementation).

Usage:
    python benchmarks/forward.py
"""
from __future__ import annotations

import tempfile
import time

import torch

from _common import result, write_result

import lmstack
from lmstack.model import Transformer, preset

SHAPES = [(1, 128), (1, 512), (4, 256)]


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as d:
        lmstack.save_model(Transformer(preset("llama-base")), d)
        ours = lmstack.load_model(d).eval()
        hf = LlamaForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
    results = []
    for b, t in SHAPES:
        x = torch.randint(0, 32000, (b, t))
        with torch.inference_mode():
            diff = (ours(x) - hf(x).logits).abs().max().item()
            assert diff < 1e-3, f"logits differ by {diff}"
            times = {"ours": [], "hf": []}
            for _ in range(4):
                for name, fn in (("ours", lambda: ours(x)), ("hf", lambda: hf(x, use_cache=False).logits)):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        tok_s = {k: b * t / min(v[1:]) for k, v in times.items()}
        print(f"B={b} T={t}: ours {tok_s['ours']:.0f} tok/s, transformers {tok_s['hf']:.0f} tok/s, "
              f"max |logit diff| {diff:.2e}", flush=True)
        results.append(result("forward", f"tokens_per_s_B{b}_T{t}", True, tok_s["ours"], "transformers LlamaForCausalLM",
                              tok_s["hf"], goal=1.0, preset="llama-base", params=ours.num_parameters(), batch=b,
                              seq_len=t, dtype="float32", threads=2))
    write_result("forward", results)


if __name__ == "__main__":
    main()
