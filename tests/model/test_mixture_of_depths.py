import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.counting import model_stats
from lmstack.model.hf_io import load_model, save_model
from lmstack.model.mixture_of_depths import RoutedContext, mod_forward_flops
from lmstack.model.transformer import Block, ForwardContext, RoutedBlock


def _cfg(**kw):
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, mod_capacity=0.25)
    return ModelConfig(**{**base, **kw})


def _block_io(model, layer, idx):
    """(input, output) of block `layer` in one forward of idx."""
    seen = {}
    hook = model.blocks[layer].register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    model(idx)
    hook.remove()
    return seen["x"], seen["y"]


def test_default_routing_is_every_other_block_and_off_by_default():
    assert not any(isinstance(b, RoutedBlock) for b in Transformer(_cfg(mod_capacity=0.0)).blocks)
    model = Transformer(_cfg(n_layers=4))
    assert [isinstance(b, RoutedBlock) for b in model.blocks] == [False, True, False, True]
    assert [isinstance(b, RoutedBlock) for b in Transformer(_cfg(n_layers=4, mod_layers=[0])).blocks] == \
        [True, False, False, False]


def test_only_k_tokens_enter_the_routed_block_and_the_rest_pass_unchanged():
    torch.manual_seed(0)
    model = Transformer(_cfg()).eval()
    idx = torch.randint(0, 64, (3, 16))
    entered = []
    model.blocks[1].attn.register_forward_hook(lambda m, args, out: entered.append(args[0].shape))
    model.blocks[1].mlp.register_forward_hook(lambda m, args, out: entered.append(args[0].shape))
    x, y = _block_io(model, 1, idx)
    k = math.ceil(0.25 * 16)
    assert entered == [(3, k, 32), (3, k, 32)]
    sel = model.blocks[1].router.last_selected
    assert sel.shape == (3, 16) and sel.sum(-1).tolist() == [k] * 3
    assert torch.equal(y[~sel], x[~sel])            # skipped tokens: exactly the residual
    assert (y[sel] - x[sel]).abs().amax() > 1e-4      # processed tokens changed
    # the selected are the router's top k of each row
    scores = model.blocks[1].router.score(x).squeeze(-1)
    assert torch.equal(sel, torch.zeros_like(sel).scatter(1, scores.topk(k, -1).indices, True))


def test_capacity_one_is_the_dense_block_with_its_update_scaled_by_the_router_weight():
    """At capacity 1 every token enters; the only difference from the dense block is that the block's residual
    update block(x) - x is multiplied by sigmoid(router score), per token."""
    torch.manual_seed(1)
    model = Transformer(_cfg(mod_capacity=1.0, mod_layers=[1])).eval()
    idx = torch.randint(0, 64, (2, 12))
    x, y = _block_io(model, 1, idx)
    block = model.blocks[1]
    ctx = ForwardContext(model, torch.arange(12), torch.arange(12), None, None, None)
    dense = Block.forward(block, x, ctx, 1)
    gate = torch.sigmoid(block.router.score(x))
    assert torch.allclose(y, x + gate * (dense - x), atol=1e-6)
    # folding the router weight to 1 (gate -> 1) gives the dense block's numbers
    with torch.no_grad():
        block.router.score.weight.zero_()
    _, y_half = _block_io(model, 1, idx)
    assert torch.allclose(y_half, x + 0.5 * (dense - x), atol=1e-6)


def test_routed_tokens_keep_their_rope_positions():
    """The block sees only the selected tokens, yet rotates them by their original positions: the routed
    context's tables equal the full context's tables at the chosen positions."""
    model = Transformer(_cfg())
    full = ForwardContext(model, torch.arange(10), torch.arange(10), None, None, None)
    chosen = torch.tensor([[1, 4, 9], [0, 2, 3]])
    sub = RoutedContext(full, chosen)
    assert torch.equal(sub.cos_q[:, 0], full.cos_q[chosen])
    assert torch.equal(sub.sin_t[:, :, 0], full.sin_q[chosen])
    assert sub.mask(1).is_plain_causal()


def test_router_gets_gradient_and_aux_loss_is_in_model_aux_loss():
    torch.manual_seed(2)
    model = Transformer(_cfg(mod_aux_loss_coef=0.5)).train()
    idx = torch.randint(0, 64, (2, 16))
    logits = model(idx)
    router = model.blocks[1].router
    assert router.aux_loss > 0 and torch.allclose(model.aux_loss, router.aux_loss)
    ce = F.cross_entropy(logits.flatten(0, 1), idx.flatten())
    ce.backward(retain_graph=True)  # the LM loss alone reaches the router, through the gate
    assert router.score.weight.grad.abs().sum() > 0
    out = model(input_ids=idx, labels=idx)  # the HF-style loss adds it too
    assert out.aux_loss is not None and torch.allclose(out.aux_loss, model.aux_loss)


