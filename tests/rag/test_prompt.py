"""The cited-answer prompt: numbered chunks before the question, trimming to the context with a warning,
[n] parsing, and citation checks that point at real spans of the source document."""
import pytest

from lmstack.errors import LmstackError
from lmstack.rag.prompt import (RagPromptWarning, build_prompt, check_citations, content_words, find_span,
                                parse_citations, split_sentences, training_chat)
from lmstack.rag.types import Chunk, Document, Hit
from lmstack.tokenizer import train_tokenizer

DOCS = [
    Document("ada", "Ada Ashford was born in Amberhaven. She studied botany at Norvale University.", "bios"),
    Document("bo", "Bo Brant works for Zentrix Labs. He was born on March 4, 1987 in Coldwater.", "bios"),
]


def hits_of(docs=DOCS, start=0):
    out = []
    for rank, d in enumerate(docs, 1):
        text = d.text[start:]
        out.append(Hit(Chunk(f"{d.doc_id}#0", d.doc_id, text, d.source, start, start + len(text)), 1.0 / rank, rank))
    return out


@pytest.fixture(scope="module")
def tok():
    texts = [d.text for d in DOCS] * 20 + ["Question: where was she born? Context: answer cite the passage"] * 20
    return train_tokenizer(texts=texts, type="bpe", vocab_size=300, special_tokens="chat", show_progress=False)


def test_chunks_are_numbered_before_the_question_in_a_chat():
    p = build_prompt("Where was Ada Ashford born?", hits_of())
    assert [m["role"] for m in p.messages] == ["system", "user"]
    user = p.messages[1]["content"]
    assert user.index("[1] Ada Ashford") < user.index("[2] Bo Brant") < user.index("Question: Where was Ada")
    assert p.trimmed == [] and p.n_tokens is None


def test_a_prompt_that_fits_is_not_trimmed_and_counts_its_tokens(tok):
    p = build_prompt("Where was Ada born?", hits_of(), tokenizer=tok, max_model_len=4096, max_tokens=16)
    assert p.trimmed == [] and len(p.hits) == 2
    assert p.n_tokens == len(tok.render_messages(p.messages, add_generation_prompt=True).ids)


def test_too_many_chunks_drop_the_lowest_ranked_with_a_warning(tok):
    full = build_prompt("Where was Ada born?", hits_of(), tokenizer=tok, max_model_len=4096, max_tokens=0)
    one = build_prompt("Where was Ada born?", hits_of()[:1], tokenizer=tok, max_model_len=4096, max_tokens=0)
    limit = (full.n_tokens + one.n_tokens) // 2 + 10
    with pytest.warns(RagPromptWarning, match="kept the top 1 of 2 chunks"):
        p = build_prompt("Where was Ada born?", hits_of(), tokenizer=tok, max_model_len=limit, max_tokens=10)
    assert [h.chunk.doc_id for h in p.hits] == ["ada"] and p.n_tokens + 10 <= limit


def test_a_long_chunk_is_cut_and_a_long_query_is_cut_but_never_overflows(tok):
    long = Document("long", "Ada Ashford was born in Amberhaven. " * 400, "x")
    with pytest.warns(RagPromptWarning, match="cut chunk"):
        p = build_prompt("Where was Ada born?", hits_of([long]), tokenizer=tok, max_model_len=200, max_tokens=20)
    assert p.n_tokens <= 180 and p.hits and long.text.startswith(p.hits[0].chunk.text)
    question = "where was she born " * 2000  # a query far longer than the context
    with pytest.warns(RagPromptWarning, match="question"):
        p = build_prompt(question, hits_of(), tokenizer=tok, max_model_len=160, max_tokens=20)
    assert p.n_tokens <= 140 and p.hits == [] and question.startswith(p.question)
    rendered = tok.render_messages(p.messages, add_generation_prompt=True).ids
    assert len(rendered) == p.n_tokens


def test_no_room_at_all_is_a_clear_error(tok):
    with pytest.raises(LmstackError, match="no room"):
        build_prompt("Where?", hits_of(), tokenizer=tok, max_model_len=20, max_tokens=15)
    with pytest.raises(LmstackError, match="empty"):
        build_prompt("  ", hits_of())


def test_parse_citations_finds_each_number_once_in_order():
    assert parse_citations("Born in Amberhaven [2]. Studied botany [1][2], works at X [3, 1].") == [2, 1, 3]
    assert parse_citations("no citations here [a] [ ]") == []


def test_sentences_keep_a_citation_written_after_the_period():
    assert split_sentences("Ada was born in Amberhaven. [1] She studied botany [1].") == \
        ["Ada was born in Amberhaven [1].", "She studied botany [1]."]


def test_citations_point_at_real_spans_of_the_source_document():
    hits = hits_of(start=4)  # chunks that start mid-document: offsets must be the document's, not the chunk's
    answer = "Ada Ashford was born in Amberhaven [1]. Bo works for Zentrix Labs [2]."
    checks = check_citations(answer, hits)
    assert [(c.n, c.ok) for c in checks] == [(1, True), (2, True)]
    by_id = {d.doc_id: d for d in DOCS}
    for c in checks:
        start, end = c.span
        assert by_id[c.doc_id].text[start:end] == c.span_text
    assert checks[0].span_text == "Ashford was born in Amberhaven"  # "Ada " is cut off this chunk
    assert checks[1].span_text == "works for Zentrix Labs"


def test_a_wrong_or_missing_citation_fails_the_check():
    checks = check_citations("Ada was born in Coldwater and works at Zentrix [1]. Also [7].", hits_of())
    assert checks[0].exists and not checks[0].supported and checks[0].overlap < 0.5
    assert checks[1].n == 7 and not checks[1].exists and not checks[1].ok


def test_find_span_allows_a_few_words_between_content_words():
    text = "Bo Brant was born in old Coldwater, far from March 4, 1987 and Zentrix."
    start, end = find_span(content_words("born Coldwater"), text)
    assert text[start:end] == "born in old Coldwater"
    start, end = find_span(content_words("born Zentrix"), text)  # too far apart: the longest run is one word
    assert text[start:end] == "born"
    assert find_span(["nowhere"], text) is None


def test_training_chat_ends_with_the_cited_answer():
    chat = training_chat("Where was Ada born?", "Amberhaven", hits_of(), cite=[1])
    assert chat[-1] == {"role": "assistant", "content": "Amberhaven [1]."}
    assert "[2] Bo Brant" in chat[-2]["content"]
