"""multimodal/attacks.py: FGSM and PGD stay in their L-inf ball and the pixel range, PGD finds at least FGSM's
loss, the seed fixes the result, the model's parameters get no gradients, and the typographic attack really
draws its word, inside the box it reports."""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lmstack.errors import LmstackError
from lmstack.multimodal.attacks import AttackConfig, attack, eps_in_pixels, fgsm, pgd, typographic, \
    typographic_pixels
from lmstack.multimodal.images import from_pixels, to_pixels


def _toy(seed=0, n=6, side=8, classes=4):
    """A small non-linear classifier on 3x8x8 pixels and a batch it gets right (labels = its own predictions)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * side * side, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, classes))
    x = torch.rand(n, 3, side, side) * 1.6 - 0.8
    labels = model(x).argmax(-1).detach()
    return model, x, labels


def _loss(model, labels):
    return lambda px: F.cross_entropy(model(px), labels, reduction="none")


def test_eps_units_and_bad_eps():
    assert eps_in_pixels(8) == pytest.approx(16 / 255)
    for bad in (-1, 300, "8", True):
        with pytest.raises(LmstackError, match="eps"):
            eps_in_pixels(bad)


@pytest.mark.parametrize("eps", [1, 4, 8])
def test_fgsm_and_pgd_stay_in_ball_and_range(eps):
    model, x, labels = _toy()
    x = x.clone()
    x[0] = 1.0  # a saturated image: the clamp to [-1, 1] must hold where the ball pokes out of the range
    x[1] = -1.0
    for adv in (fgsm(_loss(model, labels), x, eps), pgd(_loss(model, labels), x, eps, steps=5, seed=1)):
        assert (adv - x).abs().max() <= eps_in_pixels(eps) + 1e-6
        assert adv.min() >= -1 and adv.max() <= 1
        assert (adv - x).abs().max() > 0.5 * eps_in_pixels(eps)  # it really moved


def test_fgsm_raises_the_loss_along_the_sign():
    model, x, labels = _toy()
    loss_fn = _loss(model, labels)
    adv = fgsm(loss_fn, x, 8)
    assert loss_fn(adv).sum() > loss_fn(x).sum()
    # away from the range's edges, FGSM's step is exactly +-eps on every pixel the gradient touches
    inner = (x.abs() < 0.9)
    assert torch.allclose((adv - x)[inner].abs(), torch.full_like(x[inner], eps_in_pixels(8)), atol=1e-6)


def test_pgd_loss_at_least_fgsm_and_accuracy_drops():
    model, x, labels = _toy(n=16)
    loss_fn = _loss(model, labels)
    l_fgsm = loss_fn(fgsm(loss_fn, x, 8))
    adv = pgd(loss_fn, x, 8, steps=20, seed=0)
    l_pgd = loss_fn(adv)
    assert l_pgd.sum() >= l_fgsm.sum()
    assert (model(adv).argmax(-1) == labels).float().mean() < (model(x).argmax(-1) == labels).float().mean()


def test_pgd_keeps_each_images_best_iterate():
    model, x, labels = _toy(n=8)
    loss_fn = _loss(model, labels)
    # per-image losses: no image ends below its random start's loss (the best iterate is kept)
    start = pgd(loss_fn, x, 8, steps=1, step_size=0, seed=3)  # a zero step: only the random start is scored
    adv = pgd(loss_fn, x, 8, steps=10, seed=3)
    assert (loss_fn(adv) >= loss_fn(start) - 1e-6).all()


def test_pgd_deterministic_in_seed():
    model, x, labels = _toy()
    a = pgd(_loss(model, labels), x, 4, steps=3, seed=7)
    b = pgd(_loss(model, labels), x, 4, steps=3, seed=7)
    c = pgd(_loss(model, labels), x, 4, steps=3, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_attack_leaves_model_grads_untouched_and_works_under_no_grad():
    model, x, labels = _toy()
    with torch.no_grad():
        adv = attack(AttackConfig(kind="pgd", eps=2, steps=2), _loss(model, labels), x)
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(adv, x)
    assert torch.equal(attack(AttackConfig(eps=0), _loss(model, labels), x), x)


def test_scalar_loss_is_accepted():
    model, x, labels = _toy()
    adv = pgd(lambda px: F.cross_entropy(model(px), labels), x, 4, steps=3)
    assert (adv - x).abs().max() <= eps_in_pixels(4) + 1e-6


def test_bad_inputs_name_the_problem():
    model, x, labels = _toy()
    with pytest.raises(LmstackError, match="kind"):
        AttackConfig(kind="cw")
    with pytest.raises(LmstackError, match="steps"):
        AttackConfig(steps=0)
    with pytest.raises(LmstackError, match=r"\[-1, 1\]"):
        fgsm(_loss(model, labels), x * 3, 4)
    with pytest.raises(LmstackError, match="N, 3, S, S"):
        fgsm(_loss(model, labels), x[0], 4)
    with pytest.raises(LmstackError, match="one loss per image"):
        fgsm(lambda px: model(px), x, 4)
    with pytest.raises(LmstackError, match="no gradient"):
        fgsm(lambda px: torch.tensor(1.0), x, 4)


def _gray(side=64):
    return Image.new("RGB", (side, side), (128, 128, 128))


@pytest.mark.parametrize("position", ["center", "top", "bottom-right", (3, 20)])
def test_typographic_draws_only_inside_its_box(position):
    img = _gray()
    out, (x0, y0, x1, y1) = typographic(img, "green", font_size=14, position=position)
    before, after = to_pixels([img], 64)[0], to_pixels([out], 64)[0]
    changed = (before != after).any(0)
    assert changed.sum() > 30  # the word is really there
    inside = torch.zeros_like(changed)
    inside[y0:y1, x0:x1] = True
    assert not (changed & ~inside).any()
    assert img.getpixel((32, 32)) == (128, 128, 128)  # the caller's picture is untouched
    ys, xs = changed.nonzero(as_tuple=True)
    assert ys.max() - ys.min() >= 5 and xs.max() - xs.min() >= 15  # a word's extent, not a speck


def test_typographic_words_differ_and_box_fill_is_drawn():
    a, _ = typographic(_gray(), "red", font_size=12)
    b, _ = typographic(_gray(), "blue", font_size=12)
    assert a.tobytes() != b.tobytes()
    c, (x0, y0, x1, y1) = typographic(_gray(), "red", font_size=12, box_fill=(250, 250, 250), stroke=None)
    assert c.getpixel((x0, y0)) == (250, 250, 250)


def test_typographic_pixels_batch_and_errors():
    x = to_pixels([_gray(), _gray()], 64)
    out = typographic_pixels(x, ["star", "cross"], font_size=12, position="bottom")
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert not torch.equal(out[0], x[0]) and not torch.equal(out[0], out[1])
    assert from_pixels(out)[0].size == (64, 64)
    with pytest.raises(LmstackError, match="one word per image"):
        typographic_pixels(x, ["star"])
    with pytest.raises(LmstackError, match="non-empty"):
        typographic(_gray(), " ")
    with pytest.raises(LmstackError, match="position"):
        typographic(_gray(), "red", position="middle")
    with pytest.raises(LmstackError, match="font_size"):
        typographic(_gray(), "red", font_size=2)
