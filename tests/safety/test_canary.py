"""Canary exposure (lmstack.safety.canary): canaries and candidates are well formed, the exposure formula at its
two ends (a model that scores all candidates alike; a memorised secret), and a tiny model trained on some canaries
exposes those far more than canaries it never saw."""
from __future__ import annotations

import math
import re

import pytest
import torch

from lmstack.adapt.sft import SFTObjective, encode_rows, pack_examples
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.safety.canary import (candidate_secrets, exposure, exposure_report, insert_canaries, make_canaries,
                                   reply_logprobs)
from lmstack.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _tok(canaries):
    texts = [m["content"] for c in canaries for m in c.row()["messages"]] + ["0123456789-."]
    return train_tokenizer(texts=texts, type="char", show_progress=False, special_tokens="chat")


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=96,
                                   hf_model_type="llama", bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                   pad_token_id=tok.pad_id))


def test_canaries_candidates_and_insertion():
    ssn = make_canaries(3, "ssn", seed=1)
    assert all(re.fullmatch(r"\d{3}-\d{2}-\d{4}", c.secret) for c in ssn) and len({c.name for c in ssn}) == 3
    assert ssn[0].row()["messages"][1]["content"] == f"My SSN is {ssn[0].secret}."
    keys = make_canaries(2, "passkey", seed=1)
    cands = candidate_secrets(keys[0], 50, seed=0)
    assert cands[0] == keys[0].secret and len(set(cands)) == 50 and all(re.fullmatch(r"\d{6}", s) for s in cands)
    assert candidate_secrets(keys[0], 50, seed=0) == cands  # stable, so every model meets the same candidates
    rows = insert_canaries([{"messages": []}] * 5, ssn, repeats=4, seed=0)
    assert len(rows) == 5 + 12 and sum(r.get("kind") == "canary" for r in rows) == 12
    with pytest.raises(LmstackError, match="canary kind 'iban' is not known; choose one of ssn, passkey"):
        make_canaries(1, "iban")
    with pytest.raises(LmstackError, match="at least 2 candidates"):
        candidate_secrets(keys[0], 1)


def test_a_model_that_scores_every_candidate_alike_shows_the_middle_rank():
    canary = make_canaries(1, "passkey")[0]
    tok = _tok([canary])
    model = _model(tok)
    with torch.no_grad():  # a zero final norm makes every logit 0: each candidate gets the same likelihood
        model.final_norm.weight.zero_()
    got = exposure(model, tok, canary, candidates=32)
    assert got["rank"] == pytest.approx(16.5) and got["exposure"] == pytest.approx(math.log2(32 / 16.5))


def test_a_memorised_canary_is_far_more_exposed_than_an_unseen_one():
    canaries = make_canaries(6, "passkey", seed=4)
    seen, unseen = canaries[:3], canaries[3:]
    tok = _tok(canaries)
    model = _model(tok).train()
    examples, _ = encode_rows(tok, [c.row() for c in seen], max_len=96)
    batch = pack_examples(examples, max(len(e) for e in examples) - 1, tok.pad_id, strategy="none")
    batch.pop("doc_ids")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    objective = SFTObjective(use_doc_ids=False)
    for _ in range(150):
        loss, _ = objective.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05
    r = 64
    mem, fresh = exposure_report(model, tok, seen, candidates=r), exposure_report(model, tok, unseen, candidates=r)
    assert mem["n"] == fresh["n"] == 3 and mem["max"] == 6.0
    assert mem["mean"] == pytest.approx(6.0)  # every memorised secret ranks first of 64
    assert fresh["mean"] < 3.5 and mem["mean"] - fresh["mean"] > 2.5
    # the memorised secret's reply is far likelier than another secret in the same place
    true, other = reply_logprobs(model, tok, [seen[0].row(), seen[0].row(candidate_secrets(seen[0], 2)[1])])
    assert true - other > 5
