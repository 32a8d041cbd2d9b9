"""HELM-style multi-axis view of one task: accuracy, calibration, robustness, fairness and efficiency.

Accuracy alone hides how a model fails (Liang et al. 2022, HELM). For any task this runs the evaluator a
few times over the same items and reports:
  - accuracy: the task's main metric;
  - calibration: expected calibration error of multiple-choice answers (softmax over the choices'
    log-likelihoods; confidence vs. correctness in 10 bins); None for generative tasks;
  - robustness: the score when every prompt is perturbed -- typos (swapped/dropped/doubled letters),
    lower case, and extra whitespace -- each seeded per prompt; `worst` is the minimum, as HELM reports;
  - fairness: the score when the documents' text fields swap gendered words (he <-> she, ...) or first
    names (John <-> Mary, ...) counterfactually; the gap is original minus swapped (a fair model: ~0);
  - efficiency: the PerfTracker summary of the unperturbed run (tokens/s, TTFT, FLOPs, energy).

Usage:
    from lmstack.eval.helm import helm_view, helm_markdown
    view = helm_view(lm, "arc_easy", limit=100)
    print(helm_markdown([view]))
"""
from __future__ import annotations

import random
import re
from typing import Any, Callable

from lmstack.errors import LmstackError
from lmstack.eval.evaluator import evaluate
from lmstack.eval.task import get_task

# ---- robustness: prompt perturbations -----------------------------------------------------------------
def _rng(seed: int, text: str) -> random.Random:
    # Seeded per prompt (string seeds hash with SHA-512), so a perturbation is the same whatever the order.
    return random.Random(f"{seed}:{text}")


def typo(text: str, rate: float = 0.1, seed: int = 0) -> str:
    """Each word of 4+ letters gets, with probability `rate`, a swapped, dropped or doubled inner letter."""
    rng = _rng(seed, text)

    def one(m: re.Match) -> str:
        w = m.group()
        if rng.random() >= rate:
            return w
        i = rng.randrange(1, len(w) - 2)
        kind = rng.choice(("swap", "drop", "double"))
        if kind == "swap":
            return w[:i] + w[i + 1] + w[i] + w[i + 2:]
        if kind == "drop":
            return w[:i] + w[i + 1:]
        return w[:i] + w[i] + w[i:]

    return re.sub(r"[A-Za-z]{4,}", one, text)


def lowercase(text: str, seed: int = 0) -> str:
    return text.lower()


def extra_whitespace(text: str, rate: float = 0.3, seed: int = 0) -> str:
    """Each single space becomes 1-3 spaces with probability `rate` (newlines are left alone)."""
    rng = _rng(seed, text)
    return re.sub(r" ", lambda m: " " * (rng.randint(2, 3) if rng.random() < rate else 1), text)


PERTURBATIONS: dict[str, Callable[..., str]] = {"typo": typo, "case": lowercase, "whitespace": extra_whitespace}

# ---- fairness: counterfactual swaps over the documents' text ---------------------------------------------
GENDER_PAIRS = [("he", "she"), ("him", "her"), ("his", "her"), ("himself", "herself"), ("man", "woman"),
                ("men", "women"), ("boy", "girl"), ("boys", "girls"), ("father", "mother"), ("son", "daughter"),
                ("brother", "sister"), ("husband", "wife"), ("king", "queen"), ("mr", "mrs"), ("uncle", "aunt"),
                ("gentleman", "lady"), ("male", "female"), ("grandfather", "grandmother"), ("nephew", "niece")]
NAME_PAIRS = [("John", "Mary"), ("James", "Linda"), ("Robert", "Patricia"), ("Michael", "Jennifer"),
              ("William", "Elizabeth"), ("David", "Susan"), ("Richard", "Jessica"), ("Thomas", "Sarah"),
              ("Daniel", "Karen"), ("Paul", "Nancy"), ("Mark", "Lisa"), ("George", "Emily"), ("Tom", "Anna"),
              ("Peter", "Maria"), ("Jack", "Emma"), ("Omar", "Aisha"), ("Wei", "Mei"), ("Raj", "Priya")]


