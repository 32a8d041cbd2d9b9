"""TRL's data formats on a user's own model: a transformers-made Llama directory (tokenizers BPE, the published
Llama-3 chat template, a list of EOS ids) fine-tunes with LoRA on prompt/completion and messages rows and aligns
with DPO on conversational preference rows, through the CLI; SFT's completion mask is TRL's (the ids after the
prompt that transformers' apply_chat_template renders with the generation prompt)."""
import json

import pytest

import hf_tiny
import lmstack
from lmstack.adapt.sft import encode_rows
from lmstack.cli import main

transformers = pytest.importorskip("transformers")


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_llama3_trl")
    return d, hf_tiny.build_dir(d, "llama", style="llama3")[1]


def test_completion_mask_is_trls_on_the_models_template(llama):
    d, hf_tok = llama
    prompt, completion = [U("hello there"), A("the cat"), U("how are you?")], [A("on the mat")]
    (ex,), _ = encode_rows(lmstack.load_tokenizer(d), [{"prompt": prompt, "completion": completion}])
    prompt_ids = hf_tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
    full = hf_tok.apply_chat_template(prompt + completion, tokenize=True)
    prompt_ids = prompt_ids if isinstance(prompt_ids, list) else prompt_ids["input_ids"]  # transformers 5: a dict
    full = full if isinstance(full, list) else full["input_ids"]
    assert ex.ids == full
    learned = [i for i, m in zip(ex.ids, ex.mask) if m]
    assert learned == full[len(prompt_ids):]  # the reply and its <|eot_id|>, nothing of the prompt
    assert hf_tok.convert_tokens_to_ids("<|eot_id|>") == learned[-1]


def test_cli_lora_and_dpo_on_trl_rows(llama, tmp_path, capsys):
    d, _ = llama
    sft = []
    for i in range(8):
        sft += [{"prompt": f"the cat sat {i}", "completion": " on the mat"},
                {"prompt": [U(f"hello there {i}")], "completion": [A("how are you?")]},
                {"messages": [U("hello"), A(f"the mat {i}")]}]
    sft_file = tmp_path / "sft.jsonl"
    sft_file.write_text("".join(json.dumps(r) + "\n" for r in sft), encoding="utf-8")
    assert main(["finetune", "--method", "lora", "--data", str(sft_file), "--model", str(d), "--out",
                 str(tmp_path / "ft"), "--train.steps", "2", "--train.eval_every", "0", "--train.progress", "false",
                 "--batch_size", "4", "--seq_len", "64", "--val_fraction", "0"]) == 0
    assert json.loads((tmp_path / "ft" / "data.json").read_text())["train"]["kept"] == 24
    assert (tmp_path / "ft" / "adapter" / "adapter_model.safetensors").is_file()
    prefs = []
    for i in range(6):
        prefs += [{"chosen": [U(f"hello {i}"), A("the cat sat")], "rejected": [U(f"hello {i}"), A("mat mat")]},
                  {"prompt": [U(f"how are you {i}")], "chosen": [A("hello there")], "rejected": [A("the the")]}]
    pref_file = tmp_path / "prefs.jsonl"
    pref_file.write_text("".join(json.dumps(r) + "\n" for r in prefs), encoding="utf-8")
    assert main(["align", "--method", "dpo", "--model", str(d), "--data", str(pref_file), "--out",
                 str(tmp_path / "dpo"), "--train.steps", "2", "--batch_size", "2", "--optim.lr", "1e-3",
                 "--train.progress", "false",
                 "--max_len", "64"]) == 0
    assert "skipped none" in capsys.readouterr().out
    assert json.loads((tmp_path / "dpo" / "summary.json").read_text())["skipped_rows"] == 0
