"""lmstack.kernels.int8_linear / int4_linear: equal to F.linear on the dequantized weight (within the stated fp32
bound), the packed layout decoded exactly, batch invariant, falling back to dequantize + F.linear wherever the
kernel does not apply, and clear errors for bad buffers. lmstack.kernels.quant.w8a8_linear: equal to SmoothQuant's
reference (compress/smoothquant.py) bit for bit, in the kernel and in the torch path; the shared C++ header is in
the build key.

The extension is built once per machine into the user cache; the session fixture does it once for all tests."""

import pytest
import torch
import torch.nn.functional as F

from lmstack.compress.quantize_rtn import QuantizedWeight
from lmstack.compress.smoothquant import quantize_per_token
from lmstack.compress.smoothquant import w8a8_linear as w8a8_reference
from lmstack.errors import LmstackError
from lmstack.kernels import MAX_ROWS, build, int4_linear, int8_linear, quant
from lmstack.kernels.quant import W8A8_MAX_IN, dequantize_int4, dequantize_int8, quantize_rows, w8a8_linear

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

        def w8a8_linear(self, *args):
            calls.append("w8a8")
            return ext.w8a8_linear(*args)

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


# ---- W8A8 (SmoothQuant): int8 activations x int8 weights -> int32 ----
# The kernel and the torch path make the reference's activation codes (the same fp32 division, round half to even
# and clamp), sum the products exactly in int32, then do the reference's fp32 steps in its order: float(sum) * xs,
# times the channel scale, plus bias. So equality is exact (torch.equal), not within a tolerance. (It is that
# close a check: a build of the kernel without its compiler barrier let GCC fuse the bias add into an FMA, and
# 537 of 2509 outputs then differed from the reference in the last bits.)

def make_w8a8(O, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (O, I), generator=g, dtype=torch.int8)
    return codes, torch.rand(O, 1, generator=g) * 0.02 + 1e-3


def reference(x, codes, wscales, bias=None):
    return w8a8_reference(x, QuantizedWeight(codes, wscales.reshape(-1, 1), None, 8, codes.shape[1]), bias)


W8A8_SHAPES = [(1, 1), (7, 33), (13, 100), (9, 64), (33, 257), (129, 384), (24, 1000)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("O,I", W8A8_SHAPES)
def test_w8a8_kernel_equals_reference(counting, O, I, bias):
    """Odd O (tail rows of a tile), I not a multiple of the 64-byte chunk, 1..MAX_ROWS rows: bit for bit."""
    codes, wscales = make_w8a8(O, I, seed=O * I)
    b = torch.randn(O) if bias else None
    for M in ROWS:
        x = torch.randn(M, I) * 3
        assert torch.equal(w8a8_linear(x, codes, wscales, b), reference(x, codes, wscales, b))
    assert counting == ["w8a8"] * len(ROWS)


def test_w8a8_large_sums_and_extreme_codes(kernel_only):
    """Sums past 2^24 (their fp32 conversion rounds, as the reference's .float() does), codes of -128 in the
    weights (legal int8, exact in the kernel's unsigned/signed split), and wscales given as (O,)."""
    I = 1100                                                 # 127 * 127 * 1100 > 2^24
    codes = torch.full((5, I), 127, dtype=torch.int8)
    codes[1] = -128
    codes[2, ::2] = -127
    codes[3] = torch.randint(-128, 128, (I,), dtype=torch.int8)
    wscales = torch.rand(5) + 0.5
    x = torch.ones(3, I)
    x[1] = -x[1]
    x[2] = torch.randn(I)
    y = w8a8_linear(x, codes, wscales)
    assert torch.equal(y, reference(x, codes, wscales))
    assert abs(float(y[0, 0]) - 127 * I * float(wscales[0])) <= 1e-5 * 127 * I * float(wscales[0])


def test_w8a8_activation_codes_round_half_even(ext):
    """ext.w8a8_quantize_rows and quant.quantize_rows make quantize_per_token's codes and scales exactly, ties
    included (x / scale exactly k + 0.5 rounds to even), and an all-zero row gets scale 1."""
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.49999, 0.0, -127.0])
    rows = torch.stack([ties, torch.zeros(12), torch.randn(12) * 1e-30, torch.randn(12) * 1e30])
    for x in (rows, torch.randn(5, 333) * 10):
        want_codes, want_scales = quantize_per_token(x)
        for codes, scales in (ext.w8a8_quantize_rows(x), quantize_rows(x)):
            assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    codes, scales = ext.w8a8_quantize_rows(rows)
    assert codes[0, :10].tolist() == [127, 0, 2, 2, 0, -2, -2, 126, -126, 3] and scales[1, 0] == 1.0


@pytest.mark.parametrize("O,I", [(13, 100), (40, 384), (9, 768)])
def test_w8a8_batch_invariance(kernel_only, O, I):
    codes, wscales = make_w8a8(O, I)
    b = torch.randn(O)
    x = torch.randn(MAX_ROWS, I)
    single = torch.cat([w8a8_linear(x[m:m + 1], codes, wscales, b) for m in range(MAX_ROWS)])
    for M in (2, 3, 5, 8, MAX_ROWS):
        assert torch.equal(w8a8_linear(x[:M], codes, wscales, b), single[:M])


