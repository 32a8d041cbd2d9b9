"""TRL's preference formats in `lmstack align`: chosen/rejected message lists with an explicit prompt, or
without one (the implicit prompt is what both share from the start); text rows keep working beside them."""
import json

from align_helpers import make_policy

from lmstack.align.logprobs import encode_pair
from lmstack.align.preference_data import load_preferences, load_unpaired, pairs_from_records
from lmstack.cli import main
from lmstack.model.hf_io import save_model

SYS = {"role": "system", "content": "Answer briefly."}


def _rows(world):
    recs = [r for r in world.corpus("preferences", split="train") if r["kind"] == "helpfulness"][:9]
    rows = []
    for i, r in enumerate(recs):
        user = {"role": "user", "content": r["prompt"]}
        good, bad = ({"role": "assistant", "content": r[k]} for k in ("chosen", "rejected"))
        if i % 3 == 0:  # explicit conversational prompt
            rows.append({"prompt": [SYS, user], "chosen": [good], "rejected": [bad]})
        elif i % 3 == 1:  # implicit prompt
            rows.append({"chosen": [SYS, user, good], "rejected": [SYS, user, bad]})
        else:  # TRL's standard text row
            rows.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
    return recs, rows


def test_conversational_rows_load_and_encode_through_the_template(world, tok, tmp_path):
    recs, rows = _rows(world)
    broken = {"chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows + [broken]), encoding="utf-8")
    loaded = load_preferences(data)
    assert len(loaded.pairs) == 9
    assert "share no first message" in loaded.report() and "line 10" in loaded.report()
    explicit, implicit, text = loaded.pairs[:3]
    assert explicit.prompt == (("system", "Answer briefly."), ("user", recs[0]["prompt"]))
    assert implicit.prompt == (("system", "Answer briefly."), ("user", recs[1]["prompt"]))
    assert (implicit.chosen, implicit.rejected) == (recs[1]["chosen"], recs[1]["rejected"])
    assert text.prompt == recs[2]["prompt"]
    prompt_ids, reply_ids = encode_pair(tok, explicit.prompt, explicit.chosen)
    messages = [SYS, {"role": "user", "content": recs[0]["prompt"]}]
    assert prompt_ids == tok.apply_chat_template(messages, add_generation_prompt=True)[0]
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": explicit.chosen}])[0]
    assert prompt_ids + reply_ids == full


def test_cli_dpo_on_trl_conversational_rows(world, tok, tmp_path, capsys):
    _, rows = _rows(world)
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    policy = tmp_path / "policy"
    save_model(make_policy(tok), policy, tokenizer=tok)
    out = tmp_path / "dpo"
    assert main(["align", "--method", "dpo", "--model", str(policy), "--data", str(data), "--out", str(out),
                 "--train.steps", "2", "--batch_size", "2", "--optim.lr", "1e-3", "--train.progress", "false",
                 "--max_len", "96"]) == 0
    assert "skipped none" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "dpo" and summary["skipped_rows"] == 0
    assert (out / "model" / "model.safetensors").is_file()


def test_text_rows_without_a_prompt_split_at_the_shared_start():
    loaded = pairs_from_records([{"chosen": "The sky is blue.", "rejected": "The sky is green."},
                                 {"chosen": "blue", "rejected": "green"}])
    (pair,) = loaded.pairs
    assert (pair.prompt, pair.chosen, pair.rejected) == ("The sky is", " blue.", " green.")
    assert list(loaded.skipped) == ["fields 'chosen' and 'rejected' share no start, so there is no implicit "
                                    "prompt; add a 'prompt' field"]


def test_cli_kto_on_trl_conversational_unpaired_rows(world, tok, tmp_path, capsys):
    recs = [r for r in world.corpus("preferences", split="train") if r["kind"] == "helpfulness"][:6]
    rows = [{"prompt": [SYS, {"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r[key]}], "label": key == "chosen"}
            for r in recs for key in ("chosen", "rejected")]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    loaded = load_unpaired(data)
    assert len(loaded.rows) == 12 and loaded.rows[0].prompt[0] == ("system", "Answer briefly.")
    policy = tmp_path / "policy"
    save_model(make_policy(tok), policy, tokenizer=tok)
    assert main(["align", "--method", "kto", "--model", str(policy), "--data", str(data), "--out",
                 str(tmp_path / "kto"), "--train.steps", "2", "--batch_size", "2", "--optim.lr", "1e-3",
                 "--train.progress", "false",
                 "--max_len", "96"]) == 0
    assert json.loads((tmp_path / "kto" / "summary.json").read_text())["method"] == "kto"
