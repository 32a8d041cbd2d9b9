"""Tiny Python programming tasks in the HumanEval format, with unit tests.

Each task has `prompt` (signature + docstring with examples), `canonical_solution` (the body),
`test` (a `check(candidate)` function of asserts) and `entry_point`, exactly as HumanEval's JSONL.
Tasks come from ~25 families, most with parameters (add 7, count the letter 'r', Caesar shift 3,
...), so there are hundreds of distinct tasks. Expected outputs in the tests come from a separate
reference function written independently of the solution text, and the test suite runs every
canonical solution against its tests in a subprocess (`run_code_task`).

Usage:
    import random
    from lmstack.world.code_tasks import make_task, run_code_task
    task = make_task(random.Random(0))
    print(task["prompt"] + task["canonical_solution"])
    run_code_task(task)                                       # True: canonical solution passes
    run_code_task(task, "    return None\\n")                 # False
"""
from __future__ import annotations

import random
import subprocess
import sys
from typing import Callable, Iterator

from lmstack.world import lexicon as lx
from lmstack.world.config import assign_split, sub_rng

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _ints(rng, n_min=0, n_max=8, lo=-20, hi=50):
    return [rng.randint(lo, hi) for _ in range(rng.randint(n_min, n_max))]


def _sentence(rng, n=None):
    return " ".join(rng.choice(lx.PLAIN_WORDS) for _ in range(n if n is not None else rng.randint(1, 6)))


def _spec(name, args, doc, body, ref, inputs):
    return {"name": name, "args": args, "doc": doc, "body": body, "ref": ref, "inputs": inputs}


# ---- families: f(rng) -> spec. `body` is the solution text; `ref` is an independent reference. ----
def _add_k(rng):
    k = rng.randint(2, 99)
    return _spec(f"add_{k}", "x: int", f"Return x plus {k}.", f"    return x + {k}\n",
                 lambda x: sum([x, k]), [(rng.randint(-100, 100),) for _ in range(5)] + [(0,)])


def _count_char(rng):
    c = rng.choice(_LETTERS)
    return _spec(f"count_{c}", "s: str", f"Return how many times the lowercase letter '{c}' occurs in s.",
                 f"    return s.count({c!r})\n", lambda s: sum(1 for ch in s if ch == c),
                 [(_sentence(rng),) for _ in range(5)] + [("",), (c * 3,)])


def _shift(rng):
    k = rng.randint(1, 25)
    body = (f"    out = []\n    for ch in s:\n        if 'a' <= ch <= 'z':\n"
            f"            ch = chr((ord(ch) - ord('a') + {k}) % 26 + ord('a'))\n        out.append(ch)\n"
            "    return ''.join(out)\n")
    table = {a: b for a, b in zip(_LETTERS, _LETTERS[k:] + _LETTERS[:k])}
    return _spec(f"shift_by_{k}", "s: str",
                 f"Shift every lowercase letter of s forward by {k} places in the alphabet, wrapping from z to a.\n"
                 "    Other characters stay as they are.", body, lambda s: "".join(table.get(ch, ch) for ch in s),
                 [(_sentence(rng),) for _ in range(4)] + [("xyz!",), ("",)])


def _clamp(rng):
    lo = rng.randint(-10, 10)
    hi = lo + rng.randint(1, 30)
    return _spec(f"clamp_{lo}_{hi}".replace("-", "m"), "xs: list",
                 f"Return a new list where every number of xs is limited to the range [{lo}, {hi}].",
                 f"    return [min(max(x, {lo}), {hi}) for x in xs]\n",
                 lambda xs: [lo if x < lo else hi if x > hi else x for x in xs],
                 [(_ints(rng),) for _ in range(5)] + [([],)])


def _sum_multiples(rng):
    a, b = sorted(rng.sample(range(2, 12), 2))
    return _spec(f"sum_multiples_{a}_{b}", "n: int",
                 f"Return the sum of all positive integers below n that are divisible by {a} or by {b}.",
                 f"    return sum(i for i in range(1, n) if i % {a} == 0 or i % {b} == 0)\n",
                 lambda n: sum(set(range(a, n, a)) | set(range(b, n, b))),
                 [(rng.randint(0, 200),) for _ in range(5)] + [(1,)])


