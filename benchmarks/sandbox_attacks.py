"""The sandbox attack campaign, once, against the sealed sandbox and against the sandbox it replaced.

Runs every attack of lmstack.eval.sandbox_attacks (issue 15 §2's 20 plus a few more) with the Python guards
off (the operating-system layers must hold on their own; the posix re-import attack turns them on) and
records, per attack, whether it was contained and the evidence. The baseline is the previous sandbox
(src/lmstack/eval/sandbox.py at git commit OLD_COMMIT, read with `git show`: the nobody uid shared by every
run, a user + network namespace, rlimits, a process-group kill; and the HumanEval program without the pass
sentinel, where a 0 exit was a pass),
run by the same attack code through a small adapter, in its default mode (a network namespace here) and in
its socket_block fallback (what it did without user namespaces). Then the per-program cost: the median wall-clock
seconds of run_program("pass") for the sealed sandbox and the old one, runs alternating so the shared
machine's noise hits both alike, next to a bare `python -I -S -c pass` for reference.

Writes results/sandbox_attacks.json: {attacks, contained, per_attack, baseline_per_attack, overhead, ...}.

Usage:
    python benchmarks/sandbox_attacks.py [--repeats 15]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from _common import result, write_result

from lmstack.eval import sandbox_attacks as A
from lmstack.eval.sandbox import SandboxConfig, SandboxResult, run_program
from lmstack.eval.tasks import humaneval

OLD_COMMIT = "1e39711"  # the last commit before issue 15's sandbox work
ROOT = Path(__file__).resolve().parents[1]


def _load_old(tmp: Path):
    """The old sandbox module, from git history."""
    text = subprocess.run(["git", "show", f"{OLD_COMMIT}:src/lmstack/eval/sandbox.py"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    file = tmp / "old_sandbox.py"
    file.write_text(text)
    spec = importlib.util.spec_from_file_location("old_sandbox", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_sandbox"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _old_adapter(old, network: str):
    """run_program / run_programs / run_checked with the new call shape, backed by the old sandbox."""
    keep = ("timeout_s", "memory_mb", "cpu_s", "max_file_mb", "max_processes", "max_open_files", "drop_privileges",
            "python_guards", "site_packages", "output_bytes")

    def cfg(c: SandboxConfig):
        return old.SandboxConfig(**{k: getattr(c, k) for k in keep}, network=network)

    def res(r) -> SandboxResult:  # the old sandbox had no leftover sweep and no per-run uid
        return SandboxResult(r.status, r.returncode, r.stdout, r.stderr, r.duration_s, r.network, r.reason, 0, None)

    def run_one(code, c=None, python=None):
        return res(old.run_program(code, cfg(c or SandboxConfig())))

    def run_many(codes, c=None, workers=None, python=None):
        return [res(r) for r in old.run_programs(codes, cfg(c or SandboxConfig()), workers=workers)]

    def run_checked(programs, c, workers=None):  # the old harness: no sentinel, a 0 exit was a pass
        return run_many([humaneval.program_for(doc, comp) for doc, comp in programs], c, workers)

    return run_one, run_many, run_checked


def campaign_with_old(old, network: str) -> list[dict]:
    run_one, run_many, run_checked = _old_adapter(old, network)
    saved = (A.run_program, A.run_programs, humaneval.run_checked)
    A.run_program, A.run_programs, humaneval.run_checked = run_one, run_many, run_checked
    try:
        return A.run_campaign()
    finally:
        A.run_program, A.run_programs, humaneval.run_checked = saved


def overhead(old, repeats: int) -> dict:
    """Median seconds per trivial program: sealed sandbox, old sandbox, bare interpreter (alternating)."""
    times = {"sealed": [], "old": [], "bare": []}
    new_cfg, old_cfg = SandboxConfig(), old.SandboxConfig()
    run_program("pass", new_cfg)
    old.run_program("pass", old_cfg)  # warm both (the first call probes the kernel)
    for _ in range(repeats):
        for name, fn in (("sealed", lambda: run_program("pass", new_cfg)),
                         ("old", lambda: old.run_program("pass", old_cfg)),
                         ("bare", lambda: subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True))):
            start = time.perf_counter()
            r = fn()
            times[name].append(time.perf_counter() - start)
            assert name == "bare" or r.passed, r
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = _load_old(Path(tmp))
        rows = A.run_campaign()
        old_rows = campaign_with_old(old, "auto")          # a user + network namespace where allowed (here)
        block_rows = campaign_with_old(old, "socket_block")  # its fallback without user namespaces
        secs = overhead(old, args.repeats)
    n, k, k_old = len(rows), sum(r["contained"] for r in rows), sum(r["contained"] for r in old_rows)
    for r in rows:
        print(f"{'contained' if r['contained'] else 'ESCAPED  '} {r['attack']:24s} {r['evidence'][:90]}")
    k_block = sum(r["contained"] for r in block_rows)
    for name, rs, kk in (("old sandbox", old_rows, k_old), ("old sandbox, socket_block", block_rows, k_block)):
        print(f"{name}: {kk}/{n} contained; missed: {[r['attack'] for r in rs if not r['contained']]}")
    config = {"machine": "2 cores, shared", "python_guards": False, "old_commit": OLD_COMMIT,
              "attack_config": asdict(SandboxConfig(timeout_s=3.0, python_guards=False)), "repeats": args.repeats}
    out = result("sandbox_attacks", "attacks_contained", True, k, f"old sandbox (git {OLD_COMMIT})", k_old, goal=n,
                 **config)
    out.update(attacks=n, contained=k, baseline_contained=k_old, baseline_socket_block_contained=k_block,
               baseline_network=old.resolve_network("auto"), per_attack=rows, baseline_per_attack=old_rows,
               baseline_socket_block_per_attack=block_rows)
    out["overhead"] = result("sandbox_attacks", "seconds_per_trivial_program", False, round(secs["sealed"], 4),
                             f"old sandbox (git {OLD_COMMIT})", round(secs["old"], 4), **config,
                             bare_python_s=round(secs["bare"], 4))
    out["overhead"]["extra_s_vs_old"] = round(secs["sealed"] - secs["old"], 4)
    write_result("sandbox_attacks", out)


if __name__ == "__main__":
    main()
