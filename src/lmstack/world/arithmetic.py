"""Arithmetic word problems with step-by-step solutions in the GSM8K format (`#### <answer>`).

A problem is a start value followed by `difficulty` operations (+, -, *, /), each told as one
sentence of a little story set in the world (its people, cities and currencies). The solution
has one line per operation, "x op k = y", and ends with `#### y`. Operand sizes grow with the
difficulty, division is always exact and values stay positive. Every record stores the
operations and an `expression` ("((12 + 5) * 3) / 4") so the answer can be recomputed
independently; `difficulty` (= number of operations) orders a curriculum.

Usage:
    import random
    from lmstack.world import World
    from lmstack.world.arithmetic import make_problem
    from lmstack.world.checkers import extract_answer
    world = World(seed=0, n_people=10)
    rec = make_problem(world, random.Random(0), difficulty=3)
    print(rec["question"]); print(rec["solution"])
    extract_answer(rec["solution"]) == rec["answer"]   # True
"""
from __future__ import annotations

import random
import re
from fractions import Fraction
from typing import Iterator

from lmstack.world import lexicon as lx
from lmstack.world.checkers import extract_answer
from lmstack.world.config import assign_split, sub_rng

MULTIPLY_WORDS = {2: "doubles", 3: "triples", 4: "quadruples"}

