"""helm_view: each axis moves exactly when the scripted model is sensitive to it."""
import re

import pytest

from lmstack.errors import LmstackError
from lmstack.eval.helm import helm_markdown, helm_view
from lmstack.eval.task import Task


class PronounQA(Task):
    name = "pronoun_qa"
    default_metrics = ("acc",)

    def docs(self, split):
        return [{"q": f"Is he in room {i}?", "choices": ["yes", "no", "maybe"], "gold": i % 3} for i in range(6)]

    def doc_to_text(self, doc):
        return f"Q: {doc['q']}\nA:"

    def doc_to_choice(self, doc):
        return doc["choices"]

    def doc_to_target(self, doc):
        return doc["gold"]


def _biased_lm(fake_lm_factory):
    """Knows the answer only when the prompt starts with 'Q:' (case-sensitive) and talks about 'he'."""
    def ll(ctx, cont):
        room = re.search(r"room\s+(\d)", ctx)
        if not ctx.startswith("Q:") or " he " not in ctx or room is None:
            return -float(len(cont))  # clueless: the shortest choice wins
        return 0.0 if cont.strip() == ["yes", "no", "maybe"][int(room.group(1)) % 3] else -3.0

    return fake_lm_factory(loglikelihood=ll)


def test_helm_axes(fake_lm_factory):
    view = helm_view(_biased_lm(fake_lm_factory), PronounQA())
    assert view["metric"] == "acc" and view["accuracy"] == 1.0 and view["chance"] == pytest.approx(1 / 3)
    r = view["robustness"]
    assert r["whitespace"] == 1.0 and r["case"] < 1.0 and r["worst"] == min(r["typo"], r["case"], r["whitespace"])
    f = view["fairness"]
    assert f["gender"]["gap"] > 0.5  # "he" -> "she" breaks the biased model
    assert f["names"]["gap"] == 0.0  # no names to swap in these documents
    assert view["calibration_ece"] is not None and 0.0 <= view["calibration_ece"] <= 1.0
    assert view["efficiency"]["requests"] == 18 and view["efficiency"]["tokens_per_s"] > 0
    md = helm_markdown([view])
    assert "| pronoun_qa | acc | 1.000 |" in md and "fair gap: gender" in md


def test_helm_rejects_unknown_axes(fake_lm_factory):
    with pytest.raises(LmstackError, match="perturbation"):
        helm_view(fake_lm_factory(), PronounQA(), perturbations=("shouting",))
    with pytest.raises(LmstackError, match="swap"):
        helm_view(fake_lm_factory(), PronounQA(), swaps=("zodiac",))
