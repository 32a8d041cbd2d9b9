"""The code sandbox: correct code passes; loops, fork bombs, huge allocations, sockets and big files are each
stopped and recorded as failures without harming the test process; without namespaces it refuses to run.
(The full attack campaign is tests/eval/test_sandbox_attacks.py.)"""
from __future__ import annotations

import os
import socket
import sys
import time

import pytest

from lmstack.errors import LmstackError
from lmstack.eval import sandbox
from lmstack.eval.sandbox import SandboxConfig, SandboxResult, isolation_problem, run_program, run_programs, uid_members

PROBLEM = isolation_problem() if sys.platform.startswith("linux") else "the sandbox needs Linux"
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"the sandbox cannot isolate here: {PROBLEM}")


def test_correct_program_passes_and_output_is_captured():
    res = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok', add(1, 1))")
    assert res.passed and res.status == "passed" and res.returncode == 0
    assert res.stdout.strip() == "ok 2"


def test_failing_assert_is_failed_with_reason():
    res = run_program("assert 1 + 1 == 3, 'bad sum'")
    assert not res.passed and res.status == "failed"
    assert "AssertionError" in res.reason and "bad sum" in res.stderr


def test_infinite_loop_is_killed_at_the_timeout():
    start = time.perf_counter()
    res = run_program("while True:\n    pass\n", SandboxConfig(timeout_s=1.0))
    assert res.status == "timeout" and not res.passed
    assert time.perf_counter() - start < 6.0


def test_cpu_limit_kills_a_busy_loop_even_with_a_long_timeout():
    res = run_program("while True:\n    pass\n", SandboxConfig(timeout_s=30.0, cpu_s=1))
    assert res.status == "killed" and res.reason in ("signal SIGXCPU", "signal SIGKILL")
    assert res.duration_s < 10.0


BOMB = """
import os, time
for level in range(6):          # bounded: at most 2**6 = 64 processes even if no limit held
    try:
        pid = os.fork()
    except OSError:             # hold the slot: a process that exited would free it for another fork,
        print('refused', flush=True)  # and then more than the limit's worth of children could be counted
        time.sleep(20)
    if pid == 0:
        print('child', os.getpid(), flush=True)
time.sleep(20)
"""


def test_fork_bomb_is_capped_by_the_process_limit_and_leaves_no_survivors():
    # python_guards off: the kernel limit (RLIMIT_NPROC, as an unprivileged user) must hold on its own.
    res = run_program(BOMB, SandboxConfig(timeout_s=3.0, max_processes=8, python_guards=False))
    assert not res.passed
    children = [line for line in res.stdout.splitlines() if line.startswith("child")]
    assert len(children) < 8            # the limit counts the parent too; nobody exits before the timeout
    assert "refused" in res.stdout      # the limit, not the loop's bound, stopped the bomb
    assert res.leftovers == 0           # the PID namespace died with its init
    assert res.uid is None or uid_members(res.uid) == []


def test_fork_is_blocked_by_the_python_guard():
    res = run_program("import os\nos.fork()\n")
    assert res.status == "failed" and "PermissionError" in res.reason
    res = run_program("import subprocess\nsubprocess.run(['true'])\n")
    assert res.status == "failed" and "PermissionError" in res.reason


def test_huge_allocation_fails_with_memory_error():
    res = run_program("x = bytearray(64 * 1024 ** 3)\n", SandboxConfig(memory_mb=512))
    assert res.status == "failed" and "MemoryError" in res.reason
    res = run_program("xs = []\nwhile True:\n    xs.append(bytearray(10 ** 7))\n", SandboxConfig(memory_mb=256))
    assert res.status == "failed" and "MemoryError" in res.reason


@pytest.mark.parametrize("guards", [True, False])
def test_socket_connect_fails_and_reaches_nothing(guards):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
        res = run_program(code, SandboxConfig(timeout_s=5, python_guards=guards))
        assert res.status == "failed" and "unreachable" in res.reason.lower()
        assert res.isolation.startswith("namespaces")
        with pytest.raises(BlockingIOError):
            server.accept()                 # nobody connected
    finally:
        server.close()


