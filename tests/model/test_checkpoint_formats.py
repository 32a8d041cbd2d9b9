"""Issue 17 §3: HF checkpoints as transformers writes them (sharded, bf16/fp16, tied head), `model convert`
keeping every side file, and the model-side bad input (missing shard, over-budget config, tokenizer larger
than the model), each one `lmstack: error:` line through the CLI and an LmstackError in Python.

Every directory is built with tests/hf_tiny.py, by transformers and tokenizers only (random weights, a BPE
trained on a few hundred generated lines)."""
import json
from pathlib import Path

import pytest
import torch

import hf_tiny
import lmstack
from lmstack.cli import main
from lmstack.errors import LmstackError
from lmstack.model.load_guard import set_max_model_gib

transformers = pytest.importorskip("transformers")

CHATML = hf_tiny.CHATML
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def hf_model(family: str, out: Path, vocab_size: int = 300, tie: bool = False, dtype=None, shard: str = "5GB",
             seed: int = 0):
    model = hf_tiny.random_model(family, vocab_size, seed=seed, max_position_embeddings=128,
                                 tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out, max_shard_size=shard)
    return model


def bpe_files(out: Path, vocab_size: int) -> None:
    """tokenizer.json (a BPE of exactly vocab_size ids), tokenizer_config.json with a ChatML template, BOS/EOS,
    special_tokens_map.json and chat_template.jinja, written by hand: `model convert` must keep each file."""
    lines = [f"line {i}: the quick brown fox {i * 7 % 13} jumps over the lazy dog" for i in range(300)]
    tok = hf_tiny.bpe(lines, SPECIALS, vocab_size)
    assert tok.get_vocab_size() == vocab_size
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": CHATML,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<|im_end|>"}))
    (out / "chat_template.jinja").write_text(CHATML)


def qwen_style_dir(out: Path, vocab_size: int = 300, tokenizer_size: int = 300) -> Path:
    hf_model("qwen2", out, vocab_size=vocab_size, tie=True)
    bpe_files(out, tokenizer_size)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": [3, 1], "pad_token_id": 1, "do_sample": True, "temperature": 0.7,
         "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 64}))
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [3, 1]}))
    return out


def cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip()


IDS = torch.tensor([[0, 5, 9, 42, 7, 200, 3]])


# ---------------------------------------------------------------- formats that load
@pytest.mark.parametrize("family", list(hf_tiny.FAMILIES))
@pytest.mark.parametrize("variant", ["sharded", "bf16", "fp16", "tied"])
def test_transformers_checkpoints_load_in_fp32_and_match_transformers(tmp_path, family, variant):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(variant)
    theirs = hf_model(family, tmp_path, tie=variant == "tied", dtype=dtype,
                      shard="50KB" if variant == "sharded" else "5GB")
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if variant == "sharded":
        assert (tmp_path / "model.safetensors.index.json").exists() and len(files) > 2
    if variant == "tied":
        assert not any("lm_head" in k for k in json.loads(
            (tmp_path / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
                (tmp_path / "model.safetensors").read_bytes()[:8], "little")]))
    ours = lmstack.load_model(tmp_path)
    assert {p.dtype for p in ours.parameters()} == {torch.float32}  # bf16/fp16 upcast on CPU by default
    with torch.no_grad():
        expected = theirs.float()(IDS).logits  # the same stored weights, upcast
        assert torch.allclose(ours(IDS), expected, atol=1e-5, rtol=1e-5)


def test_dtype_argument_keeps_casts_or_resolves_auto(tmp_path):
    hf_model("llama", tmp_path, dtype=torch.bfloat16)
    assert next(lmstack.load_model(tmp_path, dtype=None).parameters()).dtype == torch.bfloat16  # the checkpoint's
    assert next(lmstack.load_model(tmp_path, dtype="bf16").parameters()).dtype == torch.bfloat16
    assert next(lmstack.load_model(tmp_path, dtype="float16").parameters()).dtype == torch.float16
    assert next(lmstack.load_model(tmp_path, dtype="auto").parameters()).dtype == torch.float32  # auto on CPU
    with pytest.raises(LmstackError, match="dtype='int8' is not allowed"):
        lmstack.load_model(tmp_path, dtype="int8")


