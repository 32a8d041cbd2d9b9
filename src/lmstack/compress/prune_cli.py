"""`lmstack prune`: a model directory -> a pruned model directory that load_model, LLM, serve and eval open as a
plain model.

Usage:
    lmstack prune --model runs/tiny --method wanda --sparsity 0.5 --calib text.jsonl --out runs/tiny-wanda50
    lmstack prune --model runs/tiny --method magnitude --sparsity 0.5 --out runs/tiny-mag50    # no calibration
    lmstack prune --model runs/tiny --method heads --sparsity 0.3 --calib text.jsonl --out runs/tiny-h30 \\
        --recover-steps 200

Methods:
- magnitude | wanda | sparsegpt: unstructured, the same fraction of every row of every Linear in the blocks
  (prune.py); the output is a dense directory whose weights hold the zeros (no speed-up on a dense matmul).
- 2:4: two of every four consecutive weights of a row are zero, chosen by SparseGPT (the best of the three at 2:4
  on the speedrun model, benchmarks/results/quant_quality.json); --sparsity must be 0.5.
- heads | channels | layers: structured (prune_structured.py); the matrices shrink and config.json says the new
  n_heads / n_kv_heads / d_ff / n_layers.
The embedding and the LM head are never pruned.

Calibration text (--calib): a .jsonl file of {"text": ...} lines (documents joined with the model's EOS id), or a
.txt file; tokenized with the model's tokenizer and cut into --calib-samples windows of min(max_seq_len, 512)
tokens. Every method but magnitude needs it, and so does recovery (--recover-steps N: LoRA on the calibration
windows, then merged; recover.py). The directory is written under a temporary name and renamed when complete; the
input directory is only read, and the tokenizer files are copied. One JSON line is printed: what was done, the
sparsity achieved, the parameter counts.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch

from lmstack.compress.calibration import block_linears, collect_stats
from lmstack.compress.prune import prune_magnitude, prune_sparsegpt, prune_wanda
from lmstack.compress.prune_structured import prune_structured
from lmstack.compress.recover import RecoverConfig, recover
from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model, save_model
from lmstack.model.side_files import keep_source_files
from lmstack.tokenizer import load_tokenizer

Method = Literal["magnitude", "wanda", "sparsegpt", "2:4", "heads", "layers", "channels"]
UNSTRUCTURED = ("magnitude", "wanda", "sparsegpt", "2:4")
MAX_CALIB_LEN = 512  # longer windows add attention cost but no new kinds of statistics


def read_calibration_texts(path: str | os.PathLike) -> list[str]:
    """The documents of a .jsonl ({"text": ...} per line) or .txt (one document) file; clear errors otherwise."""
    p = Path(path)
    if not p.is_file():
        raise LmstackError(f"--calib {p}: file not found")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmstackError(f"--calib {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if p.suffix.lower() == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmstackError(f"--calib {p} line {n} is not JSON: {e.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise LmstackError(f'--calib {p} line {n} has no "text" string field')
            texts.append(row["text"])
    elif p.suffix.lower() == ".txt":
        texts = [raw]
    else:
        raise LmstackError(f"--calib {p}: give a .jsonl file of {{\"text\": ...}} lines or a .txt file")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LmstackError(f"--calib {p} holds no text")
    return texts


def calibration_windows(tok, texts: list[str], eos: int | None, length: int, samples: int) -> torch.Tensor:
    """(samples, length) token windows: the documents' ids joined by EOS, cut without overlap."""
    ids: list[int] = []
    for seq in tok.encode_batch(texts):
        ids.extend(seq)
        if eos is not None:
            ids.append(eos)
    if len(ids) < length * samples:
        raise LmstackError(f"calibration data too short: {len(ids)} tokens make {len(ids) // length} windows of "
                           f"{length}, and --calib-samples asks for {samples}; give more text in --calib or lower "
                           "--calib-samples")
    return torch.tensor(ids[:length * samples], dtype=torch.long).view(samples, length)


