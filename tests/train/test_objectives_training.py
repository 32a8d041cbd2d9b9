"""Each objective trains: a tiny model's held-out loss falls over 30 AdamW steps on a learnable toy corpus."""
import pytest
import torch

from lmstack.model import ModelConfig, Transformer
from lmstack.train.objectives import OBJECTIVES, ObjectiveConfig, build_objective

V = 128
DEC = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
ENC = DEC.replace(causal=False)


def progressions(g: torch.Generator, b: int = 16, t: int = 33) -> torch.Tensor:
    """Rows of arithmetic progressions mod 40 (ids 4..43): every token follows from the two before it,
    and masked or missing tokens follow from their neighbours."""
    start = torch.randint(0, 40, (b, 1), generator=g)
    step = torch.randint(1, 4, (b, 1), generator=g)
    return 4 + (start + step * torch.arange(t)) % 40


def held_out_loss(obj, model, seed=123):
    model.eval()
    with torch.no_grad():
        tokens = progressions(torch.Generator().manual_seed(seed), b=32)
        batch = obj.prepare(tokens, torch.Generator().manual_seed(seed))
        loss, metrics = obj.loss(model, batch)
    model.train()
    return loss.item(), metrics


def train(obj, model, steps=30, lr=3e-3, seed=0):
    opt = torch.optim.AdamW(list(model.parameters()) + obj.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        loss, _ = obj.loss(model, obj.prepare(progressions(g), g))
        opt.zero_grad()
        loss.backward()
        opt.step()


CASES = {
    "clm": (DEC, {}),
    "mlm": (ENC, {}),
    "span": (DEC, {}),
    "prefix_lm": (DEC, {}),
    "electra": (ENC, {}),
    "ul2": (DEC, {"ul2_mode_tokens": True}),
    "clm+inverse_freq": (DEC, {"token_weighting": "inverse_freq"}),
    "clm+focal": (DEC, {"token_weighting": "focal"}),
    "span+contrastive": (DEC, {"contrastive_weight": 0.5}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_decreases_in_30_steps(case):
    torch.manual_seed(0)
    mcfg, extra = CASES[case]
    obj = build_objective(ObjectiveConfig(name=case.split("+")[0], n_sentinels=20, **extra), mcfg)
    model = Transformer(mcfg)
    before, m0 = held_out_loss(obj, model)
    train(obj, model)
    after, m1 = held_out_loss(obj, model)
    assert after < 0.85 * before, (case, before, after)
    if case == "electra":
        assert m1["disc_loss"] < m0["disc_loss"] and m1["gen_loss"] < m0["gen_loss"]


def test_contrastive_loss_decreases():
    torch.manual_seed(0)
    obj = build_objective(ObjectiveConfig(name="clm", contrastive_weight=1.0), DEC)
    model = Transformer(DEC)
    _, m0 = held_out_loss(obj, model)
    train(obj, model)
    _, m1 = held_out_loss(obj, model)
    assert m1["contrastive_loss"] < 0.8 * m0["contrastive_loss"] and m1["contrastive_acc"] > m0["contrastive_acc"]


def test_distillation_student_learns_from_a_trained_teacher():
    torch.manual_seed(0)
    teacher = Transformer(DEC)
    train(build_objective(ObjectiveConfig(name="clm"), DEC), teacher, steps=60, seed=1)
    obj = OBJECTIVES["distill"](ObjectiveConfig(name="distill", distill_alpha=0.5), DEC, teacher=teacher)
    student = Transformer(DEC.replace(n_layers=1))
    before, m0 = held_out_loss(obj, student)
    train(obj, student)
    after, m1 = held_out_loss(obj, student)
    assert after < 0.85 * before and m1["kl"] < 0.5 * m0["kl"] and m1["ce"] < m0["ce"]
    assert m1["teacher_ce"] == pytest.approx(m0["teacher_ce"])  # the teacher never moves
