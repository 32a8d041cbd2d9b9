"""Pruning one weight: magnitude, Wanda and SparseGPT, unstructured and 2:4, on tiny seeded shapes.

The quality comparisons use the layer output error tr(dW H dW^T) on correlated synthetic activations with a
few loud channels, where activation-aware choices (Wanda) and weight updates (SparseGPT) should pay off."""
from __future__ import annotations

import pytest
import torch

from lmstack.compress.awq import output_error
from lmstack.compress.prune import keep_mask, prune_magnitude, prune_sparsegpt, prune_wanda
from lmstack.errors import LmstackError


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster and steadier

def activations(n: int = 1024, i: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, i, generator=g) @ (torch.randn(i, i, generator=g) / i ** 0.5)
    x += 0.3 * torch.randn(n, i, generator=g)
    x[:, :6] *= 6.0
    return x


def setup(i: int = 128):
    x = activations(i=i)
    w = torch.randn(64, i, generator=torch.Generator().manual_seed(1))
    return x, w, 2 * x.T @ x / x.shape[0]


def all_three(w, x, h, sparsity=0.5, pattern="unstructured"):
    return {"magnitude": prune_magnitude(w, sparsity, pattern),
            "wanda": prune_wanda(w, x.norm(dim=0), sparsity, pattern),
            "sparsegpt": prune_sparsegpt(w, h, sparsity, pattern)}


def test_unstructured_masks_have_the_asked_sparsity_per_row_and_zero_the_weight():
    x, w, h = setup()
    for name, r in all_three(w, x, h).items():
        assert r.mask.dtype == torch.bool and r.weight.shape == w.shape
        assert torch.all(r.mask.sum(1) == 64), name  # 50% of 128 in every row
        assert torch.all(r.weight[~r.mask] == 0), name
        assert r.sparsity == pytest.approx(0.5)
    # magnitude keeps exactly the largest half of each row, unchanged
    r = prune_magnitude(w, 0.5)
    kept_min = torch.where(r.mask, w.abs(), torch.inf).amin(1)
    dropped_max = torch.where(r.mask, -torch.inf, w.abs()).amax(1)
    assert torch.all(kept_min >= dropped_max)
    assert torch.equal(r.weight[r.mask], w[r.mask])


def test_wanda_and_sparsegpt_beat_magnitude_at_half_sparsity():
    x, w, h = setup()
    err = {k: output_error(w, r.weight, h) for k, r in all_three(w, x, h).items()}
    assert err["wanda"] < 0.9 * err["magnitude"], err
    assert err["sparsegpt"] < 0.7 * err["magnitude"], err
    assert err["sparsegpt"] < err["wanda"], err  # the weight updates are worth more than the better choice


def test_every_two_four_group_has_exactly_two_zeros_and_the_order_holds():
    x, w, h = setup()
    results = all_three(w, x, h, pattern="2:4")
    for name, r in results.items():
        runs = r.mask.reshape(64, 32, 4)
        assert torch.all(runs.sum(2) == 2), name
        assert torch.all((r.weight.reshape(64, 32, 4) == 0).sum(2) >= 2), name
        assert torch.all(r.weight[~r.mask] == 0), name
    err = {k: output_error(w, r.weight, h) for k, r in results.items()}
    assert err["wanda"] < err["magnitude"] and err["sparsegpt"] < 0.8 * err["magnitude"], err


def test_sparsegpt_two_four_with_a_block_size_not_a_multiple_of_four():
    x, w, h = setup()
    r = prune_sparsegpt(w, h, pattern="2:4", block_size=30)  # blocks shrink to 28: no run of 4 straddles two
    assert torch.all(r.mask.reshape(64, 32, 4).sum(2) == 2)
    assert output_error(w, r.weight, h) < output_error(w, prune_magnitude(w, 0.5, "2:4").weight, h)


def test_sparsegpt_with_a_diagonal_hessian_is_magnitude_within_a_block():
    """Uncorrelated inputs of equal power: no update, and saliency w^2 / d^2 orders weights by |w|."""
    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(2))
    r, m = prune_sparsegpt(w, torch.eye(96) * 3.0, 0.5), prune_magnitude(w, 0.5)
    assert torch.equal(r.mask, m.mask)
    torch.testing.assert_close(r.weight, m.weight)


def test_keep_mask_zero_sparsity_keeps_everything():
    assert keep_mask(torch.rand(4, 8), 0.0).all()


@pytest.mark.parametrize("call, match", [
    (lambda w, x, h: prune_magnitude(w, 1.0), r"sparsity must be in \[0, 1\)"),
    (lambda w, x, h: prune_wanda(w, x.norm(dim=0), -0.1), r"sparsity must be in \[0, 1\)"),
    (lambda w, x, h: prune_magnitude(w[:, :126], 0.5, "2:4"), "divisible by 4; got 126"),
    (lambda w, x, h: prune_sparsegpt(w, h, 0.5, "4:8"), "unknown sparsity pattern '4:8'"),
    (lambda w, x, h: prune_wanda(w, x.norm(dim=0)[:64]), "does not match in_features 128"),
    (lambda w, x, h: prune_sparsegpt(w, h[:64, :64]), "does not match the weight's in_features 128"),
    (lambda w, x, h: prune_magnitude(w[0]), "2-D weight"),
])
def test_bad_input(call, match):
    x, w, h = setup()
    with pytest.raises(LmstackError, match=match):
        call(w, x, h)
