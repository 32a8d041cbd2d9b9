"""The child side of the code sandbox: a stdlib-only script that seals itself in, then runs one program.

lmstack.eval.sandbox starts it as `python -I -S sandbox_child.py SPEC_JSON` in a new session; nothing here is
imported by lmstack. It is three processes deep:

  outer   (in the caller's namespaces) unshares fresh PID, network, mount, IPC and UTS namespaces (plus a
          user namespace when not root), forks `init`, reports the new PID namespace to the caller, waits,
          kills and counts anything left in that namespace, and reports how the program ended;
  init    (PID 1 of the new namespace) makes every mount private, turns the whole filesystem read-only
          (mount_setattr, recursive, per mount: the host is untouched), mounts a fresh /proc (only the
          sandbox's processes are visible), a read-only /tmp holding only the working dir (its own tmpfs)
          and an empty read-only /dev/shm; then forks the program and reaps until it exits.
          When init exits the kernel kills every process left in the namespace: daemons cannot survive;
  program sets rlimits, drops to the sandbox uid/gid (root parent) or drops every capability (user
          namespace), sets no_new_privs, loads a seccomp filter through libseccomp when the library is
          present (no ptrace, namespaces, mounts, keyrings, bpf, io_uring), installs the Python guards if
          asked, and runs the program's code.

The network namespace is empty with loopback down, so every connect fails, 127.0.0.1 included. Any setup
step that fails is reported as {"setup_error": ...} and the program never runs: nothing runs half-isolated.
With isolate=False (the caller's explicit UNSAFE opt-out) the namespace and mount steps are skipped.

Usage (the caller builds SPEC; see lmstack.eval.sandbox._spec):
    python -I -S sandbox_child.py '{"isolate": true, "uid": 2123456789, "gid": 2123456789, "status_fd": 5, ...}'
"""
import _posixsubprocess
import ctypes
import json
import os
import posix
import resource
import shutil
import signal
import sys
import tempfile

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
CLONE_NEWCGROUP, CLONE_NEWTIME = 0x02000000, 0x00000080
NS_FLAGS = (CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP,
            CLONE_NEWTIME)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 0x4000, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (new syscalls share one table)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 1, 4, 38, 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SCMP_ACT_ALLOW, SCMP_ACT_ERRNO = 0x7FFF0000, 0x00050000
SCMP_CMP_MASKED_EQ = 7
EPERM, ENOSYS = 1, 38
# Syscalls the program never needs and that widen the kernel surface it can reach or let it look outside.
DENIED_SYSCALLS = ("ptrace", "process_vm_readv", "process_vm_writev", "unshare", "setns", "mount", "umount2",
                   "pivot_root", "chroot", "mount_setattr", "open_tree", "move_mount", "fsopen", "fsconfig",
                   "fsmount", "fspick", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
                   "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load",
                   "kexec_file_load", "init_module", "finit_module", "delete_module", "swapon", "swapoff",
                   "reboot", "acct", "quotactl", "syslog", "lookup_dcookie", "name_to_handle_at",
                   "open_by_handle_at", "sethostname", "setdomainname")

libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    """A sandbox layer could not be put in place; the program must not run."""


def check(ret: int, what: str) -> None:
    if ret != 0:
        raise SetupError(f"{what} failed: {os.strerror(ctypes.get_errno())}")


def report(fd: int, **record) -> None:
    os.write(fd, (json.dumps(record) + "\n").encode())


def mount(source, target: str, fstype, flags: int, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    ret = libc.mount(enc(source), target.encode(), enc(fstype), ctypes.c_ulong(flags), enc(data))
    check(ret, f"mount {fstype or 'bind'} on {target}")


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def read_only_everywhere() -> None:
    """Make every mount of this (private) mount namespace read-only and nosuid, recursively from /."""
    attr = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    ret = libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_long(AT_FDCWD), ctypes.c_char_p(b"/"),
                       ctypes.c_long(AT_RECURSIVE), ctypes.byref(attr), ctypes.c_long(ctypes.sizeof(attr)))
    check(ret, "mount_setattr(/, read-only, recursive) (needs Linux >= 5.12)")


