"""The sandbox attack campaign: hostile programs, each run in the sandbox and judged contained or not.

Each attack is a program written to escape or to hurt something outside the sandbox, plus the check the
parent makes afterwards (a listener nobody may reach, a victim process that must survive, a host path that
must not appear, a secret that must not be printed). A program prints ESCAPED when its probe got through,
so a probe that succeeds can never pass as contained. Every attack also requires that no process of the
run remains afterwards (SandboxResult.leftovers == 0 and nothing left under the run's uid).

By default the attacks run with python_guards=False: the operating-system layers must hold on their own.
The `posix re-import` attacks run with the guards on, to show that undoing them changes nothing.

Usage:
    from lmstack.eval.sandbox_attacks import ATTACKS, run_campaign
    rows = run_campaign()                        # [{"attack", "contained", "status", "evidence", ...}, ...]
    ATTACKS["daemon_double_fork"](SandboxConfig(timeout_s=3, python_guards=False)).contained
"""
from __future__ import annotations

from dataclasses import dataclass, replace
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Callable

from lmstack.eval.sandbox import (PRIVATE_UID_BASE, SandboxConfig, SandboxResult, run_program, run_programs,
                                  uid_members)
from lmstack.eval.tasks.humaneval import run_checked


@dataclass
class Outcome:
    """How one attack ended."""

    contained: bool
    evidence: str
    status: str
    leftovers: int
    duration_s: float


ATTACKS: dict[str, Callable[[SandboxConfig], Outcome]] = {}


def attack(name: str):
    def register(fn):
        ATTACKS[name] = fn
        return fn
    return register


def _no_survivors(res: SandboxResult) -> bool:
    private = res.uid is not None and res.uid >= PRIVATE_UID_BASE  # a shared uid has other owners (kill_all)
    return res.leftovers == 0 and not (private and uid_members(res.uid))


