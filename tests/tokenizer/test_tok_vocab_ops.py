"""Vocabulary pruning and multi-stage expansion, for tokenizers and for embedding/output matrices."""
import pytest
import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.tokenizer import train_tokenizer
from lmstack.tokenizer.dynamic import learn_domain_merges
from lmstack.tokenizer.vocab_ops import add_tokens, prune_vocab, resize_embeddings, resize_model_vocab

CODE = "\n".join(f"def handler_{i}(request, response):\n    return response.json(request.data[{i}])"
                 for i in range(60))


@pytest.mark.parametrize("fixture", ["bpe_tok", "wordpiece_tok", "unigram_tok"])
def test_prune_keeps_corpus_encodings(fixture, request, corpus):
    tok = request.getfixturevalue(fixture)
    texts = corpus.splitlines()[:80]
    small, keep = prune_vocab(tok, texts)
    assert small.vocab_size == len(keep) < tok.vocab_size
    assert keep == sorted(keep) and set(tok.special_ids) <= set(keep)
    new_id = {old: new for new, old in enumerate(keep)}
    for text in texts:
        assert small.encode(text) == [new_id[i] for i in tok.encode(text)]
    assert small.special_ids == tok.special_ids  # specials come first, so their ids do not move
    assert small.encode_batch(texts[:10]) == [small.encode(t) for t in texts[:10]]  # runtime loads it too


def test_pruned_byte_level_bpe_stays_lossless(bpe_tok):
    small, _ = prune_vocab(bpe_tok, ["the people"])
    for text in ("the people", "完全に新しい文章 🙂", "def f(x): return 42"):
        assert small.decode(small.encode(text)) == text
    with pytest.raises(LmstackError, match="min_count"):
        prune_vocab(bpe_tok, ["x"], min_count=0)


def test_resize_embeddings_prune_keeps_logits():
    torch.manual_seed(0)
    emb, head = nn.Embedding(50, 8), nn.Linear(8, 50, bias=True)
    keep = [0, 1, 2, 7, 9, 30, 49]
    new_emb, new_head = resize_embeddings(emb, head, keep_ids=keep)
    hidden = torch.randn(4, 8)
    assert torch.equal(new_emb.weight, emb.weight[keep])
    torch.testing.assert_close(new_head(hidden), head(hidden)[:, keep])
    # tied output: logits are hidden @ E^T
    tied_emb, tied_head = resize_embeddings(emb, None, keep_ids=keep)
    assert tied_head is None
    torch.testing.assert_close(hidden @ tied_emb.weight.T, (hidden @ emb.weight.T)[:, keep])
    with pytest.raises(LmstackError, match="keep_ids must lie in"):
        resize_embeddings(emb, head, keep_ids=[0, 50])


def test_resize_embeddings_grow_uses_mean_rows():
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    new_emb, new_head = resize_embeddings(emb, head, n_new=3)
    assert new_emb.num_embeddings == 13 and new_head.out_features == 13
    assert torch.equal(new_emb.weight[:10], emb.weight)
    torch.testing.assert_close(new_emb.weight[10:], emb.weight.mean(0).expand(3, 4))
    torch.testing.assert_close(new_head.weight[12], head.weight.mean(0))
    with pytest.raises(LmstackError):
        resize_embeddings(emb, head)


def test_add_tokens_as_merges_changes_only_where_they_apply(bpe_tok, corpus):
    bigger = add_tokens(bpe_tok, [" handler", "response", "<|tool|>"])
    assert bigger.vocab_size > bpe_tok.vocab_size
    assert len(bigger.encode(" handler")) == 1 and len(bigger.encode("response")) == 1
    assert bigger.encode("<|tool|>") == [bigger.token_to_id("<|tool|>")]
    old = bpe_tok.vocab_size
    for text in corpus.splitlines()[:200] + [CODE[:500]]:
        before, after = bpe_tok.encode(text), bigger.encode(text)
        assert after == before or any(i >= old for i in after)
        assert bigger.decode(after) == text
    assert bigger.encode_batch([CODE[:300]]) == [bigger.encode(CODE[:300])]


