"""W8A8 (SmoothQuant) decode GEMV: lmstack.kernels.quant.w8a8_linear's int8 x int8 -> int32 kernel against our
weight-only int8 kernel (int8_linear), fp32 F.linear (MKL) and the integer reference that QuantLinear(fmt="w8a8")
ran before it (compress.smoothquant.w8a8_linear), in one process.

Part 1, per llama-base matmul shape (fused qkv, o, fused gate_up, down, head; benchmarks/cpu_gemv.py's shapes) at
rows M = 1 (and 8): the time of one product, timed over enough distinct weight copies (>= --min-mb MB per
method) that every pass reads the weights from DRAM, as benchmarks/quant_gemv.py does; methods interleaved pass by
pass, the best pass counts. Also "hot": one weight reused, so it stays in cache (the compute side of the kernel).
  w8a8       ext.w8a8_linear: x quantized per row, codes int8 per output channel (both from the C++ call)
  int8       ext.int8_linear: the same codes, x kept fp32 (weight-only)
  fp32       F.linear on an fp32 weight (MKL)
  reference  smoothquant.w8a8_linear (quantize_per_token + int32 torch.matmul; QuantLinear's path before)
  int_mm     the same steps in torch with torch._int_mm (w8a8_linear's path past MAX_ROWS rows)
Rows: gemv_us_M{M}_{shape}_w8a8_vs_{int8,fp32,reference}, us per call, ratio = baseline time / w8a8 time.

Part 2 (--decode-tokens > 0): decode tokens/s through lmstack.LLM at batch 1 on llama-base (fixed-seed random
weights) with its block Linears quantized in process by quantize_cli.quantize_in_place: "int8" (weight-only,
per channel) and "smoothquant" (W8A8, calibrated on random token ids); the head int8 in both (quantize_head).
The W8A8 model runs twice: as QuantLinear runs it now (through this kernel) and with kernels.quant.w8a8_linear
monkeypatched to the torch reference (QuantLinear's forward before the kernel). Runs alternate, the best of
--decode-repeats counts.

--avx2-variants also builds the extension a second and third time with AVX-512 off (-mno-avx512f), once per
AVX2 dot product (vpmaddubsw sign trick, the default, and -DLMSTACK_W8A8_AVX2_MADD: sign-extend + vpmaddwd),
checks each against the reference and times them hot at M = 1: which one the AVX2 build should use.

Usage:
    flock /tmp/lmstack-bench.lock python benchmarks/w8a8_gemv.py             # ~3-5 minutes on 2 shared cores
    flock /tmp/lmstack-bench.lock python benchmarks/w8a8_gemv.py --rows 1 --decode-tokens 0 --avx2-variants
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import os
import platform

import torch
import torch.nn.functional as F

from _common import result, write_result
from cpu_gemv import seconds, shapes
from quant_gemv import int8_weight
from lmstack.compress import qlinear
from lmstack.compress.quantize_cli import quantize_in_place
from lmstack.compress.quantize_rtn import QuantizedWeight
from lmstack.compress.smoothquant import w8a8_linear as w8a8_reference
from lmstack.infer import LLM, SamplingParams
from lmstack.kernels import build, info
from lmstack.kernels.quant import _int_products, quantize_rows, w8a8_linear
from lmstack.model import Transformer, preset

NAME = "w8a8_gemv"
METHODS = ("w8a8", "int8", "fp32", "reference", "int_mm")


def int_mm_path(x, codes, scales):
    """w8a8_linear's torch path (quantize_rows + torch._int_mm), timed at decode sizes for comparison."""
    xq, xs = quantize_rows(x)
    return _int_products(xq, codes).float() * xs * scales.reshape(1, -1)


def time_methods(fns: dict, counts: dict, repeats: int) -> dict:
    """Best seconds per call of each method over `repeats` interleaved passes."""
    for fn in fns.values():
        fn()  # warm: first touch, thread pool
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            best[k] = min(best[k], seconds(fn) / counts[k])
    return best