def test_aux_loss_trains_the_causal_predictor_toward_top_k():
    """Minimising the BCE alone makes the causal rule sigmoid(score) > 1/2 agree with top-k more often."""
    torch.manual_seed(2)
    model = Transformer(_cfg(mod_aux_loss_coef=1.0))
    idx = torch.randint(0, 64, (4, 32))
    x, _ = _block_io(model, 1, idx)
    x = x.detach()
    router = model.blocks[1].router
    ctx = ForwardContext(model, torch.arange(32), torch.arange(32), None, None, None)
    skip = lambda xs, c, layer: xs  # noqa: E731 (the block does not matter to the router's loss)

    def agreement():
        with torch.no_grad():
            router.routing = "topk"
            router(skip, x, ctx, 1)
            topk = router.last_selected
            router.routing = "threshold"
            router(skip, x, ctx, 1)
            router.routing = "topk"
            return (router.last_selected == topk).float().mean().item()

    before = agreement()
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        router(skip, x, ctx, 1)
        router.aux_loss.backward()
        opt.step()
        losses.append(router.aux_loss.item())
    assert losses[-1] < 0.75 * losses[0]
    after = agreement()
    assert after >= before + 0.05 and after > 0.9  # seed 2: 0.87 -> 0.94


def test_threshold_routing_is_causal():
    torch.manual_seed(3)
    model = Transformer(_cfg()).eval()
    model.blocks[1].router.routing = "threshold"
    idx = torch.randint(0, 64, (2, 12))
    full = model(idx)
    prefix = model(idx[:, :7])
    assert torch.allclose(full[:, :7], prefix, atol=1e-5)  # top-k would not be: later tokens change the choice


def test_bad_configs_are_clear_errors():
    with pytest.raises(ConfigError, match="mod_capacity must be in"):
        _cfg(mod_capacity=1.5)
    with pytest.raises(ConfigError, match="both Mixture-of-Depths.*MoE"):
        _cfg(n_experts=4, moe_top_k=1, moe_layers=[1])
    with pytest.raises(ConfigError, match="mod_layers needs mod_capacity"):
        _cfg(mod_capacity=0.0, mod_layers=[1])
    with pytest.raises(ConfigError, match="outside"):
        _cfg(mod_layers=[5])
    with pytest.raises(ConfigError, match="alibi"):
        _cfg(position="alibi")
    _cfg(n_experts=4, moe_top_k=1, moe_layers=[0])  # MoE and MoD in different blocks is fine
    model = Transformer(_cfg())
    with pytest.raises(LmstackError, match="contiguous KV cache"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=model.new_cache(1, kind="sink", window=8))
    with pytest.raises(LmstackError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 4))


def test_save_load_round_trip_keeps_router_weights(tmp_path):
    torch.manual_seed(4)
    model = Transformer(_cfg(hf_model_type="llama")).eval()
    idx = torch.randint(0, 64, (2, 10))
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m").eval()
    assert back.config.mod_capacity == 0.25 and isinstance(back.blocks[1], RoutedBlock)
    assert torch.equal(back.blocks[1].router.score.weight, model.blocks[1].router.score.weight)
    assert torch.allclose(back(idx), model(idx), atol=1e-6)


def test_mod_flops_are_below_dense_and_match_the_arithmetic():
    cfg = _cfg(n_layers=4, mod_capacity=0.125)
    out = mod_forward_flops(cfg, context=64)
    dense = model_stats(cfg.replace(mod_capacity=0.0), 64).forward_flops_per_token
    assert out["dense_forward_flops_per_token"] == dense and out["routed_layers"] == [1, 3]
    assert out["ratio"] < 1
    full = mod_forward_flops(_cfg(n_layers=4, mod_capacity=1.0), context=64)
    # capacity 1 costs the dense model plus the two routers' 2 * d_model each
    assert full["mod_forward_flops_per_token"] == pytest.approx(dense + 2 * 2 * 32)


def test_kv_cache_decoding_equals_the_full_forward_with_the_causal_predictor():
    torch.manual_seed(5)
    model = Transformer(_cfg()).eval()
    for block in model.blocks:
        if isinstance(block, RoutedBlock):  # untrained routers score near 0: spread them so rows differ
            nn.init.normal_(block.router.score.weight, 0.0, 0.5)
    ids = torch.randint(0, 64, (2, 12))
    cache = model.new_cache(2, 32)
    steps = [model(ids[:, :7], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(7, 12)]
    routed = [b.router for b in model.blocks if isinstance(b, RoutedBlock)]
    for router in routed:
        router.routing = "threshold"
    torch.testing.assert_close(torch.cat(steps, dim=1), model(ids), atol=1e-5, rtol=1e-5)
    # the routed layers kept keys only for the tokens they processed, and skipped some
    stores = [next(iter(r._decode.values())) for r in routed]
    held = [int(s.pos.numel()) for layer in stores for s in layer]
    assert 0 < min(held) and max(held) < 12