def _fizz(rng):
    a, b = sorted(rng.sample(range(2, 8), 2))
    w1, w2 = rng.sample(lx.CITY_PREFIXES, 2)

    def ref(n):
        out = []
        for i in range(1, n + 1):
            word = (w1 if i % a == 0 else "") + (w2 if i % b == 0 else "")
            out.append(word or str(i))
        return out
    body = (f"    result = []\n    for i in range(1, n + 1):\n"
            f"        if i % {a} == 0 and i % {b} == 0:\n            result.append({w1 + w2!r})\n"
            f"        elif i % {a} == 0:\n            result.append({w1!r})\n"
            f"        elif i % {b} == 0:\n            result.append({w2!r})\n"
            "        else:\n            result.append(str(i))\n    return result\n")
    return _spec(f"fizz_{w1.lower()}_{w2.lower()}_{a}_{b}", "n: int",
                 f"For i from 1 to n, list '{w1}' for multiples of {a}, '{w2}' for multiples of {b},\n"
                 f"    '{w1}{w2}' for multiples of both, and str(i) otherwise.", body, ref,
                 [(rng.randint(1, 30),) for _ in range(4)] + [(0,)])


def _rotate(rng):
    k = rng.randint(1, 5)
    return _spec(f"rotate_left_{k}", "xs: list",
                 f"Rotate xs to the left by {k} places (wrapping around) and return the new list.",
                 f"    if not xs:\n        return []\n    k = {k} % len(xs)\n    return xs[k:] + xs[:k]\n",
                 lambda xs: [xs[(i + k) % len(xs)] for i in range(len(xs))],
                 [(_ints(rng, 1),) for _ in range(5)] + [([],)])


def _pairs(rng):
    t = rng.randint(5, 30)
    body = (f"    count = 0\n    for i in range(len(xs)):\n        for j in range(i + 1, len(xs)):\n"
            f"            if xs[i] + xs[j] == {t}:\n                count += 1\n    return count\n")
    return _spec(f"pairs_summing_to_{t}", "xs: list", f"Return how many pairs i < j have xs[i] + xs[j] == {t}.",
                 body, lambda xs: sum(1 for i, x in enumerate(xs) for y in xs[i + 1:] if x + y == t),
                 [(_ints(rng, 0, 10, 0, t),) for _ in range(5)])


def _repeat_chars(rng):
    k = rng.randint(2, 4)
    return _spec(f"repeat_chars_{k}", "s: str", f"Return s with every character repeated {k} times.",
                 f"    return ''.join(ch * {k} for ch in s)\n", lambda s: "".join(c for ch in s for c in [ch] * k),
                 [(rng.choice(lx.PLAIN_WORDS),) for _ in range(4)] + [("",)])


def _every_kth(rng):
    k = rng.randint(2, 5)
    return _spec(f"take_every_{k}", "xs: list", f"Return the elements of xs at positions 0, {k}, {2 * k}, ...",
                 f"    return xs[::{k}]\n", lambda xs: [x for i, x in enumerate(xs) if i % k == 0],
                 [(_ints(rng),) for _ in range(5)])


def _starting_with(rng):
    c = rng.choice("abcdfghlmprstw")
    return _spec(f"words_starting_with_{c}", "words: list",
                 f"Return the words of the list that start with '{c}', in order.",
                 f"    return [w for w in words if w.startswith({c!r})]\n", lambda ws: [w for w in ws if w[:1] == c],
                 [(_sentence(rng, rng.randint(0, 8)).split(),) for _ in range(5)])


def _greet(rng):
    city = rng.choice(lx.CITY_PREFIXES) + rng.choice(lx.CITY_SUFFIXES)
    return _spec(f"welcome_to_{city.lower()}", "name: str", f"Return the greeting 'Welcome to {city}, <name>!'.",
                 f"    return 'Welcome to {city}, ' + name + '!'\n", lambda name: f"Welcome to {city}, {name}!",
                 [(rng.choice(lx.FEMALE_NAMES + lx.MALE_NAMES),) for _ in range(3)])


