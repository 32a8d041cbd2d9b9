"""A search space over dotted config keys, parsed and checked against the run's config dataclass.

A space maps a dotted key of the run config (PretrainConfig by default) to a distribution:
    optim.lr: loguniform(1e-4, 1e-2)     # float, sampled on a log scale (both bounds > 0)
    optim.weight_decay: uniform(0, 0.2)  # float, linear
    model.n_layers: int(2, 6)            # integer, both bounds included
    model.d_model: [64, 128, 256]        # a choice among these values
Everything is refused before any trial runs, with the key named: an unknown key, a malformed or empty
(equal or reversed) range, a float range over an integer field, a value a field does not accept.
A trial's config is the base (a recipe mapping) with the sampled values set, built by lmstack.config.from_dict,
so it obeys exactly the checks that a recipe YAML and `--dotted.key value` flags do.

Usage:
    from lmstack.train.sweep.space import parse_space, build_config
    space = parse_space({"optim.lr": "loguniform(1e-4, 1e-2)"}, PretrainConfig, base=recipe_mapping)
    cfg = build_config(PretrainConfig, recipe_mapping, {"optim.lr": 3e-3})
"""
from __future__ import annotations

import ast
import copy
import dataclasses
from dataclasses import dataclass
import itertools
import math
import re
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints

from lmstack.config import ConfigError, from_dict

Kind = Literal["loguniform", "uniform", "int", "choice"]
_RANGE = re.compile(r"^\s*(loguniform|uniform|int)\s*\((.*)\)\s*$")
# Optuna's categorical values must be one of these (they are stored in the study database as JSON).
_SCALARS = (type(None), bool, int, float, str)
COMBOS_MAX = 256  # combinations of the other keys tried before a value is refused
GRID_MAX = 10_000  # an int(a, b) range expanded for the grid sampler: past this, a grid is a mistake


@dataclass(frozen=True)
class Param:
    """One searched key: a range (low, high) or a list of choices."""

    key: str
    kind: Kind
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()

    def grid(self) -> list:
        """The values a grid sweep visits: the choices, or every integer of an int range."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1))
        raise ConfigError(f"sweep space {self.key}: the grid sampler needs a list of values or int(a, b), "
                          f"not a continuous {self.kind}({self.low:g}, {self.high:g})")


def field_hint(cls: type, key: str) -> Any:
    """The type hint of dotted `key` inside dataclass `cls`; ConfigError naming the key when it is unknown."""
    hint: Any = cls
    parts = key.split(".")
    for i, part in enumerate(parts):
        hint = _unwrap_optional(hint)
        if not (dataclasses.is_dataclass(hint) and isinstance(hint, type)):
            raise ConfigError(f"sweep space: unknown key {key!r}: {'.'.join(parts[:i])} is not a config section")
        fields = {f.name for f in dataclasses.fields(hint) if f.init}
        if part not in fields:
            where = ".".join(parts[:i]) or cls.__name__
            raise ConfigError(f"sweep space: unknown key {key!r}: {where} has no field {part!r}; "
                              f"allowed: {', '.join(sorted(fields))}")
        hint = get_type_hints(hint)[part]
    if dataclasses.is_dataclass(_unwrap_optional(hint)):
        raise ConfigError(f"sweep space: key {key!r} is a whole config section; search its fields "
                          f"({key}.<field>) instead")
    return hint


def _unwrap_optional(hint: Any) -> Any:
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _numbers(key: str, text: str, name: str) -> tuple[float, float]:
    try:
        args = ast.literal_eval(f"({text},)")
    except (ValueError, SyntaxError):
        raise ConfigError(f"sweep space {key}: {name}({text}) needs two numbers, e.g. {name}(1, 10)") from None
    if len(args) != 2 or any(isinstance(a, bool) or not isinstance(a, (int, float)) for a in args):
        raise ConfigError(f"sweep space {key}: {name}({text}) needs exactly two numbers (low, high)")
    return args[0], args[1]


def parse_param(key: str, spec: Any) -> Param:
    """A Param from one space entry (a "name(a, b)" string or a list), checking the range but not the field."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError(f"sweep space {key}: the list of choices is empty")
        bad = [v for v in spec if not isinstance(v, _SCALARS)]
        if bad:
            raise ConfigError(f"sweep space {key}: choice {bad[0]!r} is not a number, string, boolean or null")
        if len(set(map(repr, spec))) != len(spec):
            raise ConfigError(f"sweep space {key}: the choices {list(spec)!r} repeat a value")
        return Param(key, "choice", choices=tuple(spec))
    match = _RANGE.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise ConfigError(f"sweep space {key}: {spec!r} is not a search range; write loguniform(a, b), "
                          f"uniform(a, b), int(a, b) or a list of choices [x, y, ...]")
    name, text = match.groups()
    low, high = _numbers(key, text, name)
    if not low < high:
        raise ConfigError(f"sweep space {key}: {name}({low}, {high}) is an empty range; low must be below high")
    if name == "loguniform" and low <= 0:
        raise ConfigError(f"sweep space {key}: loguniform({low}, {high}) needs bounds above 0")
    if name == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"sweep space {key}: int({low}, {high}) needs integer bounds")
    if name == "int":
        low, high = int(low), int(high)
    return Param(key, name, float(low) if name != "int" else low, float(high) if name != "int" else high)


