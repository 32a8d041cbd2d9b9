"""TRL's SFT formats in `lmstack finetune`: prompt/completion text (loss on the completion only), conversational
prompt/completion (loss on the completion's assistant tokens only) and messages rows, mixed in one file."""
import json

import pytest
from _sft_tiny import chat_rows, save_base, tokenizer, write_jsonl

from lmstack.adapt.sft import encode_rows, read_chat_jsonl
from lmstack.cli import run
from lmstack.errors import LmstackError

U = {"role": "user", "content": "What is two plus two?"}
A = {"role": "assistant", "content": "Four."}


def test_prompt_completion_text_learns_the_completion_and_eos_only():
    tok = tokenizer()
    (ex,), stats = encode_rows(tok, [{"prompt": "Two plus two is", "completion": " four."}])
    prompt = [tok.bos_id] + tok.encode("Two plus two is", allow_special=False)
    completion = tok.encode(" four.", allow_special=False) + [tok.eos_id]
    assert ex.ids == prompt + completion
    assert ex.mask == [0] * len(prompt) + [1] * len(completion)
    assert stats.kept == 1 and stats.learned_tokens == len(completion)


def test_conversational_prompt_completion_masks_assistant_turns_inside_the_prompt():
    tok = tokenizer()
    history = [U, A, {"role": "user", "content": "And three plus three?"}]
    reply = [{"role": "assistant", "content": "Six."}]
    (ex,), _ = encode_rows(tok, [{"prompt": history, "completion": reply}])
    ids, mask = tok.apply_chat_template(history + reply)
    prompt_ids = tok.apply_chat_template(history, add_generation_prompt=True)[0]
    assert ex.ids == ids
    assert sum(mask[:len(prompt_ids)]) > 0  # the messages form learns the earlier reply "Four." ...
    assert ex.mask == [0] * len(prompt_ids) + mask[len(prompt_ids):]  # ... this form does not
    assert sum(ex.mask) > 0


def test_a_bad_row_names_file_line_and_field(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"},
                                               {"prompt": [U], "completion": [{"role": "assistant"}]}])
    with pytest.raises(LmstackError, match=r"bad.jsonl:2: field 'completion': message 0 \(assistant\) has no "
                                           r"string 'content'"):
        read_chat_jsonl(bad)


def test_cli_lora_finetune_on_trl_formats(tmp_path):
    base = save_base(tmp_path / "base")
    rows = [r for r in chat_rows() if r["kind"] == "qa"][:24]
    mixed = []
    for i, r in enumerate(rows):
        user = next(m["content"] for m in r["messages"] if m["role"] == "user")
        answer = next(m["content"] for m in r["messages"] if m["role"] == "assistant")
        if i % 3 == 0:
            mixed.append({"prompt": user, "completion": " " + answer})
        elif i % 3 == 1:
            mixed.append({"prompt": [{"role": "user", "content": user}],
                          "completion": [{"role": "assistant", "content": answer}]})
        else:
            mixed.append({"messages": r["messages"]})
    data = write_jsonl(tmp_path / "trl.jsonl", mixed)
    out = tmp_path / "lora"
    summary = run(["finetune", "--method", "lora", "--data", str(data), "--model", str(base), "--out", str(out),
                   "--train.steps", "2", "--train.eval_every", "0", "--train.progress", "false",
                   "--batch_size", "4", "--seq_len", "96", "--val_fraction", "0"])
    assert summary["steps"] == 2
    report = json.loads((out / "data.json").read_text())
    assert report["train"]["kept"] == 24
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_text_rows_learn_every_token():
    tok = tokenizer()
    (ex,), _ = encode_rows(tok, [{"text": "The sky is blue."}])
    assert ex.ids == [tok.bos_id] + tok.encode("The sky is blue.", allow_special=False) + [tok.eos_id]
    assert ex.mask == [1] * len(ex.ids) and ex.n_learned == len(ex.ids) - 1