def seal_filesystem(workdir: str, uid, gid, tmp_mb: int) -> None:
    """init's mounts: private propagation, read-only everything, fresh /proc, private /tmp and /dev/shm."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    read_only_everywhere()
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # /tmp: a tiny tmpfs holding only the working dir, itself a tmpfs of tmp_mb; then /tmp turns read-only,
    # so even a program that owns /tmp (user-namespace case) can write nowhere but its working dir.
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,nr_inodes=16,mode=755")
    os.mkdir(workdir, 0o700)
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_mb}m,nr_inodes=4096,mode=700")
    if uid is not None:
        os.chown(workdir, uid, gid)
    mount(None, "/tmp", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    if os.path.isdir("/dev/shm"):
        mount("tmpfs", "/dev/shm", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,nr_inodes=1")


def drop_capabilities() -> None:
    """Empty every capability set (user-namespace case: we stay at our own uid, so setuid cannot drop them)."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # past the last capability this kernel knows
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    data = (Data * 2)()
    check(libc.capset(ctypes.byref(Header(0x20080522, 0)), data), "capset (drop all capabilities)")


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def load_seccomp() -> bool:
    """Deny DENIED_SYSCALLS and namespace-creating clone() with EPERM via libseccomp; False if it is absent."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return False
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SetupError("seccomp_init failed")
    deny = SCMP_ACT_ERRNO | EPERM
    for name in DENIED_SYSCALLS:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:  # unknown on this architecture: nothing to deny
            if lib.seccomp_rule_add_array(ctx, deny, nr, 0, None) != 0:
                raise SetupError(f"seccomp rule for {name} failed")
    clone = lib.seccomp_syscall_resolve_name(b"clone")
    for flag in NS_FLAGS:  # clone's flags are its first argument; one rule per namespace flag
        cmp = ArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag)
        if lib.seccomp_rule_add_array(ctx, deny, clone, 1, ctypes.byref(cmp)) != 0:
            raise SetupError("seccomp rule for clone failed")
    clone3 = lib.seccomp_syscall_resolve_name(b"clone3")
    if clone3 >= 0:  # its flags sit behind a pointer seccomp cannot read: make libc fall back to clone()
        lib.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO | ENOSYS, clone3, 0, None)
    ret = lib.seccomp_load(ctx)
    lib.seccomp_release(ctx)
    if ret != 0:
        raise SetupError(f"seccomp_load failed: {os.strerror(-ret)}")
    return True


def python_guards() -> None:
    """Ordinary generated code fails fast on fork/exec/kill and destructive file calls (not a boundary)."""

    def _blocked(*args, **kwargs):
        raise PermissionError("blocked by the lmstack sandbox")

    for mod in (os, posix):
        for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "setsid", "putenv", "unsetenv",
                     "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                     "posix_spawn", "posix_spawnp", "execl", "execle", "execlp", "execlpe", "execv", "execve",
                     "execvp", "execvpe", "remove", "unlink", "rmdir", "removedirs", "rename", "renames",
                     "replace", "chmod", "chown", "lchown", "fchmod", "fchown", "truncate", "ftruncate",
                     "setuid", "setgid", "chroot"):
            if hasattr(mod, name):
                setattr(mod, name, _blocked)
    # Patched before subprocess is ever imported, so its `from _posixsubprocess import fork_exec` gets this
    # (importing subprocess here would cost a trivial program a third of its run); shutil's removals go
    # through the os functions blocked above.
    _posixsubprocess.fork_exec = _blocked
    sys.modules["ctypes"] = sys.modules["_ctypes"] = None


def reach_stdlib_after_setuid() -> None:
    """The stdlib may sit under a directory only root may enter (/root/.pyenv): keep reaching it through
    directory fds opened now (before setuid), as /proc/self/fd/N import paths."""
    roots = {p: "/proc/self/fd/%d" % os.open(p, os.O_RDONLY | os.O_DIRECTORY)
             for p in sys.path if p and os.path.isdir(p)}
    sys.path[:] = list(roots.values())
    for mod in list(sys.modules.values()):  # packages imported already (collections, encodings, ...)
        if isinstance(getattr(mod, "__path__", None), list):
            for root, fd_path in roots.items():
                mod.__path__[:] = [fd_path + p[len(root):] if p.startswith(root + "/") else p for p in mod.__path__]
    sys.path_importer_cache.clear()


def run_program(spec: dict, path: str, report_fd: int) -> None:
    """The program's process: limits, identity, filters, guards, then the code. Never returns."""
    try:
        for name, (soft, hard) in spec["limits"].items():
            if hasattr(resource, name):
                resource.setrlimit(getattr(resource, name), (soft, hard))
        if spec["uid"] is not None:
            reach_stdlib_after_setuid()
            os.setgroups([])
            os.setresgid(spec["gid"], spec["gid"], spec["gid"])
            os.setresuid(spec["uid"], spec["uid"], spec["uid"])
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
        if spec["isolate"] and spec["uid"] is None:
            drop_capabilities()
        # init's non-dumpable flag (or setuid) left /proc/self root-owned: make it the program's own again
        libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
        filtered = bool(spec["seccomp"]) and load_seccomp()
        if spec["seccomp"] == "require" and not filtered:
            raise SetupError("seccomp required but libseccomp.so.2 is not installed")
        report(report_fd, seccomp=filtered)
        if spec["python_guards"]:
            python_guards()
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
    except (SetupError, OSError) as e:
        report(report_fd, setup_error=f"sandbox: {e}")
        os._exit(97)
    os.close(report_fd)
    sys.argv = [path]
    del spec
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__, "__file__": path})
    sys.exit(0)


