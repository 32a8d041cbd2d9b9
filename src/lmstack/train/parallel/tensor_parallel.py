"""Tensor parallelism (Megatron-style) for the attention and MLP projections, via DTensor `parallelize_module`.

Within each block:
- q/k/v projections are split by output features (ColwiseParallel): each rank computes n_heads/tp
  query heads and n_kv_heads/tp KV heads, with their slice of the biases;
- the output projection is split by input features (RowwiseParallel): each rank multiplies its heads'
  slice and one all-reduce sums the partial results (its bias stays whole and counts once);
- the MLP likewise: gate/up column-wise, down row-wise, one all-reduce.
So a block costs two all-reduces forward and two backward, and attention runs unchanged on the local
heads (it reshapes with view(b, t, -1, head_dim)). Rank r holds query heads [r*H/tp, (r+1)*H/tp) and
KV heads [r*K/tp, (r+1)*K/tp), which keeps every GQA group on one rank.

Per-head state follows the heads: ALiBi slopes are cut to the local heads; QK-norm weights (shared by
all heads) see only local heads, so their gradients are partial sums, which DTensor marks as Partial
and a gradient hook all-reduces. Everything else (embeddings, norms, head, MoE layers) is replicated:
its inputs are identical on every rank of the group, so its gradients are too. (With dropout, that
needs the same RNG stream on every rank of a group: seed all ranks alike, as the trainer does.)

Usage:
    check_tensor_parallel(model.config, tp=2)           # clear error if the shapes do not split
    model = apply_tensor_parallel(model, mesh["tp"])
    cache = model.new_cache(batch_size=1, max_len=64)   # now a KV cache of this rank's heads only
    out = lmstack.model.reference_decode.reference_decode(model, prompt, max_new_tokens=8)   # TP decoding, unchanged
"""
from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DTensor, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from lmstack.errors import LmstackError
from lmstack.model.kv_cache import KVCache
from lmstack.model.mlp import MLP


def check_tensor_parallel(cfg, tp: int) -> None:
    """Raise LmstackError naming the field when the model cannot be split tp ways."""
    problems = []
    if cfg.n_heads % tp:
        problems.append(f"n_heads={cfg.n_heads}")
    if cfg.n_kv_heads % tp:
        problems.append(f"n_kv_heads={cfg.n_kv_heads}")
    dense = [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
    if dense and cfg.d_ff % tp:
        problems.append(f"d_ff={cfg.d_ff}")
    if problems:
        raise LmstackError(f"tensor parallelism over {tp} ranks needs {', '.join(problems)} divisible by "
                           f"tp_size={tp}; change distributed.tp_size or the model's head counts / d_ff")
    if cfg.attention != "softmax":
        raise LmstackError(f"tensor parallelism supports attention='softmax' only, not {cfg.attention!r} "
                           "(its projections are shared across heads)")


def _block_plan(block) -> dict:
    plan = {f"attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")}
    plan["attn.o_proj"] = RowwiseParallel()
    if isinstance(block.mlp, MLP):  # MoE layers stay replicated (no expert parallelism here)
        if block.mlp.gate_proj is not None:
            plan["mlp.gate_proj"] = ColwiseParallel()
        plan["mlp.up_proj"] = ColwiseParallel()
        plan["mlp.down_proj"] = RowwiseParallel()
    return plan


def _reduce_partial_grad(param: torch.Tensor) -> None:
    # Sum the per-rank partial gradients (each rank saw only its heads) into the full gradient, once,
    # as soon as it is accumulated. Left Partial, DTensor would reduce it again inside every optimizer
    # op that reads it, and code that treats it as an ordinary tensor (gradient noise, logging) would
    # be wrong.
    if isinstance(param.grad, DTensor) and param.grad.placements != param.placements:
        param.grad = param.grad.redistribute(param.device_mesh, param.placements)


def _shard_head_norm(norm: torch.nn.Module, mesh) -> None:
    """A norm applied per head to (B, H_local, T, head_dim): its input is the local slice of a tensor
    sharded on the head dim; its weight is replicated."""

    def wrap_input(_module, args, device_mesh):
        return (DTensor.from_local(args[0], device_mesh, [Shard(1)], run_check=False),)

    def unwrap_output(_module, output, _device_mesh):
        return output.to_local()

    distribute_module(norm, mesh, input_fn=wrap_input, output_fn=unwrap_output)
    for p in norm.parameters():
        p.register_post_accumulate_grad_hook(_reduce_partial_grad)


def apply_tensor_parallel(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """Shard every block's projections over the 1-D `mesh` (the tensor-parallel ranks), in place."""
    tp = mesh.size()
    check_tensor_parallel(model.config, tp)
    rank = mesh.get_local_rank()
    for block in model.blocks:
        parallelize_module(block, mesh, _block_plan(block))
        if block.attn.q_norm is not None:
            _shard_head_norm(block.attn.q_norm, mesh)
            _shard_head_norm(block.attn.k_norm, mesh)
    if getattr(model, "alibi_slopes", None) is not None:
        per_rank = model.config.n_heads // tp
        model.alibi_slopes = model.alibi_slopes[rank * per_rank:(rank + 1) * per_rank].clone()
    model.tp_size = tp
    # Decoding code calls model.new_cache(); on this model it must size the cache for the local heads.
    model.new_cache = functools.partial(tensor_parallel_cache, model, model.new_cache)
    return model


def tensor_parallel_cache(model: torch.nn.Module, plain_new_cache, batch_size: int = 1, max_len: int | None = None,
                          kind: str = "contiguous", window: int | None = None, n_sink: int | None = None):
    """model.new_cache for a tensor-parallel model: a contiguous cache holds only this rank's
    n_kv_heads/tp KV heads, so cache memory per rank shrinks by tp too. A sink cache grows from
    whatever K/V it is given, so it needs no change."""
    if kind != "contiguous":
        return plain_new_cache(batch_size, max_len=max_len, kind=kind, window=window, n_sink=n_sink)
    cfg = model.config
    w = model.blocks[0].attn.k_proj.weight
    local = w.to_local() if isinstance(w, DTensor) else w
    return KVCache(cfg.n_layers, batch_size, cfg.n_kv_heads // model.tp_size, cfg.head_dim,
                   max_len or cfg.max_seq_len, dtype=local.dtype, device=local.device)
