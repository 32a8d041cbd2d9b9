"""Run untrusted generated code (HumanEval completions) in a locked-down subprocess.

Each program runs in a fresh `python -I -S` child inside a temporary working directory that is removed
afterwards, with a scrubbed environment and these layers, outermost first:
  - a wall-clock timeout; the child leads its own process group, and the whole group is SIGKILLed at the
    end of every run, so a child that forked cannot outlive it (stragglers included);
  - when the parent is root, the child drops to the `nobody` user before running anything, so it cannot
    write outside the temp dir, and the process-count limit applies (root ignores RLIMIT_NPROC);
  - no network: a fresh (empty, down) network namespace via unshare(CLONE_NEWUSER | CLONE_NEWNET) where
    the kernel allows it (`network="namespace"`), otherwise Python's socket constructors are replaced by
    a function that raises (`network="socket_block"`; best effort: the namespace is the real wall);
  - kernel rlimits: address space (memory), CPU seconds, file size, process count, open files, no cores;
  - Python-level guards (human-eval's "reliability guard" idea): fork/exec/spawn/kill and destructive
    file operations raise, so ordinary generated code fails fast instead of probing the limits.
The kernel layers hold on their own (tests run with python_guards=False to show it). This is a sandbox
for benchmark code from a model, not a security boundary against a determined attacker.

Usage:
    from lmstack.eval.sandbox import SandboxConfig, run_program
    res = run_program("assert 1 + 1 == 2", SandboxConfig(timeout_s=5))
    res.passed, res.status, res.reason          # True, "passed", ""
    run_program("while True: pass", SandboxConfig(timeout_s=1)).status     # "timeout"
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

NETWORK_MODES = ("auto", "namespace", "socket_block")
SETUP_FAILED = 97  # exit code of a child whose sandbox could not be set up (not the program's fault)

# The child's first code: drop privileges, cut the network, set rlimits, install guards, then run the
# program. It is plain stdlib, so the child needs no site-packages (-S) and starts quickly.
_GUARD = r'''
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
path = sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
if cfg["uid"] is not None and os.getuid() == 0:
    # The stdlib may sit under a directory only root may enter (/root/.pyenv): keep reaching it through
    # directory fds opened now, as /proc/self/fd/N import paths.
    roots = {p: "/proc/self/fd/%d" % os.open(p, os.O_RDONLY | os.O_DIRECTORY)
             for p in sys.path if p and os.path.isdir(p)}
    os.setgroups([]); os.setgid(cfg["gid"]); os.setuid(cfg["uid"])
    libc.prctl(4, 1, 0, 0, 0)                             # PR_SET_DUMPABLE: /proc/self/fd is ours again
    sys.path[:] = list(roots.values())
    for mod in list(sys.modules.values()):                # packages imported already (collections, ...)
        if isinstance(getattr(mod, "__path__", None), list):
            for root, fd_path in roots.items():
                mod.__path__[:] = [fd_path + p[len(root):] if p.startswith(root + "/") else p for p in mod.__path__]
    sys.path_importer_cache.clear()
if cfg["network"] == "namespace":
    if libc.unshare(0x10000000 | 0x40000000) != 0:      # CLONE_NEWUSER | CLONE_NEWNET
        sys.stderr.write("sandbox: unshare failed: %s\n" % os.strerror(ctypes.get_errno()))
        os._exit(SETUP_FAILED_CODE)
for name, (soft, hard) in cfg["limits"].items():
    if hasattr(resource, name):
        resource.setrlimit(getattr(resource, name), (soft, hard))
def _blocked(*args, **kwargs):
    raise PermissionError("blocked by the lmstack sandbox")
if cfg["network"] == "socket_block":
    import socket, _socket
    for mod in (socket, _socket):
        for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
            if hasattr(mod, name):
                setattr(mod, name, _blocked)
if cfg["python_guards"]:
    import posix, shutil, subprocess, _posixsubprocess
    for mod in (os, posix):
        for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "setsid", "putenv", "unsetenv",
                     "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                     "posix_spawn", "posix_spawnp", "execl", "execle", "execlp", "execlpe", "execv", "execve",
                     "execvp", "execvpe", "remove", "unlink", "rmdir", "removedirs", "rename", "renames",
                     "replace", "chmod", "chown", "lchown", "fchmod", "fchown", "truncate", "ftruncate",
                     "setuid", "setgid", "chroot"):
            if hasattr(mod, name):
                setattr(mod, name, _blocked)
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, _blocked)
    subprocess.Popen = _blocked
    _posixsubprocess.fork_exec = _blocked
    sys.modules["ctypes"] = sys.modules["_ctypes"] = None   # no raw libc calls (fork, unshare, ...)
del cfg, json, resource, libc, ctypes
with open(path, encoding="utf-8") as f:
    _code = compile(f.read(), path, "exec")
sys.argv = [path]
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__, "__file__": path})
'''.replace("SETUP_FAILED_CODE", str(SETUP_FAILED))


@dataclass
class SandboxConfig:
    """Limits for one sandboxed program run."""

    timeout_s: float = 10.0
    """Wall-clock seconds before the whole process group is killed (status 'timeout')."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) in MiB; allocations past it raise MemoryError."""
    cpu_s: int | None = None
    """CPU-seconds limit (RLIMIT_CPU, SIGXCPU); None: the timeout rounded up, plus one."""
    max_file_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE, SIGXFSZ); also caps captured stdout/stderr."""
    max_processes: int = 8
    """Process limit (RLIMIT_NPROC) of the user the program runs as (counts threads); stops fork bombs."""
    max_open_files: int = 256
    """Open file descriptors (RLIMIT_NOFILE)."""
    network: str = "auto"
    """auto (namespace when the kernel allows unprivileged user namespaces, else socket_block),
    namespace (fail when unshare is not allowed) or socket_block."""
    drop_privileges: bool = True
    """When the parent runs as root, run the program as the `nobody` user (root bypasses RLIMIT_NPROC)."""
    python_guards: bool = True
    """Replace fork/exec/kill and destructive file functions by ones that raise (defence in depth)."""
    site_packages: bool = False
    """Let the program import installed packages (python without -S). Off: stdlib only, faster start."""
    output_bytes: int = 65536
    """Bytes kept from the end of stdout and of stderr."""

    def __post_init__(self) -> None:
        if self.network not in NETWORK_MODES:
            raise ValueError(f"SandboxConfig.network={self.network!r}; choose one of {', '.join(NETWORK_MODES)}")
        for name in ("timeout_s", "memory_mb", "max_file_mb", "max_processes", "max_open_files", "output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.memory_mb < 64:
            raise ValueError(f"SandboxConfig.memory_mb={self.memory_mb} is too small for Python to start; use >= 64")
        if self.cpu_s is not None and self.cpu_s < 1:
            raise ValueError(f"SandboxConfig.cpu_s must be >= 1 or None, got {self.cpu_s!r}")

    def limits(self) -> dict[str, tuple[int, int]]:
        """rlimit name -> (soft, hard) for the child."""
        mb = 1024 * 1024
        cpu = self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1
        return {"RLIMIT_AS": (self.memory_mb * mb,) * 2, "RLIMIT_CPU": (cpu, cpu + 1),
                "RLIMIT_FSIZE": (self.max_file_mb * mb,) * 2, "RLIMIT_NPROC": (self.max_processes,) * 2,
                "RLIMIT_NOFILE": (self.max_open_files,) * 2, "RLIMIT_CORE": (0, 0)}


@dataclass
class SandboxResult:
    """What happened to one program."""

    status: str
    """passed (exit 0) | failed (non-zero exit: an exception, a failed assert) | timeout | killed (a signal,
    e.g. SIGXCPU or SIGXFSZ) | error (the sandbox itself could not be set up)."""
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    network: str
    """The network isolation used: namespace or socket_block."""
    reason: str = ""
    """A short why for anything but passed: 'timeout after 2.0 s', 'MemoryError', 'signal SIGXFSZ', ..."""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _nobody() -> tuple[int, int]:
    try:
        import pwd

        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except (ImportError, KeyError):
        return 65534, 65534


def _run_as(cfg: SandboxConfig) -> tuple[int | None, int | None]:
    """(uid, gid) the child switches to: nobody when we are root and may drop privileges, else no switch."""
    if cfg.drop_privileges and hasattr(os, "getuid") and os.getuid() == 0:
        return _nobody()
    return None, None


def _child_cmd(python: str, cfg: SandboxConfig, network: str, guard: Path, program: Path,
               uid: int | None, gid: int | None) -> list[str]:
    spec = {"uid": uid, "gid": gid, "network": network, "python_guards": cfg.python_guards,
            "limits": cfg.limits()}
    flags = ["-I"] if cfg.site_packages else ["-I", "-S"]
    return [python, *flags, str(guard), json.dumps(spec), str(program)]


def _scrubbed_env(workdir: str) -> dict[str, str]:
    # Nothing of the parent's environment leaks (API keys, tokens, proxy settings).
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}


def _tail(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(size - n, 0))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(rc: int | None, timed_out: bool, stderr: str, timeout_s: float) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"timeout after {timeout_s:g} s"
    if rc == 0:
        return "passed", ""
    if rc == SETUP_FAILED and "sandbox:" in stderr:
        return "error", stderr.strip().splitlines()[-1]
    if rc is not None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = str(-rc)
        return "killed", f"signal {name}"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {rc}"
    return "failed", last[:200]


def _run(code: str, cfg: SandboxConfig, network: str, python: str) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="lmstack-sandbox-")
    outdir = tempfile.mkdtemp(prefix="lmstack-sandbox-out-")  # parent-only: the program cannot reach it by path
    start = time.perf_counter()
    try:
        work = Path(workdir)
        program, guard = work / "program.py", work / "_sandbox_guard.py"
        program.write_text(code, encoding="utf-8")
        guard.write_text(_GUARD, encoding="utf-8")
        uid, gid = _run_as(cfg)
        cmd = _child_cmd(python, cfg, network, guard, program, uid, gid)
        if uid is not None:  # the unprivileged child must own its working directory
            for p in (work, program, guard):
                os.chown(p, uid, gid)
        out_path, err_path = Path(outdir) / "stdout", Path(outdir) / "stderr"
        with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
            proc = subprocess.Popen(cmd, cwd=workdir, env=_scrubbed_env(workdir), stdin=subprocess.DEVNULL,
                                    stdout=fo, stderr=fe, start_new_session=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=cfg.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                rc = proc.wait()
            finally:
                _kill_group(proc.pid)  # stragglers a forking program left behind
        stdout, stderr = _tail(out_path, cfg.output_bytes), _tail(err_path, cfg.output_bytes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(outdir, ignore_errors=True)
    status, reason = _classify(rc, timed_out, stderr, cfg.timeout_s)
    return SandboxResult(status, None if timed_out else rc, stdout, stderr, time.perf_counter() - start,
                         network, reason)


@lru_cache(maxsize=None)
def namespace_available(python: str = sys.executable) -> bool:
    """Whether this kernel lets the sandboxed child unshare a user + network namespace (probed once)."""
    if not sys.platform.startswith("linux"):
        return False
    probe = _run("pass", SandboxConfig(timeout_s=10, network="namespace"), "namespace", python)
    return probe.passed


def resolve_network(mode: str, python: str = sys.executable) -> str:
    """The isolation a run will use for `mode`: 'namespace' or 'socket_block'."""
    if mode not in NETWORK_MODES:
        raise ValueError(f"network={mode!r}; choose one of {', '.join(NETWORK_MODES)}")
    if mode == "auto":
        return "namespace" if namespace_available(python) else "socket_block"
    return mode


def run_program(code: str, config: SandboxConfig | None = None, python: str | None = None) -> SandboxResult:
    """Run `code` as a Python program in the sandbox; never raises for anything the program does."""
    cfg = config or SandboxConfig()
    python = python or sys.executable
    return _run(code, cfg, resolve_network(cfg.network, python), python)


def run_programs(codes: list[str], config: SandboxConfig | None = None, workers: int | None = None,
                 python: str | None = None) -> list[SandboxResult]:
    """run_program over many programs, `workers` at a time (default: the CPU count); results in order."""
    cfg = config or SandboxConfig()
    python = python or sys.executable
    network = resolve_network(cfg.network, python)  # probe once, before the threads start
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda c: _run(c, cfg, network, python), codes))
