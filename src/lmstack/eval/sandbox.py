"""Run untrusted generated code (HumanEval completions) sealed off by the kernel, not by Python.

Each program runs in a fresh `python -I -S` child (lmstack/eval/sandbox_child.py) with a scrubbed environment
and these layers, all enforced by the operating system:
  - namespaces: a fresh PID namespace (the program sees only its own processes; when the sandbox's init
    exits, the kernel kills every process left in it, so setsid + double-fork daemons die and kill(-1, 9)
    reaches only the sandbox), an empty network namespace (loopback down: no connection anywhere, the
    host's 127.0.0.1 and DNS included), a mount namespace (every mount read-only and nosuid, a fresh /proc,
    a read-only /tmp holding only the working dir, which is a private tmpfs of tmp_mb, and an empty
    read-only /dev/shm: the working dir is the one writable place), IPC and UTS namespaces;
  - identity: when the parent is root, the program runs as a fresh private uid/gid (one per run, owning no
    file, no groups; RLIMIT_NPROC then counts this run alone); otherwise a user namespace maps only the
    caller's own uid and every capability is dropped; no_new_privs always;
  - seccomp (through libseccomp, when installed): no ptrace, new namespaces, mounts, keyrings, bpf, io_uring;
  - rlimits: address space (memory), CPU seconds, file size (also bounds captured output), process count,
    open files, no core dumps; and a wall-clock timeout that kills the sandbox's process group and namespace;
  - after every run the sandbox checks that no process of its PID namespace, nor of its private uid,
    remains (and kills any it finds; SandboxResult.leftovers counts them: 0 unless the kernel misbehaves).
Python-level guards (fork/exec/kill raise) stay on by default only so that ordinary generated code fails
fast; they are not a boundary (`sys.modules.pop('posix'); import posix` restores the real calls), and the
tests run the attacks with and without them.

Where the kernel cannot provide the namespaces (no unprivileged user namespaces, no mount_setattr), the
sandbox REFUSES: run_program raises LmstackError naming what failed. `unsafe_no_isolation=True` is the
explicit opt-out: rlimits, the dropped uid and the timeout only; the program can then reach the network,
and write wherever any user may (/tmp, /dev/shm), and its daemons live until the parent's uid sweep (root)
or forever (not root). Never use it on untrusted code.

What this does not stop: kernel exploits; reading world-readable files (the stdlib, /etc/passwd, any
world-readable file of the host); burning its own CPU, memory and tmpfs quota; and, when the caller is not
root, reading the caller's own files (the program keeps the caller's uid; run as root for a private uid).
A program that reads its own source learns anything written in it (see humaneval.py's pass sentinel).

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
import secrets
import select
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

from lmstack.errors import LmstackError

CHILD = Path(__file__).resolve().parent / "sandbox_child.py"
SECCOMP_MODES = ("auto", "require", "off")
PRIVATE_UID_BASE, PRIVATE_UID_SPAN = 2_100_000_000, 40_000_000  # far above any account and subuid range
UNSAFE_HINT = ("set SandboxConfig(unsafe_no_isolation=True) (code tasks: get_task(..., unsafe_no_isolation=True)) "
               "to run it anyway with rlimits and a dropped uid only (UNSAFE: no network, process or filesystem "
               "isolation)")


@dataclass
class SandboxConfig:
    """Limits for one sandboxed program run."""

    timeout_s: float = 10.0
    """Wall-clock seconds before the whole sandbox is killed (status 'timeout')."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) in MiB; allocations past it raise MemoryError."""
    cpu_s: int | None = None
    """CPU-seconds limit (RLIMIT_CPU, SIGXCPU); None: the timeout rounded up, plus one."""
    max_file_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE, SIGXFSZ); also caps captured stdout/stderr."""
    tmp_mb: int = 64
    """Size of the program's private /tmp (a RAM-backed tmpfs holding its working dir)."""
    max_processes: int = 8
    """Process limit (RLIMIT_NPROC) of the user the program runs as (counts threads); stops fork bombs."""
    max_open_files: int = 256
    """Open file descriptors (RLIMIT_NOFILE)."""
    drop_privileges: bool = True
    """When the parent runs as root, run the program as a fresh private uid (root bypasses RLIMIT_NPROC)."""
    run_as_uid: int | None = None
    """Root only: run as this uid/gid instead of a fresh private one (runs sharing it share RLIMIT_NPROC, and
    the after-run sweep then goes by PID namespace only). The attack tests use it to put a victim outside
    and the sandbox under one uid, so that only the PID namespace stands between them."""
    seccomp: str = "auto"
    """auto (a syscall filter through libseccomp when the library is installed), require (refuse without
    it) or off."""
    python_guards: bool = True
    """Replace fork/exec/kill and destructive file functions by ones that raise (fail fast; not a boundary)."""
    site_packages: bool = False
    """Let the program import installed packages (python without -S). Off: stdlib only, faster start."""
    output_bytes: int = 65536
    """Bytes kept from the end of stdout and of stderr."""
    unsafe_no_isolation: bool = False
    """UNSAFE opt-out: where namespaces are unavailable, run anyway with rlimits, the dropped uid and the
    timeout only (the program can use the network and signal or write what its uid may). Default: refuse."""

    def __post_init__(self) -> None:
        if self.seccomp not in SECCOMP_MODES:
            raise ValueError(f"SandboxConfig.seccomp={self.seccomp!r}; choose one of {', '.join(SECCOMP_MODES)}")
        for name in ("timeout_s", "memory_mb", "max_file_mb", "tmp_mb", "max_processes", "max_open_files",
                     "output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.memory_mb < 64:
            raise ValueError(f"SandboxConfig.memory_mb={self.memory_mb} is too small for Python to start; use >= 64")
        if self.run_as_uid is not None and not 0 < self.run_as_uid < 2 ** 32 - 1:
            raise ValueError(f"SandboxConfig.run_as_uid must be a non-root uid, got {self.run_as_uid!r}")
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
    e.g. SIGXCPU or SIGXFSZ) | error (the sandbox itself could not be set up; the program did not run)."""
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    isolation: str
    """namespaces+seccomp, namespaces (libseccomp absent or seccomp='off'), or 'none (unsafe)' under
    unsafe_no_isolation."""
    reason: str = ""
    """A short why for anything but passed: 'timeout after 2.0 s', 'MemoryError', 'signal SIGXFSZ', ..."""
    leftovers: int = 0
    """Processes of the sandbox found (and killed) after the run; 0 when the PID namespace did its job."""
    uid: int | None = None
    """The private uid the program ran as (None: the caller's own uid, when the caller is not root)."""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _run_as(cfg: SandboxConfig) -> tuple[int | None, int | None]:
    """(uid, gid) the child switches to when we are root and may drop privileges, else (None, None): a fresh
    private uid per run inside a range no account uses (so RLIMIT_NPROC counts this run alone and every
    process it leaves is findable and killable by uid after the run)."""
    if not (cfg.drop_privileges and hasattr(os, "getuid") and os.getuid() == 0):
        return None, None
    if cfg.run_as_uid is not None:
        return cfg.run_as_uid, cfg.run_as_uid
    uid = PRIVATE_UID_BASE + secrets.randbelow(PRIVATE_UID_SPAN)
    return uid, uid


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


def _wait_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Whether `proc` exited within timeout_s; a pidfd wakes us the moment it does (Popen.wait(timeout)
    polls with sleeps of up to 50 ms, a third of a trivial program's run)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([fd], [], [], timeout_s)
        return bool(ready)
    finally:
        os.close(fd)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def uid_members(uid: int) -> list[int]:
    """PIDs of every process whose real, effective or saved uid is `uid` (from /proc/<pid>/status)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if str(uid) in line.split()[1:4]:
                                found.append(int(entry))
                            break
            except OSError:
                pass  # exited meanwhile
    return found


def _reap_uid(uid: int | None, grace_s: float = 2.0) -> int:
    """Wait up to grace_s for the run's private uid to own no process (the kernel may still be tearing the
    namespace down after a timeout kill); SIGKILL and count whatever remains."""
    if uid is None:
        return 0
    deadline = time.monotonic() + grace_s
    while (left := uid_members(uid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(left)


def _read_status(fd: int) -> dict:
    """The child's JSON-lines report: pidns, setup_error, exit or signal (later lines win)."""
    os.set_blocking(fd, False)  # a process holding the pipe open must not hang us
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    status: dict = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            for key, value in record.items():
                status.setdefault(key, value) if key == "setup_error" else status.__setitem__(key, value)
    return status


def _classify(rc: int | None, timed_out: bool, status: dict, stderr: str, timeout_s: float) -> tuple[str, str]:
    if "setup_error" in status:
        return "error", str(status["setup_error"])[:300]
    if timed_out:
        return "timeout", f"timeout after {timeout_s:g} s"
    if rc == 0:
        return "passed", ""
    if rc is not None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = str(-rc)
        return "killed", f"signal {name}"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {rc}"
    return "failed", last[:200]


def _spec(cfg: SandboxConfig, isolate: bool, code_path: Path, status_fd: int, token: str, uid, gid) -> dict:
    return {"isolate": isolate, "uid": uid, "gid": gid, "limits": cfg.limits(), "tmp_mb": cfg.tmp_mb,
            "seccomp": None if cfg.seccomp == "off" else cfg.seccomp, "python_guards": cfg.python_guards,
            "code_path": str(code_path), "status_fd": status_fd, "token": token}


def _run(code: str, cfg: SandboxConfig, isolate: bool, python: str) -> SandboxResult:
    outdir = tempfile.mkdtemp(prefix="lmstack-sandbox-out-")  # parent-only; the program never sees it
    token = secrets.token_hex(8)
    workdir = f"/tmp/lmstack-sandbox-{token}" if isolate else "/tmp"
    start = time.perf_counter()
    rfd, wfd = os.pipe()
    try:
        out = Path(outdir)
        # surrogatepass: a lone surrogate in generated code must fail that program inside, not raise here
        (out / "program.py").write_text(code, encoding="utf-8", errors="surrogatepass")
        uid, gid = _run_as(cfg)
        spec = _spec(cfg, isolate, out / "program.py", wfd, token, uid, gid)
        cmd = [python, *(["-I"] if cfg.site_packages else ["-I", "-S"]), str(CHILD), json.dumps(spec)]
        with open(out / "stdout", "wb") as fo, open(out / "stderr", "wb") as fe:
            proc = subprocess.Popen(cmd, cwd="/", env=_scrubbed_env(workdir), stdin=subprocess.DEVNULL,
                                    stdout=fo, stderr=fe, start_new_session=True, pass_fds=(wfd,))
            os.close(wfd)
            wfd = -1
            timed_out = not _wait_exit(proc, cfg.timeout_s)
            if timed_out:
                _kill_group(proc.pid)  # outer and init: init's death empties the namespace
            rc = proc.wait()
            _kill_group(proc.pid)
        status = _read_status(rfd)
        leftovers = int(status.get("ns_leftovers", 0)) + _reap_uid(uid if cfg.run_as_uid is None else None)
        if "signal" in status:
            rc = -int(status["signal"])
        elif "exit" in status:
            rc = int(status["exit"])
        stdout, stderr = _tail(out / "stdout", cfg.output_bytes), _tail(out / "stderr", cfg.output_bytes)
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
        shutil.rmtree(outdir, ignore_errors=True)
    state, reason = _classify(rc, timed_out, status, stderr, cfg.timeout_s)
    return SandboxResult(state, None if timed_out or state == "error" else rc, stdout, stderr,
                         time.perf_counter() - start, _layers(isolate, status), reason, leftovers, uid)


def _layers(isolate: bool, status: dict) -> str:
    if not isolate:
        return "none (unsafe)"
    return "namespaces+seccomp" if status.get("seccomp") else "namespaces"


@lru_cache(maxsize=None)
def isolation_problem(python: str = sys.executable) -> str | None:
    """Why this machine cannot run the fully isolated sandbox (None: it can). Probed once per interpreter."""
    if not sys.platform.startswith("linux"):
        return f"the sandbox needs Linux namespaces; this is {sys.platform}"
    probe = _run("pass", SandboxConfig(timeout_s=20), True, python)
    if probe.passed:
        return None
    return probe.reason or f"the isolated probe program ended {probe.status} ({probe.stderr.strip()[-200:]})"


def _isolate(cfg: SandboxConfig, python: str) -> bool:
    """True to isolate; raises LmstackError when isolation is impossible and the user did not opt out."""
    problem = isolation_problem(python)
    if problem is None:
        return True
    if cfg.unsafe_no_isolation:
        return False
    raise LmstackError(f"the code sandbox refuses to run untrusted code: it cannot isolate it here "
                       f"({problem}); {UNSAFE_HINT}")


def run_program(code: str, config: SandboxConfig | None = None, python: str | None = None) -> SandboxResult:
    """Run `code` as a Python program in the sandbox; never raises for anything the program does (raises
    LmstackError before running anything when the machine cannot isolate it)."""
    cfg = config or SandboxConfig()
    python = python or sys.executable
    return _run(code, cfg, _isolate(cfg, python), python)


def run_programs(codes: list[str], config: SandboxConfig | None = None, workers: int | None = None,
                 python: str | None = None) -> list[SandboxResult]:
    """run_program over many programs, `workers` at a time (default: the CPU count); results in order."""
    cfg = config or SandboxConfig()
    python = python or sys.executable
    isolate = _isolate(cfg, python)  # probe once, before the threads start
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda c: _run(c, cfg, isolate, python), codes))
