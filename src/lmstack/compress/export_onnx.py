"""ONNX export: one model directory -> one .onnx file, the full-sequence forward or a decoder with past key/values.

Two graphs can be built:
- the full-sequence forward (default): input_ids (batch, sequence) int64 -> logits (batch, sequence, vocab)
  float32, both axes dynamic; a runtime decodes with it by re-running the whole prefix each step.
- a decoder with past key/values (past_key_values=True): input_ids (batch, new), past_keys and past_values
  (layers, batch, kv_heads, past, head_dim) -> logits (batch, new, vocab), present_keys and present_values
  (layers, batch, kv_heads, past + new, head_dim). Prefill passes an empty past (past = 0), then each step
  one token and the previous presents. Its graph is written here (KVDecoder) from the model's own modules
  (norms, projections, RoPE tables, MLPs, head), for pre-norm RoPE softmax-attention blocks only: the
  model's KV-cache classes keep their state in Python objects that a traced graph cannot carry.

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
sliding-window mask (ONNX's And). Inputs are capped at max_seq_len positions (the RoPE table baked into the
graph; learned positions stop there too): onnxruntime refuses a longer input with an index error.

Refused (LmstackError naming the field): mixture-of-experts (routing dispatches by data-dependent indices),
attention other than softmax (LSH sorts by hash, Performer draws features), sparse attention patterns (BigBird
draws random blocks). A model over 2 GiB of weights would need ONNX's external-data files; it is refused too.
The file is written to a temporary name beside `out` and renamed, so it is never half-written.

Usage:
    from lmstack.compress.export_onnx import export_onnx
    export_onnx("runs/tiny", "tiny.onnx")      # needs `pip install onnx onnxruntime` (lmstack[export])
    export_onnx("runs/tiny", "tiny-kv.onnx", past_key_values=True)
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
from torch.onnx import symbolic_helper

from lmstack.compress.export import output_path
from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.hf_io import load_model
from lmstack.model.positions import apply_rotary
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


# what KVDecoder's graph computes besides REQUIRED: the pre-norm RoPE block, nothing it would silently drop
KV_REQUIRED: dict[str, tuple[Any, str]] = {
    "position": ("rope", "the decoder rotates keys by position"),
    "causal": (True, "a decoder is causal"),
    "norm_position": ("pre", "the decoder's block is pre-norm"),
    "parallel_residual": (False, "the decoder's block is sequential"),
    "sliding_window": (0, "the decoder attends to the whole past"),
    "attn_logit_softcap": (0.0, "the decoder has no attention soft-capping"),
    "qk_norm": (False, "the decoder has no q/k norm"),
    "scale_embeddings": (False, "the decoder does not scale embeddings"),
    "embedding_norm": (False, "the decoder has no embedding norm"),
    "type_vocab_size": (0, "the decoder has no token-type embeddings"),
    "head": ("lm", "the decoder returns logits"),
}


def check_onnx_exportable(cfg: ModelConfig, past_key_values: bool = False) -> None:
    needs = {**REQUIRED, **KV_REQUIRED} if past_key_values else REQUIRED
    for field, (need, why) in needs.items():
        if getattr(cfg, field) != need:
            what = "ONNX decoder with past key/values" if field in KV_REQUIRED else "ONNX export"
            raise LmstackError(f"{what} cannot carry {field}={getattr(cfg, field)!r} (needs {need!r}: {why})")


def _rms_norm_symbolic(g, x, shape, weight, eps):
    """aten::rms_norm(x, normalized_shape, weight, eps) over the last axis, in plain ONNX ops."""
    eps_value = symbolic_helper._get_const(eps, "f", "eps")
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


class KVDecoder(nn.Module):
    """(input_ids, past_keys, past_values) -> (logits, present_keys, present_values), from the model's modules.

    The new tokens sit at positions past .. past + new - 1; each sees every past key and the new keys up to
    itself. Keys are stored rotated (as our contiguous cache stores them)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, past_keys, past_values):
        m, cfg = self.model, self.model.config
        b, t = input_ids.shape
        past = past_keys.shape[3]
        pos = torch.arange(t, device=input_ids.device) + past
        cos, sin = m.rope.cos_table[pos], m.rope.sin_table[pos]
        visible = torch.arange(past + t, device=input_ids.device)[None, :] <= pos[:, None]  # (new, past + new)
        x = m.tok_emb(input_ids)
        keys, values = [], []
        blocks = list(m.blocks)
        for layer in range(cfg.n_layers):
            block = blocks[layer % len(blocks)]
            attn = block.attn
            h = block.attn_norm(x)
            q = apply_rotary(attn.q_proj(h).view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2), cos, sin)
            k = apply_rotary(attn.k_proj(h).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2), cos, sin)
            v = attn.v_proj(h).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
            k = torch.cat((past_keys[layer], k), dim=2)
            v = torch.cat((past_values[layer], v), dim=2)
            keys.append(k)
            values.append(v)
            group = cfg.n_heads // cfg.n_kv_heads
            scores = (q @ k.repeat_interleave(group, dim=1).transpose(-1, -2)) * attn.scale
            probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            out = (probs @ v.repeat_interleave(group, dim=1)).transpose(1, 2).reshape(b, t, -1)
            x = x + attn.o_proj(out)
            x = x + block.mlp(block.mlp_norm(x))
        return m.head(m.final_norm(x)), torch.stack(keys), torch.stack(values)