def test_without_namespaces_the_sandbox_refuses_unless_told_it_is_unsafe(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "isolation_problem", lambda python=None: "unshare failed: Operation not permitted")
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\n"
    with pytest.raises(LmstackError, match="refuses.*unshare failed.*unsafe_no_isolation=True"):
        run_program(code)
    with pytest.raises(LmstackError, match="refuses"):
        run_programs([code, code])
    assert not marker.exists()          # refused before anything ran
    res = run_program("print('ran')", SandboxConfig(unsafe_no_isolation=True))
    assert res.passed and res.isolation == "none (unsafe)" and res.stdout.strip() == "ran"


def test_file_size_limit_and_workdir_is_removed():
    code = "import os\nprint(os.getcwd(), flush=True)\nopen('big.bin', 'wb').write(b'x' * (50 * 1024 * 1024))\n"
    res = run_program(code, SandboxConfig(max_file_mb=4))
    assert res.status in ("failed", "killed")
    workdir = res.stdout.split()[0]
    assert "lmstack-sandbox-" in workdir and not os.path.exists(workdir)


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("LMSTACK_TEST_SECRET", "hunter2")
    res = run_program("import os\nprint(sorted(os.environ))\nprint(os.environ.get('LMSTACK_TEST_SECRET'))\n")
    assert res.passed
    assert "hunter2" not in res.stdout and "LMSTACK_TEST_SECRET" not in res.stdout


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="privileges are dropped only from root")
def test_root_parent_runs_the_program_as_a_private_uid():
    code = "import os\nprint(os.getuid(), os.getgid(), os.getgroups())\nopen('/etc/lmstack-x', 'w').write('x')\n"
    res = run_program(code, SandboxConfig(python_guards=False))
    assert res.status == "failed" and ("PermissionError" in res.reason or "Read-only" in res.reason)
    uid, gid, groups = res.stdout.split(maxsplit=2)
    assert int(uid) == int(gid) == res.uid and res.uid >= sandbox.PRIVATE_UID_BASE and groups.strip() == "[]"
    assert not os.path.exists("/etc/lmstack-x")
    other = run_program("pass")
    assert other.uid != res.uid         # one uid per run: RLIMIT_NPROC and the leftover sweep are per run


def test_working_dir_is_private_and_the_rest_read_only():
    code = ("import os\nopen('mine.txt', 'w').write('ok')\nprint(os.getcwd(), open('mine.txt').read())\n"
            "for path in ('/tmp/x', '/dev/shm/x', '/var/tmp/x', '/x'):\n    try:\n        open(path, 'w')\n"
            "        print('wrote', path)\n    except OSError as e:\n        print('refused', path)\n")
    res = run_program(code, SandboxConfig(python_guards=False))
    assert res.passed, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("/tmp/lmstack-sandbox-") and lines[0].endswith(" ok")
    assert lines[1:] == ["refused /tmp/x", "refused /dev/shm/x", "refused /var/tmp/x", "refused /x"]


def test_stdlib_imports_work_inside_the_sandbox():
    res = run_program("import collections.abc, hashlib, math, re, typing, fractions, statistics, json\n"
                      "print(hashlib.md5(b'a').hexdigest())\n")
    assert res.passed and res.stdout.strip() == "0cc175b9c0f1b6a831c399e269772661"


def test_run_programs_keeps_order_and_the_parent_survives():
    codes = ["print(1)", "raise SystemExit(2)", "while True: pass", "print(4)"]
    results = run_programs(codes, SandboxConfig(timeout_s=1.0), workers=2)
    assert [r.status for r in results] == ["passed", "failed", "timeout", "passed"]
    assert all(isinstance(r, SandboxResult) for r in results) and results[3].stdout.strip() == "4"


@pytest.mark.parametrize("field,value", [("seccomp", "wifi"), ("timeout_s", 0), ("memory_mb", 8), ("cpu_s", 0),
                                         ("tmp_mb", 0), ("run_as_uid", 0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SandboxConfig(**{field: value})


def test_a_lone_surrogate_fails_that_program_not_the_caller():
    res = run_program("x = '\ud800'\nprint('ran')\n")
    assert res.status == "failed" and "UnicodeDecodeError" in res.reason and "ran" not in res.stdout
    assert run_program("print('é ✓')").stdout.strip() == "é ✓"


def test_the_seccomp_layer_is_reported_as_used():
    import ctypes.util

    has_lib = ctypes.util.find_library("seccomp") is not None
    assert run_program("pass").isolation == ("namespaces+seccomp" if has_lib else "namespaces")
    assert run_program("pass", SandboxConfig(seccomp="off")).isolation == "namespaces"
