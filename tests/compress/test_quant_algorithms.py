"""Calibrated weight quantization: calibration hooks, RTN, GPTQ, AWQ, SmoothQuant W8A8, on tiny seeded shapes.

Each comparison is one that could fail: GPTQ/AWQ/SmoothQuant against round-to-nearest at the same bits and
groups, measured by the layer output error tr(dW H dW^T) on synthetic correlated activations with a few loud
channels (the shape of real LLM activations that the methods exploit)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.compress.awq import awq_dequantize, awq_quantize, output_error
from lmstack.compress.calibration import block_linears, collect_stats
from lmstack.compress.gptq import gptq_quantize
from lmstack.compress.quantize_rtn import dequantize, quantize_rtn
from lmstack.compress.smoothquant import (quantize_per_token, quantize_w8a8, smooth_model, smooth_scales,
                                          w8a8_linear)
from lmstack.errors import LmstackError
from lmstack.model import Transformer
from lmstack.model.presets import preset


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster and steadier

def activations(n: int = 1024, i: int = 128, outliers: int = 4, loud: float = 8.0, seed: int = 0) -> torch.Tensor:
    """Correlated inputs (a random mixing of Gaussian sources) whose first `outliers` channels are loud."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, i, generator=g) @ (torch.randn(i, i, generator=g) / i ** 0.5)
    x += 0.3 * torch.randn(n, i, generator=g)
    x[:, :outliers] *= loud
    return x


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def weight(o: int = 64, i: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(o, i, generator=torch.Generator().manual_seed(seed))


def tiny(fused: bool = False, family: str = "llama", **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = preset(f"{family}-tiny", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                 init_std=0.2, **kw)
    model = Transformer(cfg).eval()
    return model.fuse_projections() if fused else model


# ---- calibration

def test_calibration_sees_every_linear_and_removes_its_hooks():
    model = tiny()
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    stats = collect_stats(model, ids, batch_size=2)
    linears = block_linears(model)
    assert set(stats) == set(linears) and len(linears) == 2 * 7  # q k v o gate up down per block
    assert all(s.n == 48 for s in stats.values())
    assert all(not lin._forward_pre_hooks and not lin._forward_hooks for lin in linears.values())
    assert model.training  # restored

    # the Hessian is 2 X^T X / n of the very inputs the layer saw
    seen = []
    down = model.blocks[1].mlp.down_proj
    h = down.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, down.in_features)))
    with torch.no_grad():
        model.eval()(ids)
    h.remove()
    x = torch.cat(seen)
    s = stats["blocks.1.mlp.down_proj"]
    torch.testing.assert_close(s.hessian, hessian(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.max_abs, x.abs().amax(0))
    torch.testing.assert_close(s.mean_abs, x.abs().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.l2_norm, x.norm(dim=0), rtol=1e-5, atol=1e-5)


def test_calibration_fused_projections_are_one_linear_and_sequences_may_differ_in_length():
    model = tiny(fused=True)
    stats = collect_stats(model, [list(range(20)), torch.arange(5, 40)])
    assert "blocks.0.attn.qkv_proj" in stats and "blocks.0.mlp.gate_up_proj" in stats
    assert "blocks.0.attn.q_proj" not in stats
    assert stats["blocks.0.attn.qkv_proj"].n == 20 + 35
    light = collect_stats(model, torch.arange(40)[None], hessian=False)
    assert light["blocks.0.attn.qkv_proj"].xtx is None and light["blocks.0.attn.qkv_proj"].max_abs.shape == (32,)
    with pytest.raises(LmstackError, match="hessian=False"):
        light["blocks.0.attn.qkv_proj"].hessian


@pytest.mark.parametrize("calib, match", [
    (None, "no calibration data"),
    ([], "no calibration data"),
    (torch.zeros(0, 8, dtype=torch.long), "no calibration data"),
    (torch.ones(1, 10, dtype=torch.long), "too short: 10 tokens, need at least 32"),
    (torch.full((2, 20), 64), r"\[0, 64\)"),
    (torch.rand(2, 20), "integer token ids"),
    (torch.ones(1, 65, dtype=torch.long), "max_seq_len 64"),
    (torch.ones(2, 2, 20, dtype=torch.long), "shape"),
    ([torch.ones(2, 20, dtype=torch.long)], "1-D sequences"),
])
def test_calibration_bad_input(calib, match):
    model = tiny()
    with pytest.raises(LmstackError, match=match):
        collect_stats(model, calib)
    assert all(not lin._forward_pre_hooks for lin in block_linears(model).values())


# ---- round to nearest

@pytest.mark.parametrize("bits, group, symmetric", [(4, 16, False), (4, 32, True), (8, None, True), (3, 64, False)])
def test_rtn_error_is_within_half_a_step_per_group(bits, group, symmetric):
    w = weight()
    w[0, :16] = 0.0  # an all-zero group must come back exactly
    qw = quantize_rtn(w, bits, group, symmetric)
    g = group or w.shape[1]
    assert qw.scales.shape == (64, 128 // g) and qw.group_size == g
    assert (qw.zeros is None) == symmetric
    assert qw.codes.dtype == (torch.int8 if symmetric else torch.uint8)
    if symmetric:
        assert qw.codes.abs().max() <= 2 ** (bits - 1) - 1
    else:
        assert qw.codes.max() <= 2 ** bits - 1
    err = (dequantize(qw) - w).abs().reshape(64, -1, g)
    assert torch.all(err <= qw.scales[..., None] / 2 + 1e-6)
    assert torch.all(dequantize(qw)[0, :16] == 0)
    # and it is round to nearest, not something coarser: most weights sit well inside half a step
    assert (err < qw.scales[..., None] / 4).float().mean() > 0.4


def test_group_size_that_does_not_divide_names_both_numbers():
    with pytest.raises(LmstackError, match="group size 48 does not divide in_features 128"):
        quantize_rtn(weight(), 4, 48)
    with pytest.raises(LmstackError, match="group size 48 does not divide in_features 128"):
        gptq_quantize(weight(), torch.eye(128), 4, 48)
    with pytest.raises(LmstackError, match="bits must be between 2 and 8"):
        quantize_rtn(weight(), 9, 32)
    with pytest.raises(LmstackError, match="2-D weight"):
        quantize_rtn(torch.zeros(4, 4, 4), 4, 4)
    bad = weight()
    bad[3, 7] = float("nan")
    with pytest.raises(LmstackError, match="NaN or inf"):
        quantize_rtn(bad, 4, 32)
    with pytest.raises(LmstackError, match="NaN or inf"):
        gptq_quantize(bad, torch.eye(128), 4, 32)


# ---- GPTQ

@pytest.mark.parametrize("bits, group", [(4, 32), (4, None), (3, 64)])
def test_gptq_output_error_is_lower_than_rtn(bits, group):
    x, w = activations(), weight()
    h = hessian(x)
    rtn = output_error(w, dequantize(quantize_rtn(w, bits, group)), h)
    plain = gptq_quantize(w, h, bits, group)
    ordered = gptq_quantize(w, h, bits, group, act_order=True)
    assert plain.perm is None
    assert sorted(ordered.perm.tolist()) == list(range(128))
    assert torch.all(torch.diag(h)[ordered.perm].diff() <= 0)  # descending diag(H)
    e_plain, e_ordered = output_error(w, dequantize(plain), h), output_error(w, dequantize(ordered), h)
    assert e_plain < 0.8 * rtn, (e_plain, rtn)
    assert e_ordered < 0.8 * rtn, (e_ordered, rtn)
    # the codes are a real grid: the dequantized weight stays within its range of codes
    assert plain.codes.max() <= 2 ** bits - 1


def test_gptq_with_a_diagonal_hessian_is_rtn():
    """No correlation between inputs -> nothing to compensate: GPTQ's codes are RTN's exactly."""
    w = weight()
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(3)) + 0.5)
    g, r = gptq_quantize(w, h, 4, 32), quantize_rtn(w, 4, 32)
    assert torch.equal(g.codes, r.codes) and torch.equal(g.scales, r.scales) and torch.equal(g.zeros, r.zeros)


