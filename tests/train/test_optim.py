"""Optimizers: each beats SGD, and each one's defining property holds (LAMB trust ratio, Adafactor's
O(n+m) state, Lion's sign update, Muon's orthogonalisation, Shampoo/SOAP preconditioning)."""
import math

import pytest
import torch
from torch import nn

from lmstack.config import ConfigError, from_dict
from lmstack.errors import LmstackError
from lmstack.train.optim import (OPTIMIZERS, SOAP, Adafactor, Lamb, Lion, Muon, OptimizerConfig, Shampoo,
                                 build_optimizer, orthogonalize)
from lmstack.train.optim.kronecker import gram, inverse_root, precond_sides, rotate


class LeastSquares(nn.Module):
    """y = x W^T + b, with the layer named like a Transformer block's so that Muon takes W."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(32, 16)])

    def forward(self, x):
        return self.blocks[0](x)


def _problem():
    # feature scales span 100x, so the curvature spans 10^4: SGD's stable LR is set by the largest
    # scale and the small-scale directions barely move, while adaptive/preconditioned methods do not care
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1, 1, 32)
    x = torch.randn(256, 32, generator=g) * scales
    w = torch.randn(16, 32, generator=g) / scales
    return x, x @ w.T + 0.01 * torch.randn(256, 16, generator=g)


def _final_loss(make, steps=50):
    x, y = _problem()
    torch.manual_seed(0)
    model = LeastSquares()
    opt = make(model)
    for _ in range(steps):
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean())


LRS = {"adamw": 0.1, "lamb": 0.3, "adafactor": 0.1, "shampoo": 0.1, "soap": 0.1, "lion": 0.1, "muon": 0.3}


@pytest.fixture(scope="module")
def sgd_best():
    # plain SGD at its best LR of a sweep (0.2 already diverges)
    return min(_final_loss(lambda m: torch.optim.SGD(m.parameters(), lr=lr)) for lr in (0.01, 0.03, 0.1))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_beats_tuned_sgd_on_ill_conditioned_least_squares(name, sgd_best):
    cfg = OptimizerConfig(name=name, lr=LRS[name], muon_lr=LRS[name], weight_decay=0.0, betas=(0.9, 0.99))
    ours = _final_loss(lambda m: build_optimizer(m, cfg))
    assert ours < 0.5 * sgd_best, (name, ours, sgd_best)


def test_lamb_update_norm_is_lr_times_weight_norm():
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(8, 16, generator=g)
    norms = []
    for scale in (1.0, 3.0):
        w = nn.Parameter(scale * torch.randn(8, 16, generator=torch.Generator().manual_seed(2)))
        opt = Lamb([w], lr=0.01, weight_decay=0.0, max_trust_ratio=0.0)
        before = w.detach().clone()
        w.grad = grad.clone()
        opt.step()
        delta = (w.detach() - before).norm()
        assert math.isclose(float(delta), 0.01 * float(before.norm()), rel_tol=1e-5)
        norms.append(float(delta))
    assert math.isclose(norms[1] / norms[0], 3.0, rel_tol=1e-5)  # proportional to ||w||, not to the gradient


def test_lamb_zero_weight_takes_a_plain_adam_step():
    b = nn.Parameter(torch.zeros(4))
    opt = Lamb([b], lr=0.1, eps=1e-12)
    b.grad = torch.tensor([1.0, -2.0, 3.0, -4.0])
    opt.step()
    assert torch.allclose(b.detach(), -0.1 * torch.sign(b.grad), atol=1e-6)  # Adam's first step is lr*sign(g)


def test_adafactor_state_is_rows_plus_cols_for_a_matrix():
    n, m = 24, 40
    w, v = nn.Parameter(torch.randn(n, m)), nn.Parameter(torch.randn(m))
    experts = nn.Parameter(torch.randn(3, n, m))
    opt = Adafactor([w, v, experts], lr=1e-2)
    for p in (w, v, experts):
        p.grad = torch.randn_like(p)
    opt.step()

    def elements(p):
        return sum(t.numel() for t in opt.state[p].values() if torch.is_tensor(t))

    assert elements(w) == n + m                    # Adam would keep 2 * n * m
    assert elements(v) == m                        # 1-D: a full second moment
    assert elements(experts) == 3 * (n + m)        # each expert's matrix factored separately
    opt_m = Adafactor([w], lr=1e-2, beta1=0.9)     # a first moment costs n * m again
    w.grad = torch.randn_like(w)
    opt_m.step()
    assert sum(t.numel() for t in opt_m.state[w].values() if torch.is_tensor(t)) == n + m + n * m


def test_adafactor_factored_estimate_is_exact_for_rank_one_squares():
    # for G = a b^T, G^2 is rank 1, so the first step's factored v equals G^2 exactly and u = sign(G)
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, -1.0, 2.0])
    w = nn.Parameter(torch.zeros(3, 4))
    opt = Adafactor([w], lr=0.1)
    w.grad = torch.outer(a, b)
    opt.step()
    assert torch.allclose(w.detach(), -0.1 * torch.sign(w.grad), atol=1e-5)


def test_adafactor_clips_the_update_rms():
    w = nn.Parameter(torch.zeros(2, 2))
    opt = Adafactor([w], lr=1.0, clip_threshold=0.5)
    w.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    opt.step()
    assert math.isclose(float(w.detach().pow(2).mean().sqrt()), 0.5, rel_tol=1e-5)


def test_lion_update_entries_are_plus_minus_lr():
    w = nn.Parameter(torch.randn(16, 8))
    opt = Lion([w], lr=0.003, betas=(0.9, 0.99), weight_decay=0.0)
    for _ in range(3):
        before = w.detach().clone()
        w.grad = torch.randn_like(w)
        opt.step()
        assert torch.allclose((w.detach() - before).abs(), torch.full_like(w, 0.003), atol=1e-7)
    decayed = Lion([w], lr=0.003, weight_decay=0.5)
    before = w.detach().clone()
    w.grad = torch.randn_like(w)
    decayed.step()
    assert torch.allclose(w.detach(), before * (1 - 0.003 * 0.5) - 0.003 * torch.sign(w.grad), atol=1e-7)


@pytest.mark.parametrize("shape", [(64, 192), (192, 64), (4, 48, 96)])
def test_newton_schulz_singular_values_are_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(orthogonalize(g, steps=5))
    assert s.min() > 0.6 and s.max() < 1.2, (float(s.min()), float(s.max()))
    assert float(torch.linalg.svdvals(g).min() / torch.linalg.svdvals(g).max()) < 0.5  # the input was not


def test_muon_scales_tall_matrices_and_matches_adamw_elsewhere():
    torch.manual_seed(0)
    tall, bias = nn.Parameter(torch.randn(64, 16)), nn.Parameter(torch.randn(64))
    twin = nn.Parameter(bias.detach().clone())
    opt = Muon([{"params": [tall], "use_muon": True, "lr": 0.02},
                {"params": [bias], "use_muon": False, "lr": 1e-2, "weight_decay": 0.1}], momentum=0.0, nesterov=False)
    ref = torch.optim.AdamW([twin], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(3):
        before = tall.detach().clone()
        tall.grad, bias.grad = torch.randn_like(tall), torch.randn_like(bias)
        twin.grad = bias.grad.clone()
        opt.step()
        ref.step()
        step = (tall.detach() - before) / (0.02 * 2.0)  # sqrt(64 / 16) = 2
        s = torch.linalg.svdvals(step)
        assert s.min() > 0.6 and s.max() < 1.2
        assert torch.allclose(bias.detach(), twin.detach(), atol=1e-6)
    with pytest.raises(LmstackError, match="needs matrices"):
        Muon([{"params": [bias], "use_muon": True, "names": ["mlp.bias"]}])


def test_kronecker_rotation_matches_explicit_matrix_products():
    g = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    ql, _ = torch.linalg.qr(torch.randn(6, 6))
    qr, _ = torch.linalg.qr(torch.randn(9, 9))
    assert torch.allclose(rotate(g, ql, qr), ql.T @ g @ qr, atol=1e-5)
    assert torch.allclose(rotate(rotate(g, ql, qr), ql, qr, back=True), g, atol=1e-5)
    assert torch.allclose(rotate(g, None, qr), g @ qr, atol=1e-5)
    assert torch.allclose(gram(g, "right"), g.T @ g, atol=1e-5)
    spd = g @ g.T + torch.eye(6)
    root = inverse_root(spd, 4, damping=1e-12)
    assert torch.allclose(torch.linalg.matrix_power(root, 4) @ spd, torch.eye(6), atol=1e-3)
    stack = torch.randn(3, 6, 9)
    assert torch.allclose(gram(stack, "left")[1], stack[1] @ stack[1].T, atol=1e-5)  # per expert
    assert precond_sides((3, 6, 2000), 1024) == (True, False) and precond_sides((7,), 1024) == (False, False)


def test_shampoo_first_step_direction_is_the_kronecker_whitened_gradient():
    g = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    w = nn.Parameter(torch.zeros(5, 7))
    opt = Shampoo([w], lr=1.0, betas=(0.0, 0.5), shampoo_beta=0.0, damping=1e-9)
    w.grad = g.clone()
    opt.step()
    expect = inverse_root(g @ g.T, 4, 1e-9) @ g @ inverse_root(g.T @ g, 4, 1e-9)
    got = -w.detach()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), expect.flatten(), dim=0)
    assert cos > 0.999
    adam_norm = (g / (g.abs() + 1e-8)).norm()  # grafting: Adam's first-step norm
    assert math.isclose(float(got.norm()), float(adam_norm), rel_tol=1e-4)


def test_soap_without_preconditioned_dims_is_adamw():
    p, q = nn.Parameter(torch.randn(8, 12)), nn.Parameter(torch.randn(8, 12))
    q.data.copy_(p.data)
    soap = SOAP([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, max_precond_dim=4)  # 8, 12 > 4
    adamw = torch.optim.AdamW([q], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(4):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
        soap.step()
        adamw.step()
    assert torch.allclose(p, q, atol=1e-6)


def test_soap_is_invariant_to_a_rotation_of_the_gradient_basis():
    # Adam in the factors' eigenbasis does not care how the gradient's rows are rotated; plain Adam does
    torch.manual_seed(0)
    rot, _ = torch.linalg.qr(torch.randn(6, 6))
    grads = [torch.randn(6, 10) * torch.linspace(0.1, 3, 10) for _ in range(5)]

    def run(kind, rotate_rows):
        w = nn.Parameter(torch.zeros(6, 10))
        # eps well above float round-off: entries that are 0 in exact arithmetic must not be blown up to +-1;
        # the basis is refreshed every step because a one-gradient factor has a degenerate (arbitrary) null space
        opt = (SOAP([w], lr=1e-2, precondition_frequency=1, betas=(0.9, 0.95), eps=1e-3)
               if kind == "soap" else torch.optim.Adam([w], lr=1e-2, betas=(0.9, 0.95), eps=1e-3))
        for g in grads:
            w.grad = rot @ g if rotate_rows else g.clone()
            opt.step()
        return rot.T @ w.detach() if rotate_rows else w.detach()

    assert torch.allclose(run("soap", False), run("soap", True), atol=1e-4)
    assert not torch.allclose(run("adam", False), run("adam", True), atol=1e-3)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_params_without_grad_are_untouched(name):
    model = LeastSquares()
    extra = nn.Linear(4, 4)
    model.extra = extra
    opt = build_optimizer(model, OptimizerConfig(name=name, weight_decay=0.5))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model(torch.randn(8, 32)).pow(2).mean().backward()   # extra gets no gradient
    opt.step()
    assert torch.equal(extra.weight, before["extra.weight"]) and torch.equal(extra.bias, before["extra.bias"])
    assert not torch.equal(model.blocks[0].weight, before["blocks.0.weight"])


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ConfigError, match="name='sgd' is not allowed"):
        OptimizerConfig(name="sgd")
    with pytest.raises(ConfigError, match="layer_lr_decay"):
        OptimizerConfig(layer_lr_decay=0.0)
    with pytest.raises(ConfigError, match="betas"):
        OptimizerConfig(betas=(0.9, 1.0))
    with pytest.raises(ConfigError, match="unknown key 'momentun'"):
        from_dict(OptimizerConfig, {"momentun": 0.9})
    cfg = from_dict(OptimizerConfig, {"name": "soap", "betas": [0.95, 0.95]})
    assert cfg.betas == (0.95, 0.95)
