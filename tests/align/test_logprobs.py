"""Completion log-probs: encoding, padding, masks, agreement with a full-logits computation, tokenizer checks."""
import pytest
import torch
import torch.nn.functional as F

from lmstack.align.logprobs import (check_same_tokenizer, check_same_vocab, collate, encode_pair, encode_prompt,
                                    kl_logits, sequence_logprobs, token_logprobs, tokenizer_fingerprint, truncate)
from lmstack.errors import LmstackError
from lmstack.tokenizer import load_tokenizer, train_tokenizer

from align_helpers import make_policy


def test_chat_and_plain_encoding(tok):
    p, c = encode_pair(tok, "What is 2 + 2?", "4")
    assert p[0] == tok.special_id("bos") and p[-1] == tok.special_id("assistant_start")
    assert c[-1] == tok.special_id("assistant_end")
    assert tok.decode(c[:-1]) == "4"
    assert encode_prompt(tok, "What is 2 + 2?") == p
    p2, c2 = encode_pair(tok, "What is 2 + 2?", "4", template="plain")
    assert c2[-1] == tok.eos_id and tok.special_id("assistant_start") not in p2
    with pytest.raises(LmstackError, match="strings"):
        encode_pair(tok, "x", None)


def test_collate_masks_and_truncation():
    rows = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9, 10])]
    b = collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert b["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    b = collate([([1, 2], [3]), ([1], [2, 3, 4])], pad_id=99)
    assert b["input_ids"].tolist()[0] == [1, 2, 3, 99] and b["attention_mask"].tolist()[0] == [1, 1, 1, 0]
    # the prompt's start goes first, then the completion's end; one prompt token always stays
    assert truncate([1, 2, 3, 4], [5, 6], 4) == ([3, 4], [5, 6], True)
    assert truncate([1, 2], [3, 4, 5, 6], 3) == ([2], [3, 4], True)
    assert int(collate([([1, 2, 3, 4], [5, 6])], 0, max_len=4)["n_truncated"]) == 1
    with pytest.raises(LmstackError, match="completion token"):
        collate([([1], [])], 0)


def test_token_logprobs_match_full_logits_and_ignore_padding(tok, policy):
    rows = [encode_pair(tok, "Where was Ada born?", "Ada was born in Amberhaven."),
            encode_pair(tok, "Hi", "Hello!")]
    batch = collate(rows, tok.pad_id)
    with torch.no_grad():
        ours = token_logprobs(policy, batch)
        logits = policy(batch["input_ids"])
    ref = F.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].bool()
    assert torch.allclose(ours[mask], ref[mask], atol=1e-5)
    assert (ours[~mask] == 0).all()
    # a row scored alone equals the same row inside a right-padded batch
    with torch.no_grad():
        alone = sequence_logprobs(policy, collate(rows[1:], tok.pad_id))
        both = sequence_logprobs(policy, batch)
        avg = sequence_logprobs(policy, batch, average=True)
    assert float(alone[0]) == pytest.approx(float(both[1]), abs=1e-5)
    n = mask.sum(-1)
    assert torch.allclose(avg, both / n, atol=1e-6)
    # gradients flow
    logps = sequence_logprobs(policy, batch)
    logps.sum().backward()
    assert policy.tok_emb.weight.grad is not None and policy.tok_emb.weight.grad.abs().sum() > 0


def test_tokenizer_check_refuses_different_tokenizers_naming_both(tok, tmp_path, world):
    tok.save(tmp_path / "same")
    check_same_tokenizer(tok, load_tokenizer(tmp_path / "same"))   # identical: accepted
    other = train_tokenizer(texts=[r["text"] for r in world.corpus("arithmetic")], type="bpe", vocab_size=320,
                            special_tokens="chat", show_progress=False)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    with pytest.raises(LmstackError, match=r"policy tokenizer .* reference tokenizer .*differ"):
        check_same_tokenizer(tok, other)
    with pytest.raises(LmstackError, match="vocab_size"):
        check_same_vocab(make_policy(tok), make_policy(other))


def test_exact_kl_from_logits():
    a = torch.tensor([[2.0, 0.0, -1.0]])
    assert float(kl_logits(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert float(kl_logits(a, torch.zeros(1, 3))) > 0
