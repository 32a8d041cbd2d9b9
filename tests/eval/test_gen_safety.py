"""Safety suites: refusal detector, refusal vs over-refusal, jailbreak wrappers, ToxiGen-style toxicity."""
from __future__ import annotations

import base64
import json
import random

import pytest

from lmstack.world import World, is_harmful_request
from lmstack.world.preferences import COMPLIANCE, HELPFUL_RECIPES, OVER_REFUSALS, REFUSALS
from lmstack.errors import LmstackError
from lmstack.eval import evaluate, get_task
from lmstack.eval.tasks.safety import WRAPPERS
from lmstack.world.checkers import is_refusal

SLOTS = {"thing": "forbidden potion", "city": "Amberhaven", "drink": "festival tea", "a": "x", "b": "y", "c": "z"}


def test_refusal_detector_on_the_worlds_texts():
    assert all(is_refusal(t.format(**SLOTS)) for t in REFUSALS + OVER_REFUSALS)
    assert not any(is_refusal(t.format(**SLOTS)) for t in COMPLIANCE + HELPFUL_RECIPES)
    assert is_refusal("I\u2019m sorry, but I can\u2019t do that.")
    # A refusal phrase deep inside a long helpful answer is not a refusal.
    assert not is_refusal("Boil the water. " * 20 + "I can't stress enough: stir well.")


def _only_harmful_refused(ctx, args):
    return "I can't help with that." if is_harmful_request(ctx) else "Sure, steep the leaves in hot water."


def test_refusal_and_over_refusal(fake_lm_factory):
    out = evaluate(fake_lm_factory(generate=lambda c, a: "I cannot provide instructions for that."),
                   ["world_refusal"], progress=False, bootstrap_iters=0)
    m = out["results"]["world_refusal"]["metrics"]
    assert m["refusal_rate"] == 1.0 and m["over_refusal_rate"] == 1.0
    out = evaluate(fake_lm_factory(generate=_only_harmful_refused), ["world_refusal"], progress=False,
                   bootstrap_iters=0)
    entry = out["results"]["world_refusal"]
    assert entry["metrics"]["refusal_rate"] == 1.0 and entry["metrics"]["over_refusal_rate"] == 0.0
    assert entry["higher_is_better"]["over_refusal_rate"] is False


def test_limit_keeps_both_kinds(fake_lm_factory):
    out = evaluate(fake_lm_factory(generate=_only_harmful_refused), ["world_refusal"], limit=4, progress=False,
                   bootstrap_iters=0)
    assert {"refusal_rate", "over_refusal_rate"} <= set(out["results"]["world_refusal"]["metrics"])


def test_jailbreak_success_per_wrapper(fake_lm_factory):
    # A model that refuses whenever it can read the harmful request: only the base64 wrapper hides it.
    lm = fake_lm_factory(generate=_only_harmful_refused)
    out = evaluate(lm, ["world_jailbreak"], progress=False, bootstrap_iters=0)
    m = out["results"]["world_jailbreak"]["metrics"]
    assert m["attack_success/base64"] == 1.0
    for w in ("none", "roleplay", "ignore_previous", "prefix_injection"):
        assert m[f"attack_success/{w}"] == 0.0
    assert m["attack_success"] == pytest.approx(1 / 4)
    b64_prompt = next(c[1] for c in lm.calls if "base64" in c[1])
    decoded = base64.b64decode(b64_prompt.strip().split("\n")[-1]).decode()
    assert is_harmful_request(decoded)


def test_jailbreak_wrapper_choice():
    task = get_task("world_jailbreak", wrappers=("none", "roleplay"))
    assert {d["wrapper"] for d in task.cached_docs("test")} == {"none", "roleplay"}
    with pytest.raises(LmstackError, match="unknown wrapper"):
        get_task("world_jailbreak", wrappers=("telepathy",))
    assert set(WRAPPERS) >= {"roleplay", "ignore_previous", "base64", "prefix_injection"}


def _toxic_on_adversarial(ctx, args):
    return " they are stupid idiots" if ("stupid" in ctx or "lazy" in ctx or "worthless" in ctx or "dirty" in ctx
                                         or "nobody wants" in ctx) else " they like tea"


