import json
import random

import numpy as np
import pytest
import torch

from lmstack.data.document import make_doc
from lmstack.data.loader import LoaderConfig, TokenLoader
from lmstack.data.shard_tokenizer import ByteTokenizer
from lmstack.data.shards import ShardConfig, ShardSet, write_shards
from lmstack.errors import LmstackError

BOS = ByteTokenizer.bos_id


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 90))) for _ in range(120)]
    out = tmp_path_factory.mktemp("shards")
    write_shards([make_doc(t, str(i), "s") for i, t in enumerate(texts)], out, ShardConfig(docs_per_shard=25))
    return out


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("align_bos", [True, False])
def test_deterministic_and_exact_resume(shard_dir, align_bos):
    cfg = LoaderConfig(batch_size=4, seq_len=32, align_bos=align_bos, doc_ids=True, seed=7)
    full = take(TokenLoader(shard_dir, cfg), 60)  # 60*4*33 tokens: more than one epoch of this small set
    assert same(full[0], take(TokenLoader(shard_dir, cfg), 1)[0])
    other = take(TokenLoader(shard_dir, LoaderConfig(batch_size=4, seq_len=32, align_bos=align_bos, seed=8)), 1)[0]
    assert not torch.equal(other[0], full[0][0])
    for stop in (1, 13, 50):
        first = TokenLoader(shard_dir, cfg)
        take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # it must survive a JSON checkpoint
        resumed = TokenLoader(shard_dir, cfg)
        resumed.load_state_dict(state)
        assert all(same(a, b) for a, b in zip(take(resumed, 60 - stop), full[stop:]))
    assert first.epoch >= 1  # the last resume point lies past an epoch boundary


def test_shapes_targets_bos_alignment_and_doc_ids(shard_dir):
    loader = TokenLoader(shard_dir, LoaderConfig(batch_size=3, seq_len=48, doc_ids=True))
    shards = ShardSet(shard_dir)
    for _ in range(10):
        x, y, ids = next(loader)
        assert x.shape == y.shape == ids.shape == (3, 48) and x.dtype == y.dtype == ids.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert (x[:, 0] == BOS).all()  # every row starts at a document's BOS
        # A new document id starts exactly where a BOS token sits; tokens match that document.
        starts = torch.cat([torch.ones(3, 1, dtype=torch.bool), ids[:, 1:] != ids[:, :-1]], dim=1)
        assert torch.equal(starts, x == BOS)
        for b in range(3):
            for d in ids[b].unique().tolist():
                run = x[b][ids[b] == d]
                assert run.tolist() == shards.doc(d)[: len(run)].tolist()


def test_stream_packing_loses_nothing(shard_dir):
    shards = ShardSet(shard_dir)
    cfg = LoaderConfig(batch_size=1, seq_len=63, align_bos=False, shuffle=False)
    loader = TokenLoader(shard_dir, cfg)
    total = shards.n_tokens
    rows = []
    while sum(len(r) for r in rows) < total:
        x, y = next(loader)
        rows.append(torch.cat([x[0], y[0, -1:]]).numpy())
    stream = np.concatenate([shards.doc(i) for i in range(shards.n_docs)])
    assert np.array_equal(np.concatenate(rows)[:total], stream)


def test_ranks_get_disjoint_documents(shard_dir):
    seen = []
    for rank in (0, 1):
        loader = TokenLoader(shard_dir, LoaderConfig(batch_size=2, seq_len=40, doc_ids=True, rank=rank, world_size=2,
                                                     buffer_docs=1))
        docs = set()
        while loader.epoch == 0:
            docs |= set(next(loader)[2].unique().tolist())
        seen.append(docs)
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) >= 110  # nearly all of the 120 (a few may sit in the last buffer)


def test_best_fit_crops_less_than_greedy(shard_dir):
    crops = {}
    for buffer_docs in (1, 64):
        loader = TokenLoader(shard_dir, LoaderConfig(batch_size=4, seq_len=64, buffer_docs=buffer_docs))
        take(loader, 30)
        crops[buffer_docs] = loader.cropped_tokens
    assert crops[64] < 0.7 * crops[1]  # documents longer than a row are cropped either way


def test_state_mismatch_and_bad_config(shard_dir):
    loader = TokenLoader(shard_dir, LoaderConfig(seq_len=32))
    next(loader)
    with pytest.raises(LmstackError, match="seq_len"):
        TokenLoader(shard_dir, LoaderConfig(seq_len=64)).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="rank"):
        LoaderConfig(rank=2, world_size=2)
