"""AdapterFusion: a one-hot attention reproduces that single adapter exactly, only the fusion weights train,
training the fusion lowers the loss, and saved `lmstack finetune --method adapter` folders load as sources."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmstack.adapt import AdapterConfig, add_adapter, get_peft_model, set_adapter, trainable_report
from lmstack.adapt.fusion import count_fusion_params, fusion_slots
from lmstack.errors import LmstackError
from lmstack.model import Transformer
from lmstack.model.presets import preset

V = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("llama-tiny", vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                              init_std=0.2)).eval()


def data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, V, (4, 13), generator=g)
    return seq[:, :-1], seq[:, 1:]


def with_trained_adapters(names=("a", "b", "c")) -> Transformer:
    """A frozen base with three bottleneck adapters whose up-projections are random (so each one differs)."""
    model = tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    for i, name in enumerate(names):
        add_adapter(model, AdapterConfig(method="adapter", bottleneck_dim=8), name)
        torch.manual_seed(10 + i)
        for n, p in model.named_parameters():
            if f".adapters.{name}.up." in n:
                with torch.no_grad():
                    p.normal_(std=0.5)
    return model


def test_one_hot_attention_reproduces_each_single_adapter():
    model = with_trained_adapters()
    add_adapter(model, AdapterConfig(method="fusion", fusion_adapters=["a", "b", "c"]), "fusion")
    idx, _ = data()
    for j, name in enumerate(["a", "b", "c"]):
        set_adapter(model, name)
        single = model(idx)
        set_adapter(model, "fusion")
        for slot in fusion_slots(model):
            slot.force = F.one_hot(torch.tensor(j), 3).float()
        fused = model(idx)
        assert torch.allclose(fused, single, atol=1e-5), (name, (fused - single).abs().max())
    # the three adapters really differ, so matching each one is not a coincidence
    set_adapter(model, "a")
    out_a = model(idx)
    set_adapter(model, "b")
    assert (model(idx) - out_a).abs().max() > 1e-2


def test_only_fusion_weights_train_and_loss_falls():
    model = with_trained_adapters()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_adapter(model, AdapterConfig(method="fusion", fusion_adapters=["a", "b", "c"]), "fusion")
    set_adapter(model, "fusion")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".fusions.fusion." in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == count_fusion_params(32, 2)
    idx, tgt = data()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(25):
        loss = F.cross_entropy(model(idx).flatten(0, 1), tgt.flatten())
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.05
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # base and source adapters untouched
    model.eval()
    model(idx)
    att = fusion_slots(model)[0].last_attention
    assert att.shape[-1] == 3 and torch.allclose(att.sum(-1), torch.ones(att.shape[:-1]), atol=1e-5)


def test_fusion_loads_saved_adapter_folders(tmp_path):
    from lmstack.adapt.finetune import save_trainable

    dirs = []
    for i in range(2):
        m = get_peft_model(tiny(), AdapterConfig(method="adapter", bottleneck_dim=8))
        torch.manual_seed(20 + i)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if p.requires_grad:
                    p.normal_(std=0.3)
        dirs.append(save_trainable(m, m.adapter_configs["default"], tmp_path / f"ad{i}", "base"))
        if i == 0:
            idx, _ = data()
            ref0 = m(idx)
    model = get_peft_model(tiny(), AdapterConfig(method="fusion", fusion_adapters=[str(d) for d in dirs]))
    assert trainable_report(model)["trainable"] == count_fusion_params(32, 2)
    for slot in fusion_slots(model):
        slot.force = torch.tensor([1.0, 0.0])
    assert torch.allclose(model(idx), ref0, atol=1e-5)  # the first folder's adapter, as it was trained


def test_fusion_errors_name_the_problem(tmp_path):
    model = tiny()
    with pytest.raises(LmstackError, match="at least 2"):
        get_peft_model(model, AdapterConfig(method="fusion", fusion_adapters=["x"]))
    with pytest.raises(LmstackError, match="neither an adapter on the model"):
        get_peft_model(tiny(), AdapterConfig(method="fusion", fusion_adapters=["nope", str(tmp_path / "missing")]))
    m = tiny()
    add_adapter(m, AdapterConfig(method="ia3"), "i")
    add_adapter(m, AdapterConfig(method="adapter"), "a")
    with pytest.raises(LmstackError, match="bottleneck adapters"):
        add_adapter(m, AdapterConfig(method="fusion", fusion_adapters=["i", "a"]), "f")
