"""Fused kernels (IV.11): fused linear + cross-entropy, fused RMSNorm and SwiGLU equal the unfused path."""
import pytest
import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.fused import FusedRMSNorm, rms_norm, swiglu
from lmstack.model.fused_ce import fused_linear_cross_entropy
from lmstack.model.norms import RMSNorm
from lmstack.model.vocab import PAD_LOGIT
from lmstack.train.objectives import ObjectiveConfig, build_objective
from lmstack.config import ConfigError


def _reference(h, w, t, b=None, n_real=None, softcap=0.0, ignore_index=-100):
    logits = F.linear(h, w, b)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if n_real is not None and n_real < w.shape[0]:
        logits = logits.masked_fill(torch.arange(w.shape[0]) >= n_real, PAD_LOGIT)
    return F.cross_entropy(logits, t, ignore_index=ignore_index)


def _grads(fn, *leaves):
    for x in leaves:
        x.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), [x.grad.clone() for x in leaves]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("bias,softcap", [(False, 0.0), (True, 0.0), (False, 5.0)])
def test_fused_ce_matches_unfused_loss_and_grads_with_ignore_and_padded_rows(chunk, bias, softcap):
    torch.manual_seed(0)
    n, d, v, n_real = 53, 16, 97, 90
    h = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, n_real, (n,))
    t[::5] = -100  # ignored positions count neither in the loss nor the mean
    leaves = [h, w] + ([b] if bias else [])
    ref, g_ref = _grads(lambda: _reference(h, w, t, b, n_real, softcap), *leaves)
    got, g_got = _grads(lambda: fused_linear_cross_entropy(h, w, t, b, n_real=n_real, chunk_size=chunk,
                                                            softcap=softcap), *leaves)
    assert abs(float(ref) - float(got)) < 1e-10
    for a, c in zip(g_ref, g_got):
        assert (a - c).abs().max() < 1e-10
    assert w.grad[n_real:].abs().max() == 0  # padded rows get no gradient
    assert h.grad[::5].abs().max() == 0      # ignored positions get none either


def test_fused_ce_fp32_and_grad_scaling_and_accuracy_count():
    torch.manual_seed(1)
    h = torch.randn(40, 8, requires_grad=True)
    w = torch.randn(300, 8, requires_grad=True)
    t = torch.randint(0, 300, (40,))
    ref, g_ref = _grads(lambda: 3.0 * _reference(h, w, t), h, w)
    got, g_got = _grads(lambda: 3.0 * fused_linear_cross_entropy(h, w, t, chunk_size=9), h, w)
    assert torch.allclose(ref, got, atol=1e-5)
    assert all(torch.allclose(a, c, atol=1e-5) for a, c in zip(g_ref, g_got))
    loss, correct = fused_linear_cross_entropy(h, w, t, return_correct=True)
    assert int(correct) == int(((h @ w.t()).argmax(-1) == t).sum())


def test_fused_ce_never_materialises_full_logits():
    # what autograd keeps for backward is grad_h + grad_W, never an (N, V) tensor
    n, d, v = 256, 8, 4096
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    t = torch.randint(0, v, (n,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        fused_linear_cross_entropy(h, w, t, chunk_size=32)
    assert saved and max(saved) <= max(n * d, v * d) < n * v
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        _reference(h, w, t)
    assert max(saved) >= n * v  # the unfused path does keep the logits


def test_fused_ce_bad_input_errors():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(LmstackError, match="targets must lie"):
        fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 9, 2]), n_real=8)
    with pytest.raises(LmstackError, match="hidden"):
        fused_linear_cross_entropy(h, torch.randn(10, 7), torch.zeros(4, dtype=torch.long))


def test_clm_objective_fused_ce_equals_unfused_on_padded_model():
    cfg = ModelConfig(vocab_size=128, real_vocab_size=100, d_model=32, n_layers=2, n_heads=2, tie_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, 100, (3, 17))
    out = {}
    for fused in (False, True):
        obj = build_objective(ObjectiveConfig(name="clm", fused_ce=fused), cfg)
        batch = obj.prepare(tokens, torch.Generator().manual_seed(0))
        batch["loss_mask"][0, :4] = False  # unscored positions
        model.zero_grad()
        loss, metrics = obj.loss(model, batch)
        loss.backward()
        out[fused] = (float(loss.detach()), metrics["accuracy"], [p.grad.clone() for p in model.parameters()])
    assert abs(out[True][0] - out[False][0]) < 1e-5 and out[True][1] == out[False][1]
    for a, b in zip(out[True][2], out[False][2]):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ConfigError, match="fused_ce"):
        ObjectiveConfig(fused_ce=True, token_weighting="focal")


@pytest.mark.parametrize("mode", ["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def test_fused_rmsnorm_and_swiglu_match_unfused(mode):
    torch.manual_seed(0)
    # RMSNorm computes in fp32 whatever the input (norms.py), so compare in fp32
    x = torch.randn(2, 5, 24, requires_grad=True)
    ref, fused = RMSNorm(24), FusedRMSNorm(24)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(24))
        fused.weight.copy_(ref.weight)
    dy = torch.randn_like(x)
    y0 = ref(x)
    g0 = torch.autograd.grad(y0, (x, ref.weight), dy)
    y1 = rms_norm(x, fused.weight, fused.eps, mode)
    g1 = torch.autograd.grad(y1, (x, fused.weight), dy)
    assert (y0 - y1).abs().max() < 1e-6
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(g0, g1))
    gate = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    dz = torch.randn(3, 40, dtype=torch.float64)
    z0 = F.silu(gate) * up
    h0 = torch.autograd.grad(z0, (gate, up), dz)
    z1 = swiglu(gate, up, mode)
    h1 = torch.autograd.grad(z1, (gate, up), dz)
    assert (z0 - z1).abs().max() < 1e-12
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(h0, h1))


def test_fused_kernels_model_equals_plain_model(monkeypatch):
    from lmstack.model import fused as fused_mod

    monkeypatch.setattr(fused_mod, "CPU_MODE", "eager")  # the compiled mode's math is the slow test above
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, mlp="swiglu", norm="rmsnorm")
    torch.manual_seed(0)
    plain = Transformer(cfg)
    fused = Transformer(ModelConfig(**{**cfg.to_dict(), "fused_kernels": True}))
    fused.load_state_dict(plain.state_dict())
    assert any(isinstance(m, FusedRMSNorm) for m in fused.modules())
    ids = torch.randint(0, 64, (2, 9))
    out = [m(ids) for m in (plain, fused)]
    assert torch.allclose(out[0], out[1], atol=1e-6)
    for m, o in zip((plain, fused), out):
        o.square().mean().backward()
    for (n, a), b in zip(plain.named_parameters(), fused.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n

