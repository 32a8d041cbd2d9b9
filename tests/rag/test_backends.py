"""The three Index backends behind one interface: sqlite (exact), faiss (HNSW, IVF-PQ) and pgvector (a slow test
that starts pgserver's bundled Postgres) give the same answers through Index, stay consistent under
add/delete/update, persist, and refuse another embedder."""

import numpy as np
import pytest

from lmstack.errors import LmstackError
from lmstack.rag.index import Index
from lmstack.rag.types import Document
from rag_fakes import HashEmbedder


def WordHash(name="word-hash"):
    return HashEmbedder(dim=128, name=name)


PEOPLE = ["Ada Ashford lives in Amberhaven and maps rivers.", "Bo Baker lives in Coldwater and bakes rye bread.",
          "Cyd Crane lives in Elmstead and studies volcanoes.", "Dee Dorsey lives in Greywick and repairs clocks.",
          "Eli Evans lives in Fairport and trains falcons.", "Fay Foster lives in Hollowmere and brews cider."]
DOCS = [Document(p.split()[0].lower(), p, "people.jsonl") for p in PEOPLE]


def _exercise(idx: Index, reopen) -> None:
    """The same script for every backend: modes, writes, a reopen."""
    for mode in ("bm25", "dense", "hybrid"):
        assert idx.search("who repairs clocks in Greywick", k=1, mode=mode)[0].chunk.doc_id == "dee", mode
    idx.delete("dee")
    idx.update(Document("bo", "Bo Baker left Coldwater for Quillport, where he sails ferries.", "people.jsonl"))
    idx.add([Document("gus", "Gus Green lives in Ivydale and carves clocks from oak.", "new.txt")])
    for mode in ("bm25", "dense", "hybrid"):
        hits = idx.search("repairs clocks Greywick Dorsey", k=10, mode=mode)
        assert "dee" not in [h.chunk.doc_id for h in hits], mode
        assert idx.search("sails ferries Quillport", k=1, mode=mode)[0].chunk.doc_id == "bo", mode
        assert "bakes rye" not in " ".join(h.chunk.text for h in idx.search("bakes rye bread", k=10, mode=mode))
    again = reopen()
    assert sorted(again.doc_ids()) == ["ada", "bo", "cyd", "eli", "fay", "gus"]
    for mode in ("bm25", "dense", "hybrid"):
        assert [h.chunk.chunk_id for h in again.search("carves clocks oak", k=3, mode=mode)] == \
            [h.chunk.chunk_id for h in idx.search("carves clocks oak", k=3, mode=mode)], mode
    with pytest.raises(LmstackError, match=r"built with embedder 'word-hash' \(dim 128\), not 'other'"):
        reopen(WordHash(name="other"))


@pytest.mark.parametrize("backend,options", [("sqlite", {}), ("faiss", {"kind": "hnsw"}),
                                             ("faiss", {"kind": "ivfpq"})])
def test_file_backends_share_one_interface(tmp_path, backend, options):
    if backend == "faiss":
        pytest.importorskip("faiss")
    path = tmp_path / "idx"
    idx = Index.build(DOCS, WordHash(), path=path, backend=backend, **options)
    assert idx.backend == backend
    if backend == "faiss":
        # six documents are too few to train IVF-PQ: that kind falls back to an exact flat index, and says so
        assert idx.store.kind_in_use == ("hnsw" if options["kind"] == "hnsw" else
                                         "flat (exact: fewer than train_min=10000 vectors to train ivfpq)")
        assert [p.name for p in path.glob("*.faiss")] == [f"vectors-{idx.store.generation()}.faiss"]
    _exercise(idx, lambda emb=None: Index.open(path, emb or WordHash()))
    idx.close()
    if backend == "faiss":
        # close saved the FAISS index for the latest generation, and only that one
        reopened = Index.open(path, WordHash())
        assert [p.name for p in path.glob("*.faiss")] == [f"vectors-{reopened.store.generation()}.faiss"]
        assert reopened.store.faiss_index is not None and reopened.store.options["kind"] == options["kind"]


