"""Routing Transformer attention: exact with one cluster, causal, k-means centroids that learn in training and
stay in eval, kept by save/load, and a cost bounded by the cluster window."""
import pytest
import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.hf_io import load_model, save_model
from lmstack.model import routing_attention
from lmstack.model.routing_attention import RoutingAttention


def routing(n_clusters=4, window=0, local=0, decay=0.999, h=2, d=16):
    cfg = ModelConfig(d_model=h * d, n_heads=h, attention="routing", routing_n_clusters=n_clusters,
                      routing_window=window, routing_local_heads=local, routing_ema_decay=decay)
    return RoutingAttention(cfg).eval()


def qkv(b=2, h=2, t=64, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, generator=g) for _ in range(3))


def full(q, k, v, causal=True):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_one_cluster_holding_every_token_is_exactly_full_attention(causal):
    q, k, v = qkv(t=50)
    out = routing(n_clusters=1)(q, k, v, causal=causal)   # w = ceil(T / 1) = T
    assert (out - full(q, k, v, causal)).abs().max() < 1e-5


def test_grouped_kv_heads_and_a_ragged_last_chunk():
    # 4 query heads over 2 K/V heads, T = 45 not a multiple of w = 8: exact with one cluster, finite with several.
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 45, 16, generator=g)
    k, v = torch.randn(2, 2, 45, 16, generator=g), torch.randn(2, 2, 45, 16, generator=g)
    ref = full(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    m = routing(n_clusters=1, h=4)
    assert (m(q, k, v, causal=True) - ref).abs().max() < 1e-5
    out = routing(n_clusters=6, window=8, local=1, h=4)(q, k, v, causal=True)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_heads_done_a_few_at_a_time_give_the_same_output(monkeypatch):
    m = routing(n_clusters=4, local=1, h=4)
    q, k, v = qkv(h=4, t=64)
    whole = m(q, k, v, causal=True)
    monkeypatch.setattr(routing_attention, "SCORE_BUDGET", 1)  # one head per call
    assert torch.allclose(m(q, k, v, causal=True), whole, atol=1e-6, rtol=0)


def test_local_heads_are_exact_sliding_window_attention():
    # Head 0 local (window w = 8), head 1 routed with one cluster: the first equals a causal window of 8 keys.
    q, k, v = qkv(t=37)
    out = routing(n_clusters=1, window=8, local=1)(q, k, v, causal=True)
    t = q.shape[2]
    gap = torch.arange(t)[:, None] - torch.arange(t)[None, :]
    ref = F.scaled_dot_product_attention(q[:, :1], k[:, :1], v[:, :1], attn_mask=(gap >= 0) & (gap < 8))
    assert (out[:, :1] - ref).abs().max() < 1e-5
    assert torch.isfinite(out).all()


def test_changing_a_future_token_never_changes_an_earlier_output():
    m = routing(n_clusters=4, local=1)
    q, k, v = qkv(t=96)
    base = m(q, k, v, causal=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, 60:] = torch.randn_like(x[:, :, 60:])
    # Later tokens join clusters and shift the sorted chunks, yet no earlier output moves (beyond float
    # rounding of a reordered sum): a token's cluster and its window depend on earlier tokens only.
    moved = m(q2, k2, v2, causal=True)
    assert torch.allclose(base[:, :, :60], moved[:, :, :60], atol=1e-6, rtol=0)
    assert (base[:, :, 60:] - moved[:, :, 60:]).abs().max() > 0.1


def test_every_output_is_finite_and_gradients_reach_q_k_v():
    m = routing(n_clusters=8)
    q, k, v = (x.requires_grad_(True) for x in qkv(t=64))
    out = m(q, k, v, causal=True)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in (q, k, v))


