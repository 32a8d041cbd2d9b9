"""Objectives build the right inputs, targets and masks (small hand-checkable cases), and fail clearly."""
import math

import pytest
import torch
from torch import nn

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.train.objectives import OBJECTIVES, ObjectiveConfig, build_objective
from lmstack.train.objectives.base import pack_rows
from lmstack.train.objectives.prefix_lm import prefix_row
from lmstack.train.objectives.span import corrupt, fit_source_length, noise_mask, reconstruct, span_counts

V = 128
DEC = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
ENC = DEC.replace(causal=False)
SENT = [V - 2 - i for i in range(20)]  # mask = V - 1, sentinel_i = mask - 1 - i


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand_tokens(b, t, seed=0, high=60):
    return torch.randint(4, high, (b, t), generator=gen(seed))


# ---------------------------------------------------------------- config and registry
def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ConfigError, match="objective.name='bert'.*clm"):
        ObjectiveConfig(name="bert")
    with pytest.raises(ConfigError, match="mask_prob"):
        ObjectiveConfig(mask_prob=1.5)
    with pytest.raises(ConfigError, match="ul2_weights"):
        ObjectiveConfig(ul2_weights=[1.0, 1.0])
    with pytest.raises(ConfigError, match="unknown key 'mask_rate'"):
        ObjectiveConfig.from_dict({"mask_rate": 0.2})
    assert ObjectiveConfig.from_dict(ObjectiveConfig(name="span").to_dict()).name == "span"


def test_registry_covers_every_name():
    from typing import get_args

    from lmstack.train.objectives.config import ObjectiveName

    assert set(OBJECTIVES) == set(get_args(ObjectiveName))


def test_objectives_refuse_the_wrong_attention():
    with pytest.raises(ConfigError, match="causal=false"):
        build_objective(ObjectiveConfig(name="mlm"), DEC)
    with pytest.raises(ConfigError, match="causal=false"):
        build_objective(ObjectiveConfig(name="electra"), DEC)
    for name in ("clm", "span", "prefix_lm", "ul2"):
        with pytest.raises(ConfigError, match="causal=true"):
            build_objective(ObjectiveConfig(name=name), ENC)
    with pytest.raises(LmstackError, match="head='mlm' or 'lm'"):
        build_objective(ObjectiveConfig(name="mlm"), ENC.replace(head="none"))
    with pytest.raises(ConfigError, match="contrastive_weight"):
        build_objective(ObjectiveConfig(name="mlm", contrastive_weight=0.1), ENC)


def test_bad_tokens_are_reported():
    obj = build_objective(ObjectiveConfig(), DEC)
    with pytest.raises(LmstackError, match="vocab_size=128"):
        obj.prepare(torch.tensor([[1, 2, 500]]), gen())
    with pytest.raises(LmstackError, match="integer tensor"):
        obj.prepare(torch.tensor([1, 2, 3]), gen())
    with pytest.raises(LmstackError, match="too short"):
        build_objective(ObjectiveConfig(name="span"), DEC).prepare(torch.tensor([[5, 6, 7]]), gen())


# ---------------------------------------------------------------- CLM
def test_clm_shifts_tokens_and_masks_pad_targets():
    obj = build_objective(ObjectiveConfig(name="clm"), DEC, pad_id=0)
    tokens = torch.tensor([[5, 6, 7, 8, 0]])
    doc = torch.tensor([[0, 0, 1, 1, 1]])
    b = obj.prepare(tokens, gen(), doc_ids=doc)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8]]
    assert b["targets"].tolist() == [[6, 7, 8, 0]]
    assert b["loss_mask"].tolist() == [[True, True, True, False]]
    assert b["doc_ids"].tolist() == [[0, 0, 1, 1]]  # (B, T+1) doc ids are cut to the T inputs


