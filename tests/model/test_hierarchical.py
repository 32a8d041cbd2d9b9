import pytest
import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.hierarchical import (SUBJECT_ID, AttentionPool, FlatClassifier, FlatQA, HierarchicalClassifier,
                                        HierarchicalQA, make_documents, make_qa)

# Two busy cores: two torch threads each would collapse the training tests' speed.
pytestmark = pytest.mark.usefixtures("one_thread")

TOK = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=8)
DOC = ModelConfig(vocab_size=1, d_model=24, n_layers=1, n_heads=2, max_seq_len=16)


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return HierarchicalClassifier(TOK, DOC, chunk_size=8, n_classes=3, **kw).eval()


def test_tokens_never_attend_across_chunks():
    m = model()
    ids = torch.randint(2, 64, (2, 32))
    with torch.no_grad():
        base, _, w_base = m.chunk_summaries(ids)
        changed = ids.clone()
        changed[:, 8:16] = torch.randint(2, 64, (2, 8))  # rewrite chunk 1 only
        pert, _, w_pert = m.chunk_summaries(changed)
    others = [0, 2, 3]
    torch.testing.assert_close(pert[:, others], base[:, others], rtol=0, atol=0)
    torch.testing.assert_close(w_pert[:, others], w_base[:, others], rtol=0, atol=0)
    assert (pert[:, 1] - base[:, 1]).abs().max() > 1e-4
    # level 2 does mix chunks: the document vector moves when one chunk changes
    with torch.no_grad():
        assert (m.encode(changed) - m.encode(ids)).abs().max() > 1e-4


def test_pooling_shapes_padding_and_weights():
    pool = AttentionPool(16)
    h = torch.randn(3, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 3, dtype=torch.bool)
    out, w = pool(h, mask)
    assert out.shape == (3, 16) and w.shape == (3, 5)
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    assert (w[:, 3:] == 0).all()
    # padded keys do not change the result
    h2 = h.clone()
    h2[:, 3:] = 100.0
    torch.testing.assert_close(pool(h2, mask)[0], out)

    m = model()
    ids = torch.randint(2, 64, (2, 21))  # 21 tokens -> 3 chunks, the last one padded
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[1, 5:] = False  # row 1: only chunk 0 is real; chunks 1 and 2 are all padding
    with torch.no_grad():
        summaries, present, weights = m.chunk_summaries(ids, mask)
        logits = m(ids, mask)
    assert summaries.shape == (2, 3, 32) and weights.shape == (2, 3, 8) and logits.shape == (2, 3)
    assert present.tolist() == [[True, True, True], [True, False, False]]
    assert torch.isfinite(logits).all()
    assert (weights[0, 2, 5:] == 0).all() and (weights[1, 0, 5:] == 0).all()
    # padding chunks are invisible at level 2: filling them with other ids changes nothing
    ids2 = ids.clone()
    ids2[1, 5:] = 3
    with torch.no_grad():
        torch.testing.assert_close(m(ids2, mask)[1], logits[1])


def test_bad_inputs_raise():
    m = model(max_chunks=4)
    with pytest.raises(LmstackError, match="max_chunks"):
        m(torch.randint(2, 64, (1, 40)))
    with pytest.raises(LmstackError, match="batch, time"):
        m(torch.randint(2, 64, (40,)))
    with pytest.raises(LmstackError, match="vocab_size"):
        make_documents(4, 4, 8, 3, vocab_size=10)
    with pytest.raises(LmstackError, match="min_chunk"):
        make_documents(4, 4, 8, 3, vocab_size=64, min_chunk=4)