def _tax(rng):
    p = rng.randint(2, 25)
    return _spec(f"add_tax_{p}", "cents: int", f"Return the price in cents after adding {p}% tax, rounded down.",
                 f"    return cents * {100 + p} // 100\n", lambda c: (c * (100 + p)) // 100,
                 [(rng.randint(0, 10000),) for _ in range(5)])


def _last_digit_power(rng):
    b = rng.randint(2, 9)
    return _spec(f"last_digit_of_{b}_power", "n: int", f"Return the last decimal digit of {b} ** n (n >= 0).",
                 f"    return pow({b}, n, 10)\n", lambda n: int(str(b ** n)[-1]),
                 [(rng.randint(0, 60),) for _ in range(5)])


def _longer_than(rng):
    k = rng.randint(3, 6)
    return _spec(f"count_words_longer_than_{k}", "s: str",
                 f"Return how many space-separated words of s have more than {k} letters.",
                 f"    return sum(1 for w in s.split() if len(w) > {k})\n",
                 lambda s: len([w for w in s.split(" ") if w and len(w) > k]), [(_sentence(rng),) for _ in range(5)])


def _collatz_ref(n):
    steps = 0
    while n > 1:
        n = 3 * n + 1 if n & 1 else n >> 1
        steps += 1
    return steps


# Parameter-free classics, one task each: (name, args, doc, body, reference, inputs(rng)).
_FIXED = (
    ("is_palindrome", "s: str", "Return True if s reads the same backwards, ignoring case.",
     "    t = s.lower()\n    return t == t[::-1]\n",
     lambda s: all(a == b for a, b in zip(s.lower(), reversed(s.lower()))),
     lambda rng: [("Level",), ("abc",), ("",), (rng.choice(lx.PLAIN_WORDS),), ("noon",)]),
    ("reverse_words", "s: str", "Return the words of s in reverse order, joined by single spaces.",
     "    return ' '.join(s.split()[::-1])\n",
     lambda s: " ".join(reversed(s.split())),
     lambda rng: [(_sentence(rng),) for _ in range(4)]),
    ("count_vowels", "s: str", "Return the number of vowels (a, e, i, o, u, either case) in s.",
     "    return sum(1 for ch in s.lower() if ch in 'aeiou')\n",
     lambda s: len([c for c in s if c in "aeiouAEIOU"]),
     lambda rng: [(_sentence(rng),) for _ in range(4)] + [("AEIOUxyz",)]),
    ("second_largest", "xs: list", "Return the second largest distinct value of xs, or None if there is none.",
     "    values = sorted(set(xs))\n    return values[-2] if len(values) >= 2 else None\n",
     lambda xs: (sorted(set(xs), reverse=True) + [None, None])[1],
     lambda rng: [(_ints(rng, 0),) for _ in range(5)] + [([4, 4],)]),
    ("running_max", "xs: list", "Return the list of running maxima of xs.",
     "    out = []\n    for x in xs:\n        out.append(x if not out else max(out[-1], x))\n    return out\n",
     lambda xs: [max(xs[:i + 1]) for i in range(len(xs))],
     lambda rng: [(_ints(rng),) for _ in range(5)]),
    ("dedupe", "xs: list", "Return xs without repeated values, keeping the first occurrence of each.",
     "    seen = set()\n    out = []\n    for x in xs:\n        if x not in seen:\n"
     "            seen.add(x)\n            out.append(x)\n    return out\n",
     lambda xs: [x for i, x in enumerate(xs) if x not in xs[:i]],
     lambda rng: [(_ints(rng, 0, 10, 0, 5),) for _ in range(5)]),
    ("digit_sum", "n: int", "Return the sum of the decimal digits of the non-negative integer n.",
     "    return sum(int(d) for d in str(n))\n",
     lambda n: sum(map(int, str(n))),
     lambda rng: [(rng.randint(0, 10 ** 6),) for _ in range(5)]),
    ("collatz_steps", "n: int", "Return how many Collatz steps (n -> n/2 or 3n+1) it takes n >= 1 to reach 1.",
     "    steps = 0\n    while n != 1:\n        n = n // 2 if n % 2 == 0 else 3 * n + 1\n"
     "        steps += 1\n    return steps\n",
     _collatz_ref,
     lambda rng: [(rng.randint(1, 100),) for _ in range(5)] + [(1,)]),
    ("capitalize_words", "s: str", "Return s with the first letter of every space-separated word in uppercase.",
     "    return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))\n",
     lambda s: " ".join(w.capitalize() for w in s.split(" ")),  # inputs are lowercase words
     lambda rng: [(_sentence(rng),) for _ in range(4)]),
    ("triangular", "n: int", "Return the n-th triangular number 1 + 2 + ... + n (0 for n = 0).",
     "    return n * (n + 1) // 2\n",
     lambda n: sum(range(n + 1)),
     lambda rng: [(rng.randint(0, 500),) for _ in range(5)]),
)