# ---------------------------------------------------------------- MLM
def test_mlm_chooses_exact_counts_never_bos_or_pad():
    cfg = ENC.replace(bos_token_id=1)
    obj = build_objective(ObjectiveConfig(name="mlm", mask_prob=0.15), cfg, pad_id=0)
    tokens = rand_tokens(6, 41)
    tokens[:, 0] = 1           # bos
    tokens[3, 30:] = 0         # padding at the end of row 3
    b = obj.prepare(tokens, gen())
    chosen = b["loss_mask"]
    original = tokens[:, :-1]
    assert not chosen[:, 0].any() and not chosen[original == 0].any()
    assert chosen.sum(1).tolist() == [round(0.15 * 39)] * 3 + [round(0.15 * 29)] + [round(0.15 * 39)] * 2
    assert torch.equal(b["targets"], original)
    assert torch.equal(b["input_ids"][~chosen], original[~chosen])   # untouched elsewhere
    assert b["attention_mask"][3].tolist() == [True] * 30 + [False] * 10


def test_mlm_80_10_10():
    obj = build_objective(ObjectiveConfig(name="mlm", mask_prob=0.5), ENC)
    tokens = torch.randint(0, V - 1, (64, 257), generator=gen(1))
    b = obj.prepare(tokens, gen(2))
    chosen, inp, orig = b["loss_mask"], b["input_ids"], b["targets"]
    n = chosen.sum().item()
    masked = (chosen & (inp == V - 1)).sum().item() / n
    kept = (chosen & (inp == orig)).sum().item() / n
    random = (chosen & (inp != orig) & (inp != V - 1)).sum().item() / n
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(random - 0.1) < 0.015
    assert int(inp.max()) < V


# ---------------------------------------------------------------- span corruption
def test_span_corruption_hand_example():
    seq = torch.arange(10, 18)
    mask = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    inputs, targets = corrupt(seq, mask, [99, 98, 97])
    assert inputs.tolist() == [10, 99, 13, 14, 98, 16, 17]
    assert targets.tolist() == [99, 11, 12, 98, 15, 97]
    assert reconstruct(inputs, targets, [99, 98, 97]).tolist() == seq.tolist()


@pytest.mark.parametrize("density,mean", [(0.15, 3.0), (0.5, 3.0), (0.15, 8.0), (0.5, 64.0), (0.3, 1.0)])
def test_spans_plus_sentinels_reconstruct_the_original_exactly(density, mean):
    g = gen(3)
    for length in (8, 31, 100):
        seq = torch.randint(0, 100, (length,), generator=g)
        mask = noise_mask(length, density, mean, g)
        n_noise, k = span_counts(length, density, mean)
        starts = int((mask & ~torch.cat((torch.tensor([False]), mask[:-1]))).sum())
        assert int(mask.sum()) == n_noise and starts == k
        sentinels = list(range(1000, 1060))  # ids no source token uses
        inputs, targets = corrupt(seq, mask, sentinels)
        assert len(inputs) == length - n_noise + k and len(targets) == n_noise + k + 1
        assert torch.equal(reconstruct(inputs, targets, sentinels), seq)


def test_single_spans_land_anywhere():
    """With one span per row (short rows), the span must not always sit at the end (T5's layout would)."""
    g = gen(8)
    masks = torch.stack([noise_mask(20, 0.15, 8.0, g) for _ in range(200)])
    assert span_counts(20, 0.15, 8.0) == (3, 1)
    assert masks[:, 0].any() and masks[:, -1].any() and not masks[:, -1].all()
    assert masks[:, 5:15].any(1).float().mean() > 0.3


def test_span_batch_layout_is_inputs_then_targets_with_prefix():
    obj = build_objective(ObjectiveConfig(name="span", n_sentinels=20), DEC, pad_id=0)
    tokens = rand_tokens(4, 33)
    b = obj.prepare(tokens, gen(5))
    s = fit_source_length(33, 0.15, 3.0)
    _, k = span_counts(s, 0.15, 3.0)
    for r in range(4):
        p, n = int(b["prefix_len"][r]), int(b["lengths"][r])
        assert n == s + 2 * k  # s + 2k + 1 tokens, read as n inputs + 1 shifted
        full = torch.cat((b["input_ids"][r, :n], b["targets"][r, n - 1:n]))
        assert torch.equal(full[1:], b["targets"][r, :n])
        assert torch.equal(reconstruct(full[:p], full[p:], SENT), tokens[r, :s])
        assert int(full[p]) == SENT[0] and int(full[-1]) == SENT[k]
        assert b["loss_mask"][r].tolist() == [False] * (p - 1) + [True] * (n - p + 1) + [False] * (32 - n)


