"""KV cache: decode speed with the cache vs recomputing the whole prefix each step, and cache bytes by
attention layout (MHA vs GQA vs MQA) and by cache kind (contiguous vs sink) at long generations.

Usage:
    python benchmarks/kv_cache.py
"""
from __future__ import annotations

import time

import torch

from _common import result, write_result

from lmstack.model import Transformer, preset
from lmstack.model.reference_decode import reference_decode

PROMPT, NEW = 32, 480


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = Transformer(preset("llama-small")).eval()
    prompt = torch.randint(0, 8192, (1, PROMPT))
    speed = {}
    for cache in ("contiguous", None):
        start = time.perf_counter()
        out = reference_decode(model, prompt, NEW, cache=cache)
        speed[cache] = NEW / (time.perf_counter() - start)
        print(f"cache={cache}: {speed[cache]:.1f} tok/s", flush=True)
    assert torch.equal(out, reference_decode(model, prompt, NEW, cache="contiguous")), "cache changed the greedy output"
    results = [result("kv_cache", "decode_tokens_per_s", True, speed["contiguous"], "no cache (recompute prefix)",
                      speed[None], preset="llama-small", prompt=PROMPT, new_tokens=NEW)]
    for kv in (2, 1):
        bytes_mha = Transformer(preset("llama-small", n_kv_heads=8)).new_cache(1, 512).nbytes()
        bytes_kv = Transformer(preset("llama-small", n_kv_heads=kv)).new_cache(1, 512).nbytes()
        results.append(result("kv_cache", f"cache_bytes_n_kv_heads_{kv}", False, bytes_kv, "MHA (8 kv heads)",
                              bytes_mha, preset="llama-small", positions=512))
    # Sink cache: memory after generating 4x the context stays at sinks + window.
    long = Transformer(preset("llama-small", max_seq_len=128)).eval()
    sink = long.new_cache(1, kind="sink", window=64, n_sink=4)
    tok = torch.tensor([[1]])
    with torch.no_grad():
        for _ in range(512):
            tok = long(tok, cache=sink)[:, -1:].argmax(-1)
    full = long.new_cache(1, 512).nbytes()
    results.append(result("kv_cache", "sink_cache_bytes_after_512_tokens", False, sink.nbytes(),
                          "contiguous cache for 512 tokens", full, window=64, n_sink=4, max_seq_len=128))
    write_result("kv_cache", results)


if __name__ == "__main__":
    main()
