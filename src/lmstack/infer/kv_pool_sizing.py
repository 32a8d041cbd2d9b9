"""How many KV blocks fit on a CUDA device: the pool is sized from measured memory, as vLLM does.

`gpu_memory_utilization` is the fraction of the device's total memory the engine may use. After the
weights are loaded and one profiling forward at the engine's largest step (max_batched_tokens) has run,
the peak memory that forward reached is what the model needs besides the pool (weights + activations);
what is left of the budget becomes KV blocks:

    blocks = (gpu_memory_utilization * total - peak_used) // bytes_per_block
    bytes_per_block = 2 (K and V) * n_layers * n_kv_heads * head_dim * dtype bytes * block_size
    (kv_cache_dtype="int8": 2 * n_layers * n_kv_heads * (head_dim * 1 + 4 bytes of fp32 scale) * block_size,
     see kv_quant.py)

capped at max_blocks when given (the engine passes 4x what max_num_seqs sequences of max_model_len fill:
past that, blocks only hold cached prefixes, and a small model on a big card would otherwise get millions of
blocks, each a Python object in the block manager).

The arithmetic is a pure function of sizes (kv_blocks_for_budget), unit-tested on the CPU; the
measurement (profile_kv_blocks) needs torch.cuda's allocator statistics and is checked on a device by
benchmarks/cuda_check.py. On the CPU the engine keeps its fixed-size default (engine.py).

Usage:
    n = kv_blocks_for_budget(total_bytes=80 << 30, peak_used_bytes=3 << 30, bytes_per_block=196608,
                             gpu_memory_utilization=0.9)
    n = profile_kv_blocks(model, block_size=16, max_batched_tokens=2048, gpu_memory_utilization=0.9)
"""
from __future__ import annotations

import torch

from lmstack.errors import LmstackError
from lmstack.infer.kv_quant import kv_cache_bytes_per_token


def bytes_per_block(cfg, dtype: torch.dtype, block_size: int, kv_cache_dtype: str = "auto") -> int:
    """K and V of every layer for block_size tokens, in bytes (with int8: numbers plus their scales)."""
    return kv_cache_bytes_per_token(cfg, dtype, kv_cache_dtype) * block_size


def kv_blocks_for_budget(total_bytes: int, peak_used_bytes: int, bytes_per_block: int,
                         gpu_memory_utilization: float, max_blocks: int | None = None) -> int:
    """Blocks that fit in gpu_memory_utilization * total_bytes once peak_used_bytes are taken.

    Raises naming the numbers when not even one block fits (the weights and activations alone exceed
    the budget), so the engine never starts with a pool it cannot use."""
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise LmstackError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    if bytes_per_block <= 0:
        raise LmstackError(f"bytes_per_block must be positive, got {bytes_per_block!r}")
    budget = int(gpu_memory_utilization * total_bytes)
    blocks = (budget - peak_used_bytes) // bytes_per_block
    if blocks < 1:
        raise LmstackError(
            f"no KV block fits: gpu_memory_utilization={gpu_memory_utilization} of {total_bytes / 2**30:.2f} GiB "
            f"is {budget / 2**30:.2f} GiB, and the model's weights plus a profiling forward already peak at "
            f"{peak_used_bytes / 2**30:.2f} GiB; raise gpu_memory_utilization or lower max_batched_tokens")
    return int(blocks if max_blocks is None else min(blocks, max_blocks))


@torch.inference_mode()
def profile_kv_blocks(model, block_size: int, max_batched_tokens: int, gpu_memory_utilization: float,
                      dtype: torch.dtype | None = None, max_blocks: int | None = None,
                      kv_cache_dtype: str = "auto") -> int:
    """Run one forward of max_batched_tokens tokens on the model's CUDA device, read the allocator's peak
    and the device's total memory, and return how many KV blocks fit the rest of the budget."""
    p = next(model.parameters())
    if p.device.type != "cuda":
        raise LmstackError(f"KV pool sizing from free memory needs a CUDA model, this one is on {p.device}")
    dev = p.device
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    n = min(max_batched_tokens, model.config.max_seq_len)
    ids = torch.zeros((1, n), dtype=torch.long, device=dev)
    model(ids, return_hidden=True)  # the activations of the engine's largest prefill chunk
    model.head(torch.zeros((1, model.config.d_model), dtype=p.dtype, device=dev))
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    total = torch.cuda.get_device_properties(dev).total_memory
    # memory held outside this process's allocator (other processes, the CUDA context) also counts
    free, _ = torch.cuda.mem_get_info(dev)
    outside = max(0, total - free - torch.cuda.memory_reserved(dev))
    per_block = bytes_per_block(model.config, dtype or p.dtype, block_size, kv_cache_dtype)
    return kv_blocks_for_budget(total, peak + outside, per_block, gpu_memory_utilization, max_blocks)
