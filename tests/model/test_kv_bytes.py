"""model.counting.kv_bytes_per_token: the one KV-bytes formula agrees with the caches that are really built."""
import torch

from lmstack.model import Transformer, preset
from lmstack.model.counting import kv_bytes_per_token, kv_values_per_token, model_stats
from lmstack.model.load_guard import check_kv_pool


def test_formula_matches_a_built_cache_and_model_info():
    for kv_heads in (8, 2, 1):  # MHA, GQA, MQA
        cfg = preset("llama-small", n_kv_heads=kv_heads)
        assert kv_values_per_token(cfg) == 2 * cfg.n_layers * kv_heads * cfg.head_dim
        cache = Transformer(cfg).new_cache(1, 16)  # fp32 model -> fp32 cache
        assert cache.nbytes() == 16 * kv_bytes_per_token(cfg, 4)
        assert model_stats(cfg).kv_cache_bytes_per_token == kv_bytes_per_token(cfg, 4)
        assert kv_bytes_per_token(cfg, 2) * 2 == kv_bytes_per_token(cfg, 4)


def test_paged_pool_check_uses_the_same_formula():
    cfg = preset("llama-small")
    pool = check_kv_pool(cfg, num_blocks=3, block_size=16, dtype=torch.bfloat16, max_model_len=48, max_model_gib=64)
    assert pool == 3 * 16 * kv_bytes_per_token(cfg, 2)
