"""rag.ingest: every supported format reads into documents, and every bad file is a counted skip with a reason."""
import json

import pytest

from lmstack.errors import LmstackError
from lmstack.rag.ingest import html_to_text, read_path


def _pdf_bytes(text: str | None) -> bytes:
    """A minimal one-page PDF, with `text` drawn in Helvetica (or an empty page when None); the xref table is
    computed, so pypdf reads it without repairs."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode() if text is not None else b""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_directory_reads_every_format_and_counts_bad_files(tmp_path):
    pytest.importorskip("pypdf")
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("Plain text about Ada.\r\nSecond line.")
    (tmp_path / "sub" / "b.md").write_text("# Title\n\nBody of b.")
    (tmp_path / "c.html").write_text(
        "<html><head><title>Page C</title><style>p{color:red}</style></head><body><h1>Intro</h1>"
        "<p>Hello &amp; welcome</p><script>var x = 'hidden';</script><p>Second <b>para</b></p></body></html>")
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"id": "bio-1", "text": "Ada was born in Oslo.", "name": "Ada"}) + "\n\n"
        + json.dumps({"title": "no text here"}) + "\n" + "{not json\n"
        + json.dumps({"text": "Bo lives in Rome."}) + "\n")
    (tmp_path / "e.pdf").write_bytes(_pdf_bytes("Cyd works at Acme."))
    (tmp_path / "empty.pdf").write_bytes(_pdf_bytes(None))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "blank.md").write_text("  \n\n ")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden.txt").write_text("never read")

    report = read_path(tmp_path)
    docs = {d.doc_id: d for d in report.documents}
    assert sorted(docs) == ["a.txt", "bio-1", "c.html", "d.jsonl:5", "e.pdf", "sub/b.md"]
    assert docs["a.txt"].text == "Plain text about Ada.\nSecond line."
    assert docs["sub/b.md"].metadata["format"] == "md"
    html = docs["c.html"]
    assert html.text == "# Intro\n\nHello & welcome\n\nSecond para"
    assert html.metadata["title"] == "Page C"
    assert docs["bio-1"].metadata == {"name": "Ada"} and docs["bio-1"].text == "Ada was born in Oslo."
    assert "Cyd works at Acme." in docs["e.pdf"].text and docs["e.pdf"].metadata["pages"] == 1

    reasons = {path.rsplit("/", 1)[-1]: reason for path, reason in report.skipped}
    assert set(reasons) == {"d.jsonl:3", "d.jsonl:4", "empty.pdf", "broken.pdf", "latin1.txt", "blank.md",
                            "image.png"}
    assert "no 'text' field" in reasons["d.jsonl:3"]
    assert "not JSON" in reasons["d.jsonl:4"]
    assert "no extractable text" in reasons["empty.pdf"]
    assert "unreadable PDF" in reasons["broken.pdf"]
    assert reasons["latin1.txt"] == "not UTF-8: byte 0xe9 at offset 3"
    assert "empty" in reasons["blank.md"]
    assert "unsupported file type .png" in reasons["image.png"]
    assert report.summary() == "6 documents, 7 skipped"


def test_single_file_skip_or_strict_error(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    report = read_path(bad)
    assert report.documents == [] and report.skipped == [(str(bad), "not UTF-8: byte 0xff at offset 3")]
    with pytest.raises(LmstackError, match="bad.txt: not UTF-8"):
        read_path(bad, strict=True)
    with pytest.raises(LmstackError, match="no such file"):
        read_path(tmp_path / "missing")
    good = tmp_path / "good.md"
    good.write_text("\ufeffhello")  # a BOM is not text
    assert [d.text for d in read_path(good).documents] == ["hello"]


def test_html_headings_tables_and_breaks():
    text, title = html_to_text("<h2>Sec  one</h2><table><tr><td>a</td><td>b</td></tr></table>x<br/>y"
                               "<noscript>no</noscript><h3>Deeper</h3><ul><li>i1</li><li>i2</li></ul>")
    assert title == ""
    assert text.split("\n\n") == ["## Sec one", "a b", "x", "y", "### Deeper", "i1", "i2"]
