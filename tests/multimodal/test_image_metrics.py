"""Image-quality metrics for generated shapes (multimodal/image_metrics.py)."""
import numpy as np
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.clip import CLIP, CLIPConfig, TextConfig
from lmstack.multimodal.diffusion_train import single_object_world, uint8_to_pixels
from lmstack.multimodal.image_metrics import (AttributeClassifier, attribute_accuracy, clip_agreement,
                                              frechet_distance, parse_prompt, rate, train_attribute_classifier)
from lmstack.multimodal.text import shapes_tokenizer
from lmstack.multimodal.vit import VisionConfig


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # same covariance, shifted mean: the distance is the squared shift
    assert frechet_distance(a, a + np.array([1.0, 2.0, 0.0])) == pytest.approx(5.0, abs=1e-6)
    # N(0, I) against N(0, 4 I) in 3-d: 3 * (1 + 4 - 2 * 2) = 3
    b = rng.normal(size=(4000, 3)) * 2.0
    assert frechet_distance(a, b) == pytest.approx(3.0, rel=0.1)
    with pytest.raises(LmstackError, match="same D"):
        frechet_distance(a, a[:, :2])


def test_parse_prompt_and_rate():
    assert parse_prompt("A Red circle.") == ("red", "circle")
    assert parse_prompt("a hexagon") == (None, None)
    r = rate([True, False, True, True])
    assert r["acc"] == 0.75 and r["n"] == 4 and r["stderr"] == pytest.approx((0.75 * 0.25 / 4) ** 0.5)


class FixedPredictions(AttributeClassifier):
    def __init__(self, colours, shapes):
        super().__init__(width=4)
        self.answer = (colours, shapes)

    def predict(self, pixels, batch_size=256):
        return self.answer


def test_attribute_accuracy_counts_colour_shape_both():
    clf = FixedPredictions(["red", "blue", "red", "green"], ["circle", "star", "square", "star"])
    prompts = ["a red circle", "a blue circle", "a green square", "a green star."]
    acc = attribute_accuracy(clf, torch.zeros(4, 3, 32, 32), prompts)
    assert acc["colour"]["acc"] == 0.75 and acc["shape"]["acc"] == 0.75 and acc["both"]["acc"] == 0.5
    assert acc["both"]["n"] == 4 and acc["both"]["stderr"] == pytest.approx(0.25)
    with pytest.raises(LmstackError, match="2 prompts"):
        attribute_accuracy(clf, torch.zeros(4, 3, 32, 32), prompts[:2])


@pytest.mark.slow
def test_attribute_classifier_learns_real_pictures():
    images, labels = single_object_world(240, size=32, seed=0)
    clf = train_attribute_classifier(uint8_to_pixels(images), labels, steps=60, batch_size=48, lr=3e-3)
    test, test_labels = single_object_world(96, size=32, seed=1)
    prompts = [f"a {c} {s}" for c, s in test_labels]
    acc = attribute_accuracy(clf, uint8_to_pixels(test), prompts)
    assert acc["colour"]["acc"] > 0.9 and acc["colour"]["n"] == 96
    assert acc["both"]["acc"] <= min(acc["colour"]["acc"], acc["shape"]["acc"])
    # naming the wrong colour for every picture drops colour accuracy to the classifier's error rate
    wrong = [f"a {'blue' if c != 'blue' else 'red'} {s}" for c, s in test_labels]
    assert attribute_accuracy(clf, uint8_to_pixels(test), wrong)["colour"]["acc"] < 0.1
    assert clf.embed(uint8_to_pixels(test[:5])).shape == (5, 128)
    with pytest.raises(LmstackError, match="names no colour"):
        attribute_accuracy(clf, uint8_to_pixels(test[:1]), ["a thing"])
    with pytest.raises(LmstackError, match="unknown label"):
        train_attribute_classifier(uint8_to_pixels(test[:2]), [("red", "hexagon"), ("red", "circle")])


def test_clip_agreement_shapes_and_top1():
    tok = shapes_tokenizer(vocab_size=300, n_images=20)
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(vision=VisionConfig(image_size=32, patch_size=8, d_model=32, n_layers=1, n_heads=2),
                           text=TextConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                           bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                           pad_token_id=tok.pad_id), embed_dim=16))
    images, labels = single_object_world(6, size=32, seed=2)
    prompts = [f"a {c} {s}" for c, s in labels]
    out = clip_agreement(clip, tok, uint8_to_pixels(images), prompts, candidates=sorted(set(prompts)) + ["a red star"])
    assert -1.0 <= out["mean"] <= 1.0 and out["n"] == 6 and out["stderr"] > 0
    assert out["top1"]["n"] == 6
    # the cosine is CLIP's own: picture i against prompt i
    img = clip.encode_image(uint8_to_pixels(images[:1]))
    from_model = clip_agreement(clip, tok, uint8_to_pixels(images[:2]), prompts[:2])
    assert np.isfinite(from_model["mean"]) and img.shape == (1, 16)
    with pytest.raises(LmstackError, match="one prompt per picture"):
        clip_agreement(clip, tok, uint8_to_pixels(images[:2]), prompts[:1])
    assert isinstance(AttributeClassifier(), torch.nn.Module)
