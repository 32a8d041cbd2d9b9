"""KV pool sizing from measured memory: the byte arithmetic (the CUDA measurement is in benchmarks/cuda_check.py)."""
import pytest
import torch

from infer_helpers import tiny_model
from lmstack.errors import LmstackError
from lmstack.infer.kv_pool_sizing import bytes_per_block, kv_blocks_for_budget, profile_kv_blocks


def test_bytes_per_block_is_k_and_v_of_every_layer():
    cfg = tiny_model(300).config
    want = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2 * 16  # bf16: 2 bytes, 16 tokens a block
    assert bytes_per_block(cfg, torch.bfloat16, 16) == want
    assert bytes_per_block(cfg, torch.float32, 16) == 2 * want


def test_blocks_fill_the_budget_left_after_the_peak():
    gib = 1 << 30
    per = 2 * 12 * 4 * 64 * 2 * 16  # a 125M llama in bf16: 96 KiB a block
    n = kv_blocks_for_budget(80 * gib, 3 * gib, per, 0.9)
    assert n == (int(0.9 * 80 * gib) - 3 * gib) // per
    assert n * per <= 0.9 * 80 * gib - 3 * gib < (n + 1) * per  # the most that fits, and no more
    assert kv_blocks_for_budget(80 * gib, 3 * gib, per, 0.5) < n  # a lower utilization gives fewer blocks
    assert kv_blocks_for_budget(80 * gib, 3 * gib, per, 0.9, max_blocks=4096) == 4096  # the engine's cap
    assert kv_blocks_for_budget(80 * gib, 3 * gib, per, 0.9, max_blocks=10 * n) == n


@pytest.mark.parametrize("util", [0.0, -0.1, 1.5])
def test_bad_utilization_is_refused_by_name(util):
    with pytest.raises(LmstackError, match="gpu_memory_utilization"):
        kv_blocks_for_budget(1 << 30, 0, 4096, util)


def test_no_block_fits_names_the_numbers():
    with pytest.raises(LmstackError, match="no KV block fits.*peak at"):
        kv_blocks_for_budget(10 << 30, 9 << 30, 1 << 20, 0.8)


def test_profiling_needs_a_cuda_model():
    with pytest.raises(LmstackError, match="needs a CUDA model"):
        profile_kv_blocks(tiny_model(300), 16, 64, 0.9)
