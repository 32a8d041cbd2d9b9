"""Reformer LSH attention: exact with one chunk, approaches full attention as hash rounds grow, causal,
and selectable in the model config."""
from types import SimpleNamespace

import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.lsh_attention import SELF_SCORE, LSHAttention


def lsh(n_hashes=4, chunk=32, n_buckets=0, shared_qk=True, d=32):
    cfg = SimpleNamespace(lsh_n_hashes=n_hashes, lsh_chunk_size=chunk, lsh_n_buckets=n_buckets,
                          lsh_shared_qk=shared_qk, head_dim=d)
    return LSHAttention(cfg).eval()


def full_shared_qk(q, v, causal):
    """Dense softmax attention with Reformer's shared-QK rules: unit-norm keys, self only as a last resort."""
    k = torch.nn.functional.normalize(q, dim=-1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    t = q.shape[2]
    s = s.masked_fill(torch.eye(t, dtype=torch.bool), SELF_SCORE)
    if causal:
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def clustered(b=1, h=2, t=512, d=32, n_clusters=16, seed=0):
    """Queries (= keys) drawn around a few directions, as LSH attention assumes: each query's large
    scores are with its own cluster."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(n_clusters, d, generator=g), dim=-1)
    q = (centers[torch.randint(0, n_clusters, (b, h, t), generator=g)] + 0.05 * torch.randn(b, h, t, d, generator=g))
    # |q| = 8 sqrt(d): a query's own cluster outscores the others by about 8 nats, the sharp attention
    # LSH assumes (with flat attention most of the mass lies outside any bucket).
    return q * 8 * d ** 0.5, torch.randn(b, h, t, d, generator=g)


@pytest.mark.parametrize("causal", [True, False])
def test_one_chunk_holding_everything_is_exactly_full_attention(causal):
    q, v = clustered(t=100)
    ref = full_shared_qk(q, v, causal)
    for rounds in (1, 3):  # with several rounds every pair is counted in each, and the correction undoes that
        out = lsh(n_hashes=rounds, chunk=128)(q, q, v, causal=causal)
        assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_error_to_full_attention_falls_as_hash_rounds_grow(causal):
    q, v = clustered()
    ref = full_shared_qk(q, v, causal)
    errors = [((lsh(n_hashes=r)(q, q, v, causal=causal) - ref).abs().mean() / ref.abs().mean()).item()
              for r in (1, 2, 4, 8)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    # measured: 0.75 -> 0.03 causal, 1.16 -> 0.14 bidirectional (relative mean absolute error)
    assert errors[-1] < 0.2 * errors[0] and errors[-1] < 0.2, errors


def test_causal_lsh_never_reads_the_future():
    q, v = clustered(t=200)
    q, v = q.requires_grad_(True), v.requires_grad_(True)
    out = lsh(n_hashes=3, chunk=16)(q, q, v, causal=True)
    out[:, :, 120].sum().backward()
    assert v.grad[:, :, 121:].abs().max() == 0 and q.grad[:, :, 121:].abs().max() == 0
    assert v.grad[:, :, :121].abs().max() > 0


def test_buckets_sort_near_vectors_together():
    # Angular LSH: the same direction always shares a bucket, the opposite direction never does.
    m = lsh(n_hashes=2)
    x = torch.randn(1, 1, 1, 32)
    rot = m._rotations(32, 8, x.device, x.dtype)
    assert torch.equal(m._hash(x, rot), m._hash(3 * x, rot))
    assert not torch.equal(m._hash(x, rot), m._hash(-x, rot))


def test_separate_keys_and_padding_to_a_chunk_multiple():
    # Non-shared keys, T not a multiple of the chunk, GQA values: finite, and exact with one chunk.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 37, 32, generator=g)
    k, v = torch.randn(2, 2, 37, 32, generator=g), torch.randn(2, 2, 37, 32, generator=g)
    kk, vv = torch.nn.functional.normalize(k, dim=-1).repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ kk.transpose(-1, -2)) * 32 ** -0.5
    ref = torch.softmax(s, -1) @ vv
    out = lsh(n_hashes=2, chunk=64, shared_qk=False)(q, k, v, causal=False)
    assert (out - ref).abs().max() < 1e-5
    out = lsh(n_hashes=2, chunk=8, shared_qk=False)(q, k, v, causal=True)
    assert torch.isfinite(out).all()


def test_lsh_is_a_model_attention_option_and_trains():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=2, n_layers=1, vocab_size=50, max_seq_len=64, attention="lsh",
                      lsh_n_hashes=2, lsh_chunk_size=16)
    model = Transformer(cfg)
    assert model.blocks[0].attn.k_proj is None  # shared-QK: no key projection
    ids = torch.randint(0, 50, (2, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(LmstackError, match="attention='lsh' runs without a KV cache"):
        model(ids[:, :4], cache=model.new_cache())


def test_bad_lsh_settings_are_refused():
    with pytest.raises(Exception, match="lsh_n_buckets"):
        ModelConfig(attention="lsh", lsh_n_buckets=3)
    with pytest.raises(Exception, match="lsh_n_hashes"):
        ModelConfig(attention="lsh", lsh_n_hashes=0)
