"""skinny_linear: F.linear for decode-sized fp32 inputs (a few rows) through the C++ kernel in skinny_gemm.cpp.

At decode time x has 1..MAX_ROWS rows and the product is bound by reading the weights. The kernel streams W in
nn.Linear's own (out, in) layout once per call whatever the number of rows (benchmarks/cpu_gemv.py measures it
against MKL), and row m of the result never depends on the other rows (batch invariance).

It is used when x is fp32 on the CPU with at most MAX_ROWS rows (leading dims flattened), weight is a
contiguous fp32 (O, I) matrix, no gradient is wanted, and the extension is available; everything else goes
to F.linear, with the same result within fp32 rounding.

The extension is compiled on first use with the machine's C++ compiler (-O3 -march=native, ~40-80 s) into
$LMSTACK_CACHE_DIR/kernels/<hash> (default ~/.cache/lmstack/kernels/<hash>; the hash covers the source, torch
and Python versions, the compiler, the flags and the CPU's feature flags), under a file lock so two processes
never build at once; later processes load the built library directly. If the build fails (no compiler, no
ninja) one warning names the cause and this process uses F.linear from then on. LMSTACK_KERNELS=0 switches the
kernel off.

Usage:
    from lmstack.kernels import skinny_linear, available, info
    with torch.inference_mode():
        y = skinny_linear(x, layer.weight, layer.bias)   # == F.linear(x, layer.weight, layer.bias)
    available()   # True once the extension is built and loaded (builds it if needed)
    info()        # {"enabled", "built", "path", "isa", "error"}
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import fcntl
except ImportError:  # Windows: no flock; builds there are not guarded against a second process
    fcntl = None

# Rows up to which the kernel is used. benchmarks/cpu_gemv.py (2 threads, llama-base shapes) measured it ahead
# of F.linear (MKL) at every M up to 32 and still at 48 on most shapes; by 64 the product is compute-bound and
# MKL's blocked GEMM catches up. 32 covers the engine's decode batches (max_num_seqs 16) and speculative
# verification of a few requests x (k + 1) tokens.
MAX_ROWS = 32

SOURCE = Path(__file__).resolve().parent / "skinny_gemm.cpp"
CFLAGS = ("-O3", "-march=native", "-fopenmp")  # tuples: cpp_extension.load appends to the lists it gets
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_ext = None          # the loaded extension module
_error: str | None = None  # why the build or load failed; set once, then F.linear for the rest of the process


def enabled() -> bool:
    """False when the environment switches the kernel off (LMSTACK_KERNELS=0)."""
    return os.environ.get("LMSTACK_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def cache_dir() -> Path:
    """Where built kernels live: $LMSTACK_CACHE_DIR/kernels, else $XDG_CACHE_HOME/lmstack/kernels, else ~/.cache."""
    root = os.environ.get("LMSTACK_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmstack" / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags: -march=native code must not be loaded on a CPU without them (a cache directory
    shared between machines, e.g. a network home)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.machine() + platform.processor()


def build_key() -> str:
    """Hash of everything that changes the binary: the source, torch, Python, the compiler, the flags, the CPU."""
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (torch.__version__, sys.version, _compiler(), shutil.which(_compiler()) or "", *CFLAGS, *LDFLAGS,
                 _cpu_flags()):
        h.update(b"\0" + str(part).encode())
    return h.hexdigest()[:16]


def _module_name(key: str) -> str:
    return f"lmstack_skinny_{key}"


def _built_library(build_dir: Path, name: str) -> Path | None:
    lib = build_dir / f"{name}.so"
    return lib if lib.is_file() else None


def _import_library(name: str, lib: Path):
    spec = importlib.util.spec_from_file_location(name, lib)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build():
    """Load the built library, building it first (under a file lock) when this key has none yet."""
    key = build_key()
    name, build_dir = _module_name(key), cache_dir() / key
    lib = _built_library(build_dir, name)
    if lib is not None:
        return _import_library(name, lib)
    if shutil.which(_compiler()) is None:
        raise RuntimeError(f"C++ compiler {_compiler()!r} not found (set CXX to a working compiler)")
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f"{key}.lock", "w") as lock_file:
        if fcntl is not None:
            fcntl.flock(lock_file, fcntl.LOCK_EX)  # another process may be building this key: wait for it
        try:
            lib = _built_library(build_dir, name)
            if lib is not None:
                return _import_library(name, lib)
            # lazy: cpp_extension pulls in setuptools and the build machinery, needed only on a cache miss
            from torch.utils import cpp_extension
            return cpp_extension.load(name, [str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                                      build_directory=str(build_dir), verbose=False)
        finally:
            if fcntl is not None:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def _extension():
    """The extension module, or None when it is switched off or could not be built (warned once)."""
    global _ext, _error
    if _ext is not None or _error is not None:
        return _ext
    with _lock:
        if _ext is None and _error is None:
            try:
                _ext = _build()
            except Exception as e:  # any build or load failure: fall back, say why once
                _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                warnings.warn(f"lmstack.kernels: the skinny GEMM kernel could not be built, using F.linear "
                              f"instead ({_error})", RuntimeWarning, stacklevel=3)
    return _ext


def available() -> bool:
    """True when the kernel is switched on and its extension is built and loaded (building it if needed)."""
    return enabled() and _extension() is not None


def info() -> dict:
    """What the kernel is doing in this process: switched on?, built?, the library path, its ISA, any error."""
    key = build_key()
    lib = _built_library(cache_dir() / key, _module_name(key))
    return {"enabled": enabled(), "built": _ext is not None, "path": str(lib) if lib else None,
            "isa": _ext.isa() if _ext is not None else None, "error": _error}


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the kernel when x is a few fp32 CPU rows (see the module docstring)."""
    if (x.dtype is not torch.float32 or weight.dtype is not torch.float32 or x.device.type != "cpu"
            or weight.device.type != "cpu" or weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]
            or not weight.is_contiguous() or not enabled() or _wants_grad(x, weight, bias)):
        return F.linear(x, weight, bias)
    if bias is not None and (bias.dtype is not torch.float32 or bias.device.type != "cpu" or bias.dim() != 1
                             or bias.shape[0] != weight.shape[0]):
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 1 <= rows <= MAX_ROWS:
        return F.linear(x, weight, bias)
    ext = _extension()
    if ext is None:
        return F.linear(x, weight, bias)
    y = ext.skinny_linear(x.reshape(rows, x.shape[-1]), weight, bias.contiguous() if bias is not None else None)
    return y.view(*x.shape[:-1], weight.shape[0])
