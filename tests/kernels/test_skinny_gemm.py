"""lmstack.kernels.skinny_linear: equal to F.linear, batch invariant, and falls back to F.linear wherever the
kernel does not apply or cannot be built.

The extension is built once per machine into the user cache (~40-80 s the first time, then a library load);
the session fixture below does it once for all tests here."""
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmstack.kernels import build, skinny
from lmstack.kernels import MAX_ROWS, info, skinny_linear

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ext():
    """The built extension (skips when this machine cannot build it: the fallback tests still run)."""
    if not build.enabled():
        pytest.skip("LMSTACK_KERNELS=0")
    module = build.extension()
    if module is None:
        pytest.skip(f"skinny kernel not buildable here: {build.info()['error']}")
    return module


@pytest.fixture
def kernel_only(ext, monkeypatch):
    """skinny_linear may not fall back: F.linear inside the module raises, so a pass proves the kernel ran."""
    def no_fallback(*args, **kwargs):
        raise AssertionError("skinny_linear fell back to F.linear")
    monkeypatch.setattr(skinny, "F", types.SimpleNamespace(linear=no_fallback))
    return ext


@pytest.fixture
def counting(ext, monkeypatch):
    """Counts calls into the extension; the fallback tests assert it stays at zero."""
    calls = []

    class Spy:
        def skinny_linear(self, *args):
            calls.append(args)
            return ext.skinny_linear(*args)

    monkeypatch.setattr(build, "_ext", Spy())
    return calls