def set_dotted(data: dict, key: str, value: Any) -> dict:
    """A deep copy of mapping `data` with dotted `key` set to `value` (the sections made as needed)."""
    out = copy.deepcopy(data)
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value
    return out


def build_config(cls: type, base: dict | None, params: dict[str, Any]) -> Any:
    """The dataclass `cls` built from recipe mapping `base` with each dotted key of `params` set."""
    data = dict(base or {})
    for key, value in params.items():
        data = set_dotted(data, key, value)
    return from_dict(cls, data)


def _check_kind(cls: type, p: Param) -> None:
    hint = _unwrap_optional(field_hint(cls, p.key))
    if p.kind in ("loguniform", "uniform") and hint is not float and hint is not Any:
        name = getattr(hint, "__name__", str(hint))
        extra = "; use int(a, b) or a list" if hint is int else ""
        raise ConfigError(f"sweep space {p.key}: {p.kind}(...) samples floats but the field is {name}{extra}")
    if p.kind == "int" and hint not in (int, float, Any):
        raise ConfigError(f"sweep space {p.key}: int(...) samples integers but the field is "
                          f"{getattr(hint, '__name__', hint)}")


def _probe_values(p: Param) -> tuple:
    return p.choices if p.kind == "choice" else (p.low, p.high)


def _check_values(cls: type, base: dict | None, params: list[Param]) -> None:
    """Every choice, and both ends of a range, must build a valid config: the field's own type check and the
    config's __post_init__ rules (d_model divisible by n_heads, say). A cross-field rule may be met by another
    searched key (d_model 96 with n_heads 3), so a value is refused only when no combination of the other
    keys' probe values (at most COMBOS_MAX of them) builds."""
    for p in params:
        others = [q for q in params if q is not p]
        combos = list(itertools.islice(itertools.product(*map(_probe_values, others)), COMBOS_MAX))
        for value in _probe_values(p):
            error = None
            for combo in combos:
                try:
                    build_config(cls, base, {p.key: value, **{q.key: v for q, v in zip(others, combo)}})
                    error = None
                    break
                except (ValueError, TypeError) as e:  # ConfigError is a ValueError; so are __post_init__ checks
                    error = error or e
                    if str(e).startswith(p.key):  # the field's own type check: no other key can fix it
                        break
            if error is not None:
                raise ConfigError(f"sweep space {p.key}: value {value!r} is refused by the config: {error}")


def parse_space(spec: dict[str, Any], cls: type, base: dict | None = None) -> list[Param]:
    """The checked Params of a space mapping over dataclass `cls` (with recipe mapping `base` under it)."""
    if not isinstance(spec, dict) or not spec:
        raise ConfigError("sweep space must be a non-empty mapping of dotted config keys to ranges or lists")
    params = []
    for key, value in spec.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"sweep space: key {key!r} must be a dotted config key such as optim.lr")
        p = parse_param(key, value)
        _check_kind(cls, p)
        params.append(p)
    _check_values(cls, base, params)
    return params


def suggest(trial: Any, p: Param) -> Any:
    """The value of `p` for an Optuna trial (the dotted key is the Optuna parameter name)."""
    if p.kind == "choice":
        return trial.suggest_categorical(p.key, list(p.choices))
    if p.kind == "int":
        return trial.suggest_int(p.key, int(p.low), int(p.high))
    return trial.suggest_float(p.key, p.low, p.high, log=p.kind == "loguniform")


def grid_space(params: list[Param]) -> dict[str, list]:
    """{key: values} for Optuna's GridSampler; refuses a continuous range or a grid past GRID_MAX points."""
    grid = {p.key: p.grid() for p in params}
    size = math.prod(len(v) for v in grid.values())
    if size > GRID_MAX:
        raise ConfigError(f"sweep space: the grid has {size} points, more than {GRID_MAX}; narrow the int ranges")
    return grid
