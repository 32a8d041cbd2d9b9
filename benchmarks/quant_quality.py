"""What the calibrated compression algorithms of lmstack.compress cost in perplexity on a trained model.

Every method replaces the weights of every nn.Linear inside the model's blocks (q/k/v/o, gate/up/down) by
what the method would store, dequantized back to fp32 ("fake quantization"): the numbers measure the
algorithms' accuracy, not a kernel. The token embedding and the (tied) LM head stay fp32, as GPTQ's and
AWQ's reference recipes leave them. Calibration statistics (calibration.collect_stats) come once from the
fp32 model over 128 sequences of its own training text (documents of train.jsonl in a seeded random
order, so every kind of document is in it); perplexity is measured on held-out text:

- world: the synthetic world's pretraining `test` split (<run>/world/pretrain/test.jsonl; pretraining read
  only train.jsonl), documents joined with EOS;
- shakespeare: the last 10% (by characters) of Tiny Shakespeare, a text the model never trained on. The
  speedrun model's fp32 perplexity there is above its vocabulary size (out of domain, tokenizer trained on
  the world), so relative changes on it are noisy: methods move it by several % either way.

Both are cut into non-overlapping windows of max_seq_len tokens; perplexity = exp(mean next-token NLL).
Rows: int8 per-channel RTN (symmetric); int4 RTN / GPTQ / GPTQ act-order / AWQ, asymmetric, group 32 (the
largest power of two dividing every in_features of the speedrun model, 256 and 704; --group-size);
NF4 (quant_storage.quantize_nf4, blocks of 64, double-quantized constants); SmoothQuant W8A8 (alpha 0.5,
every block linear through the reference int8 x int8 -> int32 w8a8_linear); 50% unstructured and 2:4
pruning by magnitude, Wanda and SparseGPT. AWQ's weight is Q(W diag(s)) diag(s)^-1 (awq_dequantize), so
the linear computes the same function the packed form with its input scale would. int4_awq_folded is the
storable AWQ (awq_model.py): the scales folded into the norms and into v/up rows, one shared s for q/k/v and
one for gate/up, o_proj's tied across the heads of each K/V group; then plain RTN, so the checkpoint holds
nothing but codes per Linear. int4_awq_folded_untied leaves o_proj unscaled under GQA, as AutoAWQ does.
int4_gptq_seq is sequential GPTQ (gptq_model.py): each block's Hessians collected on the model whose
earlier blocks are already quantized (its method_seconds include those calibration passes).
int4_gptq_actorder_static is act-order with static groups (what `lmstack quantize --act_order` stores: no
permutation). fp8_e4m3 / fp8_e5m2: FP8 storage with one scale per output channel (QuantLinear.from_fp8).
A row named <method>+int8_head also quantizes the LM head and the embedding (tied here) to int8 per vocab row
with qlinear.quantize_head, the real QuantLinear / QuantEmbedding modules: what `lmstack quantize` stores by
default (--head int8); the rows without it keep them fp32.

Each row: ours = the method's perplexity, baseline = the fp32 model's on the same tokens; ratio > 1 would
mean better than fp32. config carries the relative change in % and its standard error (paired over the
n_windows windows: per-window NLL differences, delta method), the method's wall time (quantizing or
pruning all linears, calibration excluded; calibration time is in every row's config) and token counts.
goal: ratio >= 1/1.005 for int8 (within +0.5%), >= 1/1.03 for GPTQ and AWQ int4 (within +3%).

Usage (the run that wrote results/quant_quality.json; ~40 minutes on 2 busy cores):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quant_quality.py \\
        --model /tmp/sr8/runs/20261207-021912/pretrain/checkpoints/step_00000124/model \\
        --run-dir /tmp/sr8/runs/20261207-021912
    # a few rows into another file (results/quant_quality.json holds all of them):
    ... --methods fp32,int4_awq_g32,int4_awq_folded_g32 --out benchmarks/results/quant_quality_awq.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from _common import RESULTS, result, write_result

from lmstack.compress.awq import awq_dequantize, awq_quantize
from lmstack.compress.awq_model import awq_model
from lmstack.compress.calibration import block_linears, collect_stats
from lmstack.compress.gptq import gptq_quantize
from lmstack.compress.gptq_model import gptq_model
from lmstack.compress.prune import prune_magnitude, prune_sparsegpt, prune_wanda
from lmstack.compress.qlinear import QuantLinear, quantize_head
from lmstack.compress.quant_storage import dequantize_nf4, quantize_nf4
from lmstack.compress.quantize_rtn import dequantize, quantize_rtn
from lmstack.compress.smoothquant import quantize_w8a8, smooth_model, w8a8_linear
from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model
from lmstack.tokenizer import load_tokenizer

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare/input.txt")


class W8A8Linear(nn.Module):
    """A Linear computed by smoothquant.w8a8_linear (int8 weights per channel, int8 activations per token)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.qw = quantize_w8a8(lin.weight.data)
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_linear(x, self.qw, self.bias)