def _fixed(index):
    name, args, doc, body, ref, inputs = _FIXED[index]
    return lambda rng: _spec(name, args, doc, body, ref, inputs(rng))


FAMILIES: dict[str, Callable] = {
    "add_k": _add_k, "count_char": _count_char, "shift": _shift, "clamp": _clamp, "sum_multiples": _sum_multiples,
    "fizz": _fizz, "rotate": _rotate, "pairs": _pairs, "repeat_chars": _repeat_chars, "every_kth": _every_kth,
    "starting_with": _starting_with, "greet": _greet, "tax": _tax, "last_digit_power": _last_digit_power,
    "longer_than": _longer_than, **{spec[0]: _fixed(i) for i, spec in enumerate(_FIXED)},
}


def make_task(rng: random.Random, family: str | None = None) -> dict:
    """One HumanEval-style task: prompt, canonical_solution, test, entry_point (plus family)."""
    family = family or rng.choice(list(FAMILIES))
    spec = FAMILIES[family](rng)
    name, ref = spec["name"], spec["ref"]
    inputs = list({repr(inp): inp for inp in spec["inputs"]}.values())  # drop repeated random inputs
    examples = "".join(f"    >>> {name}({_args(inp)})\n    {ref(*inp)!r}\n" for inp in inputs[:2])
    prompt = f"def {name}({spec['args']}):\n    \"\"\"{spec['doc']}\n{examples}    \"\"\"\n"
    asserts = "".join(f"    assert candidate({_args(inp)}) == {ref(*inp)!r}\n" for inp in inputs)
    test = f"def check(candidate):\n{asserts}"
    return {"prompt": prompt, "canonical_solution": spec["body"], "test": test, "entry_point": name, "family": family}


def _args(inp: tuple) -> str:
    return ", ".join(repr(a) for a in inp)


def program_for(task: dict, completion: str | None = None) -> str:
    """The script that defines the function (prompt + completion) and runs its tests."""
    body = task["canonical_solution"] if completion is None else completion
    return f"{task['prompt']}{body}\n\n{task['test']}\n\ncheck({task['entry_point']})\n"


def run_code_task(task: dict, completion: str | None = None, timeout: float = 10.0) -> bool:
    """True when prompt + completion (default: the canonical solution) passes the task's tests.

    The program runs in a fresh `python -I` subprocess with a timeout, so a hanging or crashing
    completion cannot take the caller down. This is a check for our own tasks, not a sandbox for
    untrusted code (the eval stage has that).
    """
    try:
        proc = subprocess.run([sys.executable, "-I", "-c", program_for(task, completion)],
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def build_code(world) -> Iterator[dict]:
    """Yield up to n_code distinct tasks (distinct entry points); parameter-free families appear once."""
    cfg = world.config
    rng, split_rng = sub_rng(world.seed, "code"), sub_rng(world.seed, "code-split")
    seen: set[str] = set()
    n, attempts, target = 0, 0, cfg.count("n_code")
    families = list(FAMILIES)
    while n < target and attempts < 50 * target:
        task = make_task(rng, families[attempts % len(families)])
        attempts += 1
        if task["entry_point"] in seen:
            continue
        seen.add(task["entry_point"])
        yield {"id": f"code/{n}", "task_id": f"World/{n}", "source": "world/code",
               "split": assign_split(split_rng, cfg.split_fractions), "kind": "code",
               "text": task["prompt"] + task["canonical_solution"], **task}
        n += 1
