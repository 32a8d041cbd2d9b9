"""lmstack.kernels.int8_linear / int4_linear: equal to F.linear on the dequantized weight (within the stated fp32
bound), the packed layout decoded exactly, batch invariant, falling back to dequantize + F.linear wherever the
kernel does not apply, and clear errors for bad buffers.

The extension is built once per machine into the user cache; the session fixture does it once for all tests."""
import types

import pytest
import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.kernels import MAX_ROWS, build, int4_linear, int8_linear, quant
from lmstack.kernels.quant import dequantize_int4, dequantize_int8

U = 2.0 ** -24  # fp32 unit roundoff


@pytest.fixture(scope="session")
def ext():
    if not build.enabled():
        pytest.skip("LMSTACK_KERNELS=0")
    module = build.extension()
    if module is None:
        pytest.skip(f"kernels not buildable here: {build.info()['error']}")
    return module


@pytest.fixture
def kernel_only(ext, monkeypatch):
    """The fallback raises, so a passing call proves the C++ kernel computed it."""
    def no_fallback(*args, **kwargs):
        raise AssertionError("fell back to dequantize + F.linear")
    monkeypatch.setattr(quant, "_fallback", no_fallback)
    return ext


@pytest.fixture
def counting(ext, monkeypatch):
    """Counts calls into the extension's quantized kernels."""
    calls = []

    class Spy:
        def int8_linear(self, *args):
            calls.append("int8")
            return ext.int8_linear(*args)

        def int4_linear(self, *args):
            calls.append("int4")
            return ext.int4_linear(*args)

    monkeypatch.setattr(build, "_ext", Spy())
    return calls


