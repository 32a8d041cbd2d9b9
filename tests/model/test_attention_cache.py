"""The one model <-> cache contract (model/attention_cache.py): every cache is an AttentionCache, a cache
written against the interface alone works, anything else is refused, and the model never probes for an
engine (tests/test_layering.py checks it imports none)."""
from pathlib import Path
import re

import pytest
import torch

from lmstack.adapt.prefix import CaptureCache, PrefixCache
from lmstack.errors import LmstackError
from lmstack.infer.paged_attention import PagedKVCache
from lmstack.model import ModelConfig, Transformer
from lmstack.model.attention_cache import AttentionCache, BackendCache
from lmstack.model.kv_cache import KVCache, SinkCache

MODEL_SRC = Path(__file__).resolve().parents[2] / "src" / "lmstack" / "model"


class ListCache(BackendCache):
    """A cache written from the interface's docstring alone: K/V appended to lists."""

    def __init__(self, n_layers: int):
        self.k, self.v, self.length = [None] * n_layers, [None] * n_layers, 0

    def positions(self, t):
        k_pos = torch.arange(self.length + t)
        return k_pos[self.length:], k_pos

    def update(self, layer, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat((self.k[layer], k), dim=2), torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def advance(self, t):
        self.length += t


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("llama-tiny", **overrides)).eval()


def test_every_cache_implements_the_one_interface():
    cfg = tiny().config
    k = [torch.zeros(1, cfg.n_kv_heads, 2, cfg.head_dim)] * cfg.n_layers
    caches = [KVCache(2, 1, 2, 8, 16), SinkCache(2, window=4), CaptureCache(), PrefixCache(k, k),
              PagedKVCache(cfg, num_blocks=4, block_size=4)]
    for cache in caches:
        assert isinstance(cache, AttentionCache), type(cache).__name__
    assert not isinstance(caches[-1], BackendCache)  # the engine's pool computes attention its own way


@pytest.mark.parametrize("overrides", [{}, dict(sliding_window=3), dict(fused_projections=True)])
def test_a_cache_written_against_the_interface_decodes_like_kv_cache(overrides):
    model = tiny(**overrides)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        ours, ref = ListCache(model.config.n_layers), model.new_cache(2, 16)
        for chunk in (ids[:, :6], ids[:, 6:7], ids[:, 7:]):
            torch.testing.assert_close(model(chunk, cache=ours), model(chunk, cache=ref), atol=1e-6, rtol=1e-6)
        full = model(ids)
    fresh = ListCache(model.config.n_layers)
    with torch.no_grad():
        model(ids[:, :6], cache=fresh)
        torch.testing.assert_close(model(ids[:, 6:], cache=fresh), full[:, 6:], atol=1e-5, rtol=1e-5)


def test_an_object_that_is_not_an_attention_cache_is_refused():
    class Duck:  # has the old protocol's methods, but not the contract
        rotated_keys, window, n_sink = True, 0, 0

        def positions(self, t):
            return torch.arange(t), torch.arange(t)

        def update(self, layer, k, v):
            return k, v

        def advance(self, t):
            pass

    with pytest.raises(LmstackError, match="cache must be an lmstack.model.attention_cache.AttentionCache.*Duck"):
        tiny()(torch.tensor([[1, 2]]), cache=Duck())


def test_the_model_never_probes_its_cache_for_an_engine():
    for path in MODEL_SRC.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"hasattr\(\s*cache", text), f"{path.name} branches on hasattr(cache, ...)"
        assert not re.search(r"^\s*(from|import)\s+lmstack\.infer", text, re.M), f"{path.name} imports lmstack.infer"
