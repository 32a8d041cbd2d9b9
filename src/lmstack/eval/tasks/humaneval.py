"""HumanEval: write a Python function body from its signature + docstring; unbiased pass@k by running tests.

Each problem's prompt is fed raw; generation stops at the usual HumanEval stop strings (a new top-level
def/class/if/print/comment). Each of the n completions becomes the program
    prompt + completion + test + "check(entry_point)"
run in the sandbox (lmstack.eval.sandbox: PID/network/mount namespaces, `nobody`, seccomp, rlimits, timeout), and
pass@k = 1 - C(n-c, k) / C(n, k) over the c passing samples (Chen et al., 2021) for every k <= n in `ks`.

A pass means the tests ran to the end: after check(...) each program prints a fresh random sentinel (one
per run), and a sample passes only if it exits 0 AND its stdout holds that sentinel line. So sys.exit(0),
os._exit(0) or raise SystemExit in a completion, which end the program with status 0 before any test
runs, count as failures. What the sentinel does not stop: the program's own source contains it, so a
completion that reads its file (or its code object) and prints the sentinel, or that tampers with what
the tests rely on (builtins, sys.stdout), can still fake a pass; catching those would need the tests to run
outside the program's reach.
n = 1 decodes greedily; n > 1 samples at `temperature` with n distinct seeds per problem.

Data: data_dir()/humaneval/HumanEval.jsonl.gz (or path= a .jsonl / .jsonl.gz of the same records).

Usage:
    from lmstack.eval import evaluate, get_task
    evaluate(lm, ["humaneval"], limit=20)                                          # pass@1, greedy
    evaluate(lm, [get_task("humaneval", n=20, ks=(1, 10), temperature=0.8)], limit=20)   # pass@1, pass@10
"""
from __future__ import annotations

import gzip
import json
import secrets
from typing import Callable

from lmstack.errors import LmstackError
from lmstack.eval import metrics as M
from lmstack.eval.hallucination import chain_seed
from lmstack.eval.lm import GenArgs, GenerateUntil, Request
from lmstack.eval.sandbox import SandboxConfig, run_programs
from lmstack.eval.task import Task, data_dir, register_task, require_file

STOP_STRINGS = ("\ndef", "\nclass", "\nif __name__", "\nprint", "\n#")
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def program_for(doc: dict, completion: str, sentinel: str | None = None) -> str:
    """The program that passes iff the completion is correct: prompt, completion, tests, the check call, and
    (given a sentinel) a last line that prints it, reached only when check(...) returned."""
    program = f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"
    if sentinel is not None:  # through sys.stdout, not print: a completion may shadow print
        program += f"__import__('sys').stdout.write('\\n{sentinel}\\n')\n"
    return program


def new_sentinel() -> str:
    """A per-run random pass sentinel (nothing the model could have seen)."""
    return "LMSTACK-PASS-" + secrets.token_hex(16)


def require_sentinel(result, sentinel: str):
    """`result` (a SandboxResult) with a 0 exit that never printed `sentinel` turned into a failure."""
    if result.passed and sentinel not in result.stdout.splitlines():
        result.status = "failed"
        result.reason = "exited 0 before the tests finished (no pass sentinel)"
    return result


def run_checked(programs: list[tuple[dict, str]], config: SandboxConfig, workers: int | None = None) -> list:
    """Sandbox results of (doc, completion) pairs; a pass needs exit 0 and the run's sentinel in stdout."""
    sentinels = [new_sentinel() for _ in programs]
    results = run_programs([program_for(doc, c, s) for (doc, c), s in zip(programs, sentinels)], config,
                           workers=workers)
    return [require_sentinel(r, s) for r, s in zip(results, sentinels)]


def read_problems(path) -> list[dict]:
    """HumanEval records from a .jsonl or .jsonl.gz file; a bad record names the file and line."""
    opener = gzip.open if str(path).endswith(".gz") else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                missing = [k for k in FIELDS if not isinstance(row.get(k), str)]
                if missing:
                    raise LmstackError(f"{path}:{n}: HumanEval record lacks {', '.join(missing)}")
                rows.append(row)
    except (json.JSONDecodeError, OSError, EOFError) as e:
        raise LmstackError(f"{path}: cannot read HumanEval records: {e}") from None
    return rows


