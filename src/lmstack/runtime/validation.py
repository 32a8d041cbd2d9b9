"""Config validation: the checks every dataclass config's __post_init__ makes, written once.

Every message names the field, the bad value and what is allowed, the shape DESIGN.md asks for:
    position='rotary' is not allowed; choose one of rope, alibi, learned, sinusoidal, none
    lr must be > 0, got -1.0
    r=0 is not allowed; it must be an integer >= 1

Errors are ConfigError (an LmstackError and a ValueError), so callers may catch either.

Usage:
    from lmstack.runtime.validation import check_choice, check_choices, check_int, check_number, check_range, need
    text = read_text(path, "thresholds")   # a missing or unreadable file: 'thresholds file not found: PATH'

    @dataclass
    class MyConfig:
        kind: Literal["a", "b"] = "a"
        lr: float = 1e-3
        steps: int = 10
        def __post_init__(self):
            check_choices(self)                         # every Literal-typed field
            check_range("lr", self.lr, low=0, low_open=True)
            need(self.lr < 1, f"lr={self.lr} must be below 1")
            check_int("steps", self.steps, low=1)       # steps=0 is not allowed; it must be an integer >= 1
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Literal, get_args, get_origin, get_type_hints

from lmstack.config import ConfigError


def need(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)


def check_choice(field: str, value: Any, choices: Iterable[Any], quoted: bool = False) -> None:
    """Raise ConfigError naming `field` and the allowed choices unless value is one of them;
    quoted=True lists the choices as Python literals ('ddp') instead of bare words (ddp)."""
    choices = tuple(choices)
    if value not in choices:
        shown = ", ".join(map(repr if quoted else str, choices))
        raise ConfigError(f"{field}={value!r} is not allowed; choose one of {shown}")


def check_choices(cfg: Any, prefix: str = "", quoted: bool = False) -> None:
    """check_choice for every Literal-typed field of dataclass instance `cfg`; prefix names its section
    (e.g. "objective.") so the message reads like the CLI flag."""
    hints = get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        hint = hints[f.name]
        if get_origin(hint) is Literal:
            check_choice(prefix + f.name, getattr(cfg, f.name), get_args(hint), quoted)


def _inside(value: Any, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    # written as "inside" tests, so NaN (every comparison False) is refused like `need(x > 0, ...)` refuses it
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """'>= 1', '> 0', '<= 10' or 'in [0, 1)': the allowed values in math notation."""
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_range(field: str, value: float, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ConfigError unless low <= value <= high (strict where low_open / high_open); None = unbounded.
    The message shows the interval in math notation: `dropout must be in [0, 1), got 1.5`."""
    if (low is None and high is None) or _inside(value, low, high, low_open, high_open):
        return
    raise ConfigError(f"{field} must be {_bounds(low, high, low_open, high_open)}, got {value}")


def check_int(field: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    """Raise ConfigError unless value is an int (a bool or a float is refused) in [low, high]:
    `r=0 is not allowed; it must be an integer >= 1`."""
    if isinstance(value, bool) or not isinstance(value, int) or not _inside(value, low, high, False, False):
        what = f"an integer {_bounds(low, high, False, False)}" if low is not None or high is not None else "an integer"
        raise ConfigError(f"{field}={value!r} is not allowed; it must be {what}")


def check_number(field: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """Raise ConfigError unless value is an int or float (not a bool) inside the bounds; returns it as a float:
    `dropout=1.5 is not allowed; it must be a number in [0, 1)`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _inside(value, low, high, low_open,
                                                                                     high_open):
        what = f"a number {_bounds(low, high, low_open, high_open)}" if low is not None or high is not None \
            else "a number"
        raise ConfigError(f"{field}={value!r} is not allowed; it must be {what}")
    return float(value)


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of a file the user named; a missing or unreadable one is a ConfigError naming `what`."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} file {p}: {e}") from None