def test_act_order_permutation_puts_columns_back_in_input_order():
    """With a diagonal Hessian act-order is RTN of the permuted columns; dequantize must undo the permutation."""
    w = weight()
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(4)) + 0.5)
    qw = gptq_quantize(w, h, 4, 32, act_order=True)
    perm = qw.perm
    assert not torch.equal(perm, torch.arange(128))
    rtn_of_permuted = quantize_rtn(w[:, perm], 4, 32)
    assert torch.equal(qw.codes, rtn_of_permuted.codes)
    expect = torch.empty_like(w)
    expect[:, perm] = dequantize(rtn_of_permuted)
    assert torch.equal(dequantize(qw), expect)
    assert (dequantize(qw) - w).abs().max() < qw.scales.max()  # in input order: close to w, not shuffled


def test_static_groups_keep_input_order_groups_and_beat_rtn():
    """act-order with static groups (compressed-tensors' actorder "weight"): no permutation to store, RTN's own
    group parameters, and the sweep's error feedback still beats RTN."""
    x, w = activations(), weight()
    h = hessian(x)
    r = quantize_rtn(w, 4, 32)
    qw = gptq_quantize(w, h, 4, 32, act_order=True, static_groups=True)
    assert qw.perm is None
    assert torch.equal(qw.scales, r.scales) and torch.equal(qw.zeros, r.zeros)
    assert not torch.equal(qw.codes, r.codes)
    rtn = output_error(w, dequantize(r), h)
    assert output_error(w, dequantize(qw), h) < 0.8 * rtn
    diag = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(3)) + 0.5)
    assert torch.equal(gptq_quantize(w, diag, 4, 32, act_order=True, static_groups=True).codes,
                       r.codes)  # nothing to compensate: RTN exactly, whatever the order


