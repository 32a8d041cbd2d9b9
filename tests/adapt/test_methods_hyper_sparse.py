"""HyperNetwork adaptation (one network writes LoRA weights per task) and sparse fine-tuning (chosen layers,
chosen MoE experts, adaptive layer freezing)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmstack.adapt import AdapterConfig, get_peft_model, trainable_report
from lmstack.adapt.hyper import count_hyper_params, use_task
from lmstack.adapt.sparse import FreezeSchedule, LayerFreezer, freeze_layers, merge_sparse
from lmstack.errors import LmstackError
from lmstack.model import Transformer
from lmstack.model.presets import preset

V, T = 64, 10


def tiny(family: str = "llama", seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)  # init_std 0.2: see test_methods.tiny
    kw = dict(vocab_size=V, d_model=32, n_layers=3, n_heads=4, max_seq_len=64, init_std=0.2)
    kw.update(overrides)
    return Transformer(preset(f"{family}-tiny", **kw)).eval()


def data(seed: int, b: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, V, (b, T + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def loss_of(model, idx, tgt) -> torch.Tensor:
    return F.cross_entropy(model(idx).flatten(0, 1), tgt.flatten()) + model.aux_loss


HYPER = dict(method="hyper", n_tasks=2, r=4, task_embedding_dim=8, target_modules=["q_proj", "v_proj"])


# ---- hypernetwork
def test_hyper_is_noop_at_init_and_counts():
    base = tiny()
    idx, _ = data(0)
    want = base(idx)
    model = get_peft_model(base, AdapterConfig(**HYPER))
    with use_task(model, 1):
        assert torch.equal(model(idx), want)
    shapes = [(32, 32), (32, 8)] * 3  # q_proj (32 -> 4 heads * 8), v_proj (32 -> 1 kv head * 8), 3 layers
    assert model.hyper.shapes == shapes
    assert trainable_report(model)["trainable"] == count_hyper_params(shapes, AdapterConfig(**HYPER))
    e, h, r = 8, 32, 4  # by hand: embeddings, trunk, one head pair per shape (32x32 and 32x8)
    assert count_hyper_params(shapes, AdapterConfig(**HYPER)) == (
        2 * e + 6 * e + 2 * e * h + h + (h * r * 32 + r * 32) * 2 + (h * 32 * r + 32 * r) + (h * 8 * r + 8 * r))
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"hyper"}


def test_hyper_serves_two_tasks_and_both_train():
    model = get_peft_model(tiny(), AdapterConfig(**HYPER))
    tasks = {0: data(1), 1: data(2)}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def task_losses() -> list[float]:
        out = []
        for t, (idx, tgt) in tasks.items():
            with use_task(model, t):
                out.append(loss_of(model, idx, tgt).item())
        return out

    before = task_losses()
    for step in range(40):
        t = step % 2
        with use_task(model, t):
            loss = loss_of(model, *tasks[t])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = task_losses()
    assert after[0] < 0.85 * before[0] and after[1] < 0.85 * before[1], (before, after)
    idx = tasks[0][0]
    with use_task(model, 0):
        out0 = model(idx)
    with use_task(model, 1):
        out1 = model(idx)
    assert (out0 - out1).abs().max() > 1e-2  # same input, different task -> different output
    # one batch with a task per row equals the two single-task runs
    with use_task(model, torch.tensor([0, 1, 1, 0])):
        mixed = model(idx)
    torch.testing.assert_close(mixed[[0, 3]], out0[[0, 3]], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[[1, 2]], out1[[1, 2]], rtol=1e-4, atol=1e-4)


def test_hyper_bad_task_ids():
    model = get_peft_model(tiny(), AdapterConfig(**HYPER))
    with use_task(model, 2), pytest.raises(LmstackError, match="n_tasks=2"):
        model(data(0)[0])
    with pytest.raises(LmstackError, match="match no"):
        get_peft_model(tiny(), AdapterConfig(**{**HYPER, "target_modules": ["nope_proj"]}))


# ---- sparse: chosen layers
def test_sparse_layers_train_only_those_blocks():
    model = get_peft_model(tiny(), AdapterConfig(method="sparse", layers_to_train=[0, 2], freeze_first_n=1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("blocks.2.") for n in trainable)
    assert trainable_report(model)["trainable"] == sum(p.numel() for p in model.blocks[2].parameters())
    idx, tgt = data(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = loss_of(model, idx, tgt).item()
    for _ in range(20):
        loss = loss_of(model, idx, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_of(model, idx, tgt).item() < 0.85 * first
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in trainable), n


def test_sparse_bad_layers():
    with pytest.raises(LmstackError, match="layers_to_train"):
        get_peft_model(tiny(), AdapterConfig(method="sparse", layers_to_train=[5]))
    with pytest.raises(LmstackError, match="train nothing"):
        get_peft_model(tiny(), AdapterConfig(method="sparse", layers_to_train=[0], freeze_first_n=1))
    with pytest.raises(LmstackError, match="no MoE"):
        get_peft_model(tiny(), AdapterConfig(method="sparse", experts_to_train=[0]))


# ---- sparse: chosen experts
def test_sparse_experts_train_only_chosen_experts():
    base = tiny("mixtral")  # 4 experts per layer, every layer MoE
    idx, tgt = data(0)
    want = base(idx)
    model = get_peft_model(base, AdapterConfig(method="sparse", experts_to_train=[1, 3], layers_to_train=[0, 1]))
    assert torch.equal(model(idx), want)  # deltas start at zero
    moe = model.blocks[0].mlp
    w_in, w_out = moe.w_in.detach().clone(), moe.w_out.detach().clone()
    per_expert = w_in[0].numel() + w_out[0].numel()
    assert trainable_report(model)["trainable"] == 2 * 2 * per_expert  # 2 experts x 2 layers
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    first = loss_of(model, idx, tgt).item()
    for _ in range(15):
        loss = loss_of(model, idx, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_of(model, idx, tgt).item() < first
    changed = [not torch.equal(moe.w_in[e], w_in[e]) for e in range(4)]
    assert changed == [False, True, False, True]
    assert torch.equal(model.blocks[2].mlp.w_in, tiny("mixtral").blocks[2].mlp.w_in)  # block 2 untouched
    out = model(idx)
    merge_sparse(model)
    torch.testing.assert_close(model(idx), out)
    assert "blocks.0.mlp.w_in" in model.state_dict() and trainable_report(model)["trainable"] == 0


def test_sparse_bad_experts():
    with pytest.raises(LmstackError, match="experts_to_train"):
        get_peft_model(tiny("mixtral"), AdapterConfig(method="sparse", experts_to_train=[9]))


# ---- adaptive freezing
def test_freeze_schedule_ramps_up():
    s = FreezeSchedule(total_steps=100, max_frozen=3, start_frac=0.2, end_frac=0.8)
    got = [s.n_frozen(i) for i in (0, 19, 20, 39, 40, 60, 79, 80, 99)]
    assert got == [0, 0, 1, 1, 2, 3, 3, 3, 3]
    with pytest.raises(LmstackError, match="start_frac"):
        FreezeSchedule(total_steps=10, max_frozen=1, start_frac=0.9, end_frac=0.5)


def test_layer_freezer_stops_backward_below_frozen_blocks():
    model = tiny()
    freezer = LayerFreezer(model, FreezeSchedule(total_steps=10, max_frozen=2, start_frac=0.0, end_frac=0.5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx, tgt = data(0)
    for step in range(10):
        n = freezer.step(step)
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        loss = loss_of(model, idx, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for name, p in model.named_parameters():
            frozen = any(name.startswith(f"blocks.{i}.") for i in range(n)) or name == "tok_emb.weight"
            if frozen and n:
                assert p.grad is None and torch.equal(p, before[name]), (step, name)
    assert n == 2 and not any(p.requires_grad for p in model.blocks[1].parameters())
    assert all(p.requires_grad for p in model.blocks[2].parameters())
    with pytest.raises(LmstackError, match="cannot freeze"):
        freeze_layers(model, 4)
