"""Batch-1 greedy decode tokens/s: lmstack's engine (LLM.generate) vs transformers' `generate`, same weights.

The llama-base preset (~123M parameters, random init) is saved once in HF layout and loaded by both.
Both decode the same random 32-token prompt greedily for NEW_TOKENS tokens (EOS ignored); runs
alternate between the two so they share the machine's noise, and the best of REPEATS counts. We also
measure the machine's read bandwidth (sum over a 512 MB tensor) and report the fraction of the
memory-bandwidth bound: a decode step must stream every weight but the embedding table once, so
bound = bandwidth / weight bytes per token. Run at 2 threads (the project default) and at 1 thread:
on a shared 2-core machine a busy neighbour core can slow 2-thread small ops down a lot.
Goal: ratio >= 1.2 against transformers, and >= 90% of the bound (issue 18).

llama.cpp joins when it is built (bash benchmarks/setup_llama_cpp.sh; otherwise its rows are skipped with the
reason): the same weights converted by llama.cpp's own convert_hf_to_gguf.py, at f32 (the same precision, the fair
fight) and, for context only, q8_0 and q4_0 (fewer bytes per token: the compression issue's fight), decoding the
same prompt greedily through llama-cpp-python in the same alternating runs.

Usage:
    python benchmarks/decode_vs_hf.py [--new_tokens 128] [--repeats 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

import _llama_cpp
from _common import result, write_result

import lmstack
from lmstack.infer import LLM, SamplingParams
from lmstack.model import Transformer, preset


def read_bandwidth(gb: float = 0.5, repeats: int = 5) -> float:
    """Bytes/s of a full read (sum) of a large fp32 tensor, best of `repeats`."""
    x = torch.ones(int(gb * (1 << 30)) // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--llama_cpp", nargs="*", default=["f32", "q8_0", "q4_0"],
                    help="llama.cpp GGUF types to add (empty: none); skipped when llama.cpp is not built")
    args = ap.parse_args()
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = preset("llama-base")
    ggufs, work = {}, tempfile.TemporaryDirectory()
    ok, why = _llama_cpp.available()
    if args.llama_cpp and not ok:
        print(f"llama.cpp rows skipped: {why}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        lmstack.save_model(Transformer(cfg), d)
        llm = LLM(d, max_num_seqs=1, enable_prefix_caching=False)
        hf = LlamaForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
        if ok:
            for kind in args.llama_cpp:
                if kind == "q4_0":  # the converter writes f32/f16/bf16/q8_0; q4_0 comes from llama.cpp's quantizer
                    base = ggufs.get("f32") or _llama_cpp.convert(d, work.name, "f32")
                    ggufs[kind] = _llama_cpp.quantize(base, "q4_0")
                else:
                    ggufs[kind] = _llama_cpp.convert(d, work.name, kind)
    model = llm.engine.model
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,)).tolist()
    n = args.new_tokens
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes -= model.tok_emb.weight.numel() * model.tok_emb.weight.element_size()  # only one row is read
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = {"ours": [], "hf": [], **{f"llama_cpp_{k}": [] for k in ggufs}}
        outs = {}
        decoders = {k: _llama_cpp.Decoder(g, threads) for k, g in ggufs.items()}
        for _ in range(args.repeats):
            start = time.perf_counter()
            outs["ours"] = llm.generate([prompt], params)[0].outputs[0].token_ids
            times["ours"].append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.inference_mode():
                o = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
            times["hf"].append(time.perf_counter() - start)
            outs["hf"] = o[0, len(prompt):].tolist()
            for kind, dec in decoders.items():
                outs[f"llama_cpp_{kind}"], secs = dec.run(prompt, n)
                times[f"llama_cpp_{kind}"].append(secs)
        for dec in decoders.values():
            dec.close()
        bw = read_bandwidth()
        bound = bw / weight_bytes
        tok_s = {k: n / min(v) for k, v in times.items()}
        same = sum(a == b for a, b in zip(outs["ours"], outs["hf"]))
        print(f"threads={threads}: ours {tok_s['ours']:.1f} tok/s, transformers {tok_s['hf']:.1f} tok/s, "
              + "".join(f"{k} {v:.1f} tok/s, " for k, v in tok_s.items() if k.startswith("llama_cpp"))
              + f"bound {bound:.1f} tok/s ({bw / 1e9:.1f} GB/s), identical tokens {same}/{n}", flush=True)
        results.append(result(
            "decode_vs_hf", f"tokens_per_s_threads{threads}", True, tok_s["ours"], "transformers generate",
            tok_s["hf"], goal=1.2, preset="llama-base", params=model.num_parameters(), prompt_len=len(prompt),
            new_tokens=n, threads=threads, dtype="float32", read_bandwidth_gb_s=round(bw / 1e9, 2),
            weight_bytes_per_token=weight_bytes, bandwidth_bound_tok_s=round(bound, 2),
            ours_fraction_of_bound=round(tok_s["ours"] / bound, 3), hf_fraction_of_bound=round(tok_s["hf"] / bound, 3),
            identical_greedy_tokens=f"{same}/{n}", all_times_s={k: [round(t, 3) for t in v] for k, v in times.items()}))
        results.append(result(
            "decode_vs_hf", f"fraction_of_bandwidth_bound_threads{threads}", True, round(tok_s["ours"] / bound, 3),
            "transformers generate", round(tok_s["hf"] / bound, 3), goal=0.9, threads=threads,
            bandwidth_bound_tok_s=round(bound, 2), read_bandwidth_gb_s=round(bw / 1e9, 2),
            **{f"{k}_fraction_of_bound": round(v / bound, 3) for k, v in tok_s.items() if k.startswith("llama_cpp")}))
        for kind in ggufs:
            key = f"llama_cpp_{kind}"
            same_lc = sum(a == b for a, b in zip(outs["ours"], outs[key]))
            what = "same precision" if kind == "f32" else "fewer bytes per weight: context, not the same fight"
            results.append(result(
                "decode_vs_hf", f"tokens_per_s_threads{threads}_vs_llama_cpp_{kind}", True, tok_s["ours"],
                f"llama.cpp {kind} (llama-cpp-python, {what})", tok_s[key], goal=1.0 if kind == "f32" else None,
                threads=threads, gguf_type=kind, ours_dtype="float32", identical_greedy_tokens=f"{same_lc}/{n}",
                llama_cpp_fraction_of_bound=round(tok_s[key] / bound, 3),
                all_times_s={k: [round(t, 3) for t in times[k]] for k in ("ours", key)}))
    write_result("decode_vs_hf", results)
    work.cleanup()


if __name__ == "__main__":
    main()