def read_jsonl_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def doc_stream(tok, texts: list[str], eos: int) -> torch.Tensor:
    """All documents' ids, each followed by EOS (how the pretraining packer separates documents)."""
    ids: list[int] = []
    for seq in tok.encode_batch(texts):
        ids.extend(seq)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, length: int, limit: int) -> torch.Tensor:
    """(N, length) non-overlapping windows of ids, at most `limit` of them."""
    n = min(ids.numel() // length, limit)
    if n == 0:
        raise LmstackError(f"text too short: {ids.numel()} tokens, fewer than one window of {length}")
    return ids[: n * length].view(n, length)


@torch.no_grad()
def window_nll(model: nn.Module, wins: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Mean next-token NLL of each window (N,), fp64."""
    out = []
    for i in range(0, wins.shape[0], batch):
        x = wins[i:i + batch]
        logits = model(x).float()
        nll = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
        out.append(nll.double().mean(dim=1))
    return torch.cat(out)


def perplexity(model: nn.Module, wins: torch.Tensor, batch: int = 16) -> float:
    """exp(mean NLL) over the windows (all of one length, so the mean of window means is the token mean)."""
    return math.exp(window_nll(model, wins, batch).mean().item())


def paired_change(nll: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """(relative perplexity change in %, its standard error in %): the change is exp(mean d) - 1 for the
    per-window NLL differences d = nll - base (the same windows, so the pairing removes the texts' own
    variance); stderr by the delta method, exp(mean d) * std(d) / sqrt(n)."""
    d = nll - base
    mean = d.mean().item()
    se = d.std(unbiased=True).item() / math.sqrt(d.numel()) if d.numel() > 1 else float("nan")
    return 100.0 * (math.exp(mean) - 1.0), 100.0 * math.exp(mean) * se


def apply_weights(model: nn.Module, fn) -> tuple[nn.Module, float]:
    """A copy of model whose block linears hold fn(name, weight) (fp32, same shape); and fn's total seconds."""
    m = copy.deepcopy(model)
    spent = 0.0
    for name, lin in block_linears(m).items():
        t = time.perf_counter()
        w = fn(name, lin.weight.data.float())
        spent += time.perf_counter() - t
        if w.shape != lin.weight.shape:
            raise LmstackError(f"{name}: method returned shape {tuple(w.shape)}, expected {tuple(lin.weight.shape)}")
        lin.weight.data.copy_(w)
    return m, spent


def smoothquant_model(model: nn.Module, stats) -> tuple[nn.Module, float]:
    """A copy, smoothed (alpha 0.5) and with every block linear replaced by W8A8Linear."""
    m = copy.deepcopy(model)
    t = time.perf_counter()
    smooth_model(m, stats, alpha=0.5)
    for name, lin in block_linears(m).items():
        parent, _, attr = name.rpartition(".")
        setattr(m.get_submodule(parent), attr, W8A8Linear(lin))
    return m, time.perf_counter() - t


def coded_model(model: nn.Module, quantize) -> tuple[nn.Module, float]:
    """A copy whose block linears hold the dequantized codes of quantize(copy) (a whole-model method that
    may change the copy's norms and weights, as AWQ's folding does); and quantize's seconds."""
    m = copy.deepcopy(model)
    t = time.perf_counter()
    codes = quantize(m)
    spent = time.perf_counter() - t
    with torch.no_grad():
        for name, lin in block_linears(m).items():
            lin.weight.copy_(dequantize(codes[name]))
    return m, spent


def fp8_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What QuantLinear.from_fp8 stores, back in fp32: rows scaled to the format's largest finite value, cast."""
    fmt = {torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}[dtype]
    return QuantLinear.from_fp8(w, None, fmt).weight_fp32()


def nf4_weight(w: torch.Tensor) -> torch.Tensor:
    return dequantize_nf4(quantize_nf4(w, double_quant=True), tuple(w.shape))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a trained lmstack model directory")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    ap.add_argument("--run-dir", help="the speedrun's run directory holding world/pretrain/{train,test}.jsonl "
                                      "(default: four levels above --model)")
    ap.add_argument("--shakespeare", default=str(SHAKESPEARE))
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=256, help="per held-out text")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", help="comma-separated subset of the row names (default: all); fp32 alone "
                                      "writes the fp32 model's own row")
    ap.add_argument("--out", default=str(RESULTS / "quant_quality.json"),
                    help="where to write the rows (give another file when running a subset of --methods)")
    args = ap.parse_args()

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file() and not (model_dir / "lmstack_config.json").is_file():
        sys.exit(f"quant_quality: --model {model_dir} is not a model directory (no config.json); give a trained "
                 "lmstack model directory, e.g. <run>/pretrain/checkpoints/step_*/model")
    run_dir = Path(args.run_dir) if args.run_dir else model_dir.resolve().parents[3]
    world = run_dir / "world" / "pretrain"
    for f in (world / "train.jsonl", world / "test.jsonl", Path(args.shakespeare)):
        if not f.is_file():
            sys.exit(f"quant_quality: {f} not found; pass --run-dir (the speedrun's run directory) and "
                     "--shakespeare")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = load_model(model_dir, lazy=False).eval()
    tok = load_tokenizer(args.tokenizer or model_dir)
    cfg = model.config
    length = cfg.max_seq_len
    eos = cfg.eos_token_id

    # train.jsonl is ordered by kind (its first 2000 documents are all biographies); a seeded shuffle makes
    # the calibration set cover every kind the held-out split has (a bios-only set overfit SparseGPT badly)
    train = read_jsonl_texts(world / "train.jsonl")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    calib_ids = doc_stream(tok, [train[i] for i in order[:3000]], eos)
    calib = windows(calib_ids, length, args.calib_samples)
    if calib.shape[0] < args.calib_samples:
        sys.exit(f"quant_quality: only {calib.shape[0]} calibration windows of {length} tokens, need "
                 f"{args.calib_samples}")
    text = Path(args.shakespeare).read_text()
    texts = {"world": windows(doc_stream(tok, read_jsonl_texts(world / "test.jsonl"), eos), length,
                              args.max_windows),
             "shakespeare": windows(torch.tensor(tok.encode(text[int(len(text) * 0.9):]), dtype=torch.long),
                                    length, args.max_windows)}
    print(f"calibration {tuple(calib.shape)}; held-out " + ", ".join(f"{k} {tuple(v.shape)}"
                                                                     for k, v in texts.items()), flush=True)

    t = time.perf_counter()
    stats = collect_stats(model, calib, hessian=True)
    calib_s = time.perf_counter() - t
    base_nll = {k: window_nll(model, v) for k, v in texts.items()}
    base = {k: math.exp(v.mean().item()) for k, v in base_nll.items()}
    print(f"calibration stats {calib_s:.1f}s; fp32 perplexity {base}", flush=True)

    g = args.group_size
    weight_methods = {
        "int8_rtn_per_channel": (lambda n, w: dequantize(quantize_rtn(w, 8, None, symmetric=True)), 1 / 1.005),
        f"int4_rtn_g{g}": (lambda n, w: dequantize(quantize_rtn(w, 4, g)), None),
        f"int4_gptq_g{g}": (lambda n, w: dequantize(gptq_quantize(w, stats[n].hessian, 4, g)), 1 / 1.03),
        f"int4_gptq_actorder_g{g}": (lambda n, w: dequantize(gptq_quantize(w, stats[n].hessian, 4, g,
                                                                           act_order=True)), 1 / 1.03),
        f"int4_gptq_actorder_static_g{g}": (lambda n, w: dequantize(gptq_quantize(
            w, stats[n].hessian, 4, g, act_order=True, static_groups=True)), 1 / 1.03),
        "fp8_e4m3_per_channel": (lambda n, w: fp8_weight(w, torch.float8_e4m3fn), None),
        "fp8_e5m2_per_channel": (lambda n, w: fp8_weight(w, torch.float8_e5m2), None),
        f"int4_awq_g{g}": (lambda n, w: awq_dequantize(awq_quantize(w, stats[n].mean_abs, stats[n].hessian, 4, g)),
                           1 / 1.03),
        "nf4_b64_dq": (lambda n, w: nf4_weight(w), None),
        "prune50_magnitude": (lambda n, w: prune_magnitude(w, 0.5).weight, None),
        "prune50_wanda": (lambda n, w: prune_wanda(w, stats[n].l2_norm, 0.5).weight, None),
        "prune50_sparsegpt": (lambda n, w: prune_sparsegpt(w, stats[n].hessian, 0.5).weight, None),
        "prune2:4_magnitude": (lambda n, w: prune_magnitude(w, 0.5, "2:4").weight, None),
        "prune2:4_wanda": (lambda n, w: prune_wanda(w, stats[n].l2_norm, 0.5, "2:4").weight, None),
        "prune2:4_sparsegpt": (lambda n, w: prune_sparsegpt(w, stats[n].hessian, 0.5, "2:4").weight, None),
    }
    model_methods = {
        f"int4_awq_folded_g{g}": (lambda m: awq_model(m, stats, 4, g), 1 / 1.03),
        f"int4_awq_folded_untied_g{g}": (lambda m: awq_model(m, stats, 4, g, tie_gqa=False), 1 / 1.03),
        f"int4_gptq_seq_g{g}": (lambda m: gptq_model(m, None, 4, g, sequential=True, calib=calib), 1 / 1.03),
    }
    names = list(weight_methods) + list(model_methods) + ["smoothquant_w8a8"]
    head_rows = ["int8_rtn_per_channel", f"int4_rtn_g{g}", f"int4_gptq_g{g}", f"int4_awq_folded_g{g}",
                 "fp8_e4m3_per_channel", "smoothquant_w8a8"]
    names += [f"{n}+int8_head" for n in head_rows]
    if args.methods:
        wanted = args.methods.split(",")
        unknown = [m for m in wanted if m not in names + ["fp32"]]
        if unknown:
            sys.exit(f"quant_quality: unknown method(s) {unknown}; choose from {names}")
        names = wanted

    rows = []
    for name in names:
        name, _, head = name.partition("+")
        if name == "fp32":
            m, spent, goal = model, 0.0, None
        elif name == "smoothquant_w8a8":
            m, spent, goal = *smoothquant_model(model, stats), None
        elif name in model_methods:
            fn, goal = model_methods[name]
            m, spent = coded_model(model, fn)
        else:
            fn, goal = weight_methods[name]
            m, spent = apply_weights(model, fn)
        if head:
            if m is model:
                sys.exit("quant_quality: fp32+int8_head is not a row; use a method name")
            quantize_head(m)  # m is the method's own copy
            name = f"{name}+{head}"
        for text_name, wins in texts.items():
            t = time.perf_counter()
            nll = window_nll(m, wins)
            ppl = math.exp(nll.mean().item())
            eval_s = time.perf_counter() - t
            rel, rel_se = paired_change(nll, base_nll[text_name])
            rows.append(result(f"quant_quality/{name}/{text_name}", "perplexity", False, ppl, "fp32",
                               base[text_name], goal=None if goal is None else round(goal, 4),
                               rel_change_pct=round(rel, 3), rel_change_stderr_pct=round(rel_se, 3),
                               n_windows=int(wins.shape[0]), method_seconds=round(spent, 3),
                               eval_seconds=round(eval_s, 3), calib_seconds=round(calib_s, 3),
                               eval_tokens=int(wins[:, 1:].numel()), calib_tokens=int(calib.numel()),
                               calib_samples=int(calib.shape[0]), seq_len=length, group_size=g,
                               threads=args.threads, model=str(model_dir),
                               linears="every nn.Linear in model.blocks; " + (
                                   "embedding and tied head int8 per row (quantize_head)" if head else
                                   "embedding and tied head fp32")))
            print(f"{name:28s} {text_name:12s} ppl {ppl:9.4f} (fp32 {base[text_name]:.4f}, {rel:+.2f}%) "
                  f"method {spent:.1f}s eval {eval_s:.1f}s", flush=True)
        del m
    out = Path(args.out).resolve()
    if out == (RESULTS / "quant_quality.json").resolve():
        write_result("quant_quality", rows)
    else:  # the same rows, elsewhere (atomic, as write_result writes)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=2) + "\n")
        os.replace(tmp, out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
