"""Residual vector quantisation (multimodal/rvq.py): more codebooks never fit worse, codes decode, EMA and
dead-code restarts move the codebooks."""
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.rvq import ResidualVQ, kmeans

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=600, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, d, generator=g) * 3
    return centres[torch.randint(0, 5, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)


def test_more_codebooks_never_leave_a_larger_residual_on_the_fitted_data():
    x = _data()
    rvq = ResidualVQ(dim=8, n_q=5, codebook_size=16)
    left = rvq.fit_kmeans(x, iters=8)
    energy = [float(x.pow(2).sum(1).mean())] + [rvq.residual_energy(x, n) for n in range(1, 6)]
    assert all(b <= a + 1e-5 for a, b in zip(energy, energy[1:])), energy
    assert energy[-1] < 0.25 * energy[1]  # the later codebooks keep paying, not just the first
    assert left[-1] == pytest.approx(energy[-1], rel=1e-4)


def test_kmeans_rows_are_means_and_beat_the_overall_mean():
    x = _data(300, 4, seed=1)
    book = kmeans(x, 8, iters=5, generator=torch.Generator().manual_seed(0))
    d = ((x[:, None] - book[None]) ** 2).sum(-1).min(1).values.mean()
    assert d <= ((x - x.mean(0)) ** 2).sum(1).mean()


def test_codes_round_trip_shapes_and_prefixes():
    rvq = ResidualVQ(dim=8, n_q=3, codebook_size=16).eval()
    rvq.fit_kmeans(_data(200), iters=3)
    z = torch.randn(2, 8, 7)
    q, codes, loss = rvq(z)
    assert q.shape == z.shape and codes.shape == (2, 3, 7) and codes.dtype == torch.int64
    assert torch.allclose(rvq.decode(codes), q, atol=1e-5)
    assert rvq.decode(codes[:, :1]).shape == z.shape and loss.item() > 0
    with pytest.raises(LmstackError, match="outside the codebook"):
        rvq.decode(torch.full((1, 2, 3), 16))
    with pytest.raises(LmstackError, match="n_q=4"):
        rvq(z, n_q=4)


def test_ema_moves_rows_and_dead_codes_restart():
    rvq = ResidualVQ(dim=4, n_q=1, codebook_size=8, ema_decay=0.5, dead_after=2).train()
    before = rvq.codebooks.clone()
    x = torch.randn(1, 4, 64) + 5.0  # far from the random init: most rows are never picked, so they restart
    for _ in range(3):
        rvq(x)
    assert not torch.allclose(before, rvq.codebooks)
    assert int(rvq.idle_steps.max()) < 2
    near = ((rvq.codebooks[0] - 5.0).abs() < 4).all(1)
    assert int(near.sum()) >= 6  # restarted rows sit on the data