def _unit(rng, n, dim):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _recall(store, exact, queries, k=10):
    got = 0
    for q in queries:
        truth = {i for i, _ in exact.search(q, k)}
        got += len(truth & {i for i, _ in store.search(q, k)})
    return got / (k * len(queries))


@pytest.mark.parametrize("kind,options,floor", [("hnsw", {}, 0.9),
                                                ("ivfpq", {"train_min": 1000, "nbits": 6, "nprobe": 8}, 0.3)])
def test_faiss_kinds_recall_and_deletes(tmp_path, kind, options, floor):
    pytest.importorskip("faiss")
    from lmstack.rag.faiss_store import FaissStore
    from lmstack.rag.store import SQLiteStore
    from lmstack.rag.types import Chunk
    rng = np.random.default_rng(0)
    n, dim = 3000, 32
    # clustered data, as embeddings are: 60 centres, points near them
    centres = _unit(rng, 60, dim)
    vecs = centres[rng.integers(0, 60, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    docs = [Document(f"d{i}", "x") for i in range(n)]
    chunks = [Chunk(f"d{i}#0", f"d{i}", "x", "", 0, 1) for i in range(n)]
    store = FaissStore(tmp_path / "f" / "index.db", name="r", dim=dim, kind=kind, **options)
    exact = SQLiteStore(tmp_path / "e.db", name="r", dim=dim)
    for s in (store, exact):
        s.add(docs, chunks, vecs)
    queries = vecs[rng.choice(n, 50, replace=False)] + 0.05 * _unit(rng, 50, dim)
    assert store.kind_in_use == kind
    assert _recall(store, exact, queries) >= floor
    top = store.search(vecs[7], 1)[0][0]
    store.delete([top.split("#")[0]])
    assert top not in [i for i, _ in store.search(vecs[7], 20)]
    # an addition after the index is built goes into it (HNSW: graph insert; IVF-PQ: encoded with its codebooks)
    new = _unit(rng, 1, dim)
    store.add([Document("new", "x")], [Chunk("new#0", "new", "x", "", 0, 1)], new)
    assert store.search(new[0], 1)[0][0] == "new#0"
    store.close()
    # the saved file is loaded (not rebuilt) by the next open, and answers the same
    again = FaissStore(tmp_path / "f" / "index.db")
    assert again.faiss_index is not None and again.kind_in_use == kind and again.options["kind"] == kind
    assert again.search(vecs[11], 5) == FaissStore(tmp_path / "f" / "index.db").search(vecs[11], 5)
    with pytest.raises(LmstackError, match="unknown faiss option"):
        FaissStore(tmp_path / "g" / "index.db", name="r", dim=dim, kindd="hnsw")


@pytest.mark.slow
def test_pgvector_backend_through_pgserver():
    pgserver = pytest.importorskip("pgserver")
    pytest.importorskip("psycopg")
    import tempfile
    data = tempfile.mkdtemp(prefix="pg", dir="/tmp")  # short: the socket path must fit in 107 bytes
    server = pgserver.get_server(data, cleanup_mode="delete")
    try:
        dsn = server.get_uri()
        idx = Index.build(DOCS, WordHash(), path=dsn, backend="pgvector", namespace="t1", ann="exact")
        assert idx.backend == "pgvector" and len(idx) == len(DOCS)
        _exercise(idx, lambda emb=None: Index.open(dsn, emb or WordHash(), namespace="t1"))
        # an HNSW-indexed namespace beside it, in the same database, answers the same top hit
        ann = Index.build(DOCS, WordHash(), path=dsn, backend="pgvector", namespace="t2", ann="hnsw")
        assert ann.search("who trains falcons", k=1, mode="dense")[0].chunk.doc_id == "eli"
        with pytest.raises(LmstackError, match="already holds an index"):
            Index.build(DOCS, WordHash(), path=dsn, backend="pgvector", namespace="t2")
        with pytest.raises(LmstackError, match="holds no index"):
            Index.open(dsn, namespace="t3")
        idx.close()
        ann.close()
    finally:
        server.cleanup()