SHAPES = [(1, 1), (7, 13), (8, 16), (33, 100), (129, 257), (300, 768)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_in", SHAPES)
def test_equals_f_linear_for_every_row_count_and_odd_shapes(kernel_only, out_in, bias):
    O, I = out_in
    w = torch.randn(O, I)
    b = torch.randn(O) if bias else None
    with torch.inference_mode():
        for M in range(1, MAX_ROWS + 1):
            x = torch.randn(M, I)
            torch.testing.assert_close(skinny_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5 * I ** 0.5)


def test_non_contiguous_and_batched_inputs(kernel_only):
    w, b = torch.randn(50, 40), torch.randn(50)
    with torch.no_grad():
        xt = torch.randn(40, 5).t()                 # (5, 40), transposed view
        x3 = torch.randn(2, 3, 80)[:, :, ::2]       # (2, 3, 40), strided last dim
        for x in (xt, x3):
            assert not x.is_contiguous()
            y = skinny_linear(x, w, b)
            assert y.shape == (*x.shape[:-1], 50)
            torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_batch_invariance_a_row_alone_equals_the_row_inside_a_batch_bitwise(kernel_only, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w, b = torch.randn(1003, 257), torch.randn(1003)
        x = torch.randn(MAX_ROWS, 257)
        with torch.inference_mode():
            alone = [skinny_linear(x[m:m + 1], w, b) for m in range(MAX_ROWS)]
            for M in range(1, MAX_ROWS + 1):
                y = skinny_linear(x[:M], w, b)
                for m in range(M):
                    assert torch.equal(y[m:m + 1], alone[m]), f"row {m} changed inside a batch of {M}"
            # a row's result does not depend on what the other rows hold either
            other = x.clone()
            other[1:] = torch.randn(MAX_ROWS - 1, 257)
            assert torch.equal(skinny_linear(other, w, b)[0], skinny_linear(x, w, b)[0])
    finally:
        torch.set_num_threads(before)


def test_thread_count_does_not_change_results(kernel_only):
    w, x = torch.randn(4099, 300), torch.randn(5, 300)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = skinny_linear(x, w)
        torch.set_num_threads(2)
        assert torch.equal(skinny_linear(x, w), one)
    finally:
        torch.set_num_threads(before)


def test_fallbacks_do_not_call_the_kernel(counting, monkeypatch):
    w, b, x = torch.randn(20, 16), torch.randn(20), torch.randn(3, 16)
    # gradients wanted: F.linear, and backward works
    wg = w.clone().requires_grad_()
    y = skinny_linear(x, wg, b)
    assert y.grad_fn is not None
    y.sum().backward()
    assert wg.grad is not None
    xg = x.clone().requires_grad_()
    assert skinny_linear(xg, w, b).grad_fn is not None
    # bf16, too many rows, non-contiguous weight, LMSTACK_KERNELS=0
    torch.testing.assert_close(skinny_linear(x.bfloat16(), w.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()))
    big = torch.randn(MAX_ROWS + 1, 16)
    torch.testing.assert_close(skinny_linear(big, w, b), F.linear(big, w, b))
    wt = torch.randn(16, 20).t()
    torch.testing.assert_close(skinny_linear(x, wt), F.linear(x, wt))
    monkeypatch.setenv("LMSTACK_KERNELS", "0")
    torch.testing.assert_close(skinny_linear(x, w, b), F.linear(x, w, b))
    assert counting == []
    # and the kernel does run once the gates are open: the spy sees it
    monkeypatch.setenv("LMSTACK_KERNELS", "1")
    with torch.no_grad():
        skinny_linear(xg, wg, b)
    assert len(counting) == 1


def test_shape_mismatch_is_a_clear_error(ext):
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        skinny_linear(torch.randn(2, 5), torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32 CPU vector of 3 values"):
        ext.skinny_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(5))
    with pytest.raises(RuntimeError, match="x has 5 columns but weight has 4"):
        ext.skinny_linear(torch.randn(2, 5), torch.randn(3, 4), None)


def test_info_names_the_built_library_and_its_isa(ext):
    got = info()
    assert got["built"] and got["enabled"] and got["error"] is None
    assert Path(got["path"]).is_file() and got["path"].startswith(str(build.cache_dir()))
    assert got["isa"] in ("avx512", "avx2", "generic")
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert got["isa"] == "avx512"


FAILED_BUILD = textwrap.dedent("""
    import warnings, torch, torch.nn.functional as F
    warnings.simplefilter("always")
    from lmstack.kernels import skinny_linear, available, info
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(skinny_linear(x, w), F.linear(x, w))
    assert not available()
    print("ERROR=" + info()["error"])
""")


@pytest.mark.parametrize("cxx", ["/nonexistent/c++", "/bin/false"])
def test_a_failed_build_warns_once_and_falls_back(tmp_path, cxx):
    env = {**os.environ, "CXX": cxx, "LMSTACK_CACHE_DIR": str(tmp_path), "LMSTACK_KERNELS": "1",
           "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", FAILED_BUILD], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "could not be built" in line]
    assert len(warned) == 1, done.stderr
    if cxx.startswith("/nonexistent"):
        assert cxx in warned[0]
    assert "ERROR=" in done.stdout


def test_importing_the_package_does_not_load_the_build_machinery():
    code = "import sys, lmstack.kernels; print('torch.utils.cpp_extension' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.stdout.strip() == "False", done.stderr


LOAD = textwrap.dedent("""
    import sys, time
    start = time.perf_counter()
    from lmstack.kernels import available, info
    ok = available()
    print(ok, 'torch.utils.cpp_extension' in sys.modules, round(time.perf_counter() - start, 2), info()["path"])
""")


def test_a_later_process_loads_the_built_library_without_the_build_machinery(ext):
    done = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    ok, build_machinery, _seconds, path = done.stdout.split()
    assert (ok, build_machinery, path) == ("True", "False", info()["path"]), done.stderr


@pytest.mark.slow
def test_two_processes_building_at_once_compile_once(tmp_path):
    """Two fresh processes race to build into an empty cache: the source is compiled once, the other process
    waits on the lock and loads that library (~1 min: a real build)."""
    env = {**os.environ, "LMSTACK_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert [out.split()[0] for out, _ in outs] == ["True", "True"], outs
    key = build.build_key()
    compiles = [line.split("\t")[3] for line in (tmp_path / "kernels" / key / ".ninja_log").read_text().splitlines()
                if not line.startswith("#") and line.split("\t")[3].endswith(".o")]  # start end mtime output hash
    assert sorted(compiles) == sorted(f"{p.stem}.o" for p in build.SOURCES), compiles  # each source once