def test_gptq_symmetric_codes():
    x, w = activations(), weight()
    h = hessian(x)
    qw = gptq_quantize(w, h, 4, 32, symmetric=True)
    assert qw.zeros is None and qw.codes.dtype == torch.int8 and qw.codes.abs().max() <= 7
    assert output_error(w, dequantize(qw), h) < 0.8 * output_error(w, dequantize(quantize_rtn(w, 4, 32, True)), h)


def test_gptq_groups_not_aligned_with_blocks_and_dead_channels():
    x = activations(i=96)
    x[:, 5] = 0.0  # a dead input channel
    w, h = weight(i=96), hessian(x)
    # group 24 does not divide block 64: blocks shrink to 48 so each group's scale sees final values
    qw = gptq_quantize(w, h, 4, 24, block_size=64)
    w_hat = dequantize(qw)
    assert torch.isfinite(w_hat).all() and torch.all(w_hat[:, 5] == 0)
    assert output_error(w, w_hat, h) < 0.8 * output_error(w, dequantize(quantize_rtn(w, 4, 24)), h)
    with pytest.raises(LmstackError, match="does not match the weight's in_features 96"):
        gptq_quantize(w, torch.eye(64), 4, 24)
    with pytest.raises(LmstackError, match="damp must be > 0"):
        gptq_quantize(w, h, 4, 24, damp=0.0)


# ---- AWQ

def test_awq_beats_rtn_on_outlier_channels():
    x, w = activations(outliers=4, loud=10.0), weight()
    h = hessian(x)
    r = awq_quantize(w, x.abs().mean(0), h, bits=4, group_size=32)
    rtn = output_error(w, dequantize(quantize_rtn(w, 4, 32)), h)
    assert r.rtn_error == pytest.approx(rtn, rel=1e-6)
    assert r.alpha > 0 and r.error < 0.9 * rtn, (r.alpha, r.error, rtn)
    assert r.error == pytest.approx(output_error(w, awq_dequantize(r), h), rel=1e-6)
    # the loud channels got the largest scales
    assert set(r.input_scale.topk(4).indices.tolist()) == {0, 1, 2, 3}
    # what the layer computes: Q(W s) applied to x / s equals awq_dequantize(r) applied to x
    torch.testing.assert_close((x[:8] / r.input_scale) @ dequantize(r.qweight).T, x[:8] @ awq_dequantize(r).T,
                               rtol=1e-4, atol=1e-3)
    with pytest.raises(LmstackError, match="do not match in_features 128"):
        awq_quantize(w, x.abs().mean(0)[:64], h)


