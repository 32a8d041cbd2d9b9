"""lmstack.runtime.validation: the config checks' contracts and the exact shape of their messages."""
from dataclasses import dataclass
from typing import Literal

import pytest

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.runtime.validation import check_choice, check_choices, check_range, need


@dataclass
class Toy:
    kind: Literal["a", "b"] = "a"
    mode: Literal["x", "y", "z"] = "x"
    size: int = 3  # not a Literal: never checked here


def test_check_choice_names_the_field_value_and_choices():
    check_choice("kind", "a", ("a", "b"))
    with pytest.raises(ConfigError, match=r"^kind='c' is not allowed; choose one of a, b$"):
        check_choice("kind", "c", ("a", "b"))
    with pytest.raises(ConfigError, match=r"^backend='mpi' is not allowed; choose one of 'auto', 'gloo'$"):
        check_choice("backend", "mpi", ["auto", "gloo"], quoted=True)
    # a ConfigError is both an LmstackError (the CLI prints it) and a ValueError (Python callers catch it)
    with pytest.raises(LmstackError):
        check_choice("n", 5, range(3))
    with pytest.raises(ValueError):
        check_choice("n", 5, range(3))


def test_check_choices_walks_every_literal_field():
    check_choices(Toy())
    check_choices(Toy(size=-1))  # ints are not choices
    with pytest.raises(ConfigError, match=r"^mode='w' is not allowed; choose one of x, y, z$"):
        check_choices(Toy(mode="w"))
    with pytest.raises(ConfigError, match=r"^toy\.kind='q' is not allowed; choose one of 'a', 'b'$"):
        check_choices(Toy(kind="q"), prefix="toy.", quoted=True)


def test_need_raises_its_message():
    need(True, "never raised")
    with pytest.raises(ConfigError, match=r"^lr must be positive, got -1$"):
        need(False, "lr must be positive, got -1")


@pytest.mark.parametrize("kwargs,value,message", [
    (dict(low=0), -1, "x must be >= 0, got -1"),
    (dict(low=0, low_open=True), 0, "x must be > 0, got 0"),
    (dict(high=1), 2, "x must be <= 1, got 2"),
    (dict(high=1, high_open=True), 1, "x must be < 1, got 1"),
    (dict(low=0, high=1, high_open=True), 1.5, "x must be in [0, 1), got 1.5"),
    (dict(low=0, high=1, low_open=True), 0.0, "x must be in (0, 1], got 0.0"),
])
def test_check_range_refuses_outside_and_shows_the_interval(kwargs, value, message):
    with pytest.raises(ConfigError) as info:
        check_range("x", value, **kwargs)
    assert str(info.value) == message


def test_check_range_accepts_the_edges_it_includes():
    check_range("x", 0, low=0)
    check_range("x", 1, low=0, high=1)
    check_range("x", 0.5, low=0, high=1, low_open=True, high_open=True)
    check_range("x", 10**9)  # no bounds: anything goes


def test_check_range_refuses_nan_like_a_plain_comparison():
    with pytest.raises(ConfigError, match=r"^lr must be > 0, got nan$"):
        check_range("lr", float("nan"), low=0, low_open=True)
    with pytest.raises(ConfigError, match=r"^p must be in \[0, 1\], got nan$"):
        check_range("p", float("nan"), low=0, high=1)


def test_check_int_refuses_bools_floats_and_out_of_range():
    from lmstack.runtime.validation import check_int

    check_int("r", 1, low=1)
    check_int("n", 5)  # no bounds: any int
    for value in (0, True, 1.0, "2"):
        with pytest.raises(ConfigError, match=r"^r=.* is not allowed; it must be an integer >= 1$"):
            check_int("r", value, low=1)
    with pytest.raises(ConfigError, match=r"^k=9 is not allowed; it must be an integer in \[1, 8\]$"):
        check_int("k", 9, low=1, high=8)
    with pytest.raises(ConfigError, match=r"^n=None is not allowed; it must be an integer$"):
        check_int("n", None)


def test_check_number_returns_a_float_and_names_the_interval():
    from lmstack.runtime.validation import check_number

    assert check_number("alpha", 8, low=0, low_open=True) == 8.0
    assert isinstance(check_number("alpha", 8, low=0, low_open=True), float)
    for value in (0, -1.0, False, "8", float("nan")):
        with pytest.raises(ConfigError, match=r"^alpha=.* is not allowed; it must be a number > 0$"):
            check_number("alpha", value, low=0, low_open=True)
    with pytest.raises(ConfigError, match=r"^dropout=1 is not allowed; it must be a number in \[0, 1\)$"):
        check_number("dropout", 1, low=0, high=1, high_open=True)
