"""Several named adapters on one base (switch, disable, delete, weighted combination) and the learned router."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmstack.adapt import (AdapterConfig, add_adapter, add_weighted_adapter, delete_adapter, disable_adapters,
                           get_peft_model, merge_adapter, set_adapter, trainable_report)
from lmstack.adapt.lora import adapter_layers
from lmstack.adapt.router import AdapterRouter
from lmstack.errors import LmstackError

from _lora_tiny import X, make_tiny, train_like


def two_adapters(model):
    get_peft_model(model, AdapterConfig(r=2, target_modules=["q_proj", "v_proj"]), "a")
    add_adapter(model, AdapterConfig(r=3, alpha=4.0, target_modules=["v_proj", "down_proj"]), "b")
    train_like(model, seed=1)
    return model


def test_switch_disable_delete(tiny_model):
    base = tiny_model(X)
    two_adapters(tiny_model)
    out_a = tiny_model(X)  # "a" is active: the first adapter added
    set_adapter(tiny_model, "b")
    out_b = tiny_model(X)
    set_adapter(tiny_model, ["a", "b"])
    out_ab = tiny_model(X)
    assert (out_a - out_b).abs().max() > 0.1 and (out_ab - out_a).abs().max() > 0.1
    with disable_adapters(tiny_model):
        torch.testing.assert_close(tiny_model(X), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiny_model(X), out_ab, atol=1e-6, rtol=0)  # back after the block
    with pytest.raises(LmstackError, match="'c'"):
        set_adapter(tiny_model, "c")
    delete_adapter(tiny_model, "a")
    assert "a" not in tiny_model.adapter_configs
    assert not any(".a." in k for k in tiny_model.state_dict())
    torch.testing.assert_close(tiny_model(X), out_b, atol=1e-6, rtol=0)
    merge_adapter(tiny_model)
    with pytest.raises(LmstackError, match="unmerge"):
        with disable_adapters(tiny_model):
            pass


def test_weighted_combination_is_the_weighted_sum_of_updates(tiny_model):
    two_adapters(tiny_model)
    add_weighted_adapter(tiny_model, ["a", "b"], [0.7, -0.3], "mix")
    for name, layer in adapter_layers(tiny_model).items():
        expect = sum(w * layer.delta_weight(n) for n, w in (("a", 0.7), ("b", -0.3)) if n in layer.kind)
        torch.testing.assert_close(layer.delta_weight("mix"), expect, atol=1e-6, rtol=0)
    assert tiny_model.blocks[0].attn.v_proj.lora_A["mix"].weight.shape[0] == 5  # "cat": ranks add up
    set_adapter(tiny_model, ["a", "b"])
    both = tiny_model(X)
    add_weighted_adapter(tiny_model, ["a", "b"], [1.0, 1.0], "sum")
    set_adapter(tiny_model, "sum")
    torch.testing.assert_close(tiny_model(X), both, atol=1e-5, rtol=0)


def test_svd_combination_is_the_best_low_rank_approximation(tiny_model):
    two_adapters(tiny_model)
    add_weighted_adapter(tiny_model, ["a", "b"], [0.5, 0.5], "svd", combination="svd")
    layer = tiny_model.blocks[1].attn.v_proj  # both adapters here: combined rank 5, kept rank 3
    target = 0.5 * layer.delta_weight("a") + 0.5 * layer.delta_weight("b")
    s = torch.linalg.svdvals(target.detach())
    err = (layer.delta_weight("svd") - target).norm().item()
    assert layer.lora_A["svd"].weight.shape[0] == 3
    assert err == pytest.approx(s[3:].norm().item(), rel=1e-3, abs=1e-5)  # Eckart-Young
    with pytest.raises(LmstackError, match="combination"):
        add_weighted_adapter(tiny_model, ["a"], [1.0], "x", combination="ties")
    with pytest.raises(LmstackError, match="one weight per adapter"):
        add_weighted_adapter(tiny_model, ["a", "b"], [1.0], "y")


# ---- learned router: two synthetic tasks, each on its own half of the vocabulary
def task_batch(task: int, n: int = 8, t: int = 6, seed: int = 0, any_input: bool = False):
    """Task 0 answers token 5 to inputs from tokens 0..47, task 1 answers 90 to inputs from 48..95."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 96, (n, t), generator=g) if any_input else torch.randint(0, 48, (n, t), generator=g) + 48 * task
    return x, torch.full_like(x, 5 if task == 0 else 90)


def test_router_learns_to_route_each_task_to_its_adapter():
    model = make_tiny()
    # A pretrained model's embeddings encode which domain a token is from; a random one does not, so give the
    # two halves of the vocabulary one distinguishing feature (otherwise the gate must memorise 96 tokens).
    with torch.no_grad():
        model.tok_emb.weight[:48, 0] += 1.0
        model.tok_emb.weight[48:, 0] -= 1.0
    targets = ["v_proj", "o_proj", "up_proj", "down_proj"]
    get_peft_model(model, AdapterConfig(r=4, alpha=8, target_modules=targets), "t0")
    add_adapter(model, AdapterConfig(r=4, alpha=8, target_modules=targets), "t1")
    for task, name in enumerate(("t0", "t1")):  # each adapter learns its task's answer (on any input)
        set_adapter(model, name)
        opt = torch.optim.AdamW([p for n, p in model.named_parameters() if f".{name}." in n], lr=5e-2)
        for step in range(8):
            x, y = task_batch(task, seed=step, any_input=True)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in model.parameters():
        p.requires_grad_(False)
    router = AdapterRouter(model, ["t0", "t1"], hidden=16)
    assert trainable_report(router)["trainable"] == 32 * 16 + 16 + 16 * 2 + 2  # the gate alone
    opt = torch.optim.AdamW(router.parameters(), lr=0.05)
    losses = []
    for step in range(10):
        (x0, y0), (x1, y1) = task_batch(0, seed=100 + step), task_batch(1, seed=200 + step)
        x, y = torch.cat([x0, x1]), torch.cat([y0, y1])
        loss = F.cross_entropy(router(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        (x0, _), (x1, _) = task_batch(0, seed=999), task_batch(1, seed=998)
        w0, w1 = router.weights(x0), router.weights(x1)
    assert w0[:, 0].mean() > 0.8 and w1[:, 1].mean() > 0.8, (w0.mean(0), w1.mean(0))
    assert losses[-1] < 0.5 * losses[0]
    assert all(layer.mixture is None for layer in adapter_layers(model).values())  # nothing left behind


def test_router_errors(tiny_model):
    two_adapters(tiny_model)
    with pytest.raises(LmstackError, match="at least two"):
        AdapterRouter(tiny_model, ["a"])
    with pytest.raises(LmstackError, match="zz"):
        AdapterRouter(tiny_model, ["a", "zz"])