def test_untied_model_without_lm_head_names_the_tensor_and_the_files(tmp_path, capsys):
    hf_model("llama", tmp_path / "full")
    hf_model("llama", tmp_path / "m", tie=True)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(LmstackError) as e:
        lmstack.load_model(tmp_path / "m")
    msg = str(e.value)
    assert "tie_word_embeddings is false" in msg and "'lm_head.weight'" in msg and "model.safetensors" in msg
    assert str(tmp_path / "m" / "config.json") in msg
    for argv in (["generate", "--model", tmp_path / "m", "--prompt_ids", "[1, 2]", "--max_tokens", "2"],
                 ["model", "info", "--model", tmp_path / "m"]):
        rc, err = cli(argv, capsys)
        assert rc == 2 and err == f"lmstack: error: {msg}"
    assert main(["model", "info", "--model", str(tmp_path / "full")]) == 0


# ---------------------------------------------------------------- convert keeps everything
def _side_files(d: Path) -> dict[str, bytes]:
    names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "tokenizer.model", "additional_chat_templates/tool_use.jinja"]
    return {n: (d / n).read_bytes() for n in names if (d / n).exists()}


def test_convert_keeps_tokenizer_template_and_whole_generation_config_both_ways(tmp_path, capsys):
    src = qwen_style_dir(tmp_path / "hf")
    (src / "tokenizer.model").write_bytes(bytes(range(256)))  # any bytes: copied, never parsed
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages[0]['content'] }}")
    source_gen = json.loads((src / "generation_config.json").read_text())
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert main(["model", "convert", "--src", str(src), "--out", str(ours)]) == 0      # HF -> ours
    assert main(["model", "convert", "--src", str(ours), "--out", str(back)]) == 0     # ours -> HF
    for out in (ours, back):
        assert _side_files(out) == _side_files(src) and len(_side_files(src)) == 6
        gen = json.loads((out / "generation_config.json").read_text())
        assert gen == source_gen  # eos [<|im_end|>, </s>], temperature, top_p, top_k, ... all kept
        assert json.loads((out / "config.json").read_text())["eos_token_id"] == [3, 1]
        # transformers still reads all of it, and computes the same logits
        hf_tok = transformers.AutoTokenizer.from_pretrained(out)
        text = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert text == "<|im_start|>user\nhi<|im_end|>\n"
        gc = transformers.GenerationConfig.from_pretrained(out)
        assert gc.eos_token_id == [3, 1] and gc.temperature == 0.7 and gc.top_p == 0.8
        with torch.no_grad():
            a = transformers.AutoModelForCausalLM.from_pretrained(src)(IDS).logits
            b = transformers.AutoModelForCausalLM.from_pretrained(out)(IDS).logits
        assert torch.equal(a, b)
    # and our own loaders see the kept files: tokenizer ids equal transformers'
    tok = lmstack.load_tokenizer(back)
    assert tok.encode("the quick brown fox") == hf_tok.encode("the quick brown fox", add_special_tokens=False)


def test_convert_of_a_directory_without_generation_config_writes_the_model_ids(tmp_path):
    hf_model("mistral", tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").unlink()
    assert main(["model", "convert", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "o")]) == 0
    gen = json.loads((tmp_path / "o" / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 0 and gen["eos_token_id"] == 1
    assert not (tmp_path / "o" / "tokenizer.json").exists()


# ---------------------------------------------------------------- bad input
def test_missing_shard_named_in_the_index_is_one_line_naming_index_field_and_shard(tmp_path, capsys):
    hf_model("qwen2", tmp_path, shard="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / gone).unlink()
    with pytest.raises(LmstackError) as e:
        lmstack.load_model(tmp_path)
    for argv in (["model", "info", "--model", tmp_path],
                 ["generate", "--model", tmp_path, "--prompt_ids", "[1, 2]", "--max_tokens", "2"]):
        rc, err = cli(argv, capsys)
        assert rc == 2 and err == f"lmstack: error: {e.value}"
        assert "model.safetensors.index.json" in err and "weight_map" in err and repr(gone) in err
        assert "Traceback" not in err and "\n" not in err


def test_over_budget_config_is_refused_before_allocating_in_every_command(tmp_path, capsys, monkeypatch):
    # 200 layers of width 16384 is ~0.8T parameters: only config.json exists, so any attempt to build the
    # model or read weights would fail differently (no weights file) or exhaust memory.
    d = tmp_path / "big"
    hf_model("llama", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 16384, "intermediate_size": 65536,
                                               "num_hidden_layers": 200, "num_attention_heads": 128,
                                               "num_key_value_heads": 8, "head_dim": 128}))
    (d / "model.safetensors").unlink()
    bpe_files(d, 300)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n"
                             for i in range(8)))

    def no_build(*a, **k):
        raise AssertionError("a model was built before the memory check")

    monkeypatch.setattr("lmstack.model.hf_io.Transformer", no_build)
    commands = [["model", "generate", "--model", d, "--prompt_ids", "[1, 2]"],
                ["generate", "--model", d, "--prompt_ids", "[1, 2]", "--max_tokens", "2"],
                ["eval", "--model", d, "--tasks", "arc_easy", "--limit", "2"],
                ["chat", "--model", d, "--device", "cpu"],
                ["serve", "--model", d, "--device", "cpu", "--port", "1"],
                ["finetune", "--method", "lora", "--model", d, "--data", prefs, "--out", tmp_path / "ft"],
                ["align", "--method", "dpo", "--model", d, "--data", prefs, "--out", tmp_path / "dpo"]]
    try:
        for argv in commands:
            rc, err = cli(argv + ["--max_model_gib", "8"], capsys)
            assert rc == 2 and err.startswith(f"lmstack: error: {d / 'config.json'}: loading needs about"), argv
            assert "over the 8 GiB limit" in err and "hidden_size=16384" in err and "\n" not in err
    finally:
        set_max_model_gib(None)


