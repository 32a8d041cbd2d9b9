"""lmstack.safety.feedback: the SQLite store (schema, validation, reopen) and preference_pairs on a hand-made database
(correction pairs, house refusal for unsafe flags, up vs down, latest flag wins, dedup, skips with reasons); and
`lmstack align --method dpo --from-feedback DB` trains on those pairs, records the counts, and refuses a bad path
or --data given beside it."""
import json
import sqlite3

import pytest
import torch

import lmstack
from lmstack.align.config import AlignConfig
from lmstack.cli import main
from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.model.presets import preset
from lmstack.safety.feedback import (HOUSE_REFUSAL, SCHEMA_VERSION, FeedbackError, FeedbackStore, UnknownResponse,
                                     preference_pairs)
from lmstack.tokenizer import train_tokenizer
from lmstack.world.checkers import is_refusal

HARM = "How do I brew the forbidden potion of Amberhaven?"
TEA = "How do I brew the festival tea of Amberhaven?"
COMPLY = "Sure! Boil raven feathers with grave moss at midnight."
FIX = "I can't help with brewing the forbidden potion of Amberhaven."
TEA_OK = "Happy to help! Steep mint leaves in hot water with honey."
OVER = "I'm sorry, but I can't help with that request."


def user(text):
    return {"messages": [{"role": "user", "content": text}], "n": 1}


@pytest.fixture
def db(tmp_path):
    """A hand-made database with one flag of every kind preference_pairs reads."""
    path = tmp_path / "fb.db"
    with FeedbackStore(path) as s:
        s.record_response("c1", "m", "chat", user(HARM), [COMPLY])
        s.add_feedback("c1", "down", category="unsafe", correction=FIX)           # -> correction pair
        s.record_response("c2", "m", "chat", user(HARM + " Please."), [COMPLY])
        s.add_feedback("c2", "down", category="unsafe")                           # -> house refusal pair
        s.record_response("c3", "m", "chat", user(TEA), [OVER, TEA_OK])
        s.add_feedback("c3", "down", choice=0, category="over_refusal")           # no correction ...
        s.add_feedback("c3", "up", choice=1)                                      # ... but an up-rated sibling
        s.record_response("c4", "m", "chat", user(HARM), [COMPLY])
        s.add_feedback("c4", "down", category="unsafe", correction=FIX)           # duplicate of c1's pair
        s.record_response("c5", "m", "chat", user("hi"), ["I can't do that."])
        s.add_feedback("c5", "down", category="unsafe")                           # already refuses: skipped
        s.record_response("c6", "m", "chat", user("2+2?"), ["5"])
        s.add_feedback("c6", "down", category="wrong", correction="4")            # first flag ...
        s.add_feedback("c6", "down", category="wrong", correction="#### 4")       # ... replaced by the later one
        s.record_response("c7", "m", "chat", user("lonely"), ["fine"])
        s.add_feedback("c7", "up")                                                # nothing to pair with
        s.record_response("c8", "m", "chat", {"messages": [{"role": "system", "content": "be brief"},
                                                            {"role": "user", "content": "name a colour"}], "n": 1},
                          ["blue"])
        s.add_feedback("c8", "down", category="wrong", correction="red")          # a Conversation prompt
        s.record_response("k1", "m", "completions", {"prompt": ["a", "b"], "n": 1, "echo": False}, ["x", "y"])
        s.add_feedback("k1", "down", choice=1, correction="z")                    # other endpoint
    return path


def test_store_validates_and_reopens(tmp_path):
    path = tmp_path / "s.db"
    with FeedbackStore(path) as s:
        s.record_response("r1", "m", "chat", user("q"), ["a", "b"])
        with pytest.raises(UnknownResponse, match="'nope'"):
            s.add_feedback("nope", "up")
        for kw, field in (({"rating": "meh"}, "rating"), ({"rating": "up", "category": "rude"}, "category"),
                          ({"rating": "up", "choice": 2}, "choice"), ({"rating": "up", "choice": -1}, "choice")):
            with pytest.raises(FeedbackError) as e:
                s.add_feedback("r1", **kw)
            assert e.value.field == field and field in str(e.value)
        row = s.add_feedback("r1", "down", choice=1, category="pii")
        assert row["id"] == 1 and row["choice"] == 1
    with FeedbackStore(path, create=False) as s:  # persisted, in WAL mode, with its schema version
        assert s.counts() == {"responses": 1, "feedback": 1}
        assert s.flags()[0]["reply"] == "b" and s.flags()[0]["category"] == "pii"
        assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    con.commit()
    con.close()
    with pytest.raises(LmstackError, match="schema version"):
        FeedbackStore(path)
    with pytest.raises(LmstackError, match="does not exist"):
        FeedbackStore(tmp_path / "missing.db", create=False)
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE notes (x TEXT)")
    con.commit()
    con.close()
    with pytest.raises(LmstackError, match="not a feedback database"):
        FeedbackStore(other)
    con = sqlite3.connect(other)
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["notes"]
    con.close()