# ---- SmoothQuant

@pytest.mark.parametrize("family, fused", [("llama", False), ("llama", True), ("gpt2", False), ("gemma2", False)])
def test_smoothquant_folded_model_computes_the_same_function(family, fused):
    """RMSNorm, LayerNorm with a bias (gpt2), Gemma's (1 + w) RMSNorm with sandwich norms."""
    model = tiny(fused=fused, family=family)
    # loud channels in the residual stream, as trained LLMs have: scale two columns of the embedding
    with torch.no_grad():
        model.tok_emb.weight[:, :2] *= 20
        for m in model.modules():  # norms with non-trivial weights and biases, so a wrong fold shows
            if isinstance(m, nn.LayerNorm) or type(m).__name__ == "RMSNorm":
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                if getattr(m, "bias", None) is not None:
                    m.bias.add_(0.1 * torch.randn_like(m.bias))
    ids = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(1))
    stats = collect_stats(model, ids)
    smoothed = copy.deepcopy(model)
    scales = smooth_model(smoothed, stats, alpha=0.5)
    assert set(scales) == {f"blocks.{b}.{n}" for b in range(2) for n in ("attn_norm", "mlp_norm")}
    assert not torch.allclose(smoothed.blocks[0].attn_norm.weight, model.blocks[0].attn_norm.weight)
    with torch.no_grad():
        torch.testing.assert_close(smoothed(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_smoothquant_rejects_post_norm_and_bad_alpha():
    model = tiny(norm_position="post")
    stats = collect_stats(model, torch.randint(0, 64, (2, 32)))
    with pytest.raises(LmstackError, match="post-norm"):
        smooth_model(model, stats)
    with pytest.raises(LmstackError, match="alpha must be in"):
        smooth_scales(torch.ones(8), [torch.ones(4, 8)], alpha=1.5)


def test_w8a8_reference_is_exact_integer_arithmetic():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 7, 96, generator=g), torch.randn(48, 96, generator=g), torch.randn(48, generator=g)
    qw = quantize_w8a8(w)
    xq, xs = quantize_per_token(x)
    expect = (xq.double() @ qw.codes.double().T) * xs.double() * qw.scales[:, 0].double() + b.double()
    y = w8a8_linear(x, qw, b)
    assert y.shape == (5, 7, 48)
    torch.testing.assert_close(y.double(), expect, rtol=1e-6, atol=1e-6)
    ref = F.linear(x, w, b)  # and it approximates the fp32 linear: int8 x int8 is about 1% off
    assert (y - ref).norm() / ref.norm() < 0.02
    with pytest.raises(LmstackError, match="symmetric int8"):
        w8a8_linear(x, quantize_rtn(w, 4, 32), b)


def test_smoothed_w8a8_beats_naive_w8a8_with_outlier_channels():
    x, w = activations(outliers=4, loud=30.0), weight(o=96)
    ref = x @ w.T
    naive = w8a8_linear(x, quantize_w8a8(w))
    s = smooth_scales(x.abs().amax(0), [w], alpha=0.5)
    smooth = w8a8_linear(x / s, quantize_w8a8(w * s))
    e_naive, e_smooth = (naive - ref).square().mean(), (smooth - ref).square().mean()
    assert e_smooth < 0.5 * e_naive, (e_smooth, e_naive)


SMOOTHED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def emulate_w8a8(model: nn.Module, names: tuple[str, ...] = SMOOTHED) -> None:
    """The named linears of the blocks compute through the W8A8 reference (a forward hook replaces the output)."""
    for name, lin in block_linears(model).items():
        if name.endswith(names):
            qw = quantize_w8a8(lin.weight)
            lin.register_forward_hook(lambda m, args, out, qw=qw: w8a8_linear(args[0], qw, m.bias))


def test_smoothquant_w8a8_model_is_closer_to_fp32_than_naive_w8a8():
    """W8A8 on the linears SmoothQuant smooths (o_proj and down_proj would add the same error to both)."""
    model = tiny()
    with torch.no_grad():
        model.tok_emb.weight[:, :3] *= 30  # outlier channels in the residual stream
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids)
    naive, smoothed = copy.deepcopy(model), copy.deepcopy(model)
    smooth_model(smoothed, collect_stats(model, ids), alpha=0.5)
    emulate_w8a8(naive)
    emulate_w8a8(smoothed)
    with torch.no_grad():
        e_naive, e_smooth = (naive(ids) - ref).square().mean(), (smoothed(ids) - ref).square().mean()
    assert e_smooth < 0.6 * e_naive, (e_smooth, e_naive)  # measured 0.34x