class CodeTask(Task):
    """Shared by HumanEval and the world's code tasks: n completions per problem, sandboxed tests, pass@k."""

    output_type = "generate_until"
    target_delimiter = ""      # a few-shot example is prompt + canonical solution, nothing between
    default_metrics = ("pass@1",)
    n: int = 1
    """Completions per problem (pass@k needs n >= k)."""
    ks: tuple[int, ...] = (1, 10, 100)
    """The k of each pass@k reported; those above n are left out."""
    temperature: float = 0.8
    """Sampling temperature when n > 1 (n == 1 decodes greedily)."""
    top_p: float = 0.95
    """Nucleus mass when sampling."""
    sample_seed: int = 0
    """Base seed of the samples (sample i of a prompt uses hallucination.chain_seed(prompt, base, i))."""
    max_gen_toks: int = 512
    """Most tokens per completion."""
    timeout_s: float = 10.0
    """Wall-clock limit per program in the sandbox."""
    memory_mb: int = 1024
    """Address-space limit per program in the sandbox."""
    workers: int | None = None
    """Programs run at once (default: the CPU count)."""
    unsafe_no_isolation: bool = False
    """UNSAFE: where the sandbox cannot get its namespaces, run the completions anyway with rlimits and a
    dropped uid only (default: refuse with an error). See lmstack.eval.sandbox."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise LmstackError(f"task {self.name!r}: n must be an integer >= 1, got {self.n!r}")
        self.ks = tuple(int(k) for k in self.ks)
        if not self.ks or min(self.ks) < 1:
            raise LmstackError(f"task {self.name!r}: ks must be integers >= 1, got {self.ks!r}")
        if self.n > 1 and self.temperature <= 0:
            raise LmstackError(f"task {self.name!r}: n={self.n} samples need temperature > 0")
        self.sandbox = SandboxConfig(timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                                     unsafe_no_isolation=bool(self.unsafe_no_isolation))

    def doc_to_text(self, doc: dict) -> str:
        return doc["prompt"]

    def doc_to_target(self, doc: dict) -> str:
        return doc["canonical_solution"]

    def reported_ks(self) -> list[int]:
        return [k for k in sorted(set(self.ks)) if k <= self.n] or [1]

    def requests(self, doc: dict, context: str) -> list[Request]:
        if self.n == 1:
            return [GenerateUntil(context, GenArgs(until=list(STOP_STRINGS), max_gen_toks=self.max_gen_toks))]
        return [GenerateUntil(context, GenArgs(until=list(STOP_STRINGS), max_gen_toks=self.max_gen_toks,
                                               temperature=self.temperature, top_p=self.top_p,
                                               seed=chain_seed(context, self.sample_seed, i)))
                for i in range(self.n)]

    def run(self, doc: dict, completions: list[str]) -> list:
        """Sandbox results of each completion of `doc` (list of SandboxResult)."""
        return run_checked([(doc, c) for c in completions], self.sandbox, workers=self.workers)

    def process_results(self, doc: dict, responses: list) -> dict[str, float]:
        results = self.run(doc, list(responses))
        c = sum(r.passed for r in results)
        out = {f"pass@{k}": M.pass_at_k(len(results), c, k) for k in self.reported_ks()}
        # Share of samples that hit the time limit: tells a slow model apart from a wrong one.
        out["timeout_rate"] = sum(r.status == "timeout" for r in results) / len(results)
        return out

    def aggregation(self) -> dict[str, Callable[[list], float]]:
        return {**{f"pass@{k}": M.mean for k in self.reported_ks()}, "timeout_rate": M.mean}

    def higher_is_better(self) -> dict[str, bool]:
        return {**{f"pass@{k}": True for k in self.reported_ks()}, "timeout_rate": False}


@register_task("humaneval")
class HumanEval(CodeTask):
    path: str = ""
    """A HumanEval-format .jsonl(.gz) to use instead of data_dir()/humaneval/HumanEval.jsonl.gz."""

    def docs(self, split: str) -> list[dict]:
        if split != self.eval_split:
            raise LmstackError(f"task {self.name!r} has only the {self.eval_split!r} split, not {split!r}")
        path = require_file(self.path or data_dir() / "humaneval" / "HumanEval.jsonl.gz", self.name)
        return read_problems(path)
