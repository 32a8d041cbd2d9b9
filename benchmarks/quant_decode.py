"""End-to-end decode tokens/s through lmstack.LLM with weight-only int8 / int4 block weights, against the same
model in fp32, in one process; llama.cpp f32 / q8_0 / q4_0 on the same weights when its build exists.

The llama-base preset (~123M parameters, fixed-seed random weights: speed does not depend on the values) is
saved, quantized by `lmstack quantize` (compress.quantize_cli.quantize: round to nearest, every block Linear,
and the LM head int8 per row unless the variant says fp32 head) and opened with lmstack.LLM(dir), the path a
user runs; the engine fuses q/k/v and gate/up at load (QuantLinear.cat_rows), so each layer makes 4 quantized
matmuls:
  fp32               the model as is (fused projections, the skinny kernel)
  int8               one scale per output channel, symmetric; int8 head
  int4_g128          groups of 128, asymmetric (the int4 default); int8 head
  int4_g32           groups of 32 (llama.cpp q4_0's block size); int8 head
  w8a8               SmoothQuant's storage (int8 weights per channel, activations int8 per token at run time,
                     int8 x int8 -> int32 kernel; the smoothing itself changes no speed and is left out);
                     int8 head; written by save_quantized, as `lmstack quantize --method smoothquant` does
  int8_fp32_head     int8 blocks with the head left fp32 (--head fp32): what the head costs
  int4_g128_fp32_head
Each variant decodes the same random --prompt-len-token prompt greedily for --new-tokens tokens (EOS ignored)
at batch 1 (and batch 8: 8 prompts at once, tokens/s over all of them); tokens/s = new tokens / wall time of
generate (the short prompt's prefill included, as in decode_vs_hf.py). Runs alternate between variants so they
share the machine's noise; the best of --repeats counts. The bandwidth bound beside each is the machine's read
bandwidth (x.sum() over 512 MB, same run) over the bytes a decode step reads (every parameter and buffer except
the embedding table).

llama.cpp (benchmarks/_llama_cpp.py; built by bash benchmarks/setup_llama_cpp.sh): the fp32 weights converted by
llama.cpp's own converter to f32 and q8_0, and q4_0 by its quantizer, decoding the same prompt through
llama-cpp-python (in a worker process) in the same alternating runs, with its weight repacking off
(_llama_cpp.EXTRA_BUFTS: it segfaulted on this machine; config.llama_cpp_extra_bufts says which ran). When it is not built its comparison is recorded as skipped, with
the reason, in the config of the int8 / int4 rows.

Usage:
    python benchmarks/quant_decode.py                       # ~3-6 minutes on 2 shared cores
    python benchmarks/quant_decode.py --repeats 2 --new-tokens 64 --batches 1
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time

import torch

import _llama_cpp
from _common import result, write_result

import lmstack
from lmstack.compress.calibration import block_linears
from lmstack.compress.qformat import save_quantized
from lmstack.compress.qlinear import QuantLinear, quantize_head, replace_module
from lmstack.compress.quantize_cli import quantize
from lmstack.compress.smoothquant import quantize_w8a8
from lmstack.infer import LLM, SamplingParams
from lmstack.kernels import info
from lmstack.model import Transformer, preset

NAME = "quant_decode"
# name -> (lmstack quantize --method, --group-size, --head)
VARIANTS = {"fp32": None, "int8": ("int8", None, "int8"), "int4_g128": ("int4", 128, "int8"),
            "int4_g32": ("int4", 32, "int8"), "w8a8": ("w8a8", None, "int8"), "int8_fp32_head": ("int8", None, "fp32"),
            "int4_g128_fp32_head": ("int4", 128, "fp32")}
GOALS = {"int8": 2.5, "int4_g128": 4.0, "int4_g32": 4.0}
LLAMA_MATCH = {"int8": "q8_0", "int4_g32": "q4_0", "int4_g128": "q4_0"}


def read_bandwidth(repeats: int = 5) -> float:
    """GB/s of the best x.sum() over a 512 MB fp32 tensor."""
    x = torch.ones(128 * 1024 * 1024)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def step_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every parameter and buffer but the input embedding's own table (one row of it is
    read), float or int8 (QuantEmbedding); a table tied to the head is the head's and counts."""
    def tensors(m: torch.nn.Module | None) -> list[torch.Tensor]:
        return [] if m is None else list(m.parameters()) + list(m.buffers())
    head = {id(t) for t in tensors(model.lm_head)} | ({id(model.tok_emb.weight)} if model.lm_head is None else set())
    skip = {id(t) for t in tensors(model.tok_emb)} - head
    return sum(t.numel() * t.element_size() for t in tensors(model) if id(t) not in skip)