def traceable_copy(model: Transformer) -> Transformer:
    """The same weights in a model whose full-sequence forward traces to one graph for every (batch, length)."""
    cfg = model.config.replace(attn_backend="naive", fused_kernels=False, fused_projections=False)
    copy = Transformer(cfg).eval()
    copy.load_state_dict(model.state_dict(), strict=True)
    if copy.rope is not None:
        copy.rope(torch.arange(cfg.max_seq_len))  # grow the table to its full length now...
        copy.rope.static = True  # ...so the forward never reads a position value back
    return copy


def export_onnx(model_dir: str | os.PathLike, out: str | os.PathLike, past_key_values: bool = False
                ) -> dict[str, Any]:
    """Write model_dir's full-sequence forward (or, past_key_values=True, its decoder with past key/values) as
    one ONNX file; returns what was written."""
    model_dir = Path(model_dir)
    if importlib.util.find_spec("onnx") is None:
        raise LmstackError(f"ONNX export needs the onnx package, which is not installed: {INSTALL}")
    out = output_path(model_dir, out)
    model = load_model(model_dir, dtype=torch.float32)
    cfg = model.config
    check_onnx_exportable(cfg, past_key_values)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if weight_bytes > MAX_WEIGHT_BYTES:
        raise LmstackError(f"{model_dir} holds {weight_bytes / 2**30:.1f} GiB of weights; one ONNX file holds at "
                           "most 2 GiB (external-data export is not built)")
    if cfg.fused_projections:
        model.unfuse_projections()
    traced = traceable_copy(model)
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, OPSET)
    torch.onnx.register_custom_op_symbolic("aten::__iand_", _and_symbolic, OPSET)
    if past_key_values:
        # an example with both a past and several new tokens, so neither length is frozen as 0 or 1
        wrapped: nn.Module = KVDecoder(traced)
        past = torch.zeros((cfg.n_layers, 2, cfg.n_kv_heads, 3, cfg.head_dim))
        example: tuple = (torch.zeros((2, 2), dtype=torch.long), past, past.clone())
        kv_axes = {1: "batch", 3: "past"}
        names = dict(input_names=["input_ids", "past_keys", "past_values"],
                     output_names=["logits", "present_keys", "present_values"],
                     dynamic_axes={"input_ids": {0: "batch", 1: "new"}, "logits": {0: "batch", 1: "new"},
                                   "past_keys": kv_axes, "past_values": kv_axes,
                                   "present_keys": {1: "batch", 3: "total"}, "present_values": {1: "batch", 3: "total"}})
    else:
        wrapped = LogitsOnly(traced)
        example = (torch.zeros((2, min(8, cfg.max_seq_len)), dtype=torch.long),)
        axes = {0: "batch", 1: "sequence"}
        names = dict(input_names=["input_ids"], output_names=["logits"],
                     dynamic_axes={"input_ids": axes, "logits": axes})
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # the tracer warns about every Python bool it freezes; the ones here are fixed per config (above)
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, example, tmp, opset_version=OPSET, dynamo=False, **names)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"out": str(out), "format": "onnx", "bytes": out.stat().st_size, "opset": OPSET,
            "inputs": names["input_names"], "outputs": names["output_names"], "max_sequence": cfg.max_seq_len,
            "past_key_values": past_key_values}
