"""Task arguments on the command line: `--tasks name:key=value,key=value,other_task`.

Grammar (split at top-level commas; quotes protect commas and colons inside a value):
    spec    := item ("," item)*
    item    := name [":" key "=" value]     a new task (a ':' before any '=' ends the name)
             | key "=" value                 one more argument for the task before it
    value   := text | 'text' | "text"        quote a value that holds ','; 'text' is taken as written,
                                             "text" is a JSON string (so "\\n" is a newline)
So `multiple_choice:path=my.jsonl,lambada:path=C:\\data\\lam.jsonl` is two tasks, one argument each, and
`multiple_choice:path='a,b.jsonl',eval_split=test` is one task with two arguments. In a shell, wrap the
whole spec in the other kind of quotes so the inner ones reach lmstack.

Values are converted to the type of the task's setting (int, float, bool as true/false/1/0, JSON for
lists and dicts, text otherwise). An unknown key is an error that names the task, the key and the
settings the task has.

Usage:
    from lmstack.eval.task_args import parse_task_specs, build_task
    for name, args in parse_task_specs("multiple_choice:path=my.jsonl,lambada"):
        task = build_task(name, args)       # a Task with path="my.jsonl"
"""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from lmstack.errors import LmstackError
from lmstack.eval.task import Task, get_task, list_tasks
from lmstack.eval.yaml_loader import load_task_dir

QUOTES = ("'", '"')


def _split_top(spec: str) -> list[str]:
    """Split at commas that are outside quotes; an unclosed quote is an error."""
    parts, buf, quote = [], [], None
    for ch in spec:
        if quote:
            buf.append(ch)
            if ch == quote:
                quote = None
        elif ch in QUOTES:
            quote = ch
            buf.append(ch)
        elif ch == ",":
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    if quote:
        raise LmstackError(f"--tasks {spec!r}: a {quote} quote is never closed")
    parts.append("".join(buf))
    return [p.strip() for p in parts if p.strip()]


def _unquote(value: str) -> str:
    """'text' is literal; "text" is a JSON string, so \\n, \\t and \\" escapes work (delimiters)."""
    if len(value) >= 2 and value[0] == "'" and value[-1] == "'":
        return value[1:-1]
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise LmstackError(f"--tasks: {value} is not a valid double-quoted string ({e.msg}); "
                               "use single quotes for text taken as written") from None
    return value


def _key_value(piece: str, task: str, spec: str) -> tuple[str, str]:
    key, sep, value = piece.partition("=")
    key = key.strip()
    if not sep or not key or not key.isidentifier():
        raise LmstackError(f"--tasks {spec!r}: {piece!r} (an argument of task {task!r}) is not key=value")
    return key, _unquote(value.strip())


def parse_task_specs(specs: str | Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """[(task name, {key: raw value text})] in the order given; see the module docstring for the grammar."""
    pieces = [p for s in ([specs] if isinstance(specs, str) else specs) for p in _split_top(s)]
    out: list[tuple[str, dict[str, str]]] = []
    for piece in pieces:
        colon, eq = piece.find(":"), piece.find("=")
        if eq != -1 and (colon == -1 or eq < colon):
            # key=value: '=' comes first, so this belongs to the task before it (a path may hold ':').
            if not out:
                raise LmstackError(f"--tasks {specs!r}: {piece!r} is an argument, but no task name comes before it")
            key, value = _key_value(piece, out[-1][0], str(specs))
            if key in out[-1][1]:
                raise LmstackError(f"--tasks: task {out[-1][0]!r} is given {key!r} twice")
            out[-1][1][key] = value
            continue
        name, _, rest = piece.partition(":")
        name = name.strip()
        if not name:
            raise LmstackError(f"--tasks {specs!r}: {piece!r} has no task name before ':'")
        args: dict[str, str] = {}
        if rest.strip():
            key, value = _key_value(rest, name, str(specs))
            args[key] = value
        out.append((name, args))
    return out


def task_settings(task: Task) -> list[str]:
    """The settings a task takes as arguments: its public, non-method class attributes."""
    names = set()
    for cls in type(task).__mro__:
        if cls is object:
            continue
        names.update(k for k in vars(cls) if not k.startswith("_"))
    return sorted(k for k in names if k != "name" and not callable(getattr(type(task), k, None))
                  and not isinstance(getattr(type(task), k, None), property))


def _coerce(raw: str, current: Any, task: str, key: str) -> Any:
    """`raw` converted to the type of the setting's current value."""
    try:
        if isinstance(current, bool):
            low = raw.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, (list, tuple, dict)):
            value = json.loads(raw)
            if not isinstance(value, (list, dict)):
                raise ValueError("expected a JSON list or object")
            return tuple(value) if isinstance(current, tuple) else value
    except (ValueError, json.JSONDecodeError) as e:
        raise LmstackError(f"task {task!r}: {key}={raw!r} is not a valid {type(current).__name__} ({e})") from None
    return raw


def build_task(name: str, args: dict[str, str],
               factory: Callable[..., Task] | None = None) -> Task:
    """A Task `name` with `args` applied (raw text, converted to each setting's type).

    `factory` builds the task (default: the registry's get_task(name, **kwargs)); an unknown key is an
    error naming the task, the key and the settings it has."""
    make = factory or (lambda **kw: get_task(name, **kw))
    if not args:
        return make()
    plain = make()
    settings = task_settings(plain)
    kwargs = {}
    for key, raw in args.items():
        if key not in settings:
            raise LmstackError(f"task {name!r} takes no argument {key!r}; its arguments: {', '.join(settings)}")
        kwargs[key] = _coerce(raw, getattr(plain, key), name, key)
    return make(**kwargs)


def resolve_tasks(specs: str | Sequence[str], include_path: str | None = None) -> list[Task]:
    """Tasks for a --tasks spec: names (with arguments) from the registry, or from the lm-eval task YAMLs
    under `include_path` (a YAML task of the same name as a built-in one wins: the user asked for it)."""
    task_dir = load_task_dir(include_path) if include_path else None
    tasks = []
    for name, args in parse_task_specs(specs):
        if task_dir is not None and name in task_dir:
            tasks.append(build_task(name, args, factory=lambda _n=name, **kw: task_dir.get(_n, **kw)))
        elif task_dir is not None and name not in list_tasks():
            raise LmstackError(f"unknown task {name!r}: neither built in nor in {include_path}; available tasks: "
                               f"{', '.join(sorted(set(list_tasks()) | set(task_dir.names())))}")
        else:
            tasks.append(build_task(name, args))
    return tasks


def available_tasks(include_path: str | None = None) -> list[str]:
    """Built-in task names, plus those of the YAMLs under `include_path`."""
    names = set(list_tasks())
    if include_path:
        names |= set(load_task_dir(include_path).names())
    return sorted(names)
