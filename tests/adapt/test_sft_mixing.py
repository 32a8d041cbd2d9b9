"""Multi-task mixtures (exact shares, determinism, even upsampling) and difficulty curricula."""
from __future__ import annotations

from collections import Counter

import pytest

from _sft_tiny import chat_rows, tokenizer
from lmstack.adapt.curriculum import CURRICULA, competence, difficulty_of, difficulty_profile, order_examples
from lmstack.adapt.mixing import group_by_task, mix_tasks, shares
from lmstack.adapt.sft import SFTExample, encode_rows
from lmstack.errors import LmstackError


def _tasks():
    return {"qa": [f"qa{i}" for i in range(10)], "math": [f"m{i}" for i in range(40)], "inst": [f"i{i}" for i in range(5)]}


def test_shares_add_up_and_follow_the_weights():
    counts = shares({"a": 1, "b": 1, "c": 1}, 10)
    assert sum(counts.values()) == 10 and sorted(counts.values()) == [3, 3, 4]
    assert shares({"a": 3, "b": 1}, 100) == {"a": 75, "b": 25}
    with pytest.raises(LmstackError, match="sum to 0"):
        shares({"a": 0}, 5)
    with pytest.raises(LmstackError, match=">= 0"):
        shares({"a": -1, "b": 2}, 5)


def test_mixture_is_deterministic_and_hits_the_target_counts():
    tasks = _tasks()
    mixed, counts = mix_tasks(tasks, {"qa": 2, "math": 1, "inst": 1}, total=400, seed=5)
    assert counts == {"qa": 200, "math": 100, "inst": 100} and len(mixed) == 400
    seen = Counter(x.rstrip("0123456789") for x in mixed)
    assert seen == {"qa": 200, "m": 100, "i": 100}
    again, _ = mix_tasks(tasks, {"qa": 2, "math": 1, "inst": 1}, total=400, seed=5)
    other, _ = mix_tasks(tasks, {"qa": 2, "math": 1, "inst": 1}, total=400, seed=6)
    assert mixed == again and mixed != other


def test_upsampling_repeats_evenly_and_downsampling_never_repeats():
    mixed, _ = mix_tasks(_tasks(), {"inst": 1, "math": 1}, total=46, seed=0)
    inst = Counter(x for x in mixed if x.startswith("i"))
    assert set(inst.values()) == {4, 5} and sum(inst.values()) == 23  # 23 draws of 5 items: 4 or 5 each
    math = Counter(x for x in mixed if x.startswith("m"))
    assert max(math.values()) == 1 and len(math) == 23
    assert not any(x.startswith("qa") for x in mixed)  # a task missing from the weights is left out


def test_natural_proportions_and_bad_weights():
    mixed, counts = mix_tasks(_tasks(), seed=0)
    assert counts == {"qa": 10, "math": 40, "inst": 5} and sorted(mixed) == sorted(sum(_tasks().values(), []))
    with pytest.raises(LmstackError, match="task 'code', which has no examples; tasks with examples: qa, math, inst"):
        mix_tasks(_tasks(), {"code": 1.0})


def test_group_by_task_on_examples():
    tok = tokenizer()
    examples, _ = encode_rows(tok, chat_rows()[:400])
    groups = group_by_task(examples)
    assert set(groups) >= {"qa", "arithmetic"} and sum(map(len, groups.values())) == len(examples)


def _graded(n=200):
    return [SFTExample([0, 1], [0, 1], "arithmetic", difficulty=1 + i % 5) for i in range(n)]


def test_curricula_order_by_difficulty():
    exs = _graded()
    easy = order_examples(exs, "easy_to_hard", seed=0)
    assert [difficulty_of(e) for e in easy] == sorted(difficulty_of(e) for e in exs)
    hard = order_examples(exs, "hard_to_easy", seed=0)
    assert [difficulty_of(e) for e in hard] == sorted((difficulty_of(e) for e in exs), reverse=True)
    rand = difficulty_profile(order_examples(exs, "random", seed=0))
    assert max(rand) - min(rand) < 1.0  # a shuffle has no trend
    comp = difficulty_profile(order_examples(exs, "competence", seed=0, length=1000))
    assert comp[0] < 1.6 and comp[-1] > 2.5 and comp == sorted(comp)
    staged = order_examples(exs, "staged", seed=0)
    assert len(staged) == 40 + 80 + 120 + 160 + 200 and max(difficulty_of(e) for e in staged[:40]) == 1
    assert order_examples(exs, "random", seed=1) == order_examples(exs, "random", seed=1)
    assert set(CURRICULA) == {"random", "easy_to_hard", "hard_to_easy", "staged", "competence"}
    with pytest.raises(LmstackError, match="curriculum 'zigzag' is not allowed"):
        order_examples(exs, "zigzag")


def test_competence_grows_from_c0_to_one_and_world_difficulty_survives_encoding():
    assert competence(0.0, 0.1) == pytest.approx(0.1) and competence(1.0) == 1.0
    assert competence(0.25) < competence(0.5) < competence(0.75)
    tok = tokenizer()
    rows = [r for r in chat_rows() if r["kind"] == "arithmetic"][:20]
    examples, _ = encode_rows(tok, rows, max_len=1000)
    assert [e.difficulty for e in examples] == [float(r["difficulty"]) for r in rows]
    plain, _ = encode_rows(tok, [r for r in chat_rows() if r["kind"] == "qa"][:3])
    assert all(difficulty_of(e) == e.n_learned > 0 for e in plain)  # no grade: the reply's length stands in