def init(spec: dict, code: str, report_fd: int) -> None:
    """PID 1 of the sandbox (or a plain parent when not isolated): seal, fork the program, reap, report."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the caller killing `outer` takes us down too
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)                # a same-uid program cannot ptrace us
    uid, gid = spec["uid"], spec["gid"]
    try:
        if spec["isolate"]:
            workdir = "/tmp/lmstack-sandbox-" + spec["token"]
            seal_filesystem(workdir, uid, gid, spec["tmp_mb"])
        else:
            workdir = tempfile.mkdtemp(prefix="lmstack-sandbox-")
            if uid is not None:
                os.chown(workdir, uid, gid)
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(code)
        if uid is not None:
            os.chown(path, uid, gid)
    except (SetupError, OSError) as e:
        report(report_fd, setup_error=f"sandbox: {e}")
        os._exit(97)
    os.chdir(workdir)
    os.environ.update(HOME=workdir, TMPDIR=workdir)
    child = os.fork()
    if child == 0:
        run_program(spec, path, report_fd)
    while True:  # as PID 1 we also reap the program's orphans
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            break
    if os.WIFSIGNALED(status):
        report(report_fd, signal=os.WTERMSIG(status))
    else:
        report(report_fd, exit=os.WEXITSTATUS(status))
    if not spec["isolate"]:
        os.chdir("/")
        shutil.rmtree(workdir, ignore_errors=True)
    os._exit(0)  # isolated: the kernel now kills whatever the program left in the namespace


def namespace_members(pidns: str) -> list[int]:
    """PIDs of the processes in the PID namespace `pidns` ('pid:[N]'), as seen from outside it."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == pidns:
                    found.append(int(entry))
            except OSError:
                pass  # exited meanwhile, or not ours to inspect
    return found


def enter_namespaces(isolate_as_root: bool) -> None:
    """Unshare fresh namespaces; without root, inside a new user namespace mapping our own ids."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.getuid(), os.getgid()
    if not isolate_as_root:
        flags |= CLONE_NEWUSER
    check(libc.unshare(flags), "unshare(pid, net, mount, ipc, uts%s)" % ("" if isolate_as_root else ", user"))
    if not isolate_as_root:
        for name, text in (("uid_map", f"{uid} {uid} 1\n"), ("setgroups", "deny\n"), ("gid_map", f"{gid} {gid} 1\n")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    libc.sethostname(b"sandbox", 7)


def main() -> None:
    spec = json.loads(sys.argv[1])
    status_fd = spec["status_fd"]
    with open(spec["code_path"], encoding="utf-8", errors="surrogatepass") as f:
        code = f.read()
    try:
        if spec["isolate"]:
            enter_namespaces(os.getuid() == 0)
    except (SetupError, OSError) as e:
        report(status_fd, setup_error=f"sandbox: {e}")
        os._exit(97)
    rfd, wfd = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        os.close(status_fd)
        os.close(go_w)
        os.read(go_r, 1)  # wait until outer holds the namespace (below)
        os.close(go_r)
        init(spec, code, wfd)
    os.close(wfd)
    os.close(go_r)
    pidns = nsfd = None
    if spec["isolate"]:  # the new namespace exists once its first process (init) does; holding an fd on it
        # keeps its inode number from being reused by another sandbox before our leftover scan below
        nsfd = os.open("/proc/self/ns/pid_for_children", os.O_RDONLY)
        pidns = os.readlink(f"/proc/self/fd/{nsfd}")
        report(status_fd, pidns=pidns)
    os.write(go_w, b"g")
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    if pidns is not None:  # init is gone, so the kernel has emptied the namespace: check, never trust
        left = namespace_members(pidns)
        for member in left:
            try:
                os.kill(member, signal.SIGKILL)
            except OSError:
                pass
        report(status_fd, ns_leftovers=len(left))
        os.close(nsfd)
    with os.fdopen(rfd, "rb") as f:
        records = f.read()
    if records:  # init's and the program's own setup report, then how the program ended
        os.write(status_fd, records)
    else:
        report(status_fd, setup_error=f"sandbox: init ended without a report (wait status {status})")
    os._exit(0)


if __name__ == "__main__":
    main()
