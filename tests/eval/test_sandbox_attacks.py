"""The sandbox attack campaign (issue 15 §2): every attack is contained, with the Python guards off (the
operating system holds on its own) and, for the posix re-import, on; no process of a run survives it; and a
HumanEval pass needs the tests to have run, not just a 0 exit."""
from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from lmstack.eval import sandbox
from lmstack.eval.sandbox import SandboxConfig, isolation_problem, run_program, uid_members
from lmstack.eval.sandbox_attacks import ATTACKS, run_campaign
from lmstack.eval.tasks.humaneval import new_sentinel, program_for, require_sentinel, run_checked

PROBLEM = isolation_problem() if sys.platform.startswith("linux") else "the sandbox needs Linux"
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"the sandbox cannot isolate here: {PROBLEM}")
CFG = SandboxConfig(timeout_s=3.0, python_guards=False)
NEEDS = {
    "new_namespaces": (ctypes.util.find_library("seccomp") is None, "libseccomp is not installed"),
    "read_secret_file": (os.getuid() != 0, "the program runs as the caller's own uid when the caller is not "
                                           "root, so the caller's own files are readable"),
}
CAMPAIGN = ("infinite_loop fork_bomb memory_bomb posix_reimport_daemon daemon_double_fork kill_all raw_socket_type "
            "socket_connect dns write_tmp write_dev_shm write_home write_cwd_parent read_shadow read_secret_file "
            "env_secrets proc_environ_snooping kill_parent ptrace_parent output_flood file_size_bomb "
            "open_file_exhaustion sys_exit_fake_pass os_exit_fake_pass").split()


def test_the_campaign_covers_every_attack_of_the_issue():
    assert set(CAMPAIGN) <= set(ATTACKS) and len(ATTACKS) >= 20


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_contained(name):
    skip, why = NEEDS.get(name, (False, ""))
    if skip:
        pytest.skip(why)
    outcome = ATTACKS[name](CFG)
    assert outcome.contained, outcome.evidence
    assert outcome.leftovers == 0


# Unisolated and not root, kill(-1, 9) would hit every process of the caller's uid, this test runner included.
ROOT_ONLY_KILL_ALL = ["kill_all"] if os.getuid() == 0 else []


def test_the_checks_catch_an_escape_when_isolation_is_off(monkeypatch):
    # The same attacks against the UNSAFE opt-out (rlimits and a private uid only) must be reported as
    # escapes, or the containment verdicts above would prove nothing.
    monkeypatch.setattr(sandbox, "isolation_problem", lambda python=None: "namespaces disabled by the test")
    rows = run_campaign(SandboxConfig(timeout_s=3.0, python_guards=False, unsafe_no_isolation=True),
                        names=["raw_socket_type", "write_tmp", "daemon_double_fork"] + ROOT_ONLY_KILL_ALL)
    assert not any(r["contained"] for r in rows), rows
    assert "listener reached=True" in rows[0]["evidence"] and "appeared on the host=True" in rows[1]["evidence"]


def test_no_process_of_a_run_survives_it():
    # A daemon that would outlive the run by hours, started with every guard undone.
    code = ("import sys, time\nsys.modules.pop('posix')\nimport posix\nif posix.fork() == 0:\n    posix.setsid()\n"
            "    if posix.fork() == 0:\n        time.sleep(3600)\n    posix._exit(0)\n"
            "time.sleep(0.2)\nprint('forked')\n")
    res = run_program(code, SandboxConfig(timeout_s=3.0))
    assert res.passed and res.stdout.strip() == "forked" and res.leftovers == 0
    if res.uid is not None:
        assert uid_members(res.uid) == []


DOC = {"task_id": "t/0", "prompt": "def add(a, b):\n", "canonical_solution": "    return a + b\n",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}


def test_humaneval_pass_needs_the_sentinel_a_real_pass_still_passes():
    good, wrong, exits, os_exits, printer = run_checked(
        [(DOC, "    return a + b\n"), (DOC, "    return a - b\n"), (DOC, "    return 0\nimport sys\nsys.exit(0)\n"),
         (DOC, "    return 0\nimport os\nos._exit(0)\n"), (DOC, "    return a + b\nprint = None\n")],
        SandboxConfig(timeout_s=5))
    assert good.passed and printer.passed          # shadowing print does not hide the sentinel
    assert wrong.status == "failed" and "AssertionError" in wrong.reason
    for res in (exits, os_exits):
        assert res.returncode == 0 and not res.passed and "no pass sentinel" in res.reason


def test_sentinel_is_fresh_and_printed_last():
    a, b = new_sentinel(), new_sentinel()
    assert a != b and len(a) > 32
    program = program_for(DOC, "    return a + b\n", a)
    assert program.index("check(add)") < program.index(a)
    res = run_program(program, SandboxConfig(timeout_s=5))
    assert res.stdout.splitlines()[-1] == a and require_sentinel(res, a).passed
    assert not require_sentinel(run_program("print('hi')"), a).passed


def _python_for_nobody() -> str | None:
    """An interpreter `nobody` may run (ours may sit under /root), or None."""
    for cand in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(cand) and os.access(cand, os.X_OK) and not os.path.realpath(cand).startswith("/root/"):
            return cand
    return None


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv") or _python_for_nobody() is None,
                    reason="needs root, setpriv and an interpreter outside /root to start an unprivileged caller")
def test_an_unprivileged_caller_gets_the_same_isolation_from_a_user_namespace():
    # The checkout may sit under a directory `nobody` cannot enter (a 0700 mktemp dir): give the caller a
    # world-readable copy of the package instead.
    src = tempfile.mkdtemp(prefix="lmstack-nobody-")
    os.chmod(src, 0o755)
    shutil.copytree(os.path.join(os.path.dirname(sandbox.__file__), ".."), os.path.join(src, "lmstack"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for root, dirs, files in os.walk(src):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755 if name in dirs else 0o644)
    names = ["raw_socket_type", "write_tmp", "write_dev_shm", "posix_reimport_daemon", "env_secrets", "ptrace_parent"]
    script = (f"import json, sys\nsys.path.insert(0, {src!r})\n"
              "from lmstack.eval.sandbox_attacks import run_campaign\n"
              f"print(json.dumps(run_campaign(names={names!r})))\n")
    try:
        proc = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                               _python_for_nobody(), "-c", script], capture_output=True, text=True, timeout=60,
                              cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/"})
    finally:
        shutil.rmtree(src, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["attack"] for r in rows if not r["contained"]] == [], rows


def test_code_tasks_refuse_without_isolation_unless_the_task_opts_out(monkeypatch):
    from lmstack.errors import LmstackError
    from lmstack.eval import get_task

    monkeypatch.setattr(sandbox, "isolation_problem", lambda python=None: "unshare failed: Operation not permitted")
    with pytest.raises(LmstackError, match="refuses.*unsafe_no_isolation"):
        get_task("humaneval").run(DOC, ["    return a + b\n"])
    unsafe = get_task("humaneval", unsafe_no_isolation=True).run(DOC, ["    return a + b\n", "    return 0\n"])
    assert [r.passed for r in unsafe] == [True, False] and unsafe[0].isolation == "none (unsafe)"
