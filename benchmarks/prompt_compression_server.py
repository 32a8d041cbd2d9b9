"""Prompt compression through the server: time to first token with `prompt_compression` vs without.

`lmstack serve`'s app (in this process, uvicorn on a loopback port) serves the ~123M llama-base preset
(random init: prefill time depends on the token count only) with a 4 x 192 scorer that shares its tokenizer
(`--compression.model`). Each prompt is world bios (~`--prompt_tokens` tokens) then a question; a request
streams /v1/completions with max_tokens=1 and TTFT is the time from sending it to the first token's event,
so it includes the scorer's pass in the server's preparation pool and the prefill of the shorter prompt.
Modes alternate inside every repeat (off, then each rate) on a fresh prompt, so machine noise hits all
alike; medians are reported. Prefix caching is off, so no repeat is served from the cache. What compression
costs in accuracy is measured by benchmarks/prompt_compression.py (a trained reader); here the scorer is
untrained, since its weights do not change its time.

Usage:
    python benchmarks/prompt_compression_server.py [--repeats 7] [--rates 0.7 0.5] [--prompt_tokens 600]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from _common import result, write_result
from _tiny_lm import make_tokenizer, world_texts

import lmstack
from lmstack.model import ModelConfig, Transformer, preset
from lmstack.serve.commands import build_app
from lmstack.serve.engine_bridge import ServerConfig
from lmstack.serve.prompt_compression import CompressionConfig


def start(app) -> tuple[str, object]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    server.config.install_signal_handlers = False
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server


def ttft(client: httpx.Client, prompt: str, rate: float | None) -> tuple[float, dict]:
    """Seconds to the first token's event, and the request's usage."""
    body = {"prompt": prompt, "max_tokens": 1, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if rate is not None:
        body["prompt_compression"] = {"rate": rate}
    start = time.perf_counter()
    first, usage = None, {}
    with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and event["choices"]:
                first = time.perf_counter() - start
            usage = event.get("usage") or usage
    return first, usage


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.7, 0.5])
    ap.add_argument("--prompt_tokens", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts = world_texts(kinds=("bio",))
    tok = make_tokenizer(texts, vocab_size=1024)
    # one prompt per repeat (+1 warm-up): consecutive bios up to ~prompt_tokens, then a question
    prompts, i = [], 0
    for _ in range(args.repeats + 1):
        parts, n = [], 0
        while n < args.prompt_tokens:
            parts.append(texts[i])
            n += len(tok.encode(texts[i]))
            i += 1
        prompts.append("\n".join(parts) + "\nQuestion: Where was the first person born?\nAnswer:")
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        lmstack.save_model(Transformer(preset("llama-base", vocab_size=tok.vocab_size)), Path(d) / "big", tokenizer=tok)
        lmstack.save_model(Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=192, n_layers=4, n_heads=6,
                                                   n_kv_heads=2, max_seq_len=1024)), Path(d) / "scorer", tokenizer=tok)
        config = ServerConfig(model_name="big", compression=CompressionConfig(model=str(Path(d) / "scorer")))
        app, _ = build_app(str(Path(d) / "big"), config, max_num_seqs=1, enable_prefix_caching=False)
        url, server = start(app)
        modes = [None] + args.rates
        times: dict = {m: [] for m in modes}
        usages: dict = {m: [] for m in modes}
        load_start = os.getloadavg()[0]
        with httpx.Client(base_url=url, timeout=120) as client:
            for m in modes:  # warm-up
                ttft(client, prompts[0], m)
            for p in prompts[1:]:
                for m in modes:
                    t, u = ttft(client, p, m)
                    times[m].append(t)
                    usages[m].append(u)
                print(" ".join(f"{m or 'off'}: {times[m][-1] * 1000:.0f} ms" for m in modes), flush=True)
        server.should_exit = True
        load_end = os.getloadavg()[0]
    base = statistics.median(times[None])
    mean_tokens = {m: statistics.mean(u["prompt_tokens"] for u in usages[m]) for m in modes}
    results = []
    for rate in args.rates:
        ratios = [b / c for b, c in zip(times[None], times[rate])]
        results.append(result(
            "prompt_compression_server", f"server_ttft_s_rate{rate}", False, statistics.median(times[rate]),
            "the same server, no prompt_compression", base, goal=None,
            prompt_tokens=round(mean_tokens[rate], 1), prompt_tokens_uncompressed=round(mean_tokens[None], 1),
            per_repeat_ratio=[round(r, 3) for r in ratios], ttft_s_each=[round(t, 4) for t in times[rate]],
            ttft_s_each_uncompressed=[round(t, 4) for t in times[None]], repeats=args.repeats,
            served_model="llama-base preset (random init), batch 1, prefix caching off",
            scorer="4x192 llama (random init), same tokenizer", request="/v1/completions stream, max_tokens 1",
            threads=args.threads, machine="2 cores, shared",
            load_avg_1min=[round(load_start, 2), round(load_end, 2)]))
    write_result("prompt_compression_server", results)


if __name__ == "__main__":
    main()
