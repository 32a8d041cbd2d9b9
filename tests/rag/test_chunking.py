"""rag.chunking: exact offsets, bounded sizes, overlap, heading paths, and the three methods' boundaries."""
import re
import time

import pytest

from lmstack.errors import LmstackError
from lmstack.rag.chunking import ChunkConfig, chunk_document
from lmstack.rag.types import Document

MD = """Preface line before any heading.

# Alpha

Alpha one is short. Alpha two is a bit longer than one. Alpha three ends here!

## Beta

""" + " ".join(f"w{i}" for i in range(50)) + """

Tail paragraph of beta.

# Gamma
Gamma only.
"""


def _words(text: str) -> int:
    return len(re.findall(r"\S+", text))


def _check_exact(doc, chunks):
    for c in chunks:
        assert doc.text[c.start:c.end] == c.text and c.text == c.text.strip() and c.text
        assert c.doc_id == doc.doc_id and c.source == doc.source and c.metadata == doc.metadata


def test_recursive_follows_headings_and_paragraphs():
    doc = Document("d", MD, "d.md", {"lang": "en"})
    chunks = chunk_document(doc, "recursive", size=20, overlap=0)
    _check_exact(doc, chunks)
    assert [c.chunk_id for c in chunks] == [f"d#{i}" for i in range(len(chunks))]
    assert all(_words(c.text) <= 20 for c in chunks)
    assert chunks[0].text == "Preface line before any heading." and chunks[0].heading_path == ()
    assert chunks[1].heading_path == ("Alpha",) and chunks[1].text.startswith("# Alpha")
    beta = [c for c in chunks if c.heading_path == ("Alpha", "Beta")]
    assert beta[0].text == "## Beta" and beta[-1].text.endswith("Tail paragraph of beta.")
    # the 50-word paragraph is cut into windows of 20: w0..w19, w20..w39, then w40..w49 packed with the tail
    assert [c.text.split()[0] for c in beta[1:]] == ["w0", "w20", "w40"]
    assert chunks[-1].heading_path == ("Gamma",) and chunks[-1].text == "# Gamma\nGamma only."
    # no chunk crosses a section
    assert not any("# Gamma" in c.text and "beta" in c.text for c in chunks)


def test_token_windows_overlap_exactly():
    text = " ".join(f"t{i}" for i in range(25))
    doc = Document("x", text)
    chunks = chunk_document(doc, "tokens", size=10, overlap=3)
    _check_exact(doc, chunks)
    assert [c.text.split() for c in chunks] == [[f"t{i}" for i in range(a, min(a + 10, 25))] for a in (0, 7, 14)] \
        + [[f"t{i}" for i in range(21, 25)]]


def test_sentence_packing_with_overlap():
    sents = [f"Sentence {i} has five words." for i in range(6)]
    doc = Document("s", "  " + " ".join(sents) + "\n")
    chunks = chunk_document(doc, "sentences", size=12, overlap=5)
    _check_exact(doc, chunks)
    # two sentences (10 words) per chunk, the last sentence of one repeated at the head of the next
    assert [c.text for c in chunks] == [" ".join(sents[i:i + 2]) for i in (0, 1, 2, 3, 4)]
    no_overlap = chunk_document(doc, "sentences", size=12, overlap=0)
    assert [c.text for c in no_overlap] == [" ".join(sents[i:i + 2]) for i in (0, 2, 4)]


def test_tokenizer_offsets_map_back_to_text():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()  # splits "end." into "end" and "."
    doc = Document("t", "one two, three. four five! six")
    chunks = chunk_document(doc, "tokens", size=3, overlap=1, tokenizer=tok)
    _check_exact(doc, chunks)
    assert [c.text for c in chunks] == ["one two,", ", three.", ". four five", "five! six"]


def test_no_space_text_is_bounded_by_max_chars():
    doc = Document("z", "x" * 10_000)
    for method in ("recursive", "tokens", "sentences"):
        chunks = chunk_document(doc, method, size=500, overlap=0, max_chars=1000)
        _check_exact(doc, chunks)
        assert max(len(c.text) for c in chunks) <= 1000 and "".join(c.text for c in chunks) == doc.text


def test_bad_config_names_the_problem():
    with pytest.raises(LmstackError, match="chunk method 'pages' is not one of recursive, tokens, sentences"):
        ChunkConfig(method="pages")
    with pytest.raises(LmstackError, match="overlap"):
        ChunkConfig(size=10, overlap=10)
    with pytest.raises(LmstackError, match="size"):
        ChunkConfig(size=0)


@pytest.mark.slow
def test_50mb_single_line_gives_bounded_chunks():
    """One 50 MB line (sentences with no newline) is streamed into chunks of bounded size by every method."""
    unit = "The quick brown fox number seven jumps over the lazy dog again. "
    doc = Document("big", unit * (50_000_000 // len(unit)))
    for method in ("recursive", "tokens", "sentences"):
        start = time.perf_counter()
        chunks = chunk_document(doc, method, size=256, overlap=32)
        took = time.perf_counter() - start
        assert len(chunks) > 35_000
        assert max(len(c.text) for c in chunks) <= 4000 and max(_words(c.text) for c in chunks) <= 256
        for c in chunks[:: len(chunks) // 50]:
            assert doc.text[c.start:c.end] == c.text
        assert chunks[-1].end == len(doc.text.rstrip())
        assert took < 120, (method, took)
