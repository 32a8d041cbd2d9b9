"""Weight-only int8 / int4 decode GEMV (lmstack.kernels.int8_linear / int4_linear) on llama-base's matmuls, against
our fp32 skinny kernel, MKL's F.linear, torch's _weight_int8pack_mm and torchao's int8 weight-only (when importable).

Part 1, per weight shape of llama-base (fused qkv, o, fused gate_up, down, head) and rows M in {1, 8}: the time of
one product, timed over enough distinct weight copies (>= --min-mb MB per method) that every pass reads DRAM:
  fp32         ext.skinny_linear (our fp32 decode kernel, benchmarks/cpu_gemv.py)
  mkl          F.linear, fp32
  int8         ext.int8_linear, one scale per output channel (what `quantize --method int8` writes)
  int4_g128    ext.int4_linear, groups of 128, asymmetric (the int4 default)
  int4_g32     ext.int4_linear, groups of 32
  int8pack_mm  torch._weight_int8pack_mm (int8 codes, per-channel scales: the op torch's int8 weight-only uses)
  torchao      torchao Int8WeightOnlyConfig on an nn.Linear (skipped, with the reason, when torchao is absent)
Methods are interleaved pass by pass, so contention on a shared machine hits all alike; the best pass counts.
GB/s = bytes of codes and constants read per product / time, beside the machine's read bandwidth (x.sum() over a
512 MB tensor, measured in the same loop).

Part 2: one llama-base decode step's matmuls (12 layers x (qkv, o, gate_up, down), distinct weights, plus the
head) at M = 1 and 8, with every block weight fp32 / int8 / int4 and the head fp32 (quantize_linears leaves it
alone) or int8 ("+head8"): tokens/s bound by the matmuls alone, and the bandwidth bound (bandwidth / bytes per
step, times M).

Usage:
    python benchmarks/quant_gemv.py                       # ~4-6 minutes on 2 shared cores
    python benchmarks/quant_gemv.py --repeats 3 --min-mb 64
    PYTHONPATH=/tmp/torchao_site python benchmarks/quant_gemv.py   # with torchao unpacked there (see below)
torchao is not a dependency; to include it without touching the venv:
    pip download torchao --no-deps -d /tmp/torchao_dl && pip install --no-deps --target /tmp/torchao_site \
        /tmp/torchao_dl/torchao-*.whl
"""
from __future__ import annotations

import argparse
import os
import platform

import torch
import torch.nn.functional as F

from _common import result, write_result
from cpu_gemv import bandwidth_pass, seconds, shapes  # the same shapes and timing as the fp32 kernel's benchmark
from lmstack.kernels import build, info, int4_linear, int8_linear, skinny_linear
from lmstack.model import preset

NAME = "quant_gemv"
torch_int8pack_mm = getattr(torch, "_weight_int8pack_mm", None)




def int8_weight(O: int, I: int) -> dict:
    """Per-output-channel int8 codes and scales (random codes: the kernel's speed does not depend on them)."""
    return {"codes": torch.randint(-127, 128, (O, I), dtype=torch.int8), "scales": torch.rand(O, 1) * 0.01 + 1e-3}


