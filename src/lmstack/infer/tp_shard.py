"""Tensor-parallel sharding of an engine-owned model for serving: rank r keeps 1/N of every block's heads
and MLP width (Megatron's layout, done by hand on plain tensors).

In each block:
- attention: rank r keeps query heads [r*H/N, (r+1)*H/N) and KV heads [r*K/N, (r+1)*K/N): the matching
  rows of q_proj/k_proj/v_proj, or of a fused qkv_proj (rank r's q rows, then its k rows, then its v rows),
  and the same columns of o_proj. Every GQA group stays on one rank, so attention runs unchanged on the
  local heads and the paged KV pool holds only this rank's KV heads (1/N of the pool's bytes).
- a dense MLP: rank r keeps its slice of the gate/up rows (of gate_up_proj: its gate rows, then its up
  rows) and the same columns of down_proj. MoE layers stay whole on every rank (no expert parallelism).
- o_proj and down_proj give partial sums; a forward hook all-reduces each (two all-reduces per block), and
  their biases stay on rank 0 only, so each counts once.
Embeddings, norms and the LM head are replicated: after each all-reduce every rank holds the same hidden
state, so only rank 0 computes logits. model.config becomes the shard's own (n_heads, n_kv_heads and d_ff
divided by N), which is what the engine sizes the KV pool from.

Usage:
    check_shardable(model.config, 2)                  # LmstackError naming the field that does not split
    reducer = shard_model(model, rank=0, world_size=2)  # in place; reducer.group = the process group later
"""
from __future__ import annotations

import time

import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.model.attention import Attention
from lmstack.model.fused_projections import projections_fusable
from lmstack.model.mlp import MLP