def test_w8a8_torch_path_equals_reference(counting):
    """Prefill-sized inputs, other dtypes and inputs that need a gradient take the torch path (int32 products
    through torch._int_mm): the same numbers, the kernel not called; only the bias gets a gradient."""
    codes, wscales = make_w8a8(21, 100)
    b = torch.randn(21)
    x = torch.randn(MAX_ROWS + 5, 100)
    assert torch.equal(w8a8_linear(x, codes, wscales, b), reference(x, codes, wscales, b))
    x3 = torch.randn(2, 40, 100)
    assert torch.equal(w8a8_linear(x3, codes, wscales, b), reference(x3, codes, wscales, b))
    x64 = torch.randn(3, 100, dtype=torch.float64)
    y64 = w8a8_linear(x64, codes, wscales, b)
    assert y64.dtype == torch.float64 and torch.equal(y64, reference(x64, codes, wscales, b).double())
    xbf = torch.randn(3, 100).bfloat16()
    assert torch.equal(w8a8_linear(xbf, codes, wscales), reference(xbf, codes, wscales).bfloat16())
    xg, bg = torch.randn(2, 100, requires_grad=True), b.clone().requires_grad_(True)
    w8a8_linear(xg, codes, wscales, bg).sum().backward()
    assert xg.grad is None and torch.equal(bg.grad, torch.full((21,), 2.0))
    assert w8a8_linear(torch.randn(0, 100), codes, wscales).shape == (0, 21)
    assert counting == []
    w8a8_linear(x[:3], codes, wscales, b)
    assert counting == ["w8a8"]


def test_w8a8_switched_off_and_strided(ext, monkeypatch):
    codes, wscales = make_w8a8(16, 96)
    x = torch.randn(4, 192)[:, ::2]
    want = reference(x, codes, wscales)
    assert torch.equal(w8a8_linear(x, codes, wscales), want)
    assert torch.equal(w8a8_linear(x, codes.t().contiguous().t(), wscales.reshape(-1)), want)
    monkeypatch.setenv("LMSTACK_KERNELS", "0")
    assert torch.equal(w8a8_linear(x, codes, wscales), want)


def test_w8a8_nonfinite_rows_give_nan(ext):
    """A row with NaN or inf has no meaningful int8 codes: its outputs are NaN, in both paths; other rows are
    untouched."""
    codes, wscales = make_w8a8(10, 50)
    x = torch.randn(4, 50)
    clean = w8a8_linear(x, codes, wscales)
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    for y in (w8a8_linear(x, codes, wscales), w8a8_linear(x.double(), codes, wscales).float()):
        assert y[1:3].isnan().all()
        assert torch.equal(y[[0, 3]], clean[[0, 3]])


def test_w8a8_bad_inputs_are_clear_errors(ext):
    codes, wscales = make_w8a8(6, 64)
    x = torch.randn(2, 64)
    cases = [
        (lambda: w8a8_linear(x, codes.to(torch.int16), wscales), "codes must be a 2-D torch.int8"),
        (lambda: w8a8_linear(x, codes, wscales.double()), "wscales must be float32"),
        (lambda: w8a8_linear(x, codes, torch.rand(6, 2)), "one scale per output channel, shape (6,) or (6, 1)"),
        (lambda: w8a8_linear(x, codes, torch.rand(5, 1)), "one scale per output channel"),
        (lambda: w8a8_linear(torch.randn(2, 63), codes, wscales), "in_features=64"),
        (lambda: w8a8_linear(x.long(), codes, wscales), "floating-point"),
        (lambda: w8a8_linear(x, codes, wscales, torch.randn(5)), "bias must be"),
        (lambda: w8a8_linear(torch.randn(1, W8A8_MAX_IN), torch.zeros(1, W8A8_MAX_IN, dtype=torch.int8),
                             torch.ones(1, 1)), "could overflow the int32 accumulator"),
    ]
    for call, needle in cases:
        with pytest.raises(LmstackError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            call()
    with pytest.raises(RuntimeError, match="columns"):
        ext.w8a8_linear(torch.randn(1, 10), codes, wscales, None)
    with pytest.raises(RuntimeError, match="one per output channel"):
        ext.w8a8_linear(x, codes, torch.rand(3), None)


def test_build_key_covers_every_header(monkeypatch, tmp_path):
    """The shared ops_common.h is hashed into the build key: editing a header rebuilds instead of loading a stale
    library."""
    assert {"ops_common.h", "simd.h"} <= {p.name for p in build.HEADERS}
    header = tmp_path / "extra.h"
    header.write_text("// one\n")
    monkeypatch.setattr(build, "HEADERS", build.HEADERS + (header,))
    before = build.build_key()
    header.write_text("// two\n")
    assert build.build_key() != before
