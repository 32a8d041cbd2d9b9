"""SFT data: assistant-only loss mask, skipped rows, packing that never attends across examples, the all-masked
batch (loss 0, no NaN), loader determinism and resume, and clear errors for bad files."""
from __future__ import annotations

import math

import pytest
import torch

from _sft_tiny import chat_rows, tiny_model, tokenizer, write_jsonl
from lmstack.adapt.sft import (SFTExample, SFTLoader, SFTObjective, describe, encode_rows, pack_examples,
                               read_chat_jsonl, score_examples)
from lmstack.errors import LmstackError

CONV = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Where is Amberhaven?"},
        {"role": "assistant", "content": "Arr! It be in Norland."}]


def test_loss_mask_covers_exactly_the_assistant_reply():
    tok = tokenizer()
    (ex,), stats = encode_rows(tok, [{"messages": CONV, "kind": "persona"}])
    learned = tok.decode([i for i, m in zip(ex.ids, ex.mask) if m])
    assert learned == "Arr! It be in Norland.<|assistant_end|>"
    assert stats.kept == 1 and stats.learned_tokens == ex.n_learned == sum(ex.mask)
    assert stats.by_task == {"persona": 1}


def test_rows_without_an_assistant_turn_are_counted_and_skipped():
    tok = tokenizer()
    rows = [{"messages": CONV}, {"messages": CONV[:2]}, {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": CONV}]
    examples, stats = encode_rows(tok, rows)
    assert (stats.rows, stats.kept, stats.skipped_no_assistant) == (4, 2, 2) and len(examples) == 2
    assert "skipped 2 without an assistant turn" in stats.summary()


def test_long_rows_are_truncated_and_counted():
    tok = tokenizer()
    long_user = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]
    n = len(tok.apply_chat_template(CONV)[0])
    examples, stats = encode_rows(tok, [{"messages": CONV}, {"messages": long_user}], max_len=n - 2)
    # CONV loses its last two tokens but keeps a reply to learn; the long row's reply lies wholly past the cut,
    # so it is dropped, not kept with nothing to learn
    assert stats.truncated == 1 and stats.skipped_too_long == 1 and stats.kept == 1
    assert [len(e) for e in examples] == [n - 2]


def test_malformed_rows_are_errors_naming_the_row(tmp_path):
    tok = tokenizer()
    with pytest.raises(LmstackError, match="row #1: no 'text', 'messages' or 'prompt'/'completion' fields"):
        encode_rows(tok, [{"messages": CONV}, {"body": "plain"}])
    with pytest.raises(LmstackError, match="row #0: message #0 has unknown role 'robot'"):
        encode_rows(tok, [{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{not json\n', encoding="utf-8")
    with pytest.raises(LmstackError, match=r"bad.jsonl:2 is not valid JSON"):
        read_chat_jsonl(bad)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"messages": [], "x": "caf\xe9"}\n')
    with pytest.raises(LmstackError, match="not valid UTF-8"):
        read_chat_jsonl(latin)
    with pytest.raises(LmstackError, match="not found"):
        read_chat_jsonl(tmp_path / "missing.jsonl")
    assert len(read_chat_jsonl(write_jsonl(tmp_path / "ok.jsonl", [{"messages": CONV}]))) == 1


def test_packing_strategies_keep_every_learned_token():
    tok = tokenizer()
    examples, _ = encode_rows(tok, chat_rows()[:300], max_len=129)
    packs = {s: pack_examples(examples, 128, tok.pad_id, strategy=s) for s in ("none", "greedy", "best_fit")}
    learned = {s: int(p["loss_mask"].sum()) for s, p in packs.items()}
    assert len(set(learned.values())) == 1 and learned["none"] == sum(e.n_learned for e in examples)
    rows = {s: p["input_ids"].shape[0] for s, p in packs.items()}
    assert rows["best_fit"] <= rows["greedy"] < rows["none"] == len(examples)
    assert describe(packs["best_fit"])["efficiency"] > describe(packs["none"])["efficiency"]
    # greedy keeps the order: the first row starts with the first example
    first = examples[0]
    assert packs["greedy"]["input_ids"][0, :len(first) - 1].tolist() == first.ids[:-1]
    with pytest.raises(LmstackError, match="longer than seq_len"):
        pack_examples(examples, 8, tok.pad_id)
    with pytest.raises(LmstackError, match="strategy 'zigzag'"):
        pack_examples(examples, 128, tok.pad_id, strategy="zigzag")


def test_packed_examples_do_not_attend_to_each_other():
    tok = tokenizer()
    examples, _ = encode_rows(tok, chat_rows()[:40], max_len=129)
    packed = pack_examples(examples, 128, tok.pad_id, strategy="greedy")
    row = next(r for r in range(packed["doc_ids"].shape[0]) if int(packed["doc_ids"][r].max()) >= 2)
    ids, docs = packed["input_ids"][row:row + 1], packed["doc_ids"][row:row + 1]
    model = tiny_model(tok).eval()
    with torch.no_grad():
        together = model(ids, doc_ids=docs)[0]
        no_mask = model(ids)[0]
        pos = (docs[0] == 1).nonzero().flatten()
        alone = model(ids[:, pos])[0]
    assert torch.allclose(together[pos], alone, atol=1e-5)
    assert (no_mask[pos] - alone).abs().max() > 1e-3  # without doc ids the second example would see the first


def test_all_masked_micro_batch_gives_zero_loss_and_finite_zero_gradients():
    tok = tokenizer()
    examples, _ = encode_rows(tok, chat_rows()[:10], max_len=65)
    batch = pack_examples(examples, 64, tok.pad_id)
    batch["loss_mask"][:] = False
    model = tiny_model(tok)
    loss, metrics = SFTObjective().loss(model, batch)
    loss.backward()
    value = float(loss.detach())
    assert value == 0.0 and not math.isnan(value) and metrics["n_tokens"] == 0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and float(g.abs().max()) == 0.0 for g in grads)


def test_loss_counts_only_masked_positions():
    tok = tokenizer()
    examples, _ = encode_rows(tok, chat_rows()[:6], max_len=65)
    batch = pack_examples(examples, 64, tok.pad_id, strategy="none")
    model = tiny_model(tok).eval()
    loss, m = SFTObjective(use_doc_ids=False).loss(model, batch)
    logits = model(batch["input_ids"])
    mask = batch["loss_mask"]
    ref = torch.nn.functional.cross_entropy(logits[mask], batch["targets"][mask])
    assert torch.allclose(loss, ref) and m["n_tokens"] == int(mask.sum())
    # changing a target outside the mask changes nothing
    batch["targets"][~mask] = 7
    assert torch.allclose(SFTObjective(use_doc_ids=False).loss(model, batch)[0], ref)


def test_loader_is_seeded_and_resumes_exactly():
    tok = tokenizer()
    examples, _ = encode_rows(tok, chat_rows()[:60], max_len=65)
    packed = pack_examples(examples, 64, tok.pad_id)
    a, b = SFTLoader(packed, 4, seed=3), SFTLoader(packed, 4, seed=3)
    first = [next(a)["input_ids"] for _ in range(5)]
    assert all(torch.equal(x, next(b)["input_ids"]) for x in first)
    state = a.state_dict()
    ahead = [next(a)["input_ids"] for _ in range(30)]  # crosses an epoch boundary
    c = SFTLoader(packed, 4, seed=3)
    c.load_state_dict(state)
    assert all(torch.equal(x, next(c)["input_ids"]) for x in ahead)
    assert not torch.equal(next(SFTLoader(packed, 4, seed=4))["input_ids"], first[0])
    ordered = SFTLoader(packed, 4, shuffle=False)
    assert torch.equal(next(ordered)["input_ids"], packed["input_ids"][:4])
    assert all(next(a)["input_ids"].shape[0] == 4 for _ in range(20))


def test_score_examples_exact_means_every_reply_token_is_the_argmax():
    tok = tokenizer()
    (ex,), _ = encode_rows(tok, [{"messages": CONV}])
    model = tiny_model(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = pack_examples([ex], 64, tok.pad_id)
    before = score_examples(model, [ex], 64, tok.pad_id)
    for _ in range(60):  # memorise one reply
        loss, _ = SFTObjective().loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = score_examples(model, [ex], 64, tok.pad_id)
    assert before["exact"] == 0.0 and after["exact"] == 1.0 and after["token_acc"] == 1.0
    assert after["loss"] < before["loss"]