def build_variants(base: Transformer, root: str) -> dict[str, str]:
    """Model directories: the fp32 one, and each variant made from it by `lmstack quantize`."""
    fp32 = os.path.join(root, "fp32")
    lmstack.save_model(base, fp32)
    out = {"fp32": fp32}
    for name, spec in VARIANTS.items():
        if spec is None:
            continue
        method, group, head = spec
        if method == "w8a8":  # no calibration text here: SmoothQuant's storage without its smoothing
            m = Transformer(base.config).eval()
            m.load_state_dict(base.state_dict())
            for n, lin in block_linears(m).items():
                replace_module(m, n, QuantLinear.from_weight(quantize_w8a8(lin.weight), lin.bias, fmt="w8a8"))
            quantize_head(m)
            save_quantized(m, os.path.join(root, name), method="smoothquant")
            out[name] = os.path.join(root, name)
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # quantize prints its JSON report
            quantize(fp32, os.path.join(root, name), method, group, head=head)
        out[name] = os.path.join(root, name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16, help="<= 32 keeps the prefill on the decode kernels too")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-cpp", nargs="*", default=["f32", "q8_0", "q4_0"],
                    help="llama.cpp GGUF types to add when llama.cpp is built (empty: none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset("llama-base")
    base = Transformer(cfg).eval()
    work = tempfile.TemporaryDirectory()
    dirs = build_variants(base, work.name)
    llms = {k: LLM(d, max_num_seqs=max(args.batches), enable_prefix_caching=False) for k, d in dirs.items()}
    for k, llm in llms.items():  # the user's path: LLM(dir) fused the projections of every variant
        if llm.engine.model.blocks[0].attn.qkv_proj is None:
            raise SystemExit(f"the engine did not fuse {k}'s projections")
        if k != "fp32" and not isinstance(llm.engine.model.blocks[0].attn.qkv_proj, QuantLinear):
            raise SystemExit(f"{k} has no quantized projections")
    nbytes = {k: step_bytes(llm.engine.model) for k, llm in llms.items()}

    ok, why = _llama_cpp.available()
    ggufs = {}
    if ok and args.llama_cpp:
        d = dirs["fp32"]
        for kind in args.llama_cpp:
            if kind == "q4_0":  # the converter writes f32/f16/q8_0; q4_0 comes from llama.cpp's quantizer
                ggufs[kind] = _llama_cpp.quantize(ggufs.get("f32") or _llama_cpp.convert(d, work.name, "f32"), kind)
            else:
                ggufs[kind] = _llama_cpp.convert(d, work.name, kind)
    llama_skip = "" if ggufs else (why or "not requested (--llama-cpp with no types)")
    if llama_skip:
        print(f"llama.cpp rows skipped: {llama_skip}", flush=True)
    decoders = {k: _llama_cpp.Decoder(g, args.threads) for k, g in ggufs.items()}

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
               for _ in range(max(args.batches))]
    n = args.new_tokens
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    times = {b: {k: [] for k in llms} for b in args.batches}
    times_lc = {k: [] for k in decoders}
    tokens = {}
    for llm in llms.values():  # warm: first calls build the kernels' thread pool, the KV pool pages
        llm.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    bws = [read_bandwidth()]
    for _ in range(args.repeats):
        for b in args.batches:
            for k, llm in llms.items():
                start = time.perf_counter()
                outs = llm.generate(prompts[:b], params)
                times[b][k].append(time.perf_counter() - start)
                if b == 1:
                    tokens[k] = outs[0].outputs[0].token_ids
        for kind, dec in decoders.items():
            tokens[f"llama_cpp_{kind}"], secs = dec.run(prompts[0], n)
            times_lc[kind].append(secs)
        bws.append(read_bandwidth(2))
    for dec in decoders.values():
        dec.close()
    work.cleanup()
    bw = max(bws)

    tps = {b: {k: b * n / min(v) for k, v in times[b].items()} for b in args.batches}
    tps_lc = {k: n / min(v) for k, v in times_lc.items()}
    common = dict(preset="llama-base", params=sum(p.numel() for p in base.parameters()), new_tokens=n,
                  prompt_len=args.prompt_len, threads=args.threads, fused_projections=True,
                  made_by="lmstack quantize, opened with lmstack.LLM(dir)",
                  llama_cpp_extra_bufts=_llama_cpp.EXTRA_BUFTS if decoders else None,
                  read_bandwidth_gbps=round(bw, 2), isa=info()["isa"], torch=torch.__version__,
                  machine="2 cores, shared" if (os.cpu_count() or 0) <= 2 else f"{os.cpu_count()} cores",
                  load_average_at_end=os.getloadavg()[0], weights="fixed-seed random (speed only)")
    res = []
    for b in args.batches:
        for k in VARIANTS:
            if k == "fp32":
                continue
            bound = b * bw * 1e9 / nbytes[k]
            same = sum(x == y for x, y in zip(tokens["fp32"], tokens[k]))
            extra = {}
            if b == 1 and k in LLAMA_MATCH:
                lc = LLAMA_MATCH[k]
                extra["llama_cpp"] = (f"{lc}: {tps_lc[lc]:.1f} tok/s" if lc in tps_lc else
                                      f"skipped: {llama_skip or lc + ' not requested'}")
            res.append(result(NAME, f"tokens_per_s_batch{b}_{k}", True, round(tps[b][k], 1),
                              "our fp32 engine, same run", round(tps[b]["fp32"], 1),
                              goal=GOALS.get(k) if b == 1 else None, batch=b, variant=k,
                              head="fp32" if k.endswith("fp32_head") else "int8",
                              step_mb=round(nbytes[k] / 1e6, 1), fp32_step_mb=round(nbytes["fp32"] / 1e6, 1),
                              bandwidth_bound_tokens_per_s=round(bound, 1),
                              fraction_of_bound=round(tps[b][k] / bound, 3),
                              fp32_fraction_of_bound=round(tps[b]["fp32"] * nbytes["fp32"] / (b * bw * 1e9), 3),
                              greedy_tokens_equal_to_fp32=f"{same}/{n}" if b == 1 else None,
                              all_times_s={v: [round(t, 3) for t in times[b][v]] for v in ("fp32", k)},
                              **extra, **common))
        res.append(result(NAME, f"tokens_per_s_batch{b}_w8a8_vs_int8", True, round(tps[b]["w8a8"], 1),
                          "our weight-only int8 (W8A16), same run", round(tps[b]["int8"], 1), batch=b,
                          note="both int8 weights per channel and an int8 head; w8a8 also rounds each "
                               "activation row to int8 and multiplies in int32", **common))
        print(f"batch {b}: " + "  ".join(f"{k} {v:.1f} tok/s" for k, v in tps[b].items()), flush=True)
    for k in ("int8", "int4_g32", "int4_g128"):
        lc = LLAMA_MATCH[k]
        if lc in tps_lc:
            res.append(result(NAME, f"tokens_per_s_batch1_{k}_vs_llama_cpp_{lc}", True, round(tps[1][k], 1),
                              f"llama.cpp {lc} (llama-cpp-python), same weights", round(tps_lc[lc], 1), goal=0.8,
                              all_times_s=[round(t, 3) for t in times_lc[lc]], **common))
    if "f32" in tps_lc:
        res.append(result(NAME, "tokens_per_s_batch1_fp32_vs_llama_cpp_f32", True, round(tps[1]["fp32"], 1),
                          "llama.cpp f32 (llama-cpp-python), same weights", round(tps_lc["f32"], 1), **common))
    if tps_lc:
        print("llama.cpp: " + "  ".join(f"{k} {v:.1f} tok/s" for k, v in tps_lc.items()), flush=True)
    write_result(NAME, res)


if __name__ == "__main__":
    main()
