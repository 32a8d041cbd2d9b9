"""rag.store: the SQLite store's writes, exact search, cache refresh across connections, the embedder check and
two processes writing at once."""
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lmstack.errors import LmstackError
from lmstack.rag.store import SQLiteStore, top_k
from lmstack.rag.types import Chunk, Document


def _doc(doc_id, n_chunks=2):
    text = " ".join(f"{doc_id}-part{i}" for i in range(n_chunks))
    doc = Document(doc_id, text, f"{doc_id}.txt", {"k": doc_id})
    chunks, at = [], 0
    for i, word in enumerate(text.split()):
        start = text.index(word, at)
        chunks.append(Chunk(f"{doc_id}#{i}", doc_id, word, doc.source, start, start + len(word), ("H",), {"i": i}))
        at = start + len(word)
    return doc, chunks


def _unit(rng, n, dim=8):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_add_search_get_delete_update(tmp_path):
    rng = np.random.default_rng(0)
    store = SQLiteStore(tmp_path / "i.db", name="fake", dim=8)
    docs = [_doc(f"d{i}") for i in range(5)]
    vecs = _unit(rng, 10)
    store.add([d for d, _ in docs], [c for _, cs in docs for c in cs], vecs)
    assert len(store) == 10 and store.doc_ids() == [f"d{i}" for i in range(5)]
    # exact: the top hit of each stored vector is itself, with cosine 1, and scores come sorted
    for row in range(10):
        hits = store.search(vecs[row], 3)
        assert hits[0][0] == f"d{row // 2}#{row % 2}" and hits[0][1] == pytest.approx(1.0, abs=1e-6)
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    got = store.get(["d3#1", "d0#0"])
    assert [c.chunk_id for c in got] == ["d3#1", "d0#0"]
    assert got[0] == docs[3][1][1] and store.document("d3") == docs[3][0]
    with pytest.raises(LmstackError, match="already in the index"):
        store.add([docs[0][0]], docs[0][1], vecs[:2])

    assert store.delete(["d1", "nope"]) == 1
    assert all(not cid.startswith("d1#") for cid, _ in store.search(vecs[2], 10))
    with pytest.raises(LmstackError, match="no chunk 'd1#0'"):
        store.get(["d1#0"])

    new_doc, new_chunks = _doc("d2", n_chunks=3)
    new_vecs = _unit(rng, 3)
    store.update([new_doc], new_chunks, new_vecs)
    assert store.search(new_vecs[2], 1)[0] == ("d2#2", pytest.approx(1.0, abs=1e-6))
    assert store.document("d2").text == new_doc.text and len(store) == 9
    ids, matrix = store.matrix()
    assert len(ids) == 9 and matrix.shape == (9, 8)
    # the in-place patched matrix equals a fresh load of the file
    fresh = SQLiteStore(tmp_path / "i.db")
    assert fresh.matrix()[0] == ids and np.array_equal(fresh.matrix()[1], matrix)


def test_other_connection_sees_writes_and_embedder_is_checked(tmp_path):
    rng = np.random.default_rng(1)
    a = SQLiteStore(tmp_path / "i.db", name="fake", dim=8)
    b = SQLiteStore(tmp_path / "i.db", name="fake", dim=8)
    d, cs = _doc("x")
    v = _unit(rng, 2)
    assert b.search(v[0], 5) == []
    a.add([d], cs, v)
    assert b.search(v[0], 1)[0][0] == "x#0"
    a.delete(["x"])
    assert b.search(v[0], 5) == []
    with pytest.raises(LmstackError, match=r"built with embedder 'fake' \(dim 8\), not 'other' \(dim 8\)"):
        SQLiteStore(tmp_path / "i.db", name="other", dim=8)
    with pytest.raises(LmstackError, match=r"not 'fake' \(dim 16\)"):
        SQLiteStore(tmp_path / "i.db", name="fake", dim=16)
    with pytest.raises(LmstackError, match="no embedder recorded"):
        SQLiteStore(tmp_path / "new.db")
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(LmstackError, match="not a usable SQLite index"):
        SQLiteStore(tmp_path / "junk.db", name="fake", dim=8)
    with pytest.raises(LmstackError, match="expected 2 vectors of dim 8"):
        a.add([d], cs, _unit(rng, 2, dim=4))


def test_top_k_orders_and_bounds():
    s = np.array([0.1, 0.9, 0.5, 0.9, -1.0], dtype=np.float32)
    assert top_k(s, 3).tolist() == [1, 3, 2]
    assert top_k(s, 10).tolist() == [1, 3, 2, 0, 4]
    assert top_k(s, 0).tolist() == []


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from lmstack.rag.store import SQLiteStore
    from lmstack.rag.types import Chunk, Document
    import os, time
    path, tag = sys.argv[1], sys.argv[2]
    store = SQLiteStore(path, name="fake", dim=8)
    open(path + "." + tag, "w").close()
    while not all(os.path.exists(path + "." + t) for t in ("a", "bb")):  # start together: the writes collide
        time.sleep(0.001)
    rng = np.random.default_rng(len(tag))
    for i in range(30):
        doc_id = f"{tag}{i}"
        doc = Document(doc_id, "text " * 50)
        chunks = [Chunk(f"{doc_id}#{j}", doc_id, "text", "", 0, 4) for j in range(20)]
        v = rng.standard_normal((20, 8)).astype(np.float32)
        store.add([doc], chunks, v / np.linalg.norm(v, axis=1, keepdims=True))
        if i % 3 == 2:
            store.update([doc], chunks[:5], v[:5] / np.linalg.norm(v[:5], axis=1, keepdims=True))
    print("done", len(store))
""")


def test_two_processes_write_at_once(tmp_path):
    path = tmp_path / "shared.db"
    SQLiteStore(path, name="fake", dim=8).close()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for tag in ("a", "bb")]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    store = SQLiteStore(path, name="fake", dim=8)
    assert store.integrity() == "ok"
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert len(store.doc_ids()) == 60
    # 10 of each writer's 30 documents were cut to 5 chunks by update
    assert len(store) == 2 * (20 * 20 + 10 * 5)
    ids, matrix = store.matrix()
    assert matrix.shape == (900, 8) and len(set(ids)) == 900


def test_get_can_skip_missing(tmp_path):
    store = SQLiteStore(tmp_path / "i.db", name="fake", dim=8)
    d, cs = _doc("x")
    store.add([d], cs, _unit(np.random.default_rng(2), 2))
    assert [c.chunk_id for c in store.get(["gone#0", "x#1", "x#0"], skip_missing=True)] == ["x#1", "x#0"]
