"""ONNX export: one model directory -> one .onnx file holding the full-sequence forward, input_ids -> logits.

What is built: the full-sequence forward only (input_ids (batch, sequence) int64 -> logits (batch, sequence,
vocab) float32, both axes dynamic). There is no decoder with past key/values yet: a runtime decodes by
re-running the whole prefix each step.

How: torch.onnx.export's TorchScript tracer (dynamo=False). torch.export (the dynamo path) refuses our forward,
because the attention mask reads tensor values to pick fast paths (masks.py: is_plain_causal, is_full) and
the RoPE table grows on demand; the tracer instead records the path the example input takes, which is the
same path for every full-sequence call without a cache. To keep it that way the model is rebuilt with
  - attn_backend="naive": explicit softmax attention, whose shapes trace symbolically (the sdpa call takes
    its GQA flag from tensor shapes, which the tracer turns into tensors it cannot pass on);
  - fused_kernels=False: plain torch ops;
  - the RoPE table built to max_seq_len up front and marked static, so no length is read back.
aten::rms_norm has no ONNX symbolic at the opsets the tracer supports, so it is written here as
x / sqrt(mean(x^2) + eps) * w (the definition torch's op computes), and so is the in-place bool `&=` of the
sliding-window mask (ONNX's And). Inputs are capped at max_seq_len positions
(the RoPE table baked into the graph; learned positions stop there too).

Refused (LmstackError naming the field): mixture-of-experts (routing dispatches by data-dependent indices),
attention other than softmax (LSH sorts by hash, Performer draws features), sparse attention patterns (BigBird
draws random blocks). A model over 2 GiB of weights would need ONNX's external-data files; it is refused too.
The file is written to a temporary name beside `out` and renamed, so it is never half-written.

Usage:
    from lmstack.compress.export_onnx import export_onnx
    export_onnx("runs/tiny", "tiny.onnx")      # needs `pip install onnx onnxruntime` (lmstack[export])
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
import tempfile
from typing import Any
import warnings

import torch
from torch import nn

from lmstack.compress.export import output_path
from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.hf_io import load_model
from lmstack.model.transformer import Transformer

OPSET = 18
INSTALL = "pip install onnx onnxruntime  (or: pip install 'lmstack[export]')"
MAX_WEIGHT_BYTES = 2 * 1024**3  # one protobuf file holds at most 2 GiB

# config field -> (the value the export needs, why)
REQUIRED: dict[str, tuple[Any, str]] = {
    "n_experts": (0, "MoE routing dispatches by data-dependent indices, which a traced graph would freeze"),
    "attention": ("softmax", "LSH/Performer/Linformer attention draws or sorts per input"),
    "sparse_pattern": ("none", "sparse patterns draw random blocks or read positions at trace time"),
}


def check_onnx_exportable(cfg: ModelConfig) -> None:
    for field, (need, why) in REQUIRED.items():
        if getattr(cfg, field) != need:
            raise LmstackError(f"ONNX export cannot carry {field}={getattr(cfg, field)!r} (needs {need!r}: {why})")


def _rms_norm_symbolic(g, x, shape, weight, eps):
    """aten::rms_norm(x, normalized_shape, weight, eps) over the last axis, in plain ONNX ops."""
    eps_value = torch.onnx.symbolic_helper._get_const(eps, "f", "eps")
    eps_value = 1e-6 if eps_value is None else eps_value  # torch's default when eps is None
    square = g.op("Mul", x, x)
    mean = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor([-1])), keepdims_i=1)
    denom = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_value, dtype=torch.float32))))
    y = g.op("Div", x, denom)
    return y if weight.node().mustBeNone() else g.op("Mul", y, weight)


def _and_symbolic(g, a, b):
    """aten::__iand_ (the sliding-window mask's `allowed &= local`) as ONNX's And: the tracer has made it
    functional already, so returning the new value is all that is left."""
    return g.op("And", a, b)


class LogitsOnly(nn.Module):
    """input_ids -> logits: the one input and output the ONNX graph has."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


def traceable_copy(model: Transformer) -> Transformer:
    """The same weights in a model whose full-sequence forward traces to one graph for every (batch, length)."""
    cfg = model.config.replace(attn_backend="naive", fused_kernels=False)
    copy = Transformer(cfg).eval()
    copy.load_state_dict(model.state_dict(), strict=True)
    if copy.rope is not None:
        copy.rope(torch.arange(cfg.max_seq_len))  # grow the table to its full length now...
        copy.rope.static = True  # ...so the forward never reads a position value back
    return copy


def export_onnx(model_dir: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write model_dir's full-sequence forward as one ONNX file; returns what was written."""
    model_dir = Path(model_dir)
    if importlib.util.find_spec("onnx") is None:
        raise LmstackError(f"ONNX export needs the onnx package, which is not installed: {INSTALL}")
    out = output_path(model_dir, out)
    model = load_model(model_dir, dtype=torch.float32)
    cfg = model.config
    check_onnx_exportable(cfg)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if weight_bytes > MAX_WEIGHT_BYTES:
        raise LmstackError(f"{model_dir} holds {weight_bytes / 2**30:.1f} GiB of weights; one ONNX file holds at "
                           "most 2 GiB (external-data export is not built)")
    if cfg.fused_projections:
        model.unfuse_projections()
    wrapped = LogitsOnly(traceable_copy(model))
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, OPSET)
    torch.onnx.register_custom_op_symbolic("aten::__iand_", _and_symbolic, OPSET)
    example = torch.zeros((2, min(8, cfg.max_seq_len)), dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # the tracer warns about every Python bool it freezes; the ones here are fixed per config (above)
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (example,), tmp, input_names=["input_ids"], output_names=["logits"],
                              dynamic_axes={"input_ids": axes, "logits": axes}, opset_version=OPSET, dynamo=False)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"out": str(out), "format": "onnx", "bytes": out.stat().st_size, "opset": OPSET,
            "inputs": ["input_ids"], "outputs": ["logits"], "max_sequence": cfg.max_seq_len,
            "past_key_values": False}
