"""DoReMi-style adaptive data sampling: the mixed loader's domain proportions follow the weights (fixed or
changing), it resumes exactly, the hook moves weight towards the domain with the highest excess loss over the
reference, and pretraining runs with `data.adaptive` switched on."""
from __future__ import annotations

import copy
import json
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from lmstack.data.document import make_doc
from lmstack.data.loader import DomainMixLoader, LoaderConfig, TokenLoader
from lmstack.data.mixing import AdaptiveConfig, AdaptiveWeights, DoReMi
from lmstack.data.shards import ShardConfig, write_shards
from lmstack.errors import LmstackError

ALPHABETS = {"a": "abcd ", "b": "efgh ", "c": "ijkl "}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Three shard sets whose texts use disjoint letters, so every token tells its domain."""
    rng = random.Random(0)
    out = {}
    for name, letters in ALPHABETS.items():
        texts = ["".join(rng.choice(letters) for _ in range(rng.randint(10, 60))) for _ in range(80)]
        d = tmp_path_factory.mktemp(f"dom_{name}")
        write_shards([make_doc(t, str(i), name) for i, t in enumerate(texts)], d, ShardConfig(docs_per_shard=40))
        out[name] = str(d)
    return out


def domain_of_row(row: torch.Tensor) -> str:
    letters = {chr(t) for t in row.tolist() if t < 256 and chr(t) != " "}
    found = [k for k, a in ALPHABETS.items() if letters and letters <= set(a)]
    assert len(found) == 1, letters
    return found[0]


def test_sampled_proportions_follow_fixed_and_changing_weights(domains):
    target = {"a": 0.6, "b": 0.3, "c": 0.1}
    loader = DomainMixLoader(domains, LoaderConfig(batch_size=8, seq_len=32, seed=1), target)
    counts = Counter()
    for _ in range(250):  # 2,000 rows
        x, _ = next(loader)
        for row, name in zip(x, loader.last_domains):
            assert domain_of_row(row) == name  # rows never mix domains and are labelled truly
            counts[name] += 1
    for k, p in target.items():
        assert abs(counts[k] / 2000 - p) < 0.03, (k, counts)
    # an AdaptiveWeights object is read at every batch: after it moves, the proportions move with it
    aw = AdaptiveWeights(list(domains), lr=1.0, smoothing=0.0)
    loader = DomainMixLoader(domains, LoaderConfig(batch_size=8, seq_len=32, seed=2), aw)
    aw.update({"a": 0.0, "b": 0.0, "c": 2.0}, {"a": 0.0, "b": 0.0, "c": 0.0})  # c: e^2 / (2 + e^2) = 0.787
    drawn = Counter(name for _ in range(150) for name in (next(loader), loader.last_domains)[1])
    assert abs(drawn["c"] / 1200 - aw.weights["c"]) < 0.04 and aw.weights["c"] == pytest.approx(0.787, abs=1e-3)


def test_mixed_loader_resumes_exactly_and_checks_weights(domains):
    cfg = LoaderConfig(batch_size=4, seq_len=24, seed=3, doc_ids=True)
    one = DomainMixLoader(domains, cfg, {"a": 1, "b": 1, "c": 2})
    for _ in range(7):
        next(one)
    state = json.loads(json.dumps(one.state_dict()))  # plain JSON, as in a checkpoint
    want = [next(one) for _ in range(5)]
    two = DomainMixLoader(domains, cfg, {"a": 1, "b": 1, "c": 2})
    two.load_state_dict(state)
    got = [next(two) for _ in range(5)]
    assert all(torch.equal(u, v) for a, b in zip(want, got) for u, v in zip(a, b))
    with pytest.raises(LmstackError, match="domain weights name"):
        DomainMixLoader(domains, cfg, {"a": 1, "b": 1})


def _tiny_model(seed: int):
    from lmstack.model import Transformer
    from lmstack.model.presets import preset

    torch.manual_seed(seed)
    return Transformer(preset("llama-tiny", vocab_size=258, d_model=32, n_layers=1, n_heads=2, max_seq_len=64))


def _train(model, loader, steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x, y = next(loader)[:2]
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_weights_move_towards_the_domain_with_highest_excess_loss(domains):
    cfg = LoaderConfig(batch_size=8, seq_len=32, seed=4)
    start = _tiny_model(0)
    # the reference saw every domain; the model being trained never saw domain c (it is under-trained there)
    reference = _train(copy.deepcopy(start), DomainMixLoader(domains, cfg, {"a": 1, "b": 1, "c": 1}), 40)
    model = _train(copy.deepcopy(start), DomainMixLoader(domains, cfg, {"a": 1, "b": 1, "c": 0}), 40)
    aw = AdaptiveWeights(list(domains), lr=1.0, smoothing=1e-3)
    probes = {k: TokenLoader(v, LoaderConfig(batch_size=4, seq_len=32, seed=9)) for k, v in domains.items()}
    hook = DoReMi(AdaptiveConfig(update_every=1), aw, probes, reference)
    ex, loss_model, loss_ref = hook.excess(model, torch.device("cpu"))
    assert max(ex, key=ex.get) == "c" and ex["c"] > 0.5, ex
    assert loss_model["c"] > loss_ref["c"]

    class T:  # what the hook reads from the Trainer
        step, raw, device = 1, model, torch.device("cpu")

    before = aw.weights
    metrics = hook.after_step(T)
    after = aw.weights
    assert after["c"] > before["c"] and max(after, key=after.get) == "c"
    assert metrics["domain_weight_c"] == pytest.approx(after["c"]) and "excess_loss_c" in metrics
    assert sum(after.values()) == pytest.approx(1.0)
    # an identical model has no excess anywhere: the weights stay where they are
    same = DoReMi(AdaptiveConfig(update_every=1), AdaptiveWeights(list(domains)), probes, copy.deepcopy(model))
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in same.excess(model, torch.device("cpu"))[0].values())


def test_pretrain_with_adaptive_data_updates_weights_and_saves_them(domains, tmp_path):
    from lmstack.model.hf_io import save_model
    from lmstack.train.pretrain import DataConfig, PretrainConfig, pretrain
    from lmstack.train.config import TrainConfig

    ref_dir = save_model(_tiny_model(5), tmp_path / "ref")
    model_cfg = _tiny_model(0).config
    cfg = PretrainConfig(
        out=str(tmp_path / "run"), model=model_cfg,
        train=TrainConfig(steps=6, eval_every=0, log_every=2, progress=False, device="cpu", threads=1),
        data=DataConfig(batch_size=4, seq_len=32, adaptive=AdaptiveConfig(
            enabled=True, domains=domains, reference=str(ref_dir), update_every=2, step_size=0.5, probe_rows=2)))
    summary = pretrain(cfg, log=lambda m: None)
    assert summary["steps"] == 6
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    weights = [r for r in rows if "domain_weight_a" in r]
    assert len(weights) == 3
    w = weights[-1]
    assert sum(w[f"domain_weight_{k}"] for k in "abc") == pytest.approx(1.0)
    assert any(abs(w[f"domain_weight_{k}"] - 1 / 3) > 1e-3 for k in "abc")  # the weights moved
    with pytest.raises(ValueError, match="reference"):
        AdaptiveConfig(enabled=True, domains=domains)