def check_shardable(cfg, world_size: int) -> None:
    """Raise LmstackError naming the field when the model cannot be served over world_size ranks."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise LmstackError(f"tensor_parallel_size must be an integer >= 1, got {world_size!r}")
    bad = [f"{name}={getattr(cfg, name)}" for name in ("n_heads", "n_kv_heads") if getattr(cfg, name) % world_size]
    dense = [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
    if dense and cfg.d_ff % world_size:
        bad.append(f"d_ff={cfg.d_ff}")
    if bad:
        raise LmstackError(f"tensor_parallel_size={world_size} needs {', '.join(bad)} divisible by {world_size} "
                           "(each rank keeps whole heads and an equal MLP slice); pick a tensor_parallel_size "
                           "that divides them")
    if cfg.position == "alibi":
        raise LmstackError("tensor-parallel serving does not support position='alibi' (its per-head slopes are "
                           "not sharded here); serve it with tensor_parallel_size=1")
    if cfg.attention != "softmax":
        raise LmstackError(f"tensor-parallel serving needs attention='softmax', not {cfg.attention!r}")


class AllReduce:
    """The forward hook that sums a row-parallel projection's partial outputs over the group.

    `group` is set once the process group exists (the model is sharded before the workers start); a
    collective that fails (a dead peer, a timeout) is reported to `on_error`, which marks the engine failed.
    `seconds` and `calls` count the time spent in all-reduces (waiting for the slowest rank included)."""

    def __init__(self):
        self.group = None
        self.on_error = None
        self.seconds, self.calls = 0.0, 0

    def __call__(self, module, inputs, out: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        try:
            self.group.allreduce([out]).wait()
            self.seconds += time.perf_counter() - start
            self.calls += 1
        except RuntimeError as e:
            if self.on_error is not None:
                raise self.on_error(e) from e
            raise
        return out


def _keep_rows(lin: nn.Linear, rows: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.detach()[rows].contiguous(), requires_grad=False)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.detach()[rows].contiguous(), requires_grad=False)
    lin.out_features = len(rows)


def _keep_columns(lin: nn.Linear, lo: int, hi: int, keep_bias: bool) -> None:
    lin.weight = nn.Parameter(lin.weight.detach()[:, lo:hi].contiguous(), requires_grad=False)
    if lin.bias is not None and not keep_bias:
        lin.bias = None  # the bias is added once, by rank 0, before the sum
    lin.in_features = hi - lo


def _span(start: int, width: int, rank: int) -> torch.Tensor:
    """Rows [start + rank*width, start + (rank+1)*width)."""
    return torch.arange(start + rank * width, start + (rank + 1) * width)


def _shard_attention(attn: Attention, rank: int, n: int) -> None:
    d = attn.head_dim
    q_rows, kv_rows = attn.n_heads * d // n, attn.n_kv_heads * d // n
    if attn.qkv_proj is not None:
        full_q, full_kv = attn.n_heads * d, attn.n_kv_heads * d
        rows = torch.cat([_span(0, q_rows, rank), _span(full_q, kv_rows, rank), _span(full_q + full_kv, kv_rows, rank)])
        fused = attn.qkv_proj
        _keep_rows(fused, rows)
        fused.parts = (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows))
    else:
        _keep_rows(attn.q_proj, _span(0, q_rows, rank))
        _keep_rows(attn.k_proj, _span(0, kv_rows, rank))
        _keep_rows(attn.v_proj, _span(0, kv_rows, rank))
    _keep_columns(attn.o_proj, rank * q_rows, (rank + 1) * q_rows, keep_bias=rank == 0)
    attn.n_heads, attn.n_kv_heads = attn.n_heads // n, attn.n_kv_heads // n


def _shard_mlp(mlp: MLP, rank: int, n: int) -> None:
    f = mlp.d_ff // n
    if mlp.gate_up_proj is not None:
        fused = mlp.gate_up_proj
        _keep_rows(fused, torch.cat([_span(0, f, rank), _span(mlp.d_ff, f, rank)]))
        fused.parts = (("gate_proj", f), ("up_proj", f))
    else:
        if mlp.gate_proj is not None:
            _keep_rows(mlp.gate_proj, _span(0, f, rank))
        _keep_rows(mlp.up_proj, _span(0, f, rank))
    _keep_columns(mlp.down_proj, rank * f, (rank + 1) * f, keep_bias=rank == 0)
    mlp.d_ff = f


_PROJECTIONS = ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "gate_proj", "up_proj",
                "down_proj")


def _check_plain(module: nn.Module) -> None:
    for name in _PROJECTIONS:
        lin = getattr(module, name, None)
        if lin is not None and (not isinstance(lin, nn.Linear) or type(lin.weight.data) is not torch.Tensor):
            weight = getattr(lin, "weight", None)  # a QuantLinear (compress/qlinear.py) has codes, no weight
            held = type(weight.data).__name__ if weight is not None else "packed codes"
            raise LmstackError(f"tensor-parallel serving needs plain Linear projections; {name} is a "
                               f"{type(lin).__name__} holding {held} (quantized or adapted weights cannot be "
                               "sliced here)")


def shard_model(model: nn.Module, rank: int, world_size: int) -> AllReduce:
    """Keep rank's shard of every block, in place (fusing q/k/v and gate/up first when they can be: the
    engine's layout). Returns the all-reduce hook the row-parallel projections call; set its `group`."""
    cfg = model.config
    check_shardable(cfg, world_size)
    if not 0 <= rank < world_size:
        raise LmstackError(f"rank {rank} is outside tensor_parallel_size={world_size}")
    if projections_fusable(model):
        model.fuse_projections()  # every rank makes the same choice: they load the same directory
    reduce = AllReduce()
    seen = set()  # blocks shared between layers (n_unique_layers) are sharded once
    for block in model.blocks:
        if id(block) in seen:
            continue
        seen.add(id(block))
        for module, shard, out in ((block.attn, _shard_attention, "o_proj"), (block.mlp, _shard_mlp, "down_proj")):
            if isinstance(module, (Attention, MLP)):
                _check_plain(module)
                shard(module, rank, world_size)
                getattr(module, out).register_forward_hook(reduce)
    cfg = model.config  # (fuse_projections replaced it)
    model.config = cfg.replace(n_heads=cfg.n_heads // world_size, n_kv_heads=cfg.n_kv_heads // world_size,
                               head_dim=cfg.head_dim, d_ff=cfg.d_ff // world_size)
    return reduce
