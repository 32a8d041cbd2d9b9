"""FlashAttention-2 backward: gradients equal naive attention's, and the saved memory is linear in T."""
import pytest
import torch

from lmstack.model import ModelConfig, Transformer
from lmstack.model.backends import naive_attention
from lmstack.model.flash_attention import flash_attention
from lmstack.model.masks import AttentionMask
from lmstack.model.positions import alibi_slopes

MASKS = {
    "causal": dict(causal=True),
    "bidirectional": dict(causal=False),
    "window": dict(causal=True, window=7),
    "window_bidir": dict(causal=False, window=5),
    "sink": dict(causal=True, window=6, n_global=3),
    "longformer": dict(causal=False, window=4, n_global=2, global_queries=True),
    "bigbird": dict(causal=True, window=8, n_global=4, global_queries=True, random_blocks=1, block_size=8),
    "dilated": dict(causal=True, window=4, dilation=3),
}


def _inputs(b=2, h=4, hkv=2, t=50, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, t, d, generator=g, requires_grad=True) for n in (h, hkv, hkv)]


def _grads(fn, q, k, v, dout):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _assert_same_as_naive(q, k, v, mask, **kw):
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    ref = _grads(lambda a, b, c: naive_attention(a, b, c, mask, 0.25, **kw), q, k, v, dout)
    ours = _grads(lambda a, b, c: flash_attention(a, b, c, mask, 0.25, block_q=16, block_k=8, **kw), q, k, v, dout)
    for name, r, o in zip(("out", "dq", "dk", "dv"), ref, ours):
        err = (r - o).abs().max().item()
        assert err < 1e-5, f"{name} differs from naive attention by {err}"


@pytest.mark.parametrize("kind", list(MASKS))
@pytest.mark.parametrize("hkv", [4, 2, 1])  # MHA, GQA, MQA
def test_gradients_equal_naive_on_every_mask(kind, hkv):
    q, k, v = _inputs(hkv=hkv)
    pos = torch.arange(q.shape[2])
    _assert_same_as_naive(q, k, v, AttentionMask(q_pos=pos, k_pos=pos, **MASKS[kind]))


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_equal_naive_with_alibi(causal):
    q, k, v = _inputs(hkv=2)
    pos = torch.arange(q.shape[2])
    _assert_same_as_naive(q, k, v, AttentionMask(q_pos=pos, k_pos=pos, causal=causal), slopes=alibi_slopes(4))


def test_gradients_equal_naive_with_softcap():
    q, k, v = _inputs()
    q = (q * 4).detach()  # large logits, so the cap bends them
    pos = torch.arange(q.shape[2])
    _assert_same_as_naive(q, k, v, AttentionMask(q_pos=pos, k_pos=pos, causal=True), softcap=2.0)


def test_gradients_equal_naive_with_documents_padding_and_a_kv_prefix():
    q, k, v = _inputs(t=40)
    pos = torch.arange(40)
    doc = torch.tensor([[0] * 15 + [1] * 25, [0] * 30 + [1] * 10])
    pad = torch.ones(2, 40, dtype=torch.bool)
    pad[1, 35:] = False  # right padding: every query still sees a real key
    _assert_same_as_naive(q, k, v, AttentionMask(q_pos=pos, k_pos=pos, doc_q=doc, doc_k=doc, key_padding=pad))
    # decode-style: 10 new queries after 30 cached keys (q positions offset from k positions)
    q2 = q[:, :, 30:].detach()
    _assert_same_as_naive(q2, k, v, AttentionMask(q_pos=pos[30:], k_pos=pos, causal=True, window=12))


def test_a_row_that_sees_no_key_gives_zero_output_and_zero_gradient():
    q, k, v = _inputs(b=1, t=20)
    pos = torch.arange(20)
    pad = torch.ones(1, 20, dtype=torch.bool)
    pad[0, :5] = False  # left padding: causal queries 0..4 see only padding
    out = flash_attention(q, k, v, AttentionMask(q_pos=pos, k_pos=pos, key_padding=pad), 0.25, block_q=8, block_k=8)
    out.sum().backward()
    assert out[:, :, :5].abs().max() == 0 and q.grad[:, :, :5].abs().max() == 0
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert k.grad[:, :, :5].abs().max() == 0  # padded keys receive no gradient


def _saved_bytes(fn, t: int) -> int:
    """Bytes autograd keeps for the backward of fn at sequence length t, counted by saved-tensor hooks."""
    q, k, v = _inputs(b=1, h=2, hkv=2, t=t, d=16)
    seen = {}

    def pack(x):
        seen[(x.data_ptr(), x.dtype, tuple(x.shape))] = x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn(q, k, v, AttentionMask(q_pos=torch.arange(t), k_pos=torch.arange(t), causal=True))
    return sum(seen.values())


def test_saved_for_backward_bytes_grow_linearly_in_t():
    flash = lambda q, k, v, m: flash_attention(q, k, v, m, 0.25, block_q=64, block_k=64)
    naive = lambda q, k, v, m: naive_attention(q, k, v, m, 0.25)
    ours = [_saved_bytes(flash, t) for t in (128, 256, 512)]
    base = [_saved_bytes(naive, t) for t in (128, 256, 512)]
    # Linear: doubling T doubles the saved bytes exactly (q, k, v, O: T*D each; L: T).
    assert all(b == 2 * a for a, b in zip(ours, ours[1:])), ours
    assert ours[0] == 4 * (2 * 128 * 16 * 4) + 2 * 128 * 4  # q, k, v, out in fp32, plus one lse per row
    # The naive graph keeps T x T tensors, so it roughly quadruples; the test would catch a regression.
    assert base[-1] / base[-2] > 3.5 and base[-1] > 10 * ours[-1]  # 17x at T=512


def test_blockwise_model_trains_like_naive_model():
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, vocab_size=50, max_seq_len=64, sliding_window=12,
               attn_block_size=16)
    a = Transformer(ModelConfig(attn_backend="naive", **cfg))
    b = Transformer(ModelConfig(attn_backend="blockwise", **cfg))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 50, (2, 48))
    for model in (a, b):
        torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa.grad - pb.grad).abs().max() < 1e-5, name


def test_bad_inputs_are_refused_with_a_clear_error():
    q, k, v = _inputs(h=3, hkv=2)
    m = AttentionMask(q_pos=torch.arange(50), k_pos=torch.arange(50))
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        flash_attention(q, k, v, m, 0.25)
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="block sizes"):
        flash_attention(q, k, v, m, 0.25, block_q=0)
