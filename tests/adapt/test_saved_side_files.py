"""A full fine-tune of a user's transformers-made Qwen2 directory saves a model that still talks as the one the
user brought: generation_config.json keeps its eos list (<|im_end|>, <|endoftext|>) and sampling defaults, and
the tokenizer and chat-template files are the source's, byte for byte (model/side_files.keep_source_files)."""
import json

from transformers import AutoTokenizer

import hf_tiny
from lmstack.cli import main


def test_full_finetune_keeps_the_source_directorys_side_files(tmp_path):
    src = tmp_path / "qwen2"
    _, tok = hf_tiny.build_dir(src, "qwen2", style="qwen2")
    gen = json.loads((src / "generation_config.json").read_text())
    gen.update(temperature=0.7, top_p=0.8, do_sample=True)  # Qwen's published sampling defaults
    (src / "generation_config.json").write_text(json.dumps(gen))
    rows = [{"messages": [{"role": "user", "content": hf_tiny.LINES[i]},
                          {"role": "assistant", "content": hf_tiny.LINES[i + 1]}]} for i in range(4)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert main(["finetune", "--method", "full", "--data", str(data), "--model", str(src), "--out",
                 str(tmp_path / "ft"), "--train.steps", "1", "--train.eval_every", "0", "--train.progress", "false",
                 "--batch_size", "2", "--seq_len", "64", "--val_fraction", "0"]) == 0

    out = tmp_path / "ft" / "model"
    saved = json.loads((out / "generation_config.json").read_text())
    assert saved["eos_token_id"] == hf_tiny.eos_ids(tok, "qwen2") and len(saved["eos_token_id"]) == 2
    assert (saved["temperature"], saved["top_p"], saved["do_sample"]) == (0.7, 0.8, True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert AutoTokenizer.from_pretrained(out).pad_token == "<|endoftext|>"