def test_documents_are_seeded_and_labelled_by_the_marked_chunk():
    ids, labels = make_documents(20, n_chunks=6, chunk_size=8, n_classes=3, vocab_size=64, seed=5, min_chunk=3)
    again, labels2 = make_documents(20, n_chunks=6, chunk_size=8, n_classes=3, vocab_size=64, seed=5, min_chunk=3)
    assert torch.equal(ids, again) and torch.equal(labels, labels2)
    chunks = ids.view(20, 6, 8)
    for i in range(20):
        marked = (chunks[i, :, 0] == SUBJECT_ID).nonzero().flatten().tolist()
        assert len(marked) == 1 and marked[0] >= 3
        words = chunks[i, marked[0]]
        topic = words[(words >= 2) & (words < 2 + 3 * 4)]
        assert len(topic) == 4 and ((topic - 2) // 4 == labels[i]).all()


def _train(net, ids, labels, steps=120, lr=3e-3):
    opt = torch.optim.AdamW(net.parameters(), lr)
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(steps):
        b = torch.randint(0, len(ids), (32,), generator=g)
        loss = F.cross_entropy(net(ids[b]), labels[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def test_learns_a_label_beyond_the_flat_models_truncation():
    # The subject chunk is chunk 2 or 3; the flat model sees only the first 16 tokens (chunks 0-1).
    kw = dict(n_chunks=4, chunk_size=8, n_classes=2, vocab_size=64, min_chunk=2, distractors=0)
    ids, labels = make_documents(512, seed=0, **kw)
    test_ids, test_labels = make_documents(200, seed=1, **kw)
    torch.manual_seed(0)
    hier = HierarchicalClassifier(TOK.replace(n_layers=1), DOC.replace(d_model=32), chunk_size=8, n_classes=2)
    flat = FlatClassifier(TOK.replace(n_layers=1, max_seq_len=16), n_classes=2, context=16)
    _train(hier, ids, labels, steps=80, lr=5e-3)
    _train(flat, ids, labels, steps=60, lr=5e-3)
    with torch.no_grad():
        acc_h = (hier(test_ids).argmax(-1) == test_labels).float().mean().item()
        acc_f = (flat(test_ids).argmax(-1) == test_labels).float().mean().item()
    assert acc_h > 0.9
    assert acc_f < 0.7  # what it sees carries no label: chance, 0.5 with stderr 0.035 at n=200


# ---- long-document QA
QA_KW = dict(n_chunks=4, chunk_size=8, vocab_size=48, n_relations=2, answer_len=1, n_entities=8)
QTOK = ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=2, max_seq_len=10)
QDOC = ModelConfig(vocab_size=1, d_model=32, n_layers=1, n_heads=2, max_seq_len=4)


def qa_model(seed=0):
    torch.manual_seed(seed)
    return HierarchicalQA(QTOK, QDOC, chunk_size=8, question_len=2).eval()


def test_qa_data_is_seeded_and_the_span_answers_the_question():
    d = make_qa(30, seed=3, min_chunk=1, **QA_KW)
    again = make_qa(30, seed=3, min_chunk=1, **QA_KW)
    assert all(torch.equal(a, b) for a, b in zip(d, again))
    assert not torch.equal(d.ids, make_qa(30, seed=4, min_chunk=1, **QA_KW).ids)
    chunks = d.ids.view(30, 4, 8)
    for i in range(30):
        entity, relation = d.questions[i].tolist()
        assert chunks[i, :, 0].tolist().count(entity) == 1  # every bio is a different entity
        k = int(d.evidence[i])
        assert k >= 1 and chunks[i, k, 0] == entity
        assert d.start[i] // 8 == k and d.end[i] == d.start[i]  # answer_len=1
        assert d.ids[i, d.start[i] - 1] == relation
        # every bio states every relation exactly once, so the entity alone does not give the span
        for j in range(4):
            assert (chunks[i, j, 1:] == relation).sum() == 1


def test_qa_outputs_are_distributions_over_chunks_and_tokens():
    d = make_qa(3, **QA_KW)
    mask = torch.ones(3, 32, dtype=torch.bool)
    mask[1, 12:] = False  # row 1: chunk 0 and half of chunk 1 are real
    torch.manual_seed(0)
    flat = FlatQA(QTOK.replace(max_seq_len=18), chunk_size=8, question_len=2, context=16).eval()
    with torch.no_grad():
        for out in (qa_model()(d.questions, d.ids, mask), flat(d.questions, d.ids, mask)):
            assert out.evidence.shape == (3, 4) and out.start.shape == out.end.shape == (3, 32)
            for lp in out:
                torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3))
            assert (out.start[1, 12:].exp() == 0).all() and (out.evidence[1, 2:].exp() == 0).all()
            assert torch.isfinite(out.loss(d.evidence.clamp(max=1), d.start.clamp(max=11), d.end.clamp(max=11)))
        # the truncated baseline cannot point past its context
        assert (out.start[:, 16:].exp() == 0).all() and (out.evidence[:, 2:].exp() == 0).all()