def output_dir(model_dir: Path, out: Path) -> Path:
    """`out` as a Path, refused when it is or lies inside the model directory, or already holds files."""
    if out.resolve() == model_dir.resolve() or out.resolve().is_relative_to(model_dir.resolve()):
        raise LmstackError(f"--out {out} is the model directory {model_dir} or inside it; prune leaves the input "
                           "untouched, so choose another directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmstackError(f"--out {out} already exists and is not an empty directory; choose a new one")
    if not out.parent.exists():
        raise LmstackError(f"--out {out}: the folder {out.parent} does not exist")
    return out


def publish_dir(out_dir: Path, write) -> None:
    """write(tmp) into a temporary sibling of out_dir, then move the complete directory into place: a crash or an
    error leaves no half-written --out (output_dir checked that out_dir is new or empty)."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty: the complete directory takes its place
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unstructured(model, method: str, sparsity: float, calib) -> tuple[dict[str, torch.Tensor], float]:
    """Prune every block Linear in place; returns ({weight name: keep mask}, fraction of those weights zeroed)."""
    stats = None
    if method != "magnitude":
        stats = collect_stats(model, calib, hessian=method in ("sparsegpt", "2:4"))
    masks, zeros, total = {}, 0, 0
    for name, lin in block_linears(model).items():
        w = lin.weight.data.float()
        if method == "magnitude":
            r = prune_magnitude(w, sparsity)
        elif method == "wanda":
            r = prune_wanda(w, stats[name].l2_norm, sparsity)
        elif method == "sparsegpt":
            r = prune_sparsegpt(w, stats[name].hessian, sparsity)
        else:
            r = prune_sparsegpt(w, stats[name].hessian, 0.5, pattern="2:4")
        lin.weight.data.copy_(r.weight)
        masks[f"{name}.weight"] = r.mask
        zeros += int((~r.mask).sum())
        total += r.mask.numel()
    return masks, zeros / total


def prune(model: str, out: str, method: Method, sparsity: float = 0.5, calib: str | None = None,
          calib_samples: int = 128, recover_steps: int = 0, recover_lr: float = 1e-3) -> dict[str, Any]:
    """Prune a model directory and write the result as a new model directory.

    Args:
        model: Model directory to prune (only read).
        out: Directory to write (new or empty; not the model directory or inside it).
        method: magnitude | wanda | sparsegpt (unstructured), 2:4 (SparseGPT, semi-structured), or heads | channels |
            layers (structured: the matrices shrink).
        sparsity: Fraction to remove, strictly between 0 and 1: of each row's weights (unstructured), of the
            attention heads, of the MLP channels, or of the layers. 2:4 takes 0.5 only.
        calib: Calibration text: a .jsonl file of {"text": ...} lines or a .txt file. Needed by every method but
            magnitude, and by --recover-steps.
        calib_samples: Calibration windows of min(max_seq_len, 512) tokens.
        recover_steps: Steps of recovery fine-tuning (LoRA on every projection, merged) on the calibration windows
            after pruning; 0 = none.
        recover_lr: Peak learning rate of recovery fine-tuning.
    """
    start = time.perf_counter()
    if method not in Method.__args__:
        raise LmstackError(f"unknown --method {method!r}; choose one of {', '.join(Method.__args__)}")
    if not (0.0 < sparsity < 1.0):
        raise LmstackError(f"--sparsity must lie strictly between 0 and 1 (the fraction to remove); got {sparsity}")
    if method == "2:4" and sparsity != 0.5:
        raise LmstackError(f"--method 2:4 removes exactly half of the weights; --sparsity must be 0.5, got {sparsity}")
    if calib_samples < 1:
        raise LmstackError(f"--calib-samples must be at least 1; got {calib_samples}")
    if recover_steps < 0:
        raise LmstackError(f"--recover-steps must be >= 0; got {recover_steps}")
    model_dir, out_dir = Path(model), output_dir(Path(model), Path(out))
    needs_text = method != "magnitude" or recover_steps > 0
    if needs_text and calib is None:
        why = f"--method {method}" if method != "magnitude" else "--recover-steps"
        raise LmstackError(f"{why} needs calibration text: pass --calib FILE (a .jsonl of {{\"text\": ...}} lines or "
                           "a .txt file)")

    net = load_model(model_dir, lazy=False)  # eager: the weights are edited, never a memory map of the input
    fused = net.config.fused_projections
    net.unfuse_projections()
    cfg = net.config
    windows = None
    if needs_text:
        try:
            tok = load_tokenizer(model_dir)
        except (LmstackError, OSError) as e:
            raise LmstackError(f"--calib text is tokenized with the model's tokenizer, which {model_dir} lacks "
                               f"({e})") from None
        length = min(cfg.max_seq_len, MAX_CALIB_LEN)
        windows = calibration_windows(tok, read_calibration_texts(calib), cfg.eos_token_id, length, calib_samples)

    params_before = sum(p.numel() for p in net.parameters())
    masks = None
    if method in UNSTRUCTURED:
        masks, achieved = _unstructured(net, method, sparsity, windows)
        report: dict[str, Any] = {"pattern": "2:4" if method == "2:4" else "unstructured"}
    else:
        net, report = prune_structured(net, method, sparsity, windows)
        achieved = report["removed_fraction"]
        report = {k: v for k, v in report.items() if k not in ("kind", "sparsity_requested", "params_before",
                                                               "params_after", "removed_fraction", "scores")}
    if recover_steps:
        net, log = recover(net, windows, RecoverConfig(steps=recover_steps, lr=recover_lr), keep_masks=masks)
        report["recover"] = log
    if fused:
        net.fuse_projections()

    def write(tmp: Path) -> None:
        save_model(net.eval(), tmp)
        keep_source_files(model_dir, tmp, net.config)

    publish_dir(out_dir, write)
    written = {"out": str(out_dir), "method": method, "sparsity_requested": sparsity, "sparsity": round(achieved, 6),
               "params_before": params_before, "params_after": sum(p.numel() for p in net.parameters()),
               "calib_tokens": 0 if windows is None else int(windows.numel()), **report,
               "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps(written))
    return written


COMMANDS = prune