def make_int8(O, I, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (O, I), generator=g, dtype=torch.int8)
    scales = torch.rand(O, I // group, generator=g) * 0.02 + 1e-3
    return codes, scales


def make_int4(O, I, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (O, I // 2), generator=g, dtype=torch.uint8)
    scales = torch.rand(O, I // group, generator=g) * 0.02 + 1e-3
    zeros = torch.randint(0, 16, (O, I // group), generator=g, dtype=torch.uint8)
    return codes, scales, zeros


def assert_within_bound(y, x, w, bias):
    """|y - F.linear| <= 2 I u sum|w x| (both sum the same fp32 products, in different orders), and the same bound
    against the float64 product."""
    ref = F.linear(x, w, bias)
    mag = F.linear(x.double().abs(), w.double().abs()) + (bias.double().abs() if bias is not None else 0)
    bound = 2 * (w.shape[1] + 1) * U * mag + 1e-30
    assert y.shape == ref.shape
    assert ((y.double() - ref.double()).abs() <= bound).all(), (y - ref).abs().max()
    exact = F.linear(x.double(), w.double(), bias.double() if bias is not None else None)
    assert ((y.double() - exact).abs() <= bound).all()


SHAPES = [(1, 32), (7, 64), (13, 100), (33, 256), (129, 384)]
ROWS = [1, 2, 3, 8, 17, MAX_ROWS]


def groups_of(I, choices=(32, 64, 128)):
    return [g for g in choices if I % g == 0] + [I]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("O,I", SHAPES)
def test_int8_equals_dequant_linear(kernel_only, O, I, bias):
    for group in groups_of(I):
        codes, scales = make_int8(O, I, group, seed=O + group)
        b = torch.randn(O) if bias else None
        w = dequantize_int8(codes, scales)
        for M in ROWS:
            x = torch.randn(M, I)
            assert_within_bound(int8_linear(x, codes, scales, b), x, w, b)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("O,I", SHAPES)
def test_int4_equals_dequant_linear(kernel_only, O, I, bias):
    for group in groups_of(I) + ([I // 2] if I // 2 % 2 == 0 else []):
        codes, scales, zeros = make_int4(O, I, group, seed=O + group)
        b = torch.randn(O) if bias else None
        w = dequantize_int4(codes, scales, zeros, group)
        for M in ROWS:
            x = torch.randn(M, I)
            assert_within_bound(int4_linear(x, codes, scales, zeros, group, b), x, w, b)


def test_packed_layout_by_hand(kernel_only):
    """Byte j holds column 2j in its low nibble and 2j + 1 in its high one; w = (code - zero) * scale."""
    codes = torch.tensor([[0x21, 0x43], [0xF0, 0x08]], dtype=torch.uint8)   # row 0 codes 1 2 3 4; row 1: 0 15 8 0
    scales = torch.tensor([[1.0], [0.5]])
    zeros = torch.tensor([[0], [8]], dtype=torch.uint8)
    expected = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-4.0, 3.5, 0.0, -4.0]])
    assert torch.equal(dequantize_int4(codes, scales, zeros, 4), expected)
    assert torch.equal(int4_linear(torch.eye(4), codes, scales, zeros, 4), expected.t())
    c8 = torch.tensor([[1, -2, 3, -127]], dtype=torch.int8)
    s8 = torch.tensor([[0.5, 2.0]])   # two groups of two
    assert torch.equal(int8_linear(torch.eye(4), c8, s8), torch.tensor([[0.5, -1.0, 6.0, -254.0]]).t())


@pytest.mark.parametrize("I,group", [(32, 32), (32, 8), (64, 16), (96, 96)])
def test_kernel_decodes_exact_weights(kernel_only, I, group):
    """x = rows of the identity: each output is one weight times 1, so the kernel must return the dequantized
    weight bit for bit (it decodes the same fp32 values torch computes)."""
    codes8, scales8 = make_int8(11, I, group)
    codes4, scales4, zeros4 = make_int4(11, I, group)
    w8, w4 = dequantize_int8(codes8, scales8), dequantize_int4(codes4, scales4, zeros4, group)
    eye = torch.eye(I)
    for start in range(0, I, MAX_ROWS):
        x = eye[start:start + MAX_ROWS]
        assert torch.equal(int8_linear(x, codes8, scales8), w8[:, start:start + MAX_ROWS].t())
        assert torch.equal(int4_linear(x, codes4, scales4, zeros4, group), w4[:, start:start + MAX_ROWS].t())


@pytest.mark.parametrize("O,I,group", [(13, 100, 100), (13, 100, 50), (40, 384, 32), (9, 768, 128)])
def test_batch_invariance(kernel_only, O, I, group):
    """Row m of a batched call equals the single-row call bitwise, for every batch size up to MAX_ROWS."""
    codes8, scales8 = make_int8(O, I, group if I % group == 0 else I)
    codes4, scales4, zeros4 = make_int4(O, I, group)
    b = torch.randn(O)
    x = torch.randn(MAX_ROWS, I)
    single8 = torch.cat([int8_linear(x[m:m + 1], codes8, scales8, b) for m in range(MAX_ROWS)])
    single4 = torch.cat([int4_linear(x[m:m + 1], codes4, scales4, zeros4, group, b) for m in range(MAX_ROWS)])
    for M in (2, 3, 5, 8, 16, MAX_ROWS):
        assert torch.equal(int8_linear(x[:M], codes8, scales8, b), single8[:M])
        assert torch.equal(int4_linear(x[:M], codes4, scales4, zeros4, group, b), single4[:M])


def test_noncontiguous_and_leading_dims(kernel_only):
    codes, scales, zeros = make_int4(24, 128, 32)
    c8, s8 = make_int8(24, 128, 128)
    base = torch.randn(3, 256)
    x = base[:, ::2]                     # strided columns
    assert not x.is_contiguous()
    assert torch.equal(int4_linear(x, codes, scales, zeros, 32), int4_linear(x.contiguous(), codes, scales, zeros, 32))
    assert torch.equal(int8_linear(x, c8, s8), int8_linear(x.contiguous(), c8, s8))
    xt = torch.randn(128, 4).t()          # transposed rows
    assert torch.equal(int8_linear(xt, c8, s8), int8_linear(xt.contiguous(), c8, s8))
    c8t = c8.t().contiguous().t()         # the same codes and scales as strided views
    s8t = torch.cat([s8, s8], 1)[:, :1]
    assert not c8t.is_contiguous() and not s8t.is_contiguous()
    assert torch.equal(int8_linear(x, c8t, s8t), int8_linear(x, c8, s8))
    s4t, z4t = scales.t().contiguous().t(), zeros.t().contiguous().t()
    assert torch.equal(int4_linear(x, codes, s4t, z4t, 32), int4_linear(x, codes, scales, zeros, 32))
    x3 = torch.randn(2, 3, 128)           # (B, T, I): 6 rows
    y3 = int4_linear(x3, codes, scales, zeros, 32)
    assert y3.shape == (2, 3, 24)
    assert torch.equal(y3.reshape(6, 24), int4_linear(x3.reshape(6, 128), codes, scales, zeros, 32))


def test_fallback_past_max_rows_and_other_dtypes(counting):
    """33+ rows (prefill), float64/bfloat16 x and x that needs a gradient go to dequantize + F.linear, which
    is the definition: results equal it exactly, and the kernel is not called."""
    codes, scales, zeros = make_int4(10, 64, 32)
    c8, s8 = make_int8(10, 64, 64)
    w4, w8 = dequantize_int4(codes, scales, zeros, 32), dequantize_int8(c8, s8)
    b = torch.randn(10)
    x = torch.randn(MAX_ROWS + 1, 64)
    assert torch.equal(int4_linear(x, codes, scales, zeros, 32, b), F.linear(x, w4, b))
    assert torch.equal(int8_linear(x, c8, s8, b), F.linear(x, w8, b))
    x64 = torch.randn(2, 64, dtype=torch.float64)
    y64 = int8_linear(x64, c8, s8, b)
    assert y64.dtype == torch.float64 and torch.equal(y64, F.linear(x64, w8.double(), b.double()))
    xbf = torch.randn(2, 64).bfloat16()
    ybf = int4_linear(xbf, codes, scales, zeros, 32)
    assert ybf.dtype == torch.bfloat16 and torch.equal(ybf, F.linear(xbf, w4.bfloat16()))
    xg = torch.randn(2, 64, requires_grad=True)
    int4_linear(xg, codes, scales, zeros, 32).sum().backward()
    assert torch.allclose(xg.grad, w4.sum(0).expand(2, -1))
    assert counting == []
    int4_linear(x[:4], codes, scales, zeros, 32, b)
    int8_linear(x[:4], c8, s8, b)
    assert counting == ["int4", "int8"]


def test_odd_int4_groups_and_odd_in_features(counting):
    """An odd group size (bytes would straddle groups) or an odd in_features (the last byte's high nibble is
    padding) is valid int4 and takes the dequantize + F.linear path."""
    g = torch.Generator().manual_seed(3)
    for I, group in [(100, 25), (33, 11), (33, 33)]:
        full = torch.randint(0, 16, (5, I), generator=g, dtype=torch.uint8)
        padded = F.pad(full, (0, I % 2))
        codes = padded[:, 0::2] | (padded[:, 1::2] << 4)
        scales = torch.rand(5, I // group, generator=g)
        zeros = torch.randint(0, 16, (5, I // group), generator=g, dtype=torch.uint8)
        w = (full.float() - zeros.float().repeat_interleave(group, 1)) * scales.repeat_interleave(group, 1)
        assert torch.equal(dequantize_int4(codes, scales, zeros, group), w)
        x = torch.randn(2, I)
        assert torch.equal(int4_linear(x, codes, scales, zeros, group), F.linear(x, w))
    assert counting == []


def test_switched_off(counting, monkeypatch):
    monkeypatch.setenv("LMSTACK_KERNELS", "0")
    codes, scales = make_int8(5, 32, 32)
    x = torch.randn(1, 32)
    assert torch.equal(int8_linear(x, codes, scales), F.linear(x, dequantize_int8(codes, scales)))
    assert counting == []


def test_bad_inputs_are_clear_errors():
    c8, s8 = make_int8(6, 64, 32)
    c4, s4, z4 = make_int4(6, 64, 32)
    x = torch.randn(2, 64)
    cases = [
        (lambda: int8_linear(x, c8.to(torch.int16), s8), "codes must be a 2-D torch.int8"),
        (lambda: int8_linear(x, c8, s8.double()), "scales must be a float32"),
        (lambda: int8_linear(x, c8, torch.rand(5, 2)), "out_features=6"),
        (lambda: int8_linear(x, c8, torch.rand(6, 3)), "3 scale groups do not divide in_features=64"),
        (lambda: int8_linear(torch.randn(2, 63), c8, s8), "in_features=64"),
        (lambda: int8_linear(x.long(), c8, s8), "floating-point"),
        (lambda: int8_linear(x, c8, s8, torch.randn(5)), "bias must be"),
        (lambda: int4_linear(x, c4.to(torch.int8), s4, z4, 32), "codes must be a 2-D torch.uint8"),
        (lambda: int4_linear(x, c4, s4, z4, 16), "codes have 32 bytes a row but groups=2 x group_size=16"),
        (lambda: int4_linear(x, c4, s4, z4, 32.0), "group_size must be a positive int"),
        (lambda: int4_linear(x, c4, s4, z4.float(), 32), "zeros must be a uint8"),
        (lambda: int4_linear(x, c4, s4, z4[:, :1], 32), "shaped like scales"),
        (lambda: int4_linear(torch.randn(2, 32), c4, s4, z4, 32), "in_features=64"),
    ]
    for call, needle in cases:
        with pytest.raises(LmstackError, match=needle.replace("(", r"\(")):
            call()


def test_cpp_checks_guard_direct_calls(ext):
    """The extension itself refuses mismatched buffers (a caller bypassing quant.py gets an error, not garbage)."""
    c4, s4, z4 = make_int4(6, 64, 32)
    with pytest.raises(RuntimeError, match="group_size"):
        ext.int4_linear(torch.randn(1, 64), c4, s4, z4, 16, None)
    with pytest.raises(RuntimeError, match="columns"):
        ext.int8_linear(torch.randn(1, 10), *make_int8(6, 64, 64), None)
