"""TRL's data formats on a user's own model: a transformers-made Llama directory (tokenizers BPE, the published
Llama-3 chat template, a list of EOS ids) fine-tunes with LoRA on prompt/completion and messages rows and aligns
with DPO on conversational preference rows, through the CLI; SFT's completion mask is TRL's (the ids after the
prompt that transformers' apply_chat_template renders with the generation prompt)."""
import json
from pathlib import Path

import pytest

import lmstack
from lmstack.adapt.sft import encode_rows
from lmstack.cli import main

transformers = pytest.importorskip("transformers")
TEMPLATE = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates" / "llama3.jinja"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEXT = ["the cat sat on the mat", "hello there, how are you?", "user assistant system"] * 30


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("hf_llama3_trl")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                                  chat_template=TEMPLATE.read_text())
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    hf_tok.save_pretrained(d)
    gen = json.loads((d / "generation_config.json").read_text())
    gen["eos_token_id"] = [hf_tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    (d / "generation_config.json").write_text(json.dumps(gen))
    return d, hf_tok


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
    assert main(["finetune", "--method", "lora", "--data", str(sft_file), "--base", str(d), "--out",
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
    assert main(["align", "--method", "dpo", "--policy", str(d), "--data", str(pref_file), "--out",
                 str(tmp_path / "dpo"), "--steps", "2", "--batch_size", "2", "--lr", "1e-3", "--progress", "false",
                 "--max_len", "64"]) == 0
    assert "skipped none" in capsys.readouterr().out
    assert json.loads((tmp_path / "dpo" / "summary.json").read_text())["skipped_rows"] == 0
