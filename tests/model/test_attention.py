import pytest
import torch

from lmstack.model import ModelConfig, Transformer
from lmstack.model.backends import BACKENDS, blockwise_attention, naive_attention
from lmstack.model.masks import AttentionMask, mask_for
from lmstack.model.positions import alibi_slopes


def reference(q, k, v, visible, scale, bias=None):
    """Plain softmax attention with an explicit (Tq, Tk) or (B,1,Tq,Tk) mask, GQA by repeating K/V."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~visible, float("-inf"))
    return torch.softmax(s, -1) @ v


def qkv(b=2, h=4, hkv=2, t=50, d=16):
    return torch.randn(b, h, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)


CASES = {
    "causal": dict(causal=True),
    "bidirectional": dict(causal=False),
    "sliding": dict(causal=True, window=7),
    "sliding_bidir": dict(causal=False, window=5),
    "sinks": dict(causal=True, window=6, n_global=3),
    "longformer": dict(causal=False, window=4, n_global=2, global_queries=True),
    "bigbird": dict(causal=True, window=8, n_global=4, global_queries=True, random_blocks=1, block_size=8),
    "dilated": dict(causal=True, window=4, dilation=3),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["sdpa", "naive", "blockwise"])
def test_backends_equal_reference(case, backend):
    q, k, v = qkv()
    pos = torch.arange(q.shape[2])
    mask = AttentionMask(q_pos=pos, k_pos=pos, **CASES[case])
    expected = reference(q, k, v, mask.dense(), 0.25)
    kw = dict(block_q=16, block_k=16) if backend == "blockwise" else {}
    out = BACKENDS[backend](q, k, v, mask, 0.25, **kw)
    assert (out - expected).abs().max() < 1e-5


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["sdpa", "naive", "blockwise"])
def test_alibi_backends_equal_reference(backend, causal):
    q, k, v = qkv(hkv=4)
    pos = torch.arange(q.shape[2])
    slopes = alibi_slopes(4)
    dist = (pos[:, None] - pos[None]).float()
    dist = dist.clamp(min=0) if causal else dist.abs()
    bias = -slopes[:, None, None] * dist
    mask = AttentionMask(q_pos=pos, k_pos=pos, causal=causal)
    expected = reference(q, k, v, mask.dense(), 0.25, bias)
    out = BACKENDS[backend](q, k, v, mask, 0.25, slopes=slopes)
    assert (out - expected).abs().max() < 1e-5


def test_sliding_window_blocks_exactly_the_tokens_outside():
    pos = torch.arange(10)
    m = AttentionMask(q_pos=pos, k_pos=pos, causal=True, window=3).dense()[0, 0]
    for i in range(10):
        for j in range(10):
            assert bool(m[i, j]) == (0 <= i - j < 3), (i, j)


def test_doc_ids_and_padding_hide_keys():
    pos = torch.arange(6)
    doc = torch.tensor([[0, 0, 0, 1, 1, 1]])
    pad = torch.tensor([[True, True, False, True, True, True]])
    m = AttentionMask(q_pos=pos, k_pos=pos, causal=True, doc_q=doc, doc_k=doc, key_padding=pad).dense()[0, 0]
    assert bool(m[4, 3]) and not bool(m[4, 1]) and not bool(m[2, 2]) and bool(m[2, 1])


def test_blockwise_skips_fully_masked_tiles(monkeypatch):
    import lmstack.model.backends as backends

    calls = []
    real = backends._grouped_scores
    monkeypatch.setattr(backends, "_grouped_scores", lambda *a: calls.append(1) or real(*a))
    q, k, v = qkv(t=128)
    pos = torch.arange(128)
    blockwise_attention(q, k, v, AttentionMask(q_pos=pos, k_pos=pos, causal=False), 0.25, block_q=16, block_k=16)
    dense_tiles = len(calls)
    calls.clear()
    blockwise_attention(q, k, v, AttentionMask(q_pos=pos, k_pos=pos, causal=True, window=16), 0.25, block_q=16, block_k=16)
    assert dense_tiles == 64 and len(calls) == 8 + 7  # diagonal tiles plus the one before each


def test_blockwise_memory_is_linear_only_one_tile_of_scores():
    # The largest score tensor the blockwise backend creates is block_q × block_k, whatever T is.
    import lmstack.model.backends as backends

    sizes = []
    real = backends._grouped_scores

    def spy(q, k, scale):
        s = real(q, k, scale)
        sizes.append(s.shape[-2] * s.shape[-1])
        return s

    backends._grouped_scores = spy
    try:
        q, k, v = qkv(b=1, t=300)
        pos = torch.arange(300)
        blockwise_attention(q, k, v, AttentionMask(q_pos=pos, k_pos=pos), 0.25, block_q=32, block_k=32)
    finally:
        backends._grouped_scores = real
    assert max(sizes) == 32 * 32


def test_gqa_with_one_kv_head_is_mqa_and_equals_repeated_mha():
    torch.manual_seed(0)
    mqa = Transformer(ModelConfig(d_model=64, n_heads=4, n_kv_heads=1, n_layers=1))
    mha = Transformer(ModelConfig(d_model=64, n_heads=4, n_kv_heads=4, n_layers=1))
    state = dict(mqa.state_dict())
    for name in ("k_proj", "v_proj"):  # copy the single K/V head to all four heads
        w = state[f"blocks.0.attn.{name}.weight"]
        state[f"blocks.0.attn.{name}.weight"] = w.repeat(4, 1)
    mha.load_state_dict(state)
    x = torch.randint(0, 512, (2, 20))
    assert (mqa(x) - mha(x)).abs().max() < 1e-5
    assert mha.new_cache(1, 32).nbytes() == 4 * mqa.new_cache(1, 32).nbytes()


def test_longformer_globals_see_and_are_seen_by_everyone():
    cfg = ModelConfig(sparse_pattern="longformer", sliding_window=2, sparse_global_tokens=2, causal=False)
    pos = torch.arange(12)
    m = mask_for(cfg, pos, pos, window=2).dense()[0, 0]
    assert m[:, :2].all() and m[:2, :].all()
    assert not bool(m[8, 4]) and bool(m[8, 7])


def test_bigbird_random_blocks_are_deterministic_and_add_visibility():
    cfg = ModelConfig(sparse_pattern="bigbird", attn_block_size=4, sparse_random_blocks=2, sliding_window=4)
    pos = torch.arange(64)
    a = mask_for(cfg, pos, pos, window=4).dense()
    b = mask_for(cfg, pos, pos, window=4).dense()
    plain = mask_for(cfg.replace(sparse_random_blocks=0), pos, pos, window=4).dense()
    assert torch.equal(a, b) and int(a.sum()) > int(plain.sum())


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_softcap_backends_agree(softcap):
    q, k, v = qkv()
    pos = torch.arange(q.shape[2])
    mask = AttentionMask(q_pos=pos, k_pos=pos)
    a = naive_attention(q * 4, k, v, mask, 0.25, softcap=softcap)
    b = blockwise_attention(q * 4, k, v, mask, 0.25, softcap=softcap, block_q=8, block_k=8)
    assert (a - b).abs().max() < 1e-5
    if softcap:
        assert (a - naive_attention(q * 4, k, v, mask, 0.25)).abs().max() > 1e-3


def test_tile_state_never_contradicts_the_dense_mask():
    import random

    rng = random.Random(0)
    for _ in range(200):
        t, off = rng.randint(5, 40), rng.choice([0, 7])
        kw = dict(causal=rng.random() < 0.7, window=rng.choice([0, 1, 3, 8]), n_global=rng.choice([0, 2]),
                  global_queries=rng.random() < 0.5, dilation=rng.choice([1, 2]), random_blocks=rng.choice([0, 1]),
                  block_size=4)
        if not kw["window"]:
            kw.update(n_global=0, random_blocks=0, dilation=1)
        m = AttentionMask(q_pos=torch.arange(off, off + t), k_pos=torch.arange(off + t), **kw)
        dense = m.dense()[0, 0]
        bq, bk = rng.randint(1, 9), rng.randint(1, 9)
        for q0 in range(0, t, bq):
            for k0 in range(0, off + t, bk):
                qs, ks = slice(q0, min(q0 + bq, t)), slice(k0, min(k0 + bk, off + t))
                state, tile = m.tile_state(qs, ks), dense[qs, ks]
                assert not (state == "empty" and tile.any()) and not (state == "full" and not tile.all())