@pytest.mark.parametrize("local", [0, 1])
def test_each_query_sees_at_most_w_keys_all_of_its_own_cluster_and_past(local):
    t, n_clusters = 128, 8
    m = routing(n_clusters=n_clusters, local=local)
    q, k, _ = qkv(b=1, t=t)
    w = m.window_for(t)
    assert w == 16
    # Values = the identity: each output row is that query's attention distribution over the keys.
    p = m(q, k, torch.eye(t).expand(1, 2, t, t), causal=True)
    seen = p > 0
    assert torch.allclose(p.sum(-1), torch.ones(1, 2, t), atol=1e-5)
    assert (seen.sum(-1) <= w).all() and seen.diagonal(dim1=-2, dim2=-1).all()   # at most w, itself included
    assert not seen.triu(1).any()                                                # nothing from the future
    scored = seen.sum().item()
    assert scored <= 2 * t * w < t * (t + 1)  # full causal attention scores T(T+1)/2 pairs per head
    if local:
        return
    _, cluster = m.route(q, k)
    same = cluster[..., :, None] == cluster[..., None, :]
    assert not (seen & ~same).any()
    # Within its cluster a query sees the min(w, rank + 1) most recent keys: exactly, no fewer.
    earlier_same = (same & torch.ones(t, t, dtype=torch.bool).tril()).sum(-1)
    assert torch.equal(seen.sum(-1), earlier_same.clamp(max=w))


def test_centroids_move_toward_the_mean_of_their_members_in_training_and_stay_in_eval():
    torch.manual_seed(0)
    m = routing(n_clusters=2, decay=0.5, h=1, d=8)
    # Queries and keys around two directions: k-means must find them.
    dirs = F.normalize(torch.randn(2, 8), dim=-1)
    pick = torch.randint(0, 2, (4, 1, 128))
    x = dirs[pick] + 0.05 * torch.randn(4, 1, 128, 8)
    before = m.centroids.clone()
    m(x, x, x, causal=True)
    assert torch.equal(m.centroids, before)  # eval: no k-means step
    m.train()

    def gap():  # worst cosine distance from each direction to its nearest centroid
        return (1 - (dirs @ m.centroids[0].T).amax(dim=1)).max().item()

    start = gap()
    for _ in range(20):
        m(x, x, x, causal=True)
    assert not m.centroids.requires_grad and m.centroids.grad is None
    assert gap() < 0.01 < start
    assert torch.allclose(m.centroids.norm(dim=-1), torch.ones(1, 2), atol=1e-5)


def _tiny_routing_model():
    return ModelConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=50, max_seq_len=64, attention="routing",
                       routing_n_clusters=4, routing_local_heads=1, routing_ema_decay=0.9)


def test_routing_model_trains_and_save_load_keeps_the_centroids(tmp_path):
    torch.manual_seed(0)
    model = Transformer(_tiny_routing_model())
    start = model.blocks[0].attn.linear.centroids.clone()
    assert model.blocks[0].attn.linear.centroids.shape == (3, 4, 8)   # 3 routing heads, 4 clusters, head_dim 8
    ids = torch.randint(0, 50, (2, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    trained = model.blocks[0].attn.linear.centroids
    assert not torch.equal(trained, start)
    assert not any("centroids" in name for name, _ in model.named_parameters())  # k-means moves them, not Adam
    model.eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    for a, b in zip(model.blocks, loaded.blocks):
        assert torch.equal(a.attn.linear.centroids, b.attn.linear.centroids)
    with torch.no_grad():
        assert torch.allclose(model(ids), loaded(ids), atol=1e-5)
    with pytest.raises(LmstackError, match="attention='routing' runs without a KV cache"):
        model(ids[:, :4], cache=model.new_cache())


def test_bad_routing_settings_are_refused():
    with pytest.raises(Exception, match="routing_n_clusters"):
        ModelConfig(attention="routing", routing_n_clusters=0)
    with pytest.raises(Exception, match="routing_local_heads"):
        ModelConfig(attention="routing", n_heads=4, routing_local_heads=4)
    with pytest.raises(Exception, match="routing_local_heads"):
        ModelConfig(attention="routing", causal=False, routing_local_heads=1)
    with pytest.raises(Exception, match="routing_ema_decay"):
        ModelConfig(attention="routing", routing_ema_decay=1.0)