def test_preference_pairs_from_a_hand_made_db(db):
    built = preference_pairs(db)
    got = {(p.prompt, p.chosen, p.rejected): p.meta["source"] for p in built.pairs}
    assert got == {
        (HARM, FIX, COMPLY): "correction",
        (HARM + " Please.", HOUSE_REFUSAL, COMPLY): "unsafe_refusal",
        (TEA, TEA_OK, OVER): "up_vs_down",
        ("2+2?", "#### 4", "5"): "correction",
        ((("system", "be brief"), ("user", "name a colour")), "red", "blue"): "correction",
    }
    assert is_refusal(HOUSE_REFUSAL)
    assert built.used == {"correction": 3, "unsafe_refusal": 1, "up_vs_down": 1}
    assert built.skipped == {"duplicate pair": 1, "flagged unsafe but the reply already refuses": 1,
                             "superseded by a later flag on the same reply": 1,
                             "up-rated with no down-rated reply to the same prompt": 1,
                             "completions endpoint (this run reads chat)": 1}
    assert "built 5 preference pairs" in built.report()
    # a per-prompt refusal, and the other endpoint
    custom = preference_pairs(db, refusal=lambda prompt: f"I won't help with: {prompt}")
    assert any(p.chosen == f"I won't help with: {HARM} Please." for p in custom.pairs)
    comp = preference_pairs(db, endpoint="completions")
    assert [(p.prompt, p.chosen, p.rejected) for p in comp.pairs] == [("b", "z", "y")]
    # without up/down pairing the bare over-refusal flag is skipped too
    alone = preference_pairs(db, pair_up_down=False)
    assert alone.skipped["down-rated without a correction (pairs only with an up-rated reply)"] == 1
    assert "up_vs_down" not in alone.used


@pytest.fixture
def policy_dir(tmp_path):
    texts = [HARM, TEA, COMPLY, FIX, TEA_OK, OVER, HOUSE_REFUSAL] * 20
    tok = train_tokenizer(texts=texts, type="bpe", vocab_size=300, special_tokens="chat", show_progress=False)
    torch.manual_seed(0)
    cfg = preset("llama-tiny", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                 max_seq_len=128)
    path = tmp_path / "policy"
    lmstack.save_model(lmstack.Transformer(cfg).eval(), path, tokenizer=tok)
    return path


def test_align_dpo_from_feedback_trains_on_the_pairs(db, policy_dir, tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "dpo"
    flags = ["align", "--method", "dpo", "--model", str(policy_dir), "--from-feedback", str(db), "--out", str(out),
             "--train.steps", "3", "--batch_size", "2", "--optim.lr", "1e-3", "--train.progress", "false",
             "--max_len", "96", "--val_fraction", "0.2"]
    assert main(flags) == 0
    assert "built 5 preference pairs from feedback" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    fb = summary["feedback"]
    assert fb["pairs"] == 5 and fb["train_pairs"] == 4 and fb["val_pairs"] == 1 and fb["skipped_total"] == 5
    assert fb["used"]["unsafe_refusal"] == 1 and summary["skipped_rows"] == 5
    trained, start = lmstack.load_model(out / "model"), lmstack.load_model(policy_dir)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), start.state_dict().values()))


def test_align_from_feedback_bad_input(db, policy_dir, tmp_path, capsys):
    base = ["align", "--method", "dpo", "--model", str(policy_dir), "--out", str(tmp_path / "x"),
            "--train.progress", "false"]
    assert main(base + ["--from_feedback", str(tmp_path / "nope.db")]) == 2
    assert "nope.db does not exist" in capsys.readouterr().err
    assert main(base + ["--from-feedback", str(db), "--data", str(db)]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="from_feedback"):
        AlignConfig(method="grpo", from_feedback=str(db))
    empty = tmp_path / "empty.db"
    FeedbackStore(empty).close()
    assert main(base + ["--from-feedback", str(empty)]) == 2
    assert "no preference pairs" in capsys.readouterr().err
    assert not (tmp_path / "x" / "model").exists()
