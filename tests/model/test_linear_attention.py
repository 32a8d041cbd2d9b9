import torch

from lmstack.model import ModelConfig, Transformer
from lmstack.model.linear_attention import LinformerAttention, PerformerAttention


def softmax_attention(q, k, v, causal):
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        t = q.shape[2]
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


def test_performer_error_shrinks_with_features_and_is_small_at_large_counts():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16) * 0.5 for _ in range(3))
    exact = softmax_attention(q, k, v, causal=False)
    errors = {}
    for m in (8, 64, 4096):
        cfg = ModelConfig(d_model=32, n_heads=2, performer_features=m)
        errors[m] = (PerformerAttention(cfg, seed=1)(q, k, v, causal=False) - exact).abs().mean().item()
    assert errors[4096] < errors[64] < errors[8]
    assert errors[4096] < 0.02


def test_performer_causal_matches_its_own_quadratic_form():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 100, 16) * 0.5 for _ in range(3))
    att = PerformerAttention(ModelConfig(d_model=32, n_heads=2, performer_features=128), chunk=16)
    qf, kf = att._phi(q, True), att._phi(k, False)
    a = torch.tril(qf @ kf.transpose(-1, -2))
    expected = (a @ v) / a.sum(-1, keepdim=True)
    assert (att(q, k, v, causal=True) - expected).abs().max() < 1e-4
    exact = softmax_attention(q, k, v, causal=True)
    big = PerformerAttention(ModelConfig(d_model=32, n_heads=2, performer_features=4096))
    assert (big(q, k, v, causal=True) - exact).abs().mean() < 0.03


def test_linformer_is_exact_at_full_rank_and_approximates_below():
    torch.manual_seed(0)
    t = 64
    # smooth sequences, the regime where low-rank pooling of K/V is a good approximation
    base = torch.randn(1, 2, 8, 16)
    k = torch.nn.functional.interpolate(base.flatten(0, 1).transpose(1, 2), size=t, mode="linear").transpose(1, 2).view(1, 2, t, 16)
    v = k.flip(-1)
    q = torch.randn(1, 2, t, 16)
    exact = softmax_attention(q, k, v, causal=False)
    errs = []
    for kk in (8, 32, 64):
        att = LinformerAttention(ModelConfig(d_model=32, n_heads=2, max_seq_len=t, linformer_k=kk, causal=False))
        errs.append((att(q, k, v, causal=False) - exact).abs().mean().item())
    assert errs[2] < 1e-6 and errs[1] < errs[0] and errs[1] < 0.1


def test_linear_attention_models_train_one_step():
    for cfg in (ModelConfig(attention="performer", performer_features=32),
                ModelConfig(attention="linformer", causal=False, linformer_k=16, position="learned")):
        model = Transformer(cfg)
        x = torch.randint(0, 512, (2, 40))
        loss = model(x).logsumexp(-1).mean()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