def part1(cfg, rows: list[int], repeats: int, min_mb: float, ext) -> list[dict]:
    out = []
    for name, (O, I) in shapes(cfg).items():
        n8 = max(2, int(min_mb * 1e6 / (O * I)) + 1)
        q = [int8_weight(O, I) for _ in range(n8)]
        w32 = [torch.randn(O, I) for _ in range(max(2, n8 // 4))]  # 4 bytes a weight: the same MB
        refs = [QuantizedWeight(w["codes"], w["scales"], None, 8, I) for w in q]
        for M in rows:
            x = torch.randn(M, I)
            few = max(2, n8 // 8)  # the slow torch paths: fewer calls a pass (still past the caches for the big shapes)
            fns = {"w8a8": lambda: [ext.w8a8_linear(x, w["codes"], w["scales"], None) for w in q],
                   "int8": lambda: [ext.int8_linear(x, w["codes"], w["scales"], None) for w in q],
                   "fp32": lambda: [F.linear(x, w) for w in w32],
                   "reference": lambda: [w8a8_reference(x, r) for r in refs[:few]],
                   "int_mm": lambda: [int_mm_path(x, w["codes"], w["scales"]) for w in q[:few]],
                   "w8a8_hot": lambda: [ext.w8a8_linear(x, q[0]["codes"], q[0]["scales"], None) for _ in q],
                   "int8_hot": lambda: [ext.int8_linear(x, q[0]["codes"], q[0]["scales"], None) for _ in q]}
            counts = {k: len(q) for k in fns} | {"fp32": len(w32), "reference": few, "int_mm": few}
            us = {k: v * 1e6 for k, v in time_methods(fns, counts, repeats).items()}
            assert torch.equal(ext.w8a8_linear(x, q[0]["codes"], q[0]["scales"], None), w8a8_reference(x, refs[0]))
            common = dict(out_features=O, in_features=I, rows=M, us={k: round(v, 1) for k, v in us.items()},
                          weight_mb_per_pass={"int8": round(len(q) * O * I / 1e6, 1),
                                              "fp32": round(len(w32) * O * I * 4 / 1e6, 1)},
                          hot_ratio_int8_over_w8a8=round(us["int8_hot"] / us["w8a8_hot"], 3))
            for base, label in (("int8", "our weight-only int8 kernel (int8_linear)"), ("fp32", "F.linear fp32 (MKL)"),
                                ("reference", "smoothquant.w8a8_linear (the torch reference)")):
                out.append(result(NAME, f"gemv_us_M{M}_{name}_w8a8_vs_{base}", False, round(us["w8a8"], 1), label,
                                  round(us[base], 1), goal=1.0 if base == "int8" and M == 1 else None, **common))
            print(f"{name:8s} {O}x{I} M={M}: " + "  ".join(f"{k} {v:.1f}us" for k, v in us.items()), flush=True)
        del q, w32, refs
    return out


@contextlib.contextmanager
def reference_in_qlinear(calls: list):
    """QuantLinear(fmt="w8a8") runs smoothquant's torch reference instead of the kernel for the duration: its
    forward before the kernel was wired in (it calls lmstack.kernels.quant.w8a8_linear through that module)."""
    original = qlinear.quant_kernels.w8a8_linear

    def reference(x, codes, scales, bias=None):
        calls.append(1)
        return w8a8_reference(x, QuantizedWeight(codes, scales, None, 8, codes.shape[1]), bias).to(x.dtype)
    qlinear.quant_kernels.w8a8_linear = reference
    try:
        yield
    finally:
        qlinear.quant_kernels.w8a8_linear = original


def part2(cfg, new_tokens: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    base = Transformer(cfg).eval()
    calib = torch.randint(0, cfg.vocab_size, (8, 128), generator=torch.Generator().manual_seed(2))
    models = {}
    for method in ("int8", "smoothquant"):
        net = copy.deepcopy(base)
        quantize_in_place(net, method, None, calib if method == "smoothquant" else None)
        qlinear.quantize_head(net)
        net.fuse_projections()
        models[method] = net
    if not isinstance(models["smoothquant"].blocks[0].attn.qkv_proj, qlinear.QuantLinear):
        raise SystemExit("the W8A8 model's projections were not fused into QuantLinears")
    llms = {k: LLM(m, max_num_seqs=1, enable_prefix_caching=False) for k, m in models.items()}
    prompt = torch.randint(0, cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    calls: list = []
    runs = {"int8": lambda: llms["int8"].generate([prompt], params),
            "w8a8_kernel": lambda: llms["smoothquant"].generate([prompt], params)}

    def with_reference():
        with reference_in_qlinear(calls):
            return llms["smoothquant"].generate([prompt], params)
    runs["w8a8_reference"] = with_reference
    times = {k: float("inf") for k in runs}
    tokens = {}
    for k, fn in runs.items():
        fn()
    if not calls:
        raise SystemExit("the patched reference was never called: QuantLinear no longer calls "
                         "quant_kernels.w8a8_linear")
    for _ in range(repeats):
        for k, fn in runs.items():
            t = seconds(lambda: tokens.__setitem__(k, fn()[0].outputs[0].token_ids))
            times[k] = min(times[k], t)
    tps = {k: new_tokens / v for k, v in times.items()}
    same = sum(a == b for a, b in zip(tokens["w8a8_reference"], tokens["w8a8_kernel"]))
    common = dict(preset="llama-base", new_tokens=new_tokens, prompt_len=len(prompt), batch=1,
                  tokens_per_s={k: round(v, 1) for k, v in tps.items()}, head="int8 (quantize_head)",
                  made_by="quantize_cli.quantize_in_place + quantize_head + fuse_projections, lmstack.LLM(model)",
                  reference_run="QuantLinear with kernels.quant.w8a8_linear monkeypatched to smoothquant.w8a8_linear",
                  greedy_tokens_kernel_equal_reference=f"{same}/{new_tokens}")
    print("decode batch 1: " + "  ".join(f"{k} {v:.1f} tok/s" for k, v in tps.items()), flush=True)
    return [result(NAME, "decode_tokens_per_s_batch1_w8a8_kernel_vs_int8", True, round(tps["w8a8_kernel"], 1),
                   "QuantLinear int8 (weight-only kernel)", round(tps["int8"], 1), goal=1.0, **common),
            result(NAME, "decode_tokens_per_s_batch1_w8a8_kernel_vs_reference", True, round(tps["w8a8_kernel"], 1),
                   "QuantLinear w8a8 on smoothquant.w8a8_linear (the torch reference)", round(tps["w8a8_reference"], 1), **common)]


def avx2_variants(repeats: int) -> list[dict]:
    """Build the kernels with AVX-512 off, once per AVX2 dot product, check them and time them hot at M = 1."""
    from torch.utils import cpp_extension  # lazy: only this option compiles extra builds
    cfg = preset("llama-base")
    found = {}
    for flag in ("", "-DLMSTACK_W8A8_AVX2_MADD"):
        flags = [*build.CFLAGS, "-mno-avx512f", *([flag] if flag else [])]
        key = hashlib.sha256((build.build_key() + " ".join(flags)).encode()).hexdigest()[:16]
        where = build.cache_dir() / "variants" / key
        where.mkdir(parents=True, exist_ok=True)
        mod = cpp_extension.load(f"lmstack_w8a8_variant_{key}", [str(p) for p in build.SOURCES], extra_cflags=flags,
                                 extra_ldflags=list(build.LDFLAGS), extra_include_paths=[str(build.HERE)],
                                 build_directory=str(where), verbose=False)
        found[mod.w8a8_isa()] = mod
    out = []
    for name, (O, I) in shapes(cfg).items():
        w = int8_weight(O, I)
        x = torch.randn(1, I)
        want = w8a8_reference(x, QuantizedWeight(w["codes"], w["scales"], None, 8, I))
        for isa, mod in found.items():
            if not torch.equal(mod.w8a8_linear(x, w["codes"], w["scales"], None), want):
                raise SystemExit(f"the {isa} build differs from the reference on {name}")
        fns = {isa: (lambda mod=mod: [mod.w8a8_linear(x, w["codes"], w["scales"], None) for _ in range(20)])
               for isa, mod in found.items()}
        us = {k: v * 1e6 for k, v in time_methods(fns, {k: 20 for k in fns}, repeats).items()}
        print(f"avx2 {name}: " + "  ".join(f"{k} {v:.1f}us" for k, v in us.items()), flush=True)
        out.append(result(NAME, f"avx2_hot_us_M1_{name}_maddubs_vs_madd", False, round(us["avx2_maddubs"], 1),
                          "AVX2 sign-extend + vpmaddwd", round(us["avx2_madd"], 1), out_features=O, in_features=I,
                          note="AVX-512 switched off at build time (-mno-avx512f); weights hot in cache"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timed passes per method and shape")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="x rows (M) for part 1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-mb", type=float, default=64.0, help="int8 weight MB per method and pass (past the caches)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="new tokens per decode run in part 2 (0: skip)")
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--avx2-variants", action="store_true", help="also build and time the two AVX2 dot products")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ext = build.extension()
    if ext is None:
        raise SystemExit(f"the kernels are not available here: {info()}")
    cfg = preset("llama-base")
    with torch.inference_mode():
        res = part1(cfg, args.rows, args.repeats, args.min_mb, ext)
    if args.decode_tokens > 0:
        res += part2(cfg, args.decode_tokens, args.decode_repeats)
    if args.avx2_variants:
        with torch.inference_mode():
            res += avx2_variants(args.repeats)
    common = {"machine": "2 cores, shared" if (os.cpu_count() or 0) <= 2 else f"{os.cpu_count()} cores",
              "threads": args.threads, "repeats": args.repeats, "isa": info()["isa"], "w8a8_isa": ext.w8a8_isa(),
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "model": "llama-base",
              "load_average_at_end": os.getloadavg()[0]}
    for r in res:
        r["config"] = {**common, **r["config"]}
    write_result(NAME, res)


if __name__ == "__main__":
    main()