# ---- end to end: a tiny trained model, every linear of its blocks quantized

def markov_stream(n: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    """Tokens from a random sparse Markov chain: learnable structure, so a few dozen steps train a real model."""
    g = torch.Generator().manual_seed(0)  # the same chain for every seed
    nxt = torch.randint(0, vocab, (vocab, 3), generator=g)
    g = torch.Generator().manual_seed(seed)
    out = [0]
    for c in torch.randint(0, 3, (n - 1,), generator=g).tolist():
        out.append(int(nxt[out[-1], c]))
    return torch.tensor(out)


def loss(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()


def test_gptq_int4_model_stays_closer_to_fp32_than_rtn():
    """A tiny llama trained 40 steps on a Markov stream; every linear of its blocks int4 (groups of 16)."""
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               max_seq_len=64))
    train = markov_stream(64 * 33, seed=1).view(64, 33)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        batch = train[(step * 16) % 64:][:16]
        logits = model(batch[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    held_out = markov_stream(16 * 33, seed=2).view(16, 33)
    calib = markov_stream(16 * 32, seed=3).view(16, 32)
    base = loss(model, held_out)
    assert base < 3.0  # trained: ln(64) = 4.16 is chance, the chain's entropy is ln(3) = 1.10
    stats = collect_stats(model, calib)
    rtn_model, gptq_model = copy.deepcopy(model), copy.deepcopy(model)
    layer_wins = 0
    for name, lin in block_linears(model).items():
        h = stats[name].hessian
        w_rtn = dequantize(quantize_rtn(lin.weight, 4, 16))
        w_gptq = dequantize(gptq_quantize(lin.weight, h, 4, 16))
        layer_wins += output_error(lin.weight, w_gptq, h) < output_error(lin.weight, w_rtn, h)
        with torch.no_grad():
            rtn_model.get_submodule(name).weight.copy_(w_rtn)
            gptq_model.get_submodule(name).weight.copy_(w_gptq)
    assert layer_wins == 14
    # The held-out loss moves by only ~0.1-0.5% at int4 here, which is noise: over 8 init seeds RTN's |loss
    # change| was the smaller in 1. The KL from the fp32 model's next-token distribution is the stable
    # measure of "closer to fp32": GPTQ's was 0.42-0.56 of RTN's in all 8 seeds.
    with torch.no_grad():
        ref = F.log_softmax(model(held_out[:, :-1]), -1)
        kl = {k: F.kl_div(F.log_softmax(m(held_out[:, :-1]), -1), ref, log_target=True, reduction="batchmean").item()
              for k, m in (("rtn", rtn_model), ("gptq", gptq_model))}
    assert kl["gptq"] < 0.75 * kl["rtn"], kl
    assert abs(loss(gptq_model, held_out) - base) < 0.02 * base
