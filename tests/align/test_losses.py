"""Each preference loss on fixed log-probs equals the hand-computed value of its formula (TRL's definitions).

Fixed inputs (two pairs), β = 0.1:
    policy chosen [-1, -2], policy rejected [-3, -1], ref chosen [-2, -2], ref rejected [-2.5, -2]
    Δ = (π_c - ref_c) - (π_r - ref_r) = [1 - (-0.5), 0 - 1] = [1.5, -1.0];  βΔ = [0.15, -0.10]
    -log σ(0.15) = log(1 + e^-0.15) = 0.6209570   -log σ(-0.15) = 0.7709570
    -log σ(-0.1) = log(1 + e^0.1)   = 0.7443967   -log σ(0.1)   = 0.6443967
"""
import pytest
import torch

from lmstack.align.losses import (PAIR_LOSSES, bradley_terry_loss, kto_loss, kto_reference_point, preference_loss,
                                  weighted_mean)
from lmstack.errors import LmstackError

PC, PR = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
RC, RR = torch.tensor([-2.0, -2.0]), torch.tensor([-2.5, -2.0])


def _loss(name, **kw):
    return preference_loss(name, PC, PR, RC, RR, beta=0.1, **kw)


def test_dpo_sigmoid_matches_hand_computed():
    out = _loss("dpo")
    assert out["losses"].tolist() == pytest.approx([0.6209570, 0.7443967], abs=1e-6)
    assert float(out["loss"]) == pytest.approx((0.6209570 + 0.7443967) / 2, abs=1e-6)   # 0.6826769
    # implicit rewards β(π - ref): chosen [0.1, 0.0], rejected [-0.05, 0.1]
    assert out["chosen_rewards"].tolist() == pytest.approx([0.1, 0.0])
    assert out["rejected_rewards"].tolist() == pytest.approx([-0.05, 0.1])
    assert out["margins"].tolist() == pytest.approx([0.15, -0.1])
    assert float(out["accuracy"]) == 0.5


def test_cdpo_label_smoothing():
    # ε = 0.1: 0.9 · 0.6209570 + 0.1 · 0.7709570 = 0.6359570 ; 0.9 · 0.7443967 + 0.1 · 0.6443967 = 0.7343967
    out = _loss("cdpo", label_smoothing=0.1)
    assert out["losses"].tolist() == pytest.approx([0.6359570, 0.7343967], abs=1e-6)
    # the dpo formula with the same ε is the same function (TRL: sigmoid + label_smoothing = cDPO)
    assert torch.allclose(_loss("dpo", label_smoothing=0.1)["losses"], out["losses"])
    with pytest.raises(LmstackError, match="label_smoothing"):
        _loss("cdpo", label_smoothing=0.0)


def test_robust_dpo():
    # (0.9 · 0.6209570 - 0.1 · 0.7709570) / 0.8 = 0.6022070
    out = _loss("robust", label_smoothing=0.1)
    assert float(out["losses"][0]) == pytest.approx(0.6022070, abs=1e-6)
    # with ε = 0 it is plain DPO
    assert torch.allclose(_loss("robust")["losses"], _loss("dpo")["losses"])


def test_ipo_squared_distance_to_half_inverse_beta():
    # 1/(2β) = 5: (1.5 - 5)² = 12.25, (-1 - 5)² = 36
    out = _loss("ipo")
    assert out["losses"].tolist() == pytest.approx([12.25, 36.0])
    assert float(out["loss"]) == pytest.approx(24.125)


def test_per_pair_confidence_weights_and_per_pair_smoothing():
    # weights [1, 0.5]: (0.6209570 + 0.5 · 0.7443967) / 1.5 = 0.6621036
    out = _loss("dpo", weights=torch.tensor([1.0, 0.5]))
    assert float(out["loss"]) == pytest.approx(0.6621036, abs=1e-6)
    # per-pair ε [0, 0.1]: pair 0 plain, pair 1 smoothed
    out = _loss("dpo", label_smoothing=torch.tensor([0.0, 0.1]))
    assert out["losses"].tolist() == pytest.approx([0.6209570, 0.7343967], abs=1e-6)
    with pytest.raises(LmstackError, match="weights"):
        weighted_mean(torch.ones(2), torch.tensor([-1.0, 1.0]))


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    preference_loss("dpo", pc, pr, RC, RR)["loss"].backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises log π(chosen), lowers log π(rejected)


def test_kto_with_kl_reference_point():
    # r = π - ref = [1, -0.5]; KL pairs: mean([-4 + 4.5, -2 + 2.3]) = 0.4 = z0
    # desirable: 1 - σ(0.1 · (1 - 0.4)) = 1 - σ(0.06) = 0.4850045
    # undesirable: 1 - σ(0.1 · (0.4 + 0.5)) = 1 - σ(0.09) = 0.4775152
    out = kto_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.5]), torch.tensor([True, False]),
                   torch.tensor([-4.0, -2.0]), torch.tensor([-4.5, -2.3]), beta=0.1)
    assert float(out["kl"]) == pytest.approx(0.4)
    assert out["losses"].tolist() == pytest.approx([0.4850045, 0.4775152], abs=1e-6)
    assert float(out["loss"]) == pytest.approx(0.4812598, abs=1e-6)
    # weights scale each side
    out = kto_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.5]), torch.tensor([True, False]),
                   torch.tensor([-4.0, -2.0]), torch.tensor([-4.5, -2.3]), beta=0.1, desirable_weight=2.0,
                   undesirable_weight=0.5)
    assert out["losses"].tolist() == pytest.approx([2 * 0.4850045, 0.5 * 0.4775152], abs=1e-6)


def test_kto_reference_point_clamps_at_zero_and_is_detached():
    pol = torch.tensor([-5.0, -5.0], requires_grad=True)
    assert float(kto_reference_point(pol, torch.tensor([-4.0, -4.0]))) == 0.0  # mean -1 -> clamped to 0
    z = kto_reference_point(pol, torch.tensor([-6.0, -6.0]))
    assert float(z) == pytest.approx(1.0) and not z.requires_grad


def test_bradley_terry_margin_and_centering():
    rc, rr = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0])
    # -log σ(1) = 0.3132617, -log σ(-0.5) = 0.9740770
    out = bradley_terry_loss(rc, rr)
    assert float(out["loss"]) == pytest.approx(0.6436693, abs=1e-6)
    assert float(out["accuracy"]) == 0.5
    # margin 0.5: -log σ(0.5) = 0.4740770, -log σ(-1) = 1.3132617 -> mean 0.8936693
    assert float(bradley_terry_loss(rc, rr, margin=0.5)["loss"]) == pytest.approx(0.8936693, abs=1e-6)
    # centering 0.01 · mean((3)², (1.5)²) = 0.01 · 5.625 = 0.05625
    assert float(bradley_terry_loss(rc, rr, center_coef=0.01)["loss"]) == pytest.approx(0.6436693 + 0.05625,
                                                                                         abs=1e-6)


def test_registry_and_bad_names():
    assert set(PAIR_LOSSES) == {"dpo", "cdpo", "robust", "ipo"}
    with pytest.raises(LmstackError, match="choose one of"):
        _loss("slic")
    with pytest.raises(LmstackError, match="beta"):
        preference_loss("dpo", PC, PR, RC, RR, beta=0.0)
