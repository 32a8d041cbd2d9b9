import gzip
import json

import pytest

from lmstack.data.readers import batched, read_all, read_documents
from lmstack.data.readers.config import ReaderConfig
from lmstack.data.readers.stats import ReadStats
from lmstack.errors import LmstackError


def _docs(cfg, stats=None):
    return list(read_documents(cfg, stats if stats is not None else ReadStats()))


def test_text_modes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first para line 1\nline 2\n\n\nsecond para\n\nthird\n", encoding="utf-8")
    assert [d["text"] for d in _docs(ReaderConfig(path=str(f)))] == ["first para line 1\nline 2\n\n\nsecond para\n\nthird"]
    paras = _docs(ReaderConfig(path=str(f), text_mode="paragraph"))
    assert [d["text"] for d in paras] == ["first para line 1\nline 2", "second para", "third"]
    assert paras[1]["id"] == "a/a.txt:5" and paras[1]["source"] == "a"
    lines = _docs(ReaderConfig(path=str(f), text_mode="line", source="s"))
    assert [d["text"] for d in lines] == ["first para line 1", "line 2", "second para", "third"]
    assert {d["source"] for d in lines} == {"s"}


def test_jsonl_fields_and_malformed_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps({"id": 7, "q": "What?", "a": "This.", "label": "good"}),
             "{not json",
             json.dumps({"q": "only a question"}),
             json.dumps({"q": 3, "a": "x"}),
             json.dumps(["a", "list"]),
             "",
             json.dumps({"q": "Again?", "a": "Yes."})]
    f.write_bytes(("\n".join(lines) + "\n").encode() + b'{"q": "\xff\xfe bad", "a": "x"}\n')
    stats = ReadStats()
    docs = _docs(ReaderConfig(path=str(f), text_fields=["q", "a"], meta_fields=["label"]), stats)
    assert [d["text"] for d in docs] == ["What?\n\nThis.", "Again?\n\nYes."]
    assert docs[0]["id"] == "d/7" and docs[0]["meta"] == {"label": "good"}
    assert docs[1]["id"] == "d/d.jsonl:7"
    entry = stats.malformed[str(f)]
    assert entry["count"] == 5
    assert entry["reasons"] == {"bad_json": 1, "missing_field:a": 1, "not_text:q": 1, "not_an_object": 1, "not_utf8": 1}
    assert entry["lines"][:2] == [2, 3]
    assert stats.dropped()["bad_json"] == 1


def test_non_utf8_text_file_is_skipped_and_named(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("hello world", encoding="utf-8")
    bad.write_bytes("caf\u00e9 ok ".encode("utf-8") * 100 + b"\xc3\x28 broken")
    stats = ReadStats()
    docs = _docs(ReaderConfig(path=str(tmp_path)), stats)
    assert [d["text"] for d in docs] == ["hello world"]
    assert list(stats.skipped_files) == [str(bad)]
    assert "not UTF-8 (byte 900)" in stats.skipped_files[str(bad)]
    assert stats.dropped() == {"bad_file": 1}


def test_glob_directory_gzip_csv_and_max_docs(tmp_path):
    (tmp_path / "sub").mkdir()
    with gzip.open(tmp_path / "sub" / "x.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(5):
            f.write(json.dumps({"text": f"doc {i}"}) + "\n")
    (tmp_path / "t.csv").write_text('text,extra\n"a, quoted",1\nplain,2\n', encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("secret", encoding="utf-8")
    docs = _docs(ReaderConfig(path=str(tmp_path / "sub" / "*.jsonl.gz")))
    assert [d["text"] for d in docs] == [f"doc {i}" for i in range(5)]
    assert [d["text"] for d in _docs(ReaderConfig(path=str(tmp_path / "t.csv")))] == ["a, quoted", "plain"]
    everything = _docs(ReaderConfig(path=str(tmp_path)))
    assert "secret" not in [d["text"] for d in everything] and len(everything) == 7
    assert len(_docs(ReaderConfig(path=str(tmp_path / "sub"), max_docs=2))) == 2


def test_streaming_is_lazy(tmp_path):
    f = tmp_path / "big.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(1000)), encoding="utf-8")
    it = read_all([ReaderConfig(path=str(f))])
    first = next(it)
    assert first["text"] == "t0"  # produced without reading the rest
    assert [len(b) for b in batched(it, 400)] == [400, 400, 199]


def test_bad_paths_and_config():
    with pytest.raises(LmstackError, match="matches no file"):
        _docs(ReaderConfig(path="/nonexistent/file.txt"))
    with pytest.raises(ValueError, match="max_docs"):
        ReaderConfig(path="x", max_docs=-1)


def test_parquet_when_pyarrow_installed(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a b", "c d", None], "id": [1, 2, 3]}), tmp_path / "x.parquet")
    stats = ReadStats()
    docs = _docs(ReaderConfig(path=str(tmp_path / "x.parquet")), stats)
    assert [d["text"] for d in docs] == ["a b", "c d"] and stats.n_malformed == 1
