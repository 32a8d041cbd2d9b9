import difflib
import random

import pytest

from lmstack.data.augment import AugmentConfig, Augmenter, add_noise, counterfactual, gender_counts
from lmstack.data.document import make_doc


@pytest.mark.parametrize("text,want", [
    ("He gave his sister a book.", "She gave her brother a book."),
    ("I saw her and her dog.", "I saw him and his dog."),
    ("Give it to her.", "Give it to him."),
    ("The King met Queen Mary.", "The Queen met King John."),
    ("HE SAID SHE WAS RIGHT", "SHE SAID HE WAS RIGHT"),
    ("The weather is fine.", "The weather is fine."),
])
def test_counterfactual_swaps(text, want):
    assert counterfactual(text)[0] == want


def test_counterfactual_balances_gender_counts():
    docs = ["He told his son that the king and his men would ride at dawn.",
            "My father and my uncle met the duke; she stayed home.",
            "John asked the waiter for bread."]
    before = gender_counts(docs)
    assert before["male"] > 3 * before["female"]
    augmented = docs + [counterfactual(d)[0] for d in docs]
    after = gender_counts(augmented)
    assert after["male"] == after["female"]
    assert counterfactual("Alaric met Brenna.", [("alaric", "brenna")])[0] == "Brenna met Alaric."


def test_noise_rate_and_determinism():
    text = " ".join(f"word{i} alpha{i * 7} beta{i * 13}" for i in range(60))  # no repeats: diffs align
    noisy = add_noise(text, 0.05, random.Random(0))
    assert noisy == add_noise(text, 0.05, random.Random(0))
    assert noisy != text
    similarity = difflib.SequenceMatcher(None, text, noisy, autojunk=False).ratio()
    assert 0.94 < similarity < 0.99  # about 5% of the characters perturbed
    light = add_noise(text, 0.01, random.Random(0))
    assert similarity < difflib.SequenceMatcher(None, text, light, autojunk=False).ratio()
    assert add_noise(text, 0.0, random.Random(0)) == text


def test_augmenter_adds_copies_independent_of_batching():
    docs = [make_doc(f"He met his brother number {i} at the market.", f"d{i}", "s") for i in range(40)]
    docs.append(make_doc("The weather is fine today.", "neutral", "s"))
    aug = Augmenter(AugmentConfig(counterfactual=True, noise=True, noise_fraction=0.5, seed=3))
    whole = aug(docs)
    assert len([d for d in whole.kept if d["id"].endswith("#cda")]) == 40  # 'neutral' has nothing to swap
    assert whole.modified["counterfactual"] == 40 and 10 < whole.modified["noise"] < 30
    cda = next(d for d in whole.kept if d["id"] == "d0#cda")
    assert cda["text"] == "She met her sister number 0 at the market." and cda["meta"]["augment"] == "counterfactual"
    split = aug(docs[:13]).kept + aug(docs[13:]).kept
    assert sorted((d["id"], d["text"]) for d in split) == sorted((d["id"], d["text"]) for d in whole.kept)
    assert not Augmenter(AugmentConfig()).enabled
    with pytest.raises(ValueError, match="noise_rate"):
        AugmentConfig(noise_rate=2.0)