def _judge(res: SandboxResult, ok: bool, evidence: str) -> Outcome:
    """Contained: the attack's own check holds, nothing printed ESCAPED, nothing of the run survived."""
    escaped = "ESCAPED" in res.stdout
    contained = ok and not escaped and _no_survivors(res)
    detail = f"{evidence}; status={res.status} {res.reason}".strip()
    if escaped:
        detail += "; program printed: " + res.stdout[res.stdout.index("ESCAPED"):][:120].replace("\n", " ")
    return Outcome(contained, detail[:300], res.status, res.leftovers, round(res.duration_s, 3))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline_holders(marker: str) -> list[int]:
    """Host PIDs whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


# --- resource exhaustion ------------------------------------------------------------------------------------

@attack("infinite_loop")
def infinite_loop(cfg: SandboxConfig) -> Outcome:
    res = run_program("while True:\n    pass\n", replace(cfg, timeout_s=1.0))
    return _judge(res, res.status == "timeout" and res.duration_s < 5, "killed at the 1 s timeout")


@attack("fork_bomb")
def fork_bomb(cfg: SandboxConfig) -> Outcome:
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    res = run_program(code, replace(cfg, timeout_s=2.0, max_processes=8))
    return _judge(res, not res.passed and res.duration_s < 8, "unbounded fork loop under RLIMIT_NPROC=8")


@attack("memory_bomb")
def memory_bomb(cfg: SandboxConfig) -> Outcome:
    res = run_program("xs = []\nwhile True:\n    xs.append(bytearray(10 ** 7))\n", replace(cfg, memory_mb=256))
    return _judge(res, res.status == "failed" and "MemoryError" in res.reason, "RLIMIT_AS=256 MiB")


@attack("output_flood")
def output_flood(cfg: SandboxConfig) -> Outcome:
    code = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    c = replace(cfg, max_file_mb=4, output_bytes=65536)
    res = run_program(code, c)
    ok = not res.passed and len(res.stdout.encode()) <= c.output_bytes
    return _judge(res, ok, f"stdout capped by RLIMIT_FSIZE=4 MiB; kept {len(res.stdout)} chars")


@attack("file_size_bomb")
def file_size_bomb(cfg: SandboxConfig) -> Outcome:
    code = "with open('big.bin', 'wb') as f:\n    for _ in range(400):\n        f.write(b'x' * 2 ** 20)\n"
    res = run_program(code, replace(cfg, max_file_mb=8))
    return _judge(res, not res.passed, "a 400 MiB file under RLIMIT_FSIZE=8 MiB in a 64 MiB tmpfs")


@attack("open_file_exhaustion")
def open_files(cfg: SandboxConfig) -> Outcome:
    res = run_program("fs = [open('/dev/null') for _ in range(100000)]\n", cfg)
    after = run_program("print('fine')", cfg)
    ok = res.status == "failed" and "Too many open files" in res.reason and after.stdout.strip() == "fine"
    return _judge(res, ok, "RLIMIT_NOFILE; the next program runs normally")


# --- processes ----------------------------------------------------------------------------------------------

_DAEMON = """
import os, sys, time
{prelude}
pid = {mod}.fork()
if pid == 0:
    {mod}.setsid()
    if {mod}.fork() == 0:   # the grandchild: an orphaned daemon in its own session that soon kills all it can
        {mod}.execv('/bin/sh', ['sh', '-c', 'sleep 0.6; while :; do kill -9 -1; sleep 0.05; done', '{marker}'])
    {mod}._exit(0)
{mod}.waitpid(pid, 0)
time.sleep(0.3)
print('daemon started', flush=True)
"""


def _daemon_attack(cfg: SandboxConfig, prelude: str, mod: str, what: str) -> Outcome:
    marker = "lmstack-daemon-" + secrets.token_hex(6)
    res = run_program(_DAEMON.format(prelude=prelude, mod=mod, marker=marker), cfg)
    time.sleep(0.2)
    survivors = _cmdline_holders(marker)
    for pid in survivors:
        os.kill(pid, 9)
    after = run_program("import time\ntime.sleep(0.3)\nprint('next program ran')", cfg)
    ok = ("daemon started" in res.stdout and not survivors and after.passed
          and after.stdout.strip() == "next program ran")
    return _judge(res, ok, f"{what}; {len(survivors)} daemons survived; next program {after.status}")


@attack("daemon_double_fork")
def daemon(cfg: SandboxConfig) -> Outcome:
    return _daemon_attack(cfg, "", "os", "setsid + double fork, then kill(-1, 9) in a loop")


@attack("posix_reimport_daemon")
def posix_reimport(cfg: SandboxConfig) -> Outcome:
    # Python guards ON: popping posix from sys.modules and importing it again gives back the real calls.
    return _daemon_attack(replace(cfg, python_guards=True), "sys.modules.pop('posix')\nimport posix", "posix",
                          "python guards on, undone by re-importing posix; then daemon + kill(-1, 9)")


@attack("kill_all")
def kill_all(cfg: SandboxConfig) -> Outcome:
    """kill(-1, 9) beside a sandboxed neighbour and a victim outside, all three under ONE uid when we are root
    (so no uid check can save them: only the PID namespace does); both must live."""
    shared = {}
    if os.getuid() == 0:
        uid = 2_099_000_000 + secrets.randbelow(1_000_000)  # below the private range: no run gets it by chance
        cfg, shared = replace(cfg, run_as_uid=uid), {"user": uid, "group": uid}
    victim = subprocess.Popen(["sleep", "30"], **shared)
    try:
        neighbour = "import time\ntime.sleep(1.5)\nprint('neighbour alive')"
        killer = ("import os, time\nfor _ in range(20):\n    try:\n        os.kill(-1, 9)\n"
                  "    except OSError as e:\n        print(e)\n    time.sleep(0.05)\nprint('killer done')\n")
        res_n, res = run_programs([neighbour, killer], cfg, workers=2)
        ok = _alive(victim.pid) and res_n.passed and "neighbour alive" in res_n.stdout and res_n.leftovers == 0
        return _judge(res, ok, f"victim outside (same uid) alive={_alive(victim.pid)}; sandboxed neighbour "
                               f"(same uid) {res_n.status}")
    finally:
        victim.kill()
        victim.wait()


@attack("kill_parent")
def kill_parent(cfg: SandboxConfig) -> Outcome:
    # Killing its own init would end the program too, so the program reaching its last line and the parent
    # living are the proof (a pid inside the namespace may accept a signal the kernel then ignores).
    me = os.getpid()
    code = (f"import os\nfor target in ({me}, os.getppid(), 1):\n    try:\n        os.kill(target, 9)\n"
            f"    except OSError as e:\n        print(target, e)\nimport time\ntime.sleep(0.2)\nprint('still here')\n")
    res = run_program(code, cfg)
    return _judge(res, _alive(me) and res.passed and "still here" in res.stdout,
                  f"SIGKILL to the parent pid {me}, getppid() and 1")


@attack("ptrace_parent")
def ptrace_parent(cfg: SandboxConfig) -> Outcome:
    me = os.getpid()
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"for target in ({me}, os.getppid(), 1):\n"
            "    if libc.ptrace(16, target, 0, 0) == 0:\n        print('ESCAPED attached to', target)\n"
            "    else:\n        print(target, os.strerror(ctypes.get_errno()))\n")
    res = run_program(code, cfg)
    return _judge(res, res.passed, "PTRACE_ATTACH to the parent pid, getppid() and 1")


@attack("new_namespaces")
def new_namespaces(cfg: SandboxConfig) -> Outcome:
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "if libc.unshare(0x10000000 | 0x40000000 | 0x00020000) == 0:\n    print('ESCAPED unshare worked')\n"
            "else:\n    print('unshare:', os.strerror(ctypes.get_errno()))\n")
    res = run_program(code, replace(cfg, seccomp="require"))
    return _judge(res, res.passed, "unshare(user | net | mount) under seccomp")


# --- network ------------------------------------------------------------------------------------------------

def _listener_attack(cfg: SandboxConfig, connect: str, what: str) -> Outcome:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = connect.format(port=port) + "print('ESCAPED connected')\n"
        res = run_program(code, cfg)
        try:
            server.accept()
            reached = True
        except BlockingIOError:
            reached = False
        return _judge(res, not reached and res.status == "failed", f"{what}; listener reached={reached}")
    finally:
        server.close()


@attack("socket_connect")
def socket_connect(cfg: SandboxConfig) -> Outcome:
    return _listener_attack(cfg, "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
                            "socket.create_connection to a listener on the host's 127.0.0.1")


@attack("raw_socket_type")
def raw_socket_type(cfg: SandboxConfig) -> Outcome:
    return _listener_attack(cfg, "import _socket\ns = _socket.SocketType(_socket.AF_INET, _socket.SOCK_STREAM)\n"
                                 "s.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n",
                            "_socket.SocketType(...).connect, which bypassed the old socket_block")


@attack("dns")
def dns(cfg: SandboxConfig) -> Outcome:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    port = udp.getsockname()[1]
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01"
    code = (f"import socket\ntry:\n    print('ESCAPED resolved', socket.getaddrinfo('example.com', 443))\n"
            f"except OSError as e:\n    print('getaddrinfo:', e)\n"
            f"s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto({query!r}, ('127.0.0.1', {port}))\n"
            f"print('ESCAPED sent a DNS query')\n")
    try:
        res = run_program(code, cfg)
        try:
            udp.recvfrom(512)
            reached = True
        except BlockingIOError:
            reached = False
        return _judge(res, not reached and res.status == "failed",
                      f"getaddrinfo + a UDP DNS query to a resolver on the host's 127.0.0.1; reached={reached}")
    finally:
        udp.close()


# --- filesystem ---------------------------------------------------------------------------------------------

def _write_attack(cfg: SandboxConfig, target: str, host_path: str, what: str) -> Outcome:
    code = (f"import os\npath = {target}\ntry:\n    with open(path, 'w') as f:\n        f.write('pwned')\n"
            f"    print('ESCAPED wrote', path)\nexcept OSError as e:\n    print('refused:', e)\n")
    res = run_program(code, cfg)
    on_host = os.path.exists(host_path)
    if on_host:
        os.remove(host_path)
    return _judge(res, res.passed and not on_host, f"{what}; appeared on the host={on_host}")


@attack("write_tmp")
def write_tmp(cfg: SandboxConfig) -> Outcome:
    name = f"/tmp/lmstack-attack-{secrets.token_hex(6)}"
    return _write_attack(cfg, repr(name), name, "write to /tmp")


@attack("write_dev_shm")
def write_dev_shm(cfg: SandboxConfig) -> Outcome:
    name = f"/dev/shm/lmstack-attack-{secrets.token_hex(6)}"
    return _write_attack(cfg, repr(name), name, "write to /dev/shm")


@attack("write_home")
def write_home(cfg: SandboxConfig) -> Outcome:
    name = os.path.join(os.path.expanduser("~"), f"lmstack-attack-{secrets.token_hex(6)}")
    return _write_attack(cfg, repr(name), name, "write to the parent's $HOME")


@attack("write_cwd_parent")
def write_cwd_parent(cfg: SandboxConfig) -> Outcome:
    name = f"lmstack-attack-{secrets.token_hex(6)}"  # the working dir sits in /tmp: look there on the host
    return _write_attack(cfg, f"os.path.join(os.getcwd(), '..', {name!r})", f"/tmp/{name}",
                         "write next to the working dir")


@attack("write_world_writable")
def write_world_writable(cfg: SandboxConfig) -> Outcome:
    names = [f"{d}/lmstack-attack-{secrets.token_hex(6)}" for d in ("/var/tmp", "/run/lock") if os.path.isdir(d)]
    outcomes = [_write_attack(cfg, repr(n), n, f"write to {os.path.dirname(n)}") for n in names]
    worst = next((o for o in outcomes if not o.contained), outcomes[0])
    return Outcome(all(o.contained for o in outcomes), "; ".join(o.evidence for o in outcomes)[:300], worst.status,
                   sum(o.leftovers for o in outcomes), sum(o.duration_s for o in outcomes))


# --- secrets ------------------------------------------------------------------------------------------------

def _read_attack(cfg: SandboxConfig, paths: str, secret: str, what: str) -> Outcome:
    code = (f"for path in {paths}:\n    try:\n        data = open(path, 'rb').read()\n"
            f"        print('ESCAPED read', path, data[:200])\n"
            f"    except OSError as e:\n        print('refused:', e)\n")
    res = run_program(code, cfg)
    leaked = secret in res.stdout or secret in res.stderr
    return _judge(res, res.passed and not leaked, f"{what}; secret leaked={leaked}")


@attack("read_shadow")
def read_shadow(cfg: SandboxConfig) -> Outcome:
    return _read_attack(cfg, "['/etc/shadow']", "root:", "read /etc/shadow")


@attack("read_secret_file")
def read_secret_file(cfg: SandboxConfig) -> Outcome:
    secret = "lmstack-secret-" + secrets.token_hex(8)
    folder = tempfile.mkdtemp(prefix="lmstack-attack-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    try:
        os.chmod(folder, 0o755)
        path = os.path.join(folder, "token")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, secret.encode())
        os.close(fd)
        return _read_attack(cfg, repr([path]), secret, "read a file only its owner (the parent) may read")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _with_env_secret(fn: Callable[[str], Outcome]) -> Outcome:
    secret = "sk-lmstack-" + secrets.token_hex(8)
    saved = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = secret
    try:
        return fn(secret)
    finally:
        if saved is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = saved


@attack("env_secrets")
def env_secrets(cfg: SandboxConfig) -> Outcome:
    def go(secret: str) -> Outcome:
        code = ("import os\nprint(sorted(os.environ.items()))\n"
                "print(open('/proc/self/environ', 'rb').read())\n")
        res = run_program(code, cfg)
        leaked = secret in res.stdout or "OPENAI_API_KEY" in res.stdout
        return _judge(res, res.passed and not leaked, f"OPENAI_API_KEY in the parent's environment; leaked={leaked}")
    return _with_env_secret(go)


@attack("proc_environ_snooping")
def proc_environ(cfg: SandboxConfig) -> Outcome:
    me = os.getpid()

    def go(secret: str) -> Outcome:
        code = (f"import os\nfor pid in ['1', '{me}', str(os.getppid())] + os.listdir('/proc'):\n"
                f"    if not pid.isdigit():\n        continue\n    try:\n"
                f"        print(pid, open(f'/proc/{{pid}}/environ', 'rb').read()[:4000])\n"
                f"    except OSError as e:\n        print(pid, 'refused:', e)\n")
        res = run_program(code, cfg)
        leaked = secret in res.stdout
        return _judge(res, res.passed and not leaked,
                      f"/proc/1/environ, /proc/<parent {me}>/environ and every visible one; leaked={leaked}")
    return _with_env_secret(go)


# --- faking a HumanEval pass --------------------------------------------------------------------------------

_DOC = {"task_id": "attack/0", "prompt": "def add(a, b):\n", "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}


def _fake_pass(cfg: SandboxConfig, completion: str, what: str) -> Outcome:
    res = run_checked([(_DOC, completion)], cfg)[0]
    return _judge(res, not res.passed and res.returncode == 0, f"{what} counts as a failure")


@attack("sys_exit_fake_pass")
def sys_exit_pass(cfg: SandboxConfig) -> Outcome:
    return _fake_pass(cfg, "    return None\nimport sys\nsys.exit(0)\n", "sys.exit(0) before the tests")


@attack("os_exit_fake_pass")
def os_exit_pass(cfg: SandboxConfig) -> Outcome:
    return _fake_pass(cfg, "    return None\nimport os\nos._exit(0)\n", "os._exit(0) before the tests")


def run_campaign(config: SandboxConfig | None = None, names: list[str] | None = None) -> list[dict]:
    """Run every attack (or `names`) once; one row per attack, in order."""
    cfg = config or SandboxConfig(timeout_s=3.0, python_guards=False)
    rows = []
    for name in names or list(ATTACKS):
        out = ATTACKS[name](cfg)
        rows.append({"attack": name, "contained": out.contained, "status": out.status, "leftovers": out.leftovers,
                     "seconds": out.duration_s, "evidence": out.evidence})
    return rows
