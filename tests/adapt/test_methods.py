"""Prefix tuning, prompt tuning, Houlsby adapters and IA3: no-op (or exact reference) at init, only their
parameters train, a few steps lower the loss, and the trainable count matches a hand count."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmstack.adapt import AdapterConfig, get_peft_model, trainable_report
from lmstack.adapt.ia3 import merge_ia3
from lmstack.adapt.prefix import count_prefix_params
from lmstack.errors import LmstackError
from lmstack.model import Transformer
from lmstack.model.presets import preset

V, T = 64, 12


def tiny(seed: int = 0, **overrides) -> Transformer:
    # init_std 0.2 instead of 0.02: a random model with 0.02 weights has logits within about +-0.6 after its
    # final norm, so no small adapter can move them far; larger weights behave more like a trained base.
    torch.manual_seed(seed)
    kw = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.2)
    kw.update(overrides)
    return Transformer(preset("llama-tiny", **kw)).eval()


def batch(seed: int = 1, b: int = 4, t: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, V, (b, t + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def loss_of(model, idx, tgt) -> torch.Tensor:
    return F.cross_entropy(model(idx).flatten(0, 1), tgt.flatten())


def train(model, steps: int = 30, lr: float = 1e-2) -> tuple[float, float]:
    idx, tgt = batch()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    first = None
    for _ in range(steps):
        loss = loss_of(model, idx, tgt)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, loss_of(model, idx, tgt).item()


# Few parameters want larger steps (as in practice: ~1e-2 for prompts and IA3, ~1e-3..1e-2 for adapters).
LR = {"prefix": 0.1, "prefix_proj": 1e-2, "prompt": 5e-2, "adapter": 1e-2, "ia3": 5e-2}
METHOD_MARKERS = {"prefix": "prefix_tuning.", "prompt": "prompt_tuning.", "adapter": "adapters_", "ia3": ".ia3."}
CONFIGS = {
    "prefix": dict(method="prefix", num_virtual_tokens=4),
    "prefix_proj": dict(method="prefix", num_virtual_tokens=4, prefix_projection=True, prefix_hidden=16),
    "prompt": dict(method="prompt", num_virtual_tokens=4),
    "adapter": dict(method="adapter", bottleneck_dim=8),
    "ia3": dict(method="ia3"),
}


def hand_count(key: str, model: Transformer) -> int:
    c = model.config
    kv = c.n_kv_heads * c.head_dim
    if key == "prefix":
        return c.n_layers * 2 * kv * 4
    if key == "prefix_proj":
        return 4 * c.d_model + c.d_model * 16 + 16 + 16 * c.n_layers * 2 * kv + c.n_layers * 2 * kv
    if key == "prompt":
        return 4 * c.d_model
    if key == "adapter":  # per block: two adapters of down (d*8 + 8) and up (8*d + d)
        return c.n_layers * 2 * (c.d_model * 8 + 8 + 8 * c.d_model + c.d_model)
    return c.n_layers * (2 * kv + c.d_ff)  # ia3: l_k, l_v, l_ff


@pytest.mark.parametrize("key", list(CONFIGS))
def test_only_method_params_train_and_count_matches(key):
    model = get_peft_model(tiny(), AdapterConfig(**CONFIGS[key]))
    marker = METHOD_MARKERS[CONFIGS[key]["method"]]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(marker in n for n in trainable), trainable
    assert trainable_report(model)["trainable"] == hand_count(key, model)
    if key.startswith("prefix"):
        assert hand_count(key, model) == count_prefix_params(model.config, AdapterConfig(**CONFIGS[key]))
    loss_of(model, *batch()).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_training_lowers_loss(key):
    model = get_peft_model(tiny(), AdapterConfig(**CONFIGS[key]))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    first, last = train(model, lr=LR[key])
    assert last < 0.85 * first, (first, last)
    for n, p in model.named_parameters():  # the frozen base never moves
        if n in base:
            assert torch.equal(p, base[n]), n


@pytest.mark.parametrize("key", ["adapter", "ia3"])
def test_new_adapter_is_exact_noop(key):
    base = tiny()
    idx, _ = batch()
    want = base(idx)
    model = get_peft_model(base, AdapterConfig(**CONFIGS[key]))
    assert torch.equal(model(idx), want)


def test_prefix_equals_a_prefilled_kv_cache():
    """Prefix tuning is exactly a KV cache that already holds the prefix: positions shift by P, no mask on it."""
    model = get_peft_model(tiny(), AdapterConfig(method="prefix", num_virtual_tokens=4))
    with torch.no_grad():
        enc = model.prefix_tuning.encoders["default"]
        enc.kv.add_(torch.randn_like(enc.kv))  # a trained-looking prefix, not the init
    idx, _ = batch(b=2)
    got = model(idx)
    kv = enc.kv.detach()
    model.prefix_tuning.disabled = True
    cache = model.new_cache(batch_size=2, max_len=32)
    cache.k[:, :, :, :4] = kv[:, 0][:, None]
    cache.v[:, :, :, :4] = kv[:, 1][:, None]
    cache.advance(4)
    want = model(idx, cache=cache)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, model(idx), atol=1e-3)  # and it does change the output


def test_prefix_decoding_with_kv_cache_matches_full_forward():
    model = get_peft_model(tiny(), AdapterConfig(method="prefix", num_virtual_tokens=3))
    idx, _ = batch(b=2)
    full = model(idx)
    cache = model.new_cache(batch_size=2, max_len=32)
    steps = [model(idx[:, :8], cache=cache)] + [model(idx[:, i:i + 1], cache=cache) for i in range(8, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_prefix_packed_rows_see_the_prefix_per_document():
    """With doc_ids, every packed document attends to the prefix; without positions (position='none') a packed
    document gives exactly the logits it gives alone."""
    model = get_peft_model(tiny(position="none"), AdapterConfig(method="prefix", num_virtual_tokens=3))
    a, b = batch(seed=2, b=1, t=5)[0], batch(seed=3, b=1, t=7)[0]
    packed = torch.cat((a, b), dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    out = model(packed, doc_ids=doc_ids)
    torch.testing.assert_close(out[:, :5], model(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 5:], model(b), rtol=1e-5, atol=1e-5)


def test_prefix_keeps_padding_rules():
    model = get_peft_model(tiny(), AdapterConfig(method="prefix", num_virtual_tokens=3))
    idx, _ = batch(b=2)
    ones = torch.ones_like(idx)
    torch.testing.assert_close(model(idx, attention_mask=ones), model(idx))
    mask = ones.clone()
    mask[:, 3] = 0  # hiding a key changes the later positions only
    out = model(idx, attention_mask=mask)
    torch.testing.assert_close(out[:, :3], model(idx)[:, :3])
    assert not torch.allclose(out[:, 4:], model(idx)[:, 4:])


def test_prompt_equals_concatenated_embeddings():
    """model(idx) with a soft prompt = the base model run on [prompt; embeddings], last T positions."""
    model = get_peft_model(tiny(), AdapterConfig(method="prompt", num_virtual_tokens=4))
    with torch.no_grad():
        model.prompt_tuning.prompts["default"].add_(torch.randn(4, 32))
    idx, _ = batch()
    got = model(idx)
    assert got.shape == (4, T, V)
    prompt = model.prompt_tuning.prompts["default"].detach()
    model.prompt_tuning.disabled = True
    # the reference: ids [0]*4 + idx, whose first 4 embeddings are replaced by the prompt
    handle = model.tok_emb.register_forward_hook(
        lambda m, a, out: torch.cat((prompt.expand(out.shape[0], -1, -1), out[:, 4:]), 1))
    try:
        want = model(torch.cat((torch.zeros(4, 4, dtype=torch.long), idx), dim=1))[:, 4:]
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prompt_refuses_bidirectional_models():
    enc = Transformer(preset("bert-tiny", vocab_size=V, d_model=32, n_heads=4))
    with pytest.raises(LmstackError, match="causal"):
        get_peft_model(enc, AdapterConfig(method="prompt"))


def test_ia3_merge_keeps_logits():
    model = get_peft_model(tiny(), AdapterConfig(method="ia3"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    idx, _ = batch()
    before = model(idx)
    merge_ia3(model, "default")
    torch.testing.assert_close(model(idx), before, rtol=1e-5, atol=1e-5)
    assert trainable_report(model)["trainable"] == 0
    with pytest.raises(LmstackError, match="no IA3 adapter"):
        merge_ia3(model, "default")


@pytest.mark.parametrize("key", ["prefix", "prompt", "adapter", "ia3"])
def test_named_adapters_follow_the_models_active_set_and_disable(key):
    """Hook-based methods obey model.active_adapters (add_adapter / set_adapter) and disable_adapters."""
    from lmstack.adapt import add_adapter, disable_adapters

    base = tiny()
    idx, _ = batch()
    want = base(idx)
    model = get_peft_model(base, AdapterConfig(**CONFIGS[key]))
    add_adapter(model, AdapterConfig(**CONFIGS[key]), "second")
    with torch.no_grad():  # make both adapters act visibly
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    first_only = model(idx)  # a later adapter waits until it is switched on
    model.active_adapters = ["second"]
    second_only = model(idx)
    model.active_adapters = ["default", "second"]
    both = model(idx)
    for a, b in ((first_only, second_only), (first_only, both), (second_only, both)):
        assert not torch.allclose(a, b, atol=1e-4)
    with disable_adapters(model):
        torch.testing.assert_close(model(idx), want)
    torch.testing.assert_close(model(idx), both)