def test_tokenizer_larger_than_the_model_is_an_error_and_a_smaller_one_is_fine(tmp_path, capsys):
    big = qwen_style_dir(tmp_path / "big", vocab_size=300, tokenizer_size=320)
    for argv in (["generate", "--model", big, "--prompt", "the fox", "--max_tokens", "2"],
                 ["model", "info", "--model", big]):
        rc, err = cli(argv, capsys)
        assert rc == 2 and err.startswith("lmstack: error:") and "\n" not in err and "Traceback" not in err
        assert "320 tokens" in err and "300 tokens" in err and str(big) in err
    with pytest.raises(LmstackError, match="320 tokens but the model"):
        lmstack.LLM(str(big))
    small = qwen_style_dir(tmp_path / "small", vocab_size=300, tokenizer_size=280)
    assert main(["model", "info", "--model", str(small)]) == 0
    llm = lmstack.LLM(str(small))
    out = llm.generate(["the fox"], lmstack.SamplingParams(max_tokens=20, temperature=1.0, seed=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 20 and max(out[0].outputs[0].token_ids) < 280  # padded rows unsampled


@pytest.mark.parametrize("flag, expected", [(None, torch.float32), ("auto", torch.float32),
                                            ("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_inference_commands_upcast_a_bf16_checkpoint_on_cpu_unless_dtype_says_otherwise(tmp_path, monkeypatch,
                                                                                        capsys, flag, expected):
    # lazy: only this test needs the command modules' internals
    from lmstack.eval.local_lm import LocalLM
    import lmstack.infer.commands as infer_commands
    from lmstack.serve.terminal_chat import LocalBackend

    hf_model("qwen2", tmp_path, dtype=torch.bfloat16)
    bpe_files(tmp_path, 300)
    seen = []

    class Spy(infer_commands.LLM):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(next(self.engine.model.parameters()).dtype)

    monkeypatch.setattr(infer_commands, "LLM", Spy)
    extra = [] if flag is None else ["--dtype", flag]
    assert main(["generate", "--model", str(tmp_path), "--prompt_ids", "[1, 2]", "--max_tokens", "2",
                 "--device", "cpu", *extra]) == 0
    dtype = {} if flag is None else {"dtype": flag}
    chat = LocalBackend(str(tmp_path), device="cpu", **dtype)
    scorer = LocalLM(str(tmp_path), device="cpu", **dtype)  # eval's default is float32 too
    assert seen == [expected]
    assert next(chat.engine.model.parameters()).dtype == expected
    assert next(scorer.model.parameters()).dtype == expected


def test_convert_source_keeps_a_bf16_checkpoint_bf16_and_says_so_in_config(tmp_path):
    theirs = hf_model("llama", tmp_path / "hf", dtype=torch.bfloat16)
    assert main(["model", "convert", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "keep"),
                 "--dtype", "source"]) == 0
    assert main(["model", "convert", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "fp32")]) == 0
    assert json.loads((tmp_path / "keep" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    kept = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "keep", dtype="auto")
    assert kept.dtype == torch.bfloat16
    for name, t in theirs.state_dict().items():
        assert torch.equal(kept.state_dict()[name], t), name  # bit for bit
