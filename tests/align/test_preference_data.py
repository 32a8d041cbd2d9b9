"""Preference JSONL: bad rows are counted, skipped and reported; unpaired KTO rows; world records load as pairs."""
import json

import pytest

from lmstack.align.preference_data import (load_preferences, load_unpaired, pairs_from_records, to_unpaired,
                                           write_preferences)
from lmstack.errors import LmstackError


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_rows_missing_chosen_or_rejected_are_counted_and_skipped(tmp_path):
    f = _write(tmp_path / "p.jsonl", [
        {"prompt": "a", "chosen": "good", "rejected": "bad"},
        {"prompt": "b", "chosen": "good"},                                  # line 2: no rejected
        {"prompt": "c", "rejected": "bad"},                                 # line 3: no chosen
        {"prompt": "d", "chosen": "", "rejected": "bad"},                   # line 4: empty chosen
        "{not json",                                                        # line 5
        {"prompt": "e", "chosen": "good", "rejected": "bad", "confidence": 0.8, "kind": "helpfulness"},
        {"prompt": "f", "chosen": 3, "rejected": "bad"},                    # line 7: non-string
        {"prompt": "g", "chosen": "x", "rejected": "y", "confidence": 0.2},  # line 8: confidence < 0.5
    ])
    data = load_preferences(f)
    assert [p.prompt for p in data.pairs] == ["a", "e"]
    assert data.pairs[1].confidence == 0.8 and data.pairs[1].meta == {"kind": "helpfulness"}
    assert data.skipped == {"missing rejected": [2], "missing chosen": [3, 4], "unparsable JSON": [5],
                            "non-string chosen": [7], "confidence outside [0.5, 1]": [8]}
    assert data.n_skipped == 6
    report = data.report()
    assert "loaded 2 rows" in report and "skipped 6" in report and "missing chosen 2 (lines 3, 4)" in report


def test_split_filter_and_empty_file_errors(tmp_path):
    f = _write(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "y", "split": "train"},
                                      {"prompt": "b", "chosen": "x", "rejected": "y", "split": "test"}])
    assert [p.prompt for p in load_preferences(f, split="test").pairs] == ["b"]
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a"}])
    with pytest.raises(LmstackError, match="no usable preference pair.*missing chosen 1"):
        load_preferences(bad)
    with pytest.raises(LmstackError, match="no preference file"):
        load_preferences(tmp_path / "nope.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "\xe9"}\n')
    with pytest.raises(LmstackError, match="UTF-8"):
        load_preferences(tmp_path / "latin1.jsonl")


def test_unpaired_rows_and_conversion(tmp_path):
    f = _write(tmp_path / "k.jsonl", [
        {"prompt": "a", "completion": "yes", "label": True},
        {"prompt": "b", "completion": "no", "label": "bad"},               # line 2: label not bool
        {"prompt": "c", "chosen": "good", "rejected": "bad"},              # paired row -> two rows
        {"prompt": "d", "label": False},                                   # line 4: no completion
    ])
    data = load_unpaired(f)
    assert [(r.prompt, r.completion, r.label) for r in data.rows] == [("a", "yes", True), ("c", "good", True),
                                                                        ("c", "bad", False)]
    assert data.skipped == {"label not true/false": [2], "missing completion": [4]}


def test_world_records_round_trip(world, tmp_path):
    records = world.corpus("preferences", split="train")
    data = pairs_from_records(records + [{"prompt": "x"}])
    assert len(data.pairs) == len(records) and data.skipped == {"missing chosen": [len(records) + 1]}
    assert data.pairs[0].meta["kind"] in {"correctness", "helpfulness", "instruction", "harmful", "benign"}
    path = write_preferences(data.pairs, tmp_path / "w.jsonl")
    again = load_preferences(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in again.pairs] == \
        [(p.prompt, p.chosen, p.rejected) for p in data.pairs]
    rows = to_unpaired(data.pairs[:2])
    assert [r.label for r in rows] == [True, False, True, False]
