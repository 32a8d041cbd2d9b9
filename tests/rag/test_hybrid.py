"""rag/hybrid.py: RRF arithmetic by hand, the min-max blend, ties and bad input."""
import pytest

from lmstack.errors import LmstackError
from lmstack.rag.hybrid import blend, minmax, rrf


def test_rrf_arithmetic_by_hand():
    fused = dict(rrf([["a", "b", "c"], ["c", "a", "d"]], k=60))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["b"] == pytest.approx(1 / 62)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert fused["d"] == pytest.approx(1 / 63)
    # a: 0.032522, c: 0.032266, b: 0.016129, d: 0.015873
    assert [d for d, _ in rrf([["a", "b", "c"], ["c", "a", "d"]])] == ["a", "c", "b", "d"]


def test_rrf_k_and_ties_and_repeats():
    # k = 0: plain reciprocal ranks, 1/2 + 1 for "y" beats 1 + 1/3 for "x"
    assert rrf([["x", "y"], ["y", "z", "x"]], k=0) == [("y", pytest.approx(1.5)), ("x", pytest.approx(4 / 3)),
                                                      ("z", pytest.approx(0.5))]
    # equal fused scores keep first-seen order
    assert [d for d, _ in rrf([["p", "q"], ["q", "p"]])] == ["p", "q"]
    # a repeated id counts once, at its best rank
    assert dict(rrf([["a", "a", "b"]]))["a"] == pytest.approx(1 / 61)
    assert dict(rrf([["a", "a", "b"]]))["b"] == pytest.approx(1 / 63)
    assert rrf([]) == [] and rrf([[], []]) == []


def test_blend_normalises_each_map_before_weighting():
    bm25 = {"a": 12.0, "b": 3.0, "c": 6.0}       # -> a 1, b 0, c 1/3
    dense = {"b": 0.9, "c": 0.5, "d": 0.1}       # -> b 1, c 0.5, d 0
    fused = dict(blend([bm25, dense], weights=[0.5, 0.5]))
    assert fused == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.5 * (1 / 3) + 0.25, "d": 0.0})
    # weights shift the order
    assert blend([bm25, dense], [0.9, 0.1])[0][0] == "a"
    assert blend([bm25, dense], [0.1, 0.9])[0][0] == "b"
    assert minmax({"x": 2.0, "y": 2.0}) == {"x": 1.0, "y": 1.0}
    assert minmax({}) == {}


def test_bad_input():
    with pytest.raises(LmstackError, match="2 score maps but 1 weights"):
        blend([{}, {}], [1.0])
    with pytest.raises(LmstackError, match="weights must be >= 0"):
        blend([{"a": 1.0}], [-1.0])
    with pytest.raises(LmstackError, match="finite"):
        blend([{"a": float("nan"), "b": 1.0}], [1.0])
    with pytest.raises(LmstackError, match="k must be"):
        rrf([["a"]], k=-1)
