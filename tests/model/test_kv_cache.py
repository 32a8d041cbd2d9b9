import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer, preset
from lmstack.model.reference_decode import reference_decode

VARIANTS = {
    "rope_gqa": dict(position="rope", n_kv_heads=2),
    "alibi": dict(position="alibi"),
    "learned": dict(position="learned"),
    "sinusoidal": dict(position="sinusoidal"),
    "nope": dict(position="none"),
    "moe": dict(n_experts=4, moe_top_k=2),
    "sliding": dict(sliding_window=5),
    "sliding_per_layer": dict(sliding_window=5, sliding_window_layers=[1]),
    "qk_norm_parallel": dict(qk_norm=True, parallel_residual=True),
    "blockwise": dict(attn_backend="blockwise", attn_block_size=4),
    "yarn": dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=16),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_incremental_decoding_equals_full_forward(name):
    model = Transformer(ModelConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, **VARIANTS[name])).eval()
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 32)
        pieces = [model(x[:, :10], cache=cache)]  # prefill, then a chunk, then single tokens
        pieces.append(model(x[:, 10:13], cache=cache))
        for i in range(13, 24):
            pieces.append(model(x[:, i:i + 1], cache=cache))
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-5


def test_sink_cache_with_window_reproduces_a_sliding_window_model_exactly():
    model = Transformer(preset("mistral-tiny", sliding_window=6, max_seq_len=64)).eval()
    x = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(1, kind="sink", window=6, n_sink=0)
        steps = [model(x[:, :9], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(9, 40)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    assert cache.k[0].shape[2] == 5  # window - 1 tokens kept between steps


def test_sink_cache_generates_past_max_seq_len_with_flat_memory():
    model = Transformer(preset("llama-tiny", max_seq_len=32)).eval()
    cache = model.new_cache(1, kind="sink", window=16, n_sink=4)
    tok = torch.tensor([[1]])
    sizes = []
    with torch.no_grad():
        for step in range(100):  # three times the context
            logits = model(tok, cache=cache)
            tok = logits[:, -1:].argmax(-1)
            sizes.append(cache.nbytes())
    assert torch.isfinite(logits).all()
    assert cache.seen == 100 and max(sizes[30:]) == sizes[-1] == sizes[30]
    assert cache.k[0].shape[2] == 4 + 15


def test_sink_cache_keeps_the_sink_tokens():
    model = Transformer(preset("llama-tiny")).eval()
    x = torch.randint(0, 512, (1, 30))
    cache = model.new_cache(1, kind="sink", window=8, n_sink=2)
    with torch.no_grad():
        model(x[:, :20], cache=cache)
        k_after_prefill = cache.k[0][:, :, :2].clone()
        model(x[:, 20:21], cache=cache)
    assert torch.equal(cache.k[0][:, :, :2], k_after_prefill)


def test_greedy_generation_is_identical_with_and_without_cache():
    model = Transformer(preset("mixtral-tiny")).eval()
    prompt = torch.randint(0, 512, (2, 7))
    a = reference_decode(model, prompt, 20, cache="contiguous")
    b = reference_decode(model, prompt, 20, cache=None)
    assert torch.equal(a, b) and a.shape == (2, 27)


def test_sampling_is_reproducible_by_seed():
    model = Transformer(preset("llama-tiny")).eval()
    prompt = torch.randint(0, 512, (1, 5))
    a = reference_decode(model, prompt, 15, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    b = reference_decode(model, prompt, 15, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    c = reference_decode(model, prompt, 15, temperature=1.0, top_k=50, top_p=0.9, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cache_overflow_and_learned_positions_give_clear_errors():
    model = Transformer(preset("gpt2-tiny", max_seq_len=16)).eval()
    cache = model.new_cache(1, 8)
    with pytest.raises(LmstackError, match="KV cache holds 8 positions"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    with pytest.raises(LmstackError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(LmstackError, match="sink cache"):
        model.new_cache(1, kind="sink")
    with pytest.raises(LmstackError, match="temperature"):
        reference_decode(model, torch.tensor([[1]]), 2, temperature=-1.0)


def test_kv_cache_cost_per_token_is_constant_not_linear():
    # With a cache each decode step runs the model on one token; without, on the whole prefix.
    model = Transformer(preset("llama-tiny")).eval()
    seen = []
    hook = model.blocks[0].attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    reference_decode(model, torch.tensor([[1, 2, 3, 4]]), 6, cache="contiguous")
    with_cache = list(seen)
    seen.clear()
    reference_decode(model, torch.tensor([[1, 2, 3, 4]]), 6, cache=None)
    hook.remove()
    assert with_cache == [4, 1, 1, 1, 1, 1] and seen == [4, 5, 6, 7, 8, 9]
