"""lmstack.kernels.decode_ops: each C++ op equals the torch expression it replaces (within fp32 rounding), is
batch invariant, falls back to torch where it does not apply, rejects bad input with a clear error, and the model
uses it only inside decode_kernels()."""
import pytest
import torch
import torch.nn.functional as F

from lmstack.kernels import build, decode_ops
from lmstack.model import Transformer
from lmstack.model.config import ModelConfig
from lmstack.model.linear import decode_kernels
from lmstack.model.positions import apply_rotary


@pytest.fixture(scope="module")
def ext():
    if not build.enabled() or build.extension() is None:
        pytest.skip(f"kernels not buildable here: {build.info()['error']}")
    return build.extension()


def close(a, b, tol=2e-6):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item()), (a - b).abs().max().item()


@pytest.mark.parametrize("shape", [(1, 768), (3, 1, 64), (2, 5, 100), (64, 33)])
def test_rms_norm_equals_torch(ext, shape):
    torch.manual_seed(0)
    x, w = torch.randn(shape) * 3, torch.randn(shape[-1])
    close(decode_ops.rms_norm(x, w, 1e-5), torch.rms_norm(x, w.shape, w, 1e-5))


def test_rope_equals_apply_rotary_on_a_strided_view(ext):
    torch.manual_seed(2)
    qkv = torch.randn(1, 3, 12 + 2 * 4, 64)
    qk = qkv[:, :, :16]  # q and k heads of a fused projection: a non-contiguous view, as attention passes it
    cos, sin = torch.randn(3, 1, 64), torch.randn(3, 1, 64)
    got = decode_ops.rope(qk, cos, sin)
    assert got.is_contiguous()
    close(got, apply_rotary(qk, cos, sin))


def test_rope_fallback_takes_both_table_shapes():
    """Past the kernel's row limit rope() is torch's expression, for (T, 1, D) and (T, D) tables alike."""
    torch.manual_seed(6)
    x = torch.randn(1, decode_ops.MAX_ROWS * 16 + 1, 1, 8)
    cos, sin = torch.randn(x.shape[1], 8), torch.randn(x.shape[1], 8)
    want = apply_rotary(x.transpose(1, 2), cos, sin).transpose(1, 2)
    assert torch.equal(decode_ops.rope(x, cos, sin), want)
    assert torch.equal(decode_ops.rope(x, cos[:, None], sin[:, None]), want)


def reference_attention(q, kc, vc, slots, lengths, scale, window):
    """SDPA per sequence over its gathered keys, GQA by repeating K/V heads."""
    out = []
    group = q.shape[1] // kc.shape[0]
    for b in range(q.shape[0]):
        n = int(lengths[b])
        first = max(0, n - window) if window else 0
        idx = slots[b, first:n]
        k = kc[:, idx].repeat_interleave(group, dim=0)
        v = vc[:, idx].repeat_interleave(group, dim=0)
        out.append(F.scaled_dot_product_attention(q[b][:, None], k, v, scale=scale)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("heads,kv_heads,d,window", [(12, 3, 64, 0), (4, 4, 32, 0), (8, 1, 16, 5), (6, 2, 24, 0)])
def test_paged_decode_attention_equals_sdpa(ext, heads, kv_heads, d, window):
    torch.manual_seed(3)
    pool, lengths = 200, torch.tensor([1, 17, 40, 9])
    kc, vc = torch.randn(kv_heads, pool, d), torch.randn(kv_heads, pool, d)
    slots = torch.stack([torch.randperm(pool)[:40] for _ in range(4)])  # scattered slots, as paged blocks are
    q = torch.randn(4, 1, heads + 2, d)[:, 0, :heads]  # a strided (B, H, D) view
    got = decode_ops.paged_decode_attention(q, kc, vc, slots, lengths, d ** -0.5, window)
    close(got, reference_attention(q, kc, vc, slots, lengths, d ** -0.5, window), 1e-5)


def test_paged_decode_attention_is_batch_invariant(ext):
    """A sequence's output is bitwise the same alone or among others."""
    torch.manual_seed(4)
    kc, vc = torch.randn(3, 300, 64), torch.randn(3, 300, 64)
    slots = torch.stack([torch.randperm(300)[:64] for _ in range(8)])
    lengths = torch.randint(1, 65, (8,))
    q = torch.randn(8, 12, 64)
    together = decode_ops.paged_decode_attention(q, kc, vc, slots, lengths, 0.125)
    for b in range(8):
        alone = decode_ops.paged_decode_attention(q[b:b + 1], kc, vc, slots[b:b + 1, :int(lengths[b])],
                                                  lengths[b:b + 1], 0.125)
        assert torch.equal(alone[0], together[b])


def test_bad_input_names_the_problem(ext):
    kc = vc = torch.randn(2, 10, 8)
    q = torch.randn(1, 4, 8)
    with pytest.raises(RuntimeError, match="outside the pool"):
        decode_ops.paged_decode_attention(q, kc, vc, torch.tensor([[0, 99]]), torch.tensor([2]), 1.0)
    with pytest.raises(RuntimeError, match="sees 3 keys but its slot row holds 2"):
        decode_ops.paged_decode_attention(q, kc, vc, torch.tensor([[0, 1]]), torch.tensor([3]), 1.0)
    with pytest.raises(RuntimeError, match="3 heads"):
        decode_ops.paged_decode_attention(torch.randn(1, 3, 8), kc, vc, torch.tensor([[0]]), torch.tensor([1]), 1.0)
    with pytest.raises(RuntimeError, match="weight must have 8 values"):
        ext.rms_norm_rows(torch.randn(2, 8), torch.randn(7), 1e-6)


def test_fallbacks_are_torch_exactly():
    """bf16, autograd and too many rows take torch's own expression (bitwise), kernel or no kernel."""
    torch.manual_seed(5)
    x, w = torch.randn(2, 16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    assert torch.equal(decode_ops.rms_norm(x, w, 1e-6), torch.rms_norm(x, w.shape, w, 1e-6))
    xg = torch.randn(2, 16, requires_grad=True)
    y = decode_ops.rms_norm(xg, torch.ones(16), 1e-6)
    assert y.requires_grad
    big = torch.randn(decode_ops.MAX_ROWS + 1, 8)
    assert torch.equal(decode_ops.rms_norm(big, torch.ones(8), 1e-6), torch.rms_norm(big, (8,), torch.ones(8), 1e-6))
    assert decode_ops.paged_decode_attention(torch.randn(1, 2, 8, dtype=torch.bfloat16), torch.randn(2, 4, 8),
                                             torch.randn(2, 4, 8), torch.tensor([[0]]), torch.tensor([1]), 1.0) is None


@pytest.mark.parametrize("fused", [True, False])
def test_the_model_uses_them_only_inside_decode_kernels(ext, monkeypatch, fused):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                      mlp="swiglu", fused_projections=fused)
    model = Transformer(cfg).eval()
    calls = []
    for name in ("rms_norm", "rope"):
        real = getattr(decode_ops, name)
        monkeypatch.setattr(decode_ops, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        plain = model(ids)
        assert calls == []
        with decode_kernels(True):
            fast = model(ids)
    assert set(calls) == {"rms_norm", "rope"}
    close(fast, plain, 1e-5)