def test_sentinel_budget_is_checked():
    with pytest.raises(ConfigError, match="n_sentinels"):
        build_objective(ObjectiveConfig(name="span", n_sentinels=200), DEC)
    with pytest.raises(ConfigError, match="overlap mask_token_id"):
        build_objective(ObjectiveConfig(name="span", mask_token_id=3, first_sentinel_id=10, n_sentinels=10), DEC)
    obj = build_objective(ObjectiveConfig(name="span", n_sentinels=2, noise_density=0.5, mean_span=1.0), DEC)
    with pytest.raises(LmstackError, match="n_sentinels=2"):
        obj.prepare(rand_tokens(1, 33), gen())


def test_sentinels_and_mode_tokens_can_live_anywhere_the_tokenizer_reserves():
    cfg = ObjectiveConfig(name="ul2", mask_token_id=3, first_sentinel_id=127, n_sentinels=10, ul2_mode_tokens=True)
    obj = build_objective(cfg, DEC)
    assert obj.sentinels == list(range(127, 117, -1)) and obj.mode_ids == [117, 116, 115]
    assert obj.prepare(rand_tokens(2, 33), gen())["input_ids"].max() <= 127


def test_reserved_ids_in_the_data_are_refused():
    tokens = rand_tokens(2, 33)
    tokens[1, 7] = SENT[3]
    with pytest.raises(LmstackError, match=f"contains id {SENT[3]}.*reserve"):
        build_objective(ObjectiveConfig(name="span", n_sentinels=20), DEC).prepare(tokens, gen())
    tokens[1, 7] = V - 1
    with pytest.raises(LmstackError, match=f"contains id {V - 1}"):
        build_objective(ObjectiveConfig(name="mlm"), ENC).prepare(tokens, gen())
    build_objective(ObjectiveConfig(name="clm"), DEC).prepare(tokens, gen())  # CLM reserves nothing
    pad = build_objective(ObjectiveConfig(name="mlm"), ENC, pad_id=V - 1)     # the pad id is allowed
    pad.prepare(tokens, gen())


# ---------------------------------------------------------------- prefix LM
def test_prefix_lm_split_and_loss_mask():
    obj = build_objective(ObjectiveConfig(name="prefix_lm"), DEC)
    tokens = rand_tokens(64, 17)
    b = obj.prepare(tokens, gen(7))
    p = b["prefix_len"]
    assert int(p.min()) >= 1 and int(p.max()) <= 15 and len(set(p.tolist())) > 5
    assert torch.equal(b["input_ids"], tokens[:, :-1]) and torch.equal(b["targets"], tokens[:, 1:])
    pos = torch.arange(16)[None]
    assert torch.equal(b["loss_mask"], pos >= p[:, None] - 1)


def test_pack_rows_hand_example():
    rows = [(torch.tensor([5, 6, 7, 8, 9]), 2), (torch.tensor([5, 6, 7]), 1)]
    b = pack_rows(rows, 4, fill=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [5, 6, 0, 0]]
    assert b["targets"].tolist() == [[6, 7, 8, 9], [6, 7, 0, 0]]
    assert b["loss_mask"].tolist() == [[False, True, True, True], [True, True, False, False]]
    assert b["prefix_len"].tolist() == [2, 1] and b["lengths"].tolist() == [4, 2]


@pytest.mark.parametrize("name", ["prefix_lm", "span"])
def test_scored_positions_cannot_see_their_target(name):
    """Changing the token a scored position predicts leaves that position's logits unchanged; for the
    excluded prefix positions it does not (that is why they are excluded)."""
    torch.manual_seed(0)
    model = Transformer(DEC).eval()
    obj = build_objective(ObjectiveConfig(name=name, n_sentinels=20), DEC)
    b = obj.prepare(rand_tokens(1, 33), gen(11))
    p = int(b["prefix_len"][0])
    assert p >= 3
    with torch.no_grad():
        base = model(b["input_ids"], prefix_len=b["prefix_len"])
        for t in (p - 1, p + 1):  # scored positions: their target sits at input t + 1
            x = b["input_ids"].clone()
            x[0, t + 1] = (x[0, t + 1] + 1) % 60
            assert torch.allclose(model(x, prefix_len=b["prefix_len"])[0, t], base[0, t], atol=1e-6)
        x = b["input_ids"].clone()
        x[0, 1] = (x[0, 1] + 1) % 60          # position 0 is unscored: it sees input 1 through the prefix
        assert not torch.allclose(model(x, prefix_len=b["prefix_len"])[0, 0], base[0, 0], atol=1e-6)
    assert not b["loss_mask"][0, : p - 1].any() and b["loss_mask"][0, p - 1]


