"""RunLog: the small trainers' metrics.jsonl starts empty on every run and holds one JSON line per row."""
import json

from lmstack.train.metrics import RunLog


def test_run_log_starts_fresh_and_writes_a_line_per_row(tmp_path):
    out = tmp_path / "run"
    log = RunLog(out)
    log({"step": 1, "loss": 2.5})
    log({"step": 2, "loss": 2.0})
    assert [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] == \
        [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    again = RunLog(out)  # a rerun into the same directory: the old rows are gone
    assert (out / "metrics.jsonl").read_text() == ""
    again({"step": 1})
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