# family -> phrasings. {N}/{n} name or pronoun, {p} pronoun, {o} object pronoun, {poss}, {k}, {unit}
# (items or currency), {city}, {food}. Solution lines use {x} (before), {y} (after).
FAMILIES = {
    "items": {
        "start": ("{N} has {a} {unit}.",
                  "{N} owns a box with {a} {unit} in it.",
                  "{N} collects {unit} and has {a} of them."),
        "+": ("{P} buys {k} more {unit}.",
              "A friend from {city} gives {o} {k} {unit}.",
              "{P} finds {k} {unit} in the attic."),
        "-": ("{P} gives {k} {unit} to a neighbour.",
              "{P} sells {k} {unit} at the market in {city}.",
              "{P} loses {k} {unit} on the way home."),
        "*": ("{P} {times_verb} the number of {unit} {p} has.",  # first template: only for k = 2, 3, 4
              "A lucky trade makes {poss} pile of {unit} {k} times as large."),
        "/": ("{P} splits the {unit} into {k} equal groups and keeps only one group.",
              "{P} shares the {unit} equally among {k} cousins, {o}self included, and keeps one share."),
        "question": ("How many {unit} does {n} have now?",
                     "How many {unit} does {n} have at the end?"),
    },
    "money": {
        "start": ("{N} has {a} {unit} in a wallet.",
                  "{N} saved {a} {unit} last month.",
                  "{N} starts the week with {a} {unit}."),
        "+": ("{P} earns {k} {unit} helping at a bakery.",
              "{P} receives {k} {unit} as a gift.",
              "{P} sells an old bicycle for {k} {unit}."),
        "-": ("{P} spends {k} {unit} on {food}.",
              "{P} pays {k} {unit} for a train ticket to {city}.",
              "{P} donates {k} {unit} to the library."),
        "*": ("A bank in {city} {times_verb} {poss} savings.",
              "An investment makes {poss} money {k} times as large."),
        "/": ("{P} divides the money equally into {k} envelopes and keeps one envelope.",
              "{P} splits the money evenly among {k} siblings, {o}self included, and keeps one part."),
        "question": ("How many {unit} does {n} have now?",
                     "How many {unit} does {n} have left at the end?"),
    },
}
SOLUTION_LINES = {
    "start": "{N} starts with {a} {unit}.",
    "+": "After that {p} has {x} + {k} = {y} {unit}.",
    "-": "After that {p} has {x} - {k} = {y} {unit}.",
    "*": "Multiplying by {k} gives {x} * {k} = {y} {unit}.",
    "/": "One of {k} equal parts is {x} / {k} = {y} {unit}.",
}
_OPS = {"+": lambda x, k: x + k, "-": lambda x, k: x - k, "*": lambda x, k: x * k, "/": lambda x, k: x // k}
def _pick_op(rng: random.Random, x: int, difficulty: int) -> tuple[str, int] | None:
    """A random (op, operand) that keeps the value a positive integer of modest size."""
    limit = 10 + 15 * difficulty  # operands grow with difficulty
    options = ["+", "*", "/"] + (["-"] if x > 1 else [])
    rng.shuffle(options)
    for op in options:
        if op == "+":
            return op, rng.randint(1, limit)
        if op == "-":
            return op, rng.randint(1, min(x - 1, limit))
        if op == "*" and x * 2 <= 50_000:
            return op, rng.randint(2, min(4 + difficulty // 2, max(2, 50_000 // x)))
        if op == "/":
            divisors = [d for d in range(2, 10) if x % d == 0 and x // d >= 1]
            if divisors:
                return op, rng.choice(divisors)
    return None


def make_problem(world, rng: random.Random, difficulty: int, family: str | None = None) -> dict:
    """One problem with `difficulty` operations: question, solution, answer, expression, steps."""
    family = family or rng.choice(list(FAMILIES))
    f = FAMILIES[family]
    person = rng.choice(world.people)
    city = rng.choice(world.cities)
    currency = world.country(city.country).currency
    unit = rng.choice(lx.COUNTABLES) if family == "items" else currency + "s"
    start = rng.randint(2, 10 + 10 * difficulty)
    steps: list[tuple[str, int]] = []
    values = [start]
    while len(steps) < difficulty:
        pick = _pick_op(rng, values[-1], difficulty)
        if pick is None:  # cannot happen for positive x ('+' is always possible), kept for safety
            break
        steps.append(pick)
        values.append(_OPS[pick[0]](values[-1], pick[1]))
    names = {"N": person.name, "n": person.name, "P": person.pronoun.capitalize(), "p": person.pronoun,
             "o": person.object_pronoun, "poss": person.possessive, "unit": unit, "city": city.name,
             "food": rng.choice(lx.FOODS)}
    sentences = [rng.choice(f["start"]).format(a=start, **names)]
    for op, k in steps:
        verb = MULTIPLY_WORDS.get(k, f"multiplies by {k}")
        templates = f[op] if op != "*" or k in MULTIPLY_WORDS else f[op][1:]  # "{k} times as large" fits any k
        sentences.append(rng.choice(templates).format(k=k, times_verb=verb, **names))
    sentences.append(rng.choice(f["question"]).format(**names))
    question = " ".join(sentences)
    expression = str(start)
    for op, k in steps:
        expression = f"({expression} {op} {k})"
    if steps:
        expression = expression[1:-1]  # drop the outermost pair of parentheses
    return {"question": question, "solution": render_solution(start, steps, names), "answer": values[-1],
            "difficulty": len(steps), "family": family, "expression": expression,
            "steps": [[op, k] for op, k in steps], "start": start,
            "person": person.name, "pronoun": person.pronoun, "unit": unit}


def render_solution(start: int, steps, names: dict, error_at: int | None = None, error_delta: int = 0) -> str:
    """The step-by-step solution; `error_at`/`error_delta` plant one wrong result (for rejected answers)
    that is then carried through the remaining steps, ending in a wrong `####` line."""
    lines = [SOLUTION_LINES["start"].format(a=start, **names)]
    x = start
    for i, (op, k) in enumerate(steps):
        y = _OPS[op](x, k)
        if i == error_at:
            y += error_delta
        lines.append(SOLUTION_LINES[op].format(x=x, k=k, y=y, **names))
        x = y
    lines.append(f"#### {x}")
    return "\n".join(lines)


def wrong_solution(record: dict, rng: random.Random) -> str:
    """A plausible solution with one arithmetic slip, whose final answer differs from the truth."""
    steps = [tuple(s) for s in record["steps"]]
    names = {"N": record["person"], "p": record["pronoun"], "unit": record["unit"]}
    if not steps:
        return render_solution(record["start"] + 1, [], names)
    # Plant the slip at a step after which only + - * follow, so later lines stay exact integers.
    ok = [i for i in range(len(steps)) if all(op != "/" for op, _ in steps[i + 1:])]
    at = rng.choice(ok)
    delta = rng.choice([-3, -2, -1, 1, 2, 3, 10])
    text = render_solution(record["start"], steps, names, error_at=at, error_delta=delta)
    wrong = extract_answer(text)
    if wrong == record["answer"] or wrong <= 0:
        text = render_solution(record["start"], steps, names, error_at=len(steps) - 1, error_delta=abs(delta) + 1)
    return text


def evaluate_expression(expression: str) -> Fraction:
    """Exact value of an expression of integers, + - * / and parentheses (no eval of arbitrary code)."""
    tokens = re.findall(r"\d+|[-+*/()]", expression)
    if "".join(tokens) != expression.replace(" ", ""):
        raise ValueError(f"unexpected characters in expression {expression!r}")
    pos = 0

    def parse_sum() -> Fraction:
        nonlocal pos
        value = parse_product()
        while pos < len(tokens) and tokens[pos] in "+-":
            op = tokens[pos]; pos += 1
            rhs = parse_product()
            value = value + rhs if op == "+" else value - rhs
        return value

    def parse_product() -> Fraction:
        nonlocal pos
        value = parse_atom()
        while pos < len(tokens) and tokens[pos] in "*/":
            op = tokens[pos]; pos += 1
            rhs = parse_atom()
            value = value * rhs if op == "*" else value / rhs
        return value

    def parse_atom() -> Fraction:
        nonlocal pos
        tok = tokens[pos]; pos += 1
        if tok == "(":
            value = parse_sum(); pos += 1  # skip ")"
            return value
        return Fraction(int(tok))

    return parse_sum()


def build_arithmetic(world) -> Iterator[dict]:
    """Yield n_arithmetic distinct problems; difficulty cycles 1..arithmetic_max_steps evenly."""
    cfg = world.config
    rng = sub_rng(world.seed, "arithmetic")
    split_rng = sub_rng(world.seed, "arithmetic-split")
    seen: set[str] = set()  # membership only
    n, attempts, target = 0, 0, cfg.count("n_arithmetic")
    while n < target and attempts < 20 * target:
        attempts += 1
        difficulty = 1 + n % cfg.arithmetic_max_steps
        rec = make_problem(world, rng, difficulty)
        if rec["question"] in seen:
            continue
        seen.add(rec["question"])
        text = rec["question"] + "\n" + rec["solution"]
        split = assign_split(split_rng, cfg.split_fractions)
        yield {"id": f"arithmetic/{n}", "source": "world/arithmetic", "split": split, "kind": "arithmetic",
               "text": text, **rec}
        n += 1