# ---------------------------------------------------------------- UL2
def test_ul2_mixes_paradigms_by_weight_with_mode_tokens():
    cfg = ObjectiveConfig(name="ul2", n_sentinels=20, ul2_weights=[0.5, 0.3, 0.2], ul2_mode_tokens=True)
    obj = build_objective(cfg, DEC)
    modes_ids = [V - 1 - 20 - 1 - j for j in range(3)]
    assert obj.mode_ids == modes_ids
    b = obj.prepare(rand_tokens(400, 65), gen(4))
    share = torch.bincount(b["mode"], minlength=3).float() / 400
    assert torch.allclose(share, torch.tensor([0.5, 0.3, 0.2]), atol=0.07)
    assert torch.equal(b["input_ids"][:, 0], torch.tensor(modes_ids)[b["mode"]])
    s_rows = b["mode"] == 1
    assert (b["lengths"][s_rows] == 64).all() and (b["prefix_len"][s_rows] >= 2).all()
    # R/X rows are span corruption after the mode token: the closing sentinel ends each row
    for r in torch.nonzero(~s_rows).squeeze(1)[:20].tolist():
        n = int(b["lengths"][r])
        assert int(b["targets"][r, n - 1]) in SENT
    metrics = obj.loss(Transformer(DEC), obj.prepare(rand_tokens(16, 65), gen(5)))[1]
    assert {"ce_R", "ce_S", "ce_X"} <= set(metrics)


def test_ul2_per_batch_draws_one_denoiser():
    obj = build_objective(ObjectiveConfig(name="ul2", n_sentinels=20, ul2_per_row=False), DEC)
    for seed in range(5):
        b = obj.prepare(rand_tokens(8, 65), gen(seed))
        assert len(set(b["mode"].tolist())) == 1 and len(set(b["lengths"].tolist())) == 1


# ---------------------------------------------------------------- ELECTRA
def test_electra_generator_shape_and_inverse_cdf_sampler():
    from lmstack.train.objectives.electra import sample_inverse_cdf

    obj = build_objective(ObjectiveConfig(name="electra"), ENC)
    g = obj.generator.config
    assert (g.d_model, g.n_heads, g.n_layers, g.causal, g.vocab_size) == (16, 2, 2, False, V)
    params = obj.parameters()
    assert len(params) == len(list(obj.generator.parameters())) + 2   # + the head's weight and bias
    logits = torch.log(torch.tensor([[0.25, 0.25, 0.5]])).expand(3, 3)
    assert sample_inverse_cdf(logits, torch.tensor([0.1, 0.3, 0.6])).tolist() == [0, 1, 2]