def test_domain_merges_compress_domain_and_keep_old_encodings(bpe_tok, corpus):
    domain = learn_domain_merges(bpe_tok, [CODE], n_merges=40)
    assert domain.vocab_size == bpe_tok.vocab_size + 40
    code_before, code_after = len(bpe_tok.encode(CODE)), len(domain.encode(CODE))
    assert code_after < 0.8 * code_before
    old = bpe_tok.vocab_size
    changed = 0
    for text in corpus.splitlines()[:300]:
        before, after = bpe_tok.encode(text), domain.encode(text)
        if after != before:
            changed += 1
            assert any(i >= old for i in after)  # only where a new merge applies
        assert domain.decode(after) == text
    assert changed < 300
    assert domain.encode_batch([CODE]) == [domain.encode(CODE)]
    with pytest.raises(LmstackError, match="needs a BPE"):
        learn_domain_merges(train_tokenizer(texts=[corpus[:2000]], type="wordpiece", vocab_size=200,
                                            show_progress=False), [CODE], 10)


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_transformer_prune_and_grow(tie, bpe_tok, corpus):
    model_mod = pytest.importorskip("lmstack.model")
    cfg = model_mod.ModelConfig(vocab_size=bpe_tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                                d_ff=64, max_seq_len=64, tie_embeddings=tie)
    model = model_mod.Transformer(cfg).eval()
    texts = corpus.splitlines()[:40]
    small, keep = prune_vocab(bpe_tok, texts)
    ids_old = torch.tensor([bpe_tok.encode(texts[3])[:20]])
    with torch.no_grad():
        logits_old = model(ids_old)
    resize_model_vocab(model, keep_ids=keep)
    assert model.config.vocab_size == small.vocab_size
    ids_new = torch.tensor([small.encode(texts[3])[:20]])
    with torch.no_grad():
        logits_new = model(ids_new)
    torch.testing.assert_close(logits_new, logits_old[..., keep])
    resize_model_vocab(model, n_new=5)
    with torch.no_grad():
        grown = model(ids_new)
    assert grown.shape[-1] == small.vocab_size + 5
    torch.testing.assert_close(grown[..., :small.vocab_size], logits_new)


@pytest.mark.parametrize("tie", [False, True])
def test_growing_a_padded_model_turns_padded_rows_into_the_new_tokens(tie):
    """A padded model's tokenizer ids end at real_vocab_size, so a grown tokenizer's new ids land on padded
    rows: those rows must stop being masked, and the table only grows once the padding runs out."""
    model_mod = pytest.importorskip("lmstack.model")
    cfg = model_mod.ModelConfig(vocab_size=64, real_vocab_size=60, d_model=32, n_layers=1, n_heads=2,
                                n_kv_heads=2, d_ff=64, max_seq_len=32, tie_embeddings=tie)
    model = model_mod.Transformer(cfg).eval()
    ids = torch.tensor([[1, 5, 9, 59]])
    with torch.no_grad():
        before = model(ids)
    assert (before[..., 60:] < -1e20).all()
    resize_model_vocab(model, n_new=3)
    assert model.config.vocab_size == 64 and model.config.real_vocab_size == 63
    with torch.no_grad():
        after = model(torch.tensor([[1, 5, 60, 62]]))
        emb = model.tok_emb.weight
        torch.testing.assert_close(emb[61], emb[:60].mean(0))
    assert (after[..., 60:63] > -1e20).all() and (after[..., 63:] < -1e20).all()
    resize_model_vocab(model, n_new=1)  # uses the last padded row: no padding left
    assert model.config.vocab_size == 64 and model.config.real_vocab_size is None
    resize_model_vocab(model, n_new=2)  # no padding: the table grows
    assert model.config.vocab_size == 66


def test_growing_past_the_padding_drops_it_and_keeps_real_logits():
    model_mod = pytest.importorskip("lmstack.model")
    cfg = model_mod.ModelConfig(vocab_size=64, real_vocab_size=60, d_model=32, n_layers=1, n_heads=2,
                                n_kv_heads=2, d_ff=64, max_seq_len=32)
    model = model_mod.Transformer(cfg).eval()
    ids = torch.tensor([[1, 5, 9, 59]])
    with torch.no_grad():
        before = model(ids)[..., :60]
    resize_model_vocab(model, n_new=10)
    assert model.config.vocab_size == 70 and model.config.real_vocab_size is None
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[..., :60], before)
    with pytest.raises(Exception, match="real token ids"):
        resize_model_vocab(model_mod.Transformer(cfg.replace(vocab_size=64, real_vocab_size=60)),
                           keep_ids=[0, 1, 62])