def swap_table(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Both directions, lower-case keys. Where a word maps two ways ("her" -> him/his) the first pair wins."""
    table: dict[str, str] = {}
    for a, b in pairs:
        table.setdefault(a.lower(), b)
        table.setdefault(b.lower(), a)
    return table


def swap_words(text: str, table: dict[str, str]) -> str:
    """Replace every whole word found in `table`, keeping its capitalisation (he -> she, He -> She, HE -> SHE)."""
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, table), key=len, reverse=True)) + r")\b",
                         re.IGNORECASE)

    def one(m: re.Match) -> str:
        w, new = m.group(), table[m.group().lower()]
        if w.isupper() and len(w) > 1:
            return new.upper()
        if w[0].isupper():
            return new[0].upper() + new[1:]
        return new.lower()

    return pattern.sub(one, text)


def doc_swapper(table: dict[str, str]) -> Callable[[dict], dict]:
    """A doc_transform: applies the swap to every string (and list of strings) in the document."""
    def transform(doc: dict) -> dict:
        out = {}
        for k, v in doc.items():
            if isinstance(v, str):
                out[k] = swap_words(v, table)
            elif isinstance(v, list) and all(isinstance(x, str) for x in v):
                out[k] = [swap_words(x, table) for x in v]
            else:
                out[k] = v
        return out
    return transform


SWAPS = {"gender": swap_table(GENDER_PAIRS), "names": swap_table(NAME_PAIRS)}


# ---- the view ------------------------------------------------------------------------------------------
def _main_metric(res: dict) -> tuple[str, float]:
    metrics = {k: v for k, v in (res.get("metrics") or {}).items() if not k.endswith("_stderr")}
    if not metrics:
        raise LmstackError(f"the task produced no metrics: {res}")
    name = next(iter(metrics))
    return name, metrics[name]


def helm_view(lm, task, limit: int | None = None, num_fewshot: int = 0, seed: int = 1234,
              perturbations: tuple[str, ...] = ("typo", "case", "whitespace"),
              swaps: tuple[str, ...] = ("gender", "names")) -> dict[str, Any]:
    """Run `task` (a name or Task) on `lm` unperturbed, under each prompt perturbation and each swap."""

    for p in perturbations:
        if p not in PERTURBATIONS:
            raise LmstackError(f"unknown perturbation {p!r}; choose from {', '.join(PERTURBATIONS)}")
    for s in swaps:
        if s not in SWAPS:
            raise LmstackError(f"unknown swap {s!r}; choose from {', '.join(SWAPS)}")
    task = get_task(task) if isinstance(task, str) else task
    calls = []

    def run(**kw) -> dict:
        out = evaluate(lm, [task], num_fewshot=num_fewshot, limit=limit, seed=seed, progress=False,
                       bootstrap_iters=0, **kw)
        calls.append(out)
        res = out["results"][task.name]
        if res.get("skipped"):
            raise LmstackError(f"task {task.name!r} was skipped: {res['skipped']}")
        return res

    base = run()
    metric, score = _main_metric(base)
    view: dict[str, Any] = {"task": task.name, "n": base.get("n"), "metric": metric, "accuracy": score,
                            "chance": base.get("chance"), "calibration_ece": _ece(task, base)}
    robust = {}
    for name in perturbations:
        fn = PERTURBATIONS[name]
        robust[name] = run(prompt_transform=lambda text, fn=fn: fn(text, seed=seed))["metrics"][metric]
    view["robustness"] = {**robust, "worst": min(robust.values())} if robust else {}
    fair = {}
    for name in swaps:
        swapped = run(doc_transform=doc_swapper(SWAPS[name]))["metrics"][metric]
        fair[name] = {"score": swapped, "gap": score - swapped}
    view["fairness"] = fair
    view["efficiency"] = base.get("perf")
    return view


def _ece(task, res: dict) -> float | None:
    """ECE from the evaluator's metrics when the task reports it, else None (generative tasks)."""
    metrics = res.get("metrics") or {}
    value = metrics.get("ece")
    return float(value) if isinstance(value, (int, float)) else None


def helm_markdown(views: list[dict]) -> str:
    """One row per task: accuracy, ECE, robustness per perturbation (and worst), fairness gaps, speed."""
    if not views:
        return "_no HELM views_"
    perts = list(dict.fromkeys(k for v in views for k in v["robustness"] if k != "worst"))
    swaps = list(dict.fromkeys(k for v in views for k in v["fairness"]))

    def f(x, fmt="{:.3f}"):
        return fmt.format(x) if isinstance(x, (int, float)) else "—"

    head = (["task", "metric", "accuracy", "chance", "ECE"] + [f"robust: {p}" for p in perts] + ["robust: worst"]
            + [f"fair gap: {s}" for s in swaps] + ["tokens/s", "FLOPs/query"])
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for v in views:
        perf = v.get("efficiency") or {}
        cells = [v["task"], v["metric"], f(v["accuracy"]), f(v.get("chance")), f(v.get("calibration_ece"))]
        cells += [f(v["robustness"].get(p)) for p in perts] + [f(v["robustness"].get("worst"))]
        cells += [f(v["fairness"].get(s, {}).get("gap"), "{:+.3f}") for s in swaps]
        cells += [f(perf.get("tokens_per_s"), "{:.0f}"), f(perf.get("flops_per_query"), "{:.3g}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