class Spy(nn.Module):
    """Records the ids each forward sees."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen, self.config = model, [], model.config

    def forward(self, idx, **kw):
        self.seen.append(idx.clone())
        return self.model(idx, **kw)


def test_electra_replaces_masked_tokens_with_generator_samples():
    obj = build_objective(ObjectiveConfig(name="electra", mask_prob=0.3), ENC)
    tokens = rand_tokens(4, 33)
    b = obj.prepare(tokens, gen(3))
    chosen = b["loss_mask"]
    assert torch.equal(b["input_ids"][chosen], torch.full((int(chosen.sum()),), V - 1))
    disc = Spy(Transformer(ENC)).train()
    loss, m = obj.loss(disc, b)
    seen = disc.seen[0]
    assert torch.equal(seen[~chosen], tokens[:, :-1][~chosen])            # unchosen: original
    assert (seen[chosen] != V - 1).float().mean() > 0.9                   # chosen: generator samples
    assert m["replaced_frac"] == pytest.approx(float((seen != tokens[:, :-1]).float().mean()))
    assert loss.item() == pytest.approx(m["gen_loss"] + 50.0 * m["disc_loss"], rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in obj.parameters())


def test_electra_state_round_trip():
    a = build_objective(ObjectiveConfig(name="electra"), ENC)
    b = build_objective(ObjectiveConfig(name="electra", init_seed=5), ENC)
    x = rand_tokens(2, 9)[:, :-1]
    assert not torch.equal(a.generator(x), b.generator(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.generator(x), b.generator(x))
    with pytest.raises(LmstackError, match="unknown entry"):
        b.load_state_dict({"bogus": torch.zeros(1)})


# ---------------------------------------------------------------- distillation
class Fixed(nn.Module):
    """A 'model' that returns fixed logits (so the loss can be checked by hand)."""

    def __init__(self, logits, trainable=True):
        super().__init__()
        self.logits = nn.Parameter(logits.clone(), requires_grad=trainable)

    def forward(self, idx, **kw):
        return self.logits


def test_distillation_uses_its_base_objectives_batches():
    tokens = rand_tokens(3, 17)
    for base, mcfg in (("clm", DEC), ("prefix_lm", DEC), ("mlm", ENC)):
        cfg = ObjectiveConfig(name="distill", distill_base=base)
        obj = OBJECTIVES["distill"](cfg, mcfg, teacher=Transformer(mcfg))
        ref = OBJECTIVES[base](cfg, mcfg)
        a, b = obj.prepare(tokens, gen(4)), ref.prepare(tokens, gen(4))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_matches_hand_computation():
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    t = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]]])
    cfg3 = DEC.replace(vocab_size=3)
    obj = OBJECTIVES["distill"](ObjectiveConfig(name="distill", distill_temperature=2.0, distill_alpha=0.3),
                                cfg3, teacher=Fixed(t, trainable=False))
    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "targets": torch.tensor([[0, 2]]),
             "loss_mask": torch.tensor([[True, True]])}
    loss, m = obj.loss(Fixed(s), batch)

    def softmax(xs):
        e = [math.exp(x) for x in xs]
        return [v / sum(e) for v in e]

    ce = [-math.log(softmax(s[0, 0].tolist())[0]), -math.log(softmax(s[0, 1].tolist())[2])]
    kl = []
    for i in range(2):
        pt = softmax([x / 2 for x in t[0, i].tolist()])
        ps = softmax([x / 2 for x in s[0, i].tolist()])
        kl.append(sum(a * math.log(a / b) for a, b in zip(pt, ps)))
    expect = 0.3 * sum(ce) / 2 + 0.7 * 4 * sum(kl) / 2
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    assert m["kl"] == pytest.approx(sum(kl) / 2, rel=1e-5)


def test_distillation_teacher_is_frozen_and_checked(tmp_path):
    from lmstack.model.hf_io import save_model

    teacher = Transformer(DEC)
    save_model(teacher, tmp_path / "teacher")
    obj = build_objective(ObjectiveConfig(name="distill", teacher=str(tmp_path / "teacher")), DEC)
    assert not obj.teacher.training and not any(p.requires_grad for p in obj.teacher.parameters())
    assert obj.parameters() == []
    student = Transformer(DEC).train()
    loss, m = obj.loss(student, obj.prepare(rand_tokens(2, 17), gen()))
    loss.backward()
    assert not obj.teacher.training and m["teacher_ce"] > 0
    with pytest.raises(ConfigError, match="objective.teacher"):
        build_objective(ObjectiveConfig(name="distill"), DEC)
    with pytest.raises(LmstackError, match="vocab_size=128 differs"):
        build_objective(ObjectiveConfig(name="distill", teacher=str(tmp_path / "teacher")),
                        DEC.replace(vocab_size=64))


# ---------------------------------------------------------------- contrastive
def test_info_nce_prefers_aligned_pairs():
    from lmstack.train.objectives import info_nce

    q = torch.randn(8, 16, generator=gen(0))
    k = q + 0.1 * torch.randn(8, 16, generator=gen(1))
    aligned, acc = info_nce(q, k, 0.1)
    shuffled, acc_s = info_nce(q, k[torch.roll(torch.arange(8), 1)], 0.1)
    assert float(aligned) < 0.1 < 2.0 < float(shuffled)
    assert float(acc) == 1.0 and float(acc_s) == 0.0
    none, _ = info_nce(q, k, 0.1, valid_q=torch.zeros(8, dtype=torch.bool))
    assert float(none) == 0.0


def test_contrastive_regions():
    from lmstack.train.objectives.contrastive import regions

    ids = torch.ones(2, 8, dtype=torch.long)
    prefix, cont = regions({"input_ids": ids}, 0.5, None)
    assert prefix[0].tolist() == [True] * 4 + [False] * 4 and cont[0].tolist() == [False] * 4 + [True] * 4
    batch = {"input_ids": ids, "prefix_len": torch.tensor([2, 5]), "lengths": torch.tensor([6, 8]),
             "doc_ids": torch.tensor([[0] * 8, [0, 0, 1, 1, 1, 1, 1, 2]])}
    prefix, cont = regions(batch, 0.5, None)
    assert prefix.tolist() == [[True, True] + [False] * 6, [False, False, True, True, True] + [False] * 3]
    assert cont.tolist() == [[False, False, True, True, True, True, False, False],
                             [False] * 5 + [True, True, False]]


def test_contrastive_wrapper_adds_weighted_infonce():
    torch.manual_seed(0)
    model = Transformer(DEC)
    plain = build_objective(ObjectiveConfig(name="clm"), DEC)
    obj = build_objective(ObjectiveConfig(name="clm", contrastive_weight=0.5), DEC)
    b = obj.prepare(rand_tokens(4, 17), gen())
    loss, m = obj.loss(model, b)
    base, _ = plain.loss(model, b)
    assert loss.item() == pytest.approx(base.item() + 0.5 * m["contrastive_loss"], rel=1e-5)
    assert len(obj.parameters()) == 4 and "contrastive.query.weight" in obj.state_dict()


# ---------------------------------------------------------------- token weighting
def test_inverse_frequency_weights_by_hand():
    from lmstack.train.objectives.token_weighting import InverseFrequency

    w = InverseFrequency(ObjectiveConfig(token_weight_temperature=1.0, token_freq_decay=0.5,
                                         token_weight_max=100.0), 4)
    w.counts = torch.tensor([5.0, 1.0, 1.0, 1.0])  # smoothed freqs 6/12, 2/12, 2/12, 2/12
    out = w.weights(torch.tensor([0, 1]), torch.zeros(2))
    assert out.tolist() == pytest.approx([0.5, 1.5])     # 1/freq = 2 and 6, normalised to mean 1
    assert w.counts.tolist() == pytest.approx([3.5, 1.5, 0.5, 0.5])  # decay, then this batch's counts
    capped = InverseFrequency(ObjectiveConfig(token_weight_temperature=1.0, token_weight_max=1.2), 4)
    capped.counts = torch.tensor([5.0, 1.0, 1.0, 1.0])
    assert capped.weights(torch.tensor([0, 1]), torch.zeros(2)).tolist() == pytest.approx([0.5, 1.2])


def test_focal_weights_by_hand():
    from lmstack.train.objectives.token_weighting import Focal

    ce = torch.tensor([-math.log(0.9), -math.log(0.5)])
    raw = [(1 - 0.9) ** 2, (1 - 0.5) ** 2]
    out = Focal(ObjectiveConfig(focal_gamma=2.0), 4).weights(torch.tensor([0, 1]), ce)
    assert out.tolist() == pytest.approx([r / (sum(raw) / 2) for r in raw], rel=1e-5)


def test_token_weighting_only_while_training_and_state_round_trips():
    torch.manual_seed(0)
    model = Transformer(DEC)
    obj = build_objective(ObjectiveConfig(token_weighting="inverse_freq"), DEC)
    b = obj.prepare(rand_tokens(4, 17, high=10), gen())
    for _ in range(3):
        loss, m = obj.loss(model.train(), b)
    assert loss.item() != pytest.approx(m["ce"], rel=1e-4)  # weighted while training
    loss, m = obj.loss(model.eval(), b)
    assert loss.item() == pytest.approx(m["ce"], rel=1e-6)  # plain CE for validation
    fresh = build_objective(ObjectiveConfig(token_weighting="inverse_freq"), DEC)
    fresh.load_state_dict(obj.state_dict())
    assert torch.equal(fresh.weighting.counts, obj.weighting.counts) and obj.weighting.counts.sum() > 0


# ---------------------------------------------------------------- shared guarantees
CASES = [("clm", DEC, {}), ("mlm", ENC, {}), ("span", DEC, {}), ("prefix_lm", DEC, {}), ("electra", ENC, {}),
         ("ul2", DEC, {"ul2_mode_tokens": True}), ("clm", DEC, {"contrastive_weight": 1.0}),
         ("clm", DEC, {"token_weighting": "inverse_freq"}), ("span", DEC, {"token_weighting": "focal"})]


@pytest.mark.parametrize("name,mcfg,extra", CASES)
def test_all_padding_batch_gives_zero_loss_not_nan(name, mcfg, extra):
    obj = build_objective(ObjectiveConfig(name=name, n_sentinels=20, **extra), mcfg, pad_id=0)
    model = Transformer(mcfg).train()
    b = obj.prepare(torch.zeros(3, 33, dtype=torch.long), gen())
    loss, m = obj.loss(model, b)
    assert loss.item() == 0.0 and m["n_tokens"] == 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_distill_all_padding_gives_zero_loss():
    obj = OBJECTIVES["distill"](ObjectiveConfig(name="distill"), DEC, pad_id=0, teacher=Transformer(DEC))
    loss, m = obj.loss(Transformer(DEC), obj.prepare(torch.zeros(2, 9, dtype=torch.long), gen()))
    assert loss.item() == 0.0 and m["n_tokens"] == 0


@pytest.mark.parametrize("name,mcfg,extra", CASES)
def test_prepare_is_deterministic_given_the_generator(name, mcfg, extra):
    obj = build_objective(ObjectiveConfig(name=name, n_sentinels=20, **extra), mcfg)
    tokens = rand_tokens(4, 33)
    a, b, c = obj.prepare(tokens, gen(9)), obj.prepare(tokens, gen(9)), obj.prepare(tokens, gen(10))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    random = name != "clm" or "contrastive_weight" in extra  # plain CLM draws nothing
    assert any(not torch.equal(a[k], c[k]) for k in a) == random


@pytest.mark.parametrize("extra", [{}, {"head": "mlm", "norm": "layernorm", "causal": False},
                                   {"final_logit_softcap": 5.0, "tie_embeddings": True}])
def test_scored_logits_match_full_logits(extra):
    from lmstack.train.objectives.base import scored_logits

    cfg = DEC.replace(**extra)
    model = Transformer(cfg)
    x = rand_tokens(3, 16)
    mask = torch.rand(3, 16, generator=gen()) < 0.3
    fast = scored_logits(model, x, mask, {})          # head on the masked positions only

    class Wrapped(nn.Module):                         # any wrapper takes the generic path
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, idx, **kw):
            return self.inner(idx, **kw)

    assert torch.allclose(fast, scored_logits(Wrapped(), x, mask, {}), atol=1e-5)
    assert torch.allclose(fast, model(x)[mask], atol=1e-5) and fast.shape == (int(mask.sum()), V)


def test_moe_aux_loss_is_added():
    moe = DEC.replace(n_experts=4, moe_top_k=2, router_aux_loss_coef=0.5)
    model = Transformer(moe)
    obj = build_objective(ObjectiveConfig(), moe)
    loss, m = obj.loss(model, obj.prepare(rand_tokens(2, 17), gen()))
    assert m["aux_loss"] > 0.1 and loss.item() == pytest.approx(m["ce"] + m["aux_loss"], rel=1e-5)


def test_prefix_row_with_lead_token_keeps_it_in_the_prefix():
    full, p = prefix_row(torch.arange(10, 19), gen(), lead=[99])
    assert full.tolist() == [99, *range(10, 18)] and 2 <= p <= 7
