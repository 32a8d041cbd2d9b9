"""Build and load lmstack's CPU kernels: one C++ extension from every .cpp file in this directory.

The extension is compiled on first use with the machine's C++ compiler (-O3 -march=native, ~40-80 s) into
$LMSTACK_CACHE_DIR/kernels/<hash> (default ~/.cache/lmstack/kernels/<hash>; the hash covers the sources, torch
and Python versions, the compiler, the flags and the CPU's feature flags), under a file lock so two processes
never build at once; later processes load the built library directly. If the build fails (no compiler, no
ninja) one warning names the cause and this process uses the torch fallbacks from then on. LMSTACK_KERNELS=0
switches every kernel off.

Usage:
    from lmstack.kernels import build
    build.available()      # True once the extension is built and loaded (builds it if needed)
    build.extension()      # the loaded module (skinny_linear, rms_norm_rows, ...), or None
    build.info()           # {"enabled", "built", "path", "isa", "error"}
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

try:
    import fcntl
except ImportError:  # Windows: no flock; builds there are not guarded against a second process
    fcntl = None

HERE = Path(__file__).resolve().parent
SOURCES = tuple(sorted(HERE.glob("*.cpp")))  # bindings.cpp defines the module; the others, the kernels
HEADERS = tuple(sorted(HERE.glob("*.h")))
CFLAGS = ("-O3", "-march=native", "-fopenmp")  # tuples: cpp_extension.load appends to the lists it gets
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_ext = None          # the loaded extension module
_error: str | None = None  # why the build or load failed; set once, then torch's ops for the rest of the process


_OFF = ("0", "false", "no", "off")


def enabled() -> bool:
    """False when the environment switches the kernels off (LMSTACK_KERNELS=0). Read on every call, so a test or
    a user can switch them off mid-process; the common unset case costs one dict lookup."""
    value = os.environ.get("LMSTACK_KERNELS")
    return value is None or value.strip().lower() not in _OFF


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
    """Hash of everything that changes the binary: the sources, torch, Python, the compiler, the flags, the CPU."""
    h = hashlib.sha256()
    for path in SOURCES + HEADERS:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    for part in (torch.__version__, sys.version, _compiler(), shutil.which(_compiler()) or "", *CFLAGS, *LDFLAGS,
                 _cpu_flags()):
        h.update(b"\0" + str(part).encode())
    return h.hexdigest()[:16]


def _module_name(key: str) -> str:
    return f"lmstack_kernels_{key}"


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
            return cpp_extension.load(name, [str(p) for p in SOURCES], extra_cflags=list(CFLAGS),
                                      extra_ldflags=list(LDFLAGS), extra_include_paths=[str(HERE)],
                                      build_directory=str(build_dir), verbose=False)
        finally:
            if fcntl is not None:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def extension():
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
                warnings.warn(f"lmstack.kernels: the C++ kernels could not be built, using torch's "
                              f"ops instead ({_error})", RuntimeWarning, stacklevel=3)
    return _ext


def available() -> bool:
    """True when the kernel is switched on and its extension is built and loaded (building it if needed)."""
    return enabled() and extension() is not None


def info() -> dict:
    """What the kernel is doing in this process: switched on?, built?, the library path, its ISA, any error."""
    key = build_key()
    lib = _built_library(cache_dir() / key, _module_name(key))
    return {"enabled": enabled(), "built": _ext is not None, "path": str(lib) if lib else None,
            "isa": _ext.isa() if _ext is not None else None, "error": _error}