def test_the_question_reaches_every_chunk_and_chunks_stay_apart():
    m = qa_model()
    d = make_qa(2, **QA_KW)
    other = d.questions.clone()
    other[:, 0] = d.ids.view(2, 4, 8)[:, 0, 0] + 0  # ask about the entity of chunk 0 instead
    other[:, 1] = 2 + 8 + (d.questions[:, 1] - 2 - 8 + 1) % 2  # and the other relation
    with torch.no_grad():
        h, _, _, hq = m.chunk_states(d.ids, question=d.questions)
        h_other, _, _, _ = m.chunk_states(d.ids, question=other)
        changed = d.ids.clone()
        changed[:, 8:16] = torch.randint(20, 48, (2, 8))  # rewrite chunk 1 only
        h_changed, _, _, hq_changed = m.chunk_states(changed, question=d.questions)
        out, out_other = m(d.questions, d.ids), m(other, d.ids)
    assert ((h_other - h).abs().amax((-1, -2)) > 1e-4).all()  # every chunk of every row sees the question
    torch.testing.assert_close(h_changed[:, [0, 2, 3]], h[:, [0, 2, 3]], rtol=0, atol=0)
    torch.testing.assert_close(hq_changed[:, [0, 2, 3]], hq[:, [0, 2, 3]], rtol=0, atol=0)
    assert hq.shape == (2, 4, 2, 32) and (hq_changed[:, 1] - hq[:, 1]).abs().max() > 1e-4
    assert (out.evidence - out_other.evidence).abs().max() > 1e-4
    assert (out.start - out_other.start).abs().max() > 1e-4


def test_qa_bad_inputs_raise():
    m = qa_model()
    d = make_qa(2, **QA_KW)
    with pytest.raises(LmstackError, match="question"):
        m(d.questions[:1], d.ids)  # batch mismatch
    with pytest.raises(LmstackError, match="question"):
        m(torch.randint(2, 40, (2, 3)), d.ids)  # longer than question_len
    with pytest.raises(LmstackError, match="question"):
        m.chunk_summaries(d.ids)  # a QA encoder needs its question
    with pytest.raises(LmstackError, match="question_len"):
        HierarchicalQA(QTOK, QDOC, chunk_size=8, question_len=0)
    with pytest.raises(LmstackError, match="max_chunks"):
        m(d.questions, torch.randint(2, 40, (2, 40)))
    with pytest.raises(LmstackError, match="answer_len"):
        make_qa(2, n_chunks=4, chunk_size=8, vocab_size=48, n_relations=3, answer_len=2)
    with pytest.raises(LmstackError, match="vocab_size"):
        make_qa(2, n_chunks=4, chunk_size=8, vocab_size=20, n_relations=1)
    with pytest.raises(LmstackError, match="n_entities"):
        make_qa(2, n_chunks=4, chunk_size=8, vocab_size=48, n_entities=3)
    with pytest.raises(LmstackError, match="min_chunk"):
        make_qa(2, n_chunks=4, chunk_size=8, vocab_size=48, min_chunk=4)


def test_qa_learns_to_follow_the_question():
    train, test = make_qa(512, seed=0, **QA_KW), make_qa(200, seed=1, **QA_KW)
    m = qa_model().train()
    opt = torch.optim.AdamW(m.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        b = torch.randint(0, 512, (32,), generator=g)
        loss = m(train.questions[b], train.ids[b]).loss(train.evidence[b], train.start[b], train.end[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    # Same documents, a question about the bio in a different chunk: the answer must move with the question.
    moved = (test.evidence + 1) % 4
    other = test.questions.clone()
    other[:, 0] = test.ids.view(200, 4, 8)[torch.arange(200), moved, 0]
    with torch.no_grad():
        out, out_other = m(test.questions, test.ids), m(other, test.ids)
    assert (out.evidence.argmax(-1) == test.evidence).float().mean() > 0.9
    assert (out.start.argmax(-1) == test.start).float().mean() > 0.3  # still learning the span; chance ~0.03
    assert (out_other.evidence.argmax(-1) == moved).float().mean() > 0.9  # chance is 0.25