def int4_weight(O: int, I: int, group: int) -> dict:
    return {"codes": torch.randint(0, 256, (O, I // 2), dtype=torch.uint8),
            "scales": torch.rand(O, I // group) * 0.01 + 1e-3,
            "zeros": torch.randint(0, 16, (O, I // group), dtype=torch.uint8), "group": group}


def nbytes(w) -> int:
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return sum(t.numel() * t.element_size() for t in w.values() if isinstance(t, torch.Tensor))


def torchao_linear(O: int, I: int):
    """An nn.Linear quantized by torchao's int8 weight-only config, or the reason it cannot be made."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_  # lazy: optional baseline
    except Exception as e:  # ImportError, or a torchao that does not load against this torch
        return None, f"torchao not importable ({type(e).__name__}: {e})"
    lin = torch.nn.Sequential(torch.nn.Linear(I, O, bias=False))
    quantize_(lin, Int8WeightOnlyConfig())
    return lin, ""


def torchao_version() -> str:
    try:
        import torchao  # lazy: optional baseline
        return torchao.__version__
    except Exception:
        return "absent"


def part1(cfg, rows: list[int], repeats: int, min_mb: float, bw_buf, ext, with_torchao: bool):
    out, bw_all = [], []
    for name, (O, I) in shapes(cfg).items():
        def copies(make, per_copy):
            return [make() for _ in range(max(2, int(min_mb * 1e6 / per_copy) + 1))]
        weights = {"fp32": copies(lambda: torch.randn(O, I), 4 * O * I),
                   "int8": copies(lambda: int8_weight(O, I), O * I),
                   "int4_g128": copies(lambda: int4_weight(O, I, 128), O * I / 2),
                   "int4_g32": copies(lambda: int4_weight(O, I, 32), O * I / 2)}
        weights["mkl"] = weights["fp32"]
        if torch_int8pack_mm is not None:
            weights["int8pack_mm"] = [{"codes": w["codes"], "scales": w["scales"].view(-1)} for w in weights["int8"]]
        ao_skip = "not requested (--no-torchao)"
        if with_torchao:
            first, ao_skip = torchao_linear(O, I)
            if first is not None:
                weights["torchao"] = [first] + [torchao_linear(O, I)[0] for _ in range(len(weights["int8"]) - 1)]
        for M in rows:
            x = torch.randn(M, I)
            fns = {"fp32": lambda: [ext.skinny_linear(x, w, None) for w in weights["fp32"]],
                   "mkl": lambda: [F.linear(x, w) for w in weights["mkl"]],
                   "int8": lambda: [ext.int8_linear(x, w["codes"], w["scales"], None) for w in weights["int8"]],
                   "int4_g128": lambda: [ext.int4_linear(x, w["codes"], w["scales"], w["zeros"], 128, None)
                                         for w in weights["int4_g128"]],
                   "int4_g32": lambda: [ext.int4_linear(x, w["codes"], w["scales"], w["zeros"], 32, None)
                                        for w in weights["int4_g32"]]}
            if "int8pack_mm" in weights:
                fns["int8pack_mm"] = lambda: [torch_int8pack_mm(x, w["codes"], w["scales"])
                                              for w in weights["int8pack_mm"]]
            if "torchao" in weights:
                fns["torchao"] = lambda: [lin(x) for lin in weights["torchao"]]
            for fn in fns.values():
                fn()  # warm: first touch, thread pool
            best = {k: float("inf") for k in fns}
            for _ in range(repeats):
                for k, fn in fns.items():
                    best[k] = min(best[k], seconds(fn) / len(weights[k]))
                bw_all.append(bandwidth_pass(bw_buf))
            bw = max(bw_all)
            us = {k: v * 1e6 for k, v in best.items()}
            gbps = {k: (nbytes(weights[k][0]) if k != "torchao" else nbytes(weights["int8"][0])) / best[k] / 1e9
                    for k in best}
            common = dict(out_features=O, in_features=I, rows=M, read_bandwidth_gbps_so_far=round(bw, 2),
                          us={k: round(v, 1) for k, v in us.items()}, gbps={k: round(v, 2) for k, v in gbps.items()},
                          fraction_of_bandwidth={k: round(v / bw, 3) for k, v in gbps.items()})
            for k in ("int8", "int4_g128", "int4_g32"):
                out.append(result(NAME, f"gemv_us_M{M}_{name}_{k}", False, round(us[k], 1),
                                  "our fp32 skinny kernel", round(us["fp32"], 1), goal=None, method=k,
                                  over_mkl=round(us["mkl"] / us[k], 3), **common))
            if "int8pack_mm" in us:
                out.append(result(NAME, f"gemv_us_M{M}_{name}_int8_vs_int8pack_mm", False, round(us["int8"], 1),
                                  "torch._weight_int8pack_mm", round(us["int8pack_mm"], 1), **common))
            if "torchao" in us:
                out.append(result(NAME, f"gemv_us_M{M}_{name}_int8_vs_torchao", False, round(us["int8"], 1),
                                  f"torchao {torchao_version()} Int8WeightOnlyConfig", round(us["torchao"], 1),
                                  goal=1.0, **common))
            else:
                out[-1]["config"]["torchao"] = f"skipped: {ao_skip}"
            print(f"{name:8s} {O}x{I} M={M}: " + "  ".join(f"{k} {us[k]:.0f}us {gbps[k]:.1f}GB/s" for k in us)
                  + f"   (bandwidth {bw:.1f})", flush=True)
        del weights
    return out, bw_all


def part2(cfg, repeats: int, bw_buf, bw_all: list[float]) -> list[dict]:
    sh = shapes(cfg)
    block = ("qkv", "o", "gate_up", "down")
    head32, head8 = torch.randn(*sh["head"]), int8_weight(*sh["head"])
    fp32 = [{k: torch.randn(*sh[k]) for k in block} for _ in range(cfg.n_layers)]
    int8 = [{k: int8_weight(*sh[k]) for k in block} for _ in range(cfg.n_layers)]
    int4 = {g: [{k: int4_weight(*sh[k], g) for k in block} for _ in range(cfg.n_layers)] for g in (128, 32)}

    def q8(x, w):
        return int8_linear(x, w["codes"], w["scales"])

    def q4(x, w):
        return int4_linear(x, w["codes"], w["scales"], w["zeros"], w["group"])

    # variant -> (block weights, their product, the head's weight, its product). quantize_linears leaves the head
    # fp32 (it is ~40% of llama-base's decode bytes); the "+head8" variants show what an int8 head would buy.
    variants = {"fp32": (fp32, skinny_linear, head32, skinny_linear),
                "int8": (int8, q8, head32, skinny_linear), "int8+head8": (int8, q8, head8, q8),
                "int4_g128": (int4[128], q4, head32, skinny_linear), "int4_g128+head8": (int4[128], q4, head8, q8),
                "int4_g32": (int4[32], q4, head32, skinny_linear), "int4_g32+head8": (int4[32], q4, head8, q8)}
    step_bytes = {k: sum(nbytes(w) for layer in v[0] for w in layer.values()) + nbytes(v[2])
                  for k, v in variants.items()}

    def step(layers, mul, head, head_mul, xm, xf):
        for layer in layers:
            mul(xm, layer["qkv"])
            mul(xm, layer["o"])
            mul(xm, layer["gate_up"])
            mul(xf, layer["down"])
        head_mul(xm, head)

    out, times = [], {}
    with torch.inference_mode():
        for M in (1, 8):
            xm, xf = torch.randn(M, cfg.d_model), torch.randn(M, cfg.d_ff)
            fns = {k: (lambda v=v: step(*v, xm, xf)) for k, v in variants.items()}
            for fn in fns.values():
                fn()
            best = {k: float("inf") for k in fns}
            for _ in range(repeats):
                for k, fn in fns.items():
                    best[k] = min(best[k], seconds(fn))
                bw_all.append(bandwidth_pass(bw_buf))
            times[M] = best
    bw = max(bw_all)
    for M in (1, 8):
        tps = {k: M / v for k, v in times[M].items()}
        bound = {k: M * bw * 1e9 / b for k, b in step_bytes.items()}
        for k in variants:
            if k == "fp32":
                continue
            out.append(result(NAME, f"decode_step_matmul_tokens_per_s_M{M}_{k}", True, round(tps[k], 1),
                              "fp32 skinny kernel, same step", round(tps["fp32"], 1),
                              goal={"int8": 2.5, "int4": 4.0}[k[:4]] if M == 1 else None, rows=M,
                              step_mb=round(step_bytes[k] / 1e6, 1), fp32_step_mb=round(step_bytes["fp32"] / 1e6, 1),
                              bandwidth_bound_tokens_per_s=round(bound[k], 1),
                              fraction_of_bound=round(tps[k] / bound[k], 3),
                              fp32_fraction_of_bound=round(tps["fp32"] / bound["fp32"], 3),
                              step_ms=round(times[M][k] * 1e3, 3), fp32_step_ms=round(times[M]["fp32"] * 1e3, 3),
                              read_bandwidth_gbps=round(bw, 2),
                              head="int8, per channel" if k.endswith("+head8") else "fp32 (quantize_linears' default)"))
        print(f"decode step M={M}: " + "  ".join(f"{k} {tps[k]:.1f} tok/s ({tps[k] / bound[k]:.0%} of bound)"
                                                  for k in tps), flush=True)
    out.append(result(NAME, "read_bandwidth_gbps", True, round(bw, 2), "same measurement", round(bw, 2),
                      how="best x.sum() over a 512 MB fp32 tensor, interleaved with every part above",
                      median=round(sorted(bw_all)[len(bw_all) // 2], 2)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed passes per method and shape")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="x rows (M) for part 1")
    ap.add_argument("--step-repeats", type=int, default=10, help="interleaved timed decode steps per method")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-mb", type=float, default=128.0, help="weight bytes per method and pass (beyond the caches)")
    ap.add_argument("--no-torchao", action="store_true", help="leave torchao out even when importable")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ext = build.extension()
    if ext is None:
        raise SystemExit(f"the kernels are not available here: {info()}")
    cfg = preset("llama-base")
    bw_buf = torch.ones(128 * 1024 * 1024)  # 512 MB
    with torch.inference_mode():
        res, bw_all = part1(cfg, args.rows, args.repeats, args.min_mb, bw_buf, ext, not args.no_torchao)
    res += part2(cfg, args.step_repeats, bw_buf, bw_all)
    common = {"machine": "2 cores, shared" if (os.cpu_count() or 0) <= 2 else f"{os.cpu_count()} cores",
              "threads": args.threads, "repeats": args.repeats, "isa": info()["isa"], "torch": torch.__version__,
              "torchao": torchao_version(), "cpu": platform.processor() or platform.machine(), "model": "llama-base",
              "load_average_at_end": os.getloadavg()[0]}
    for r in res:
        r["config"] = {**common, **r["config"]}
    write_result(NAME, res)


if __name__ == "__main__":
    main()
