"""Continual learning's held-out score items appear in neither the replay buffer nor the Fisher set."""
from __future__ import annotations

import random

import pytest

from lmstack.adapt.continual import continual_sets, holdout_split
from lmstack.adapt.sft import SFTExample
from lmstack.errors import LmstackError


def _examples(n: int = 300, dup_every: int = 7) -> list[SFTExample]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        ids = [1] + [rng.randrange(2, 50) for _ in range(rng.randrange(3, 9))]
        out.append(SFTExample(ids=ids, mask=[0] + [1] * (len(ids) - 1), task="qa"))
        if i % dup_every == 0:  # the same conversation twice, as repeated facts in a corpus are
            out.append(SFTExample(ids=list(ids), mask=[0] + [1] * (len(ids) - 1), task="qa"))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heldout_items_are_in_neither_the_fisher_set_nor_the_replay_buffer(seed):
    items = _examples()
    sets = continual_sets(items, n_heldout=60, n_fisher=100, replay_capacity=80, seed=seed)
    key = lambda e: tuple(e.ids)  # noqa: E731
    held = {key(e) for e in sets.heldout}
    assert len(sets.heldout) >= 60 and len(sets.fisher) == 100 and len(sets.replay) == 80
    assert not held & {key(e) for e in sets.fisher}
    assert not held & {key(e) for e in sets.replay.items}
    assert not held & {key(e) for e in sets.rest}  # duplicates went to one side together
    assert len(sets.heldout) + len(sets.rest) == len(items)
    # replay keeps drawing only from the rest: sampling many times never yields a held-out item
    assert not held & {key(e) for e in sets.replay.sample(500)}


def test_a_naive_split_would_leak_duplicates():
    """Why the split goes by content: a split by position puts one copy in each side."""
    items = _examples()
    naive_held, naive_rest = items[::2], items[1::2]  # by position: the two copies sit side by side
    leaked = {tuple(e.ids) for e in naive_held} & {tuple(e.ids) for e in naive_rest}
    assert leaked
    rest, held = holdout_split(items, 61, seed=0)
    assert not {tuple(e.ids) for e in held} & {tuple(e.ids) for e in rest}


def test_bad_sizes_are_refused():
    with pytest.raises(LmstackError, match="n_heldout=5"):
        holdout_split([1, 2, 3], 5)