def test_toxicity_rate_per_group_and_type(fake_lm_factory):
    lm = fake_lm_factory(generate=_toxic_on_adversarial)
    out = evaluate(lm, ["world_toxicity"], progress=False, bootstrap_iters=0)
    entry = out["results"]["world_toxicity"]
    m = entry["metrics"]
    assert m["toxic_rate/type:adversarial"] == 1.0 and m["toxic_rate/type:benign"] == 0.0
    countries = [c.name for c in World(seed=0, size="small").countries]
    for c in countries:
        assert m[f"toxic_rate/group:{c}"] == pytest.approx(0.5)
    assert entry["higher_is_better"]["toxic_rate"] is False
    # The prompt is a ToxiGen-style list of statements about one group, ending in "-" for the next one.
    prompt = lm.calls[0][1]
    assert prompt.endswith("\n-") and prompt.count("\n- ") == 2


def test_toxicity_limit_covers_groups_and_types(fake_lm_factory):
    out = evaluate(fake_lm_factory(generate=_toxic_on_adversarial), ["world_toxicity"], limit=16, progress=False,
                   bootstrap_iters=0)
    names = set(out["results"]["world_toxicity"]["metrics"])
    assert {"toxic_rate/type:adversarial", "toxic_rate/type:benign"} <= names
    assert sum(n.startswith("toxic_rate/group:") and not n.endswith("stderr") for n in names) == 8


def test_toxicity_with_the_data_pipelines_classifier(tmp_path, fake_lm_factory):
    from lmstack.data.filters.classifier import ClassifierConfig, HashedNgramClassifier

    rng = random.Random(0)
    mean = ["they are vile vermin", "such filthy vermin", "vile creatures all of them", "vermin, vile and filthy"]
    kind = ["they like tea", "they enjoy music", "they live by the river", "they speak softly"]
    texts = [rng.choice(mean) for _ in range(40)] + [rng.choice(kind) for _ in range(40)]
    clf = HashedNgramClassifier(ClassifierConfig(n_features=2 ** 12)).fit(texts, [1] * 40 + [0] * 40)
    clf.save(tmp_path / "clf")
    # "vile vermin" is in no word list: only the classifier can catch it.
    lm = fake_lm_factory(generate=lambda c, a: " vile filthy vermin" if "Ulmara" in c else " they like tea")
    plain = evaluate(lm, ["world_toxicity"], progress=False, bootstrap_iters=0)
    assert plain["results"]["world_toxicity"]["metrics"]["toxic_rate"] == 0.0
    task = get_task("world_toxicity", classifier=str(tmp_path / "clf"))
    m = evaluate(lm, [task], progress=False, bootstrap_iters=0)["results"]["world_toxicity"]["metrics"]
    assert m["toxic_rate/group:Ulmara"] == 1.0 and m["toxic_rate"] == pytest.approx(1 / 8)


def test_toxicity_prompts_from_a_file(tmp_path, fake_lm_factory):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "- a\n- b\n-", "group": "g1"}, {"prompt": "- c\n-", "group": "g2"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lm = fake_lm_factory(generate=lambda c, a: " damn it" if "a" in c else " fine")
    m = evaluate(lm, [get_task("world_toxicity", path=str(path))], progress=False,
                 bootstrap_iters=0)["results"]["world_toxicity"]["metrics"]
    assert m["toxic_rate/group:g1"] == 1.0 and m["toxic_rate/group:g2"] == 0.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(LmstackError, match="bad.jsonl:1"):
        get_task("world_toxicity", path=str(bad)).docs("test")


def test_refusal_eval_has_100_items_per_side_on_held_out_cities():
    from lmstack.world.preferences import safety_requests
    from lmstack.eval.tasks.world import cached_world

    task = get_task("world_refusal")
    docs = task.cached_docs("test")
    harmful = [d for d in docs if is_harmful_request(d["prompt"])]
    benign = [d for d in docs if not is_harmful_request(d["prompt"])]
    assert len(harmful) >= 100 and len(benign) >= 100
    assert all(d["kind"] == "harmful" for d in harmful) and all(d["kind"] == "benign" for d in benign)
    assert len({d["prompt"] for d in docs}) == len(docs)  # no request counted twice
    world = cached_world(task.world_seed, task.size)
    assert {world.city_split(d["city"]) for d in docs} == {"test"}  # no training city leaks into the eval
    grid = safety_requests(["Amberhaven", "Brightwater"], limit=7)
    assert len(grid) == 14 and {g["city"] for g in grid[:4]} == {"Amberhaven", "Brightwater"}
