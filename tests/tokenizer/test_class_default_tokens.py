"""Per-class default special tokens (tokenizer/class_defaults.py): a tokenizer_config.json that names a tokenizer
class but leaves tokens out gives the same BOS/EOS/PAD/UNK ids here as transformers' AutoTokenizer, including the
cases where config.json's model_type or a byte-level tokenizer.json makes transformers pick another class."""
import json
from pathlib import Path

import pytest

import lmstack
from lmstack.tokenizer.class_defaults import effective_class

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|endoftext|>", "<bos>", "<eos>", "<mask>", "<|eot|>"]
WORDS = "the cat sat on a mat and dog ran to park while birds sang in old trees".split()
TEXT = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 9)) for i in range(200)]


def spec(byte_level: bool, specials: list[str]) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    if byte_level:
        t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    else:  # SentencePiece-like (Llama-2 / Mistral style tokenizer.json)
        t.pre_tokenizer, t.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    t.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False))
    return json.loads(t.to_str())


def make_dir(path: Path, tok_config: dict, model_type: str | None, byte_level: bool,
             specials: list[str] = SPECIALS) -> Path:
    path.mkdir(parents=True)
    (path / "tokenizer.json").write_text(json.dumps(spec(byte_level, specials)))
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    if model_type:
        (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


def ids(path: Path) -> tuple[dict, dict]:
    ours = lmstack.load_tokenizer(path)
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    roles = ("bos", "eos", "pad", "unk")
    return ({r: getattr(ours, f"{r}_id") for r in roles}, {r: getattr(hf, f"{r}_token_id") for r in roles})


# (tokenizer_config.json, config.json model_type, byte-level tokenizer.json, the class transformers builds)
CASES = {
    "llama_slow_name": ({"tokenizer_class": "LlamaTokenizer"}, None, False, "LlamaTokenizer"),
    "llama_fast_name_llama_type": ({"tokenizer_class": "LlamaTokenizerFast"}, "llama", False, "LlamaTokenizer"),
    "llama_over_byte_level": ({"tokenizer_class": "LlamaTokenizerFast"}, "llama", True, ""),
    "llama_name_mistral_type": ({"tokenizer_class": "LlamaTokenizer"}, "mistral", False, ""),
    "llama_name_phi3_type": ({"tokenizer_class": "LlamaTokenizer"}, "phi3", False, ""),
    "llama_name_qwen2_type": ({"tokenizer_class": "LlamaTokenizer"}, "qwen2", True, "Qwen2Tokenizer"),
    "qwen2": ({"tokenizer_class": "Qwen2Tokenizer"}, None, True, "Qwen2Tokenizer"),
    "qwen2_fast_qwen3_type": ({"tokenizer_class": "Qwen2TokenizerFast"}, "qwen3", True, "Qwen2Tokenizer"),
    "gemma": ({"tokenizer_class": "GemmaTokenizer"}, "gemma", True, "GemmaTokenizer"),
    "gemma2_type_no_class": ({}, "gemma2", True, "GemmaTokenizer"),
    "gpt2_fast": ({"tokenizer_class": "GPT2TokenizerFast"}, None, True, "GPT2Tokenizer"),
    "gpt2_type_no_class": ({}, "gpt2", True, "GPT2Tokenizer"),
    "generic_fast": ({"tokenizer_class": "PreTrainedTokenizerFast"}, None, True, ""),
    # files still win: an explicit token replaces the default, an explicit null removes it
    "llama_partial": ({"tokenizer_class": "LlamaTokenizer", "eos_token": "<|eot|>", "bos_token": None},
                      None, False, "LlamaTokenizer"),
    "qwen2_pad_given": ({"tokenizer_class": "Qwen2Tokenizer", "pad_token": "<|eot|>"}, None, True, "Qwen2Tokenizer"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_class_defaults_match_autotokenizer(name, tmp_path):
    tok_config, model_type, byte_level, cls = CASES[name]
    path = make_dir(tmp_path / name, tok_config, model_type, byte_level)
    assert effective_class(tok_config, {"model_type": model_type} if model_type else {}, byte_level) == cls
    ours, hf = ids(path)
    assert ours == hf
    if cls:  # the class layer really filled something that the files did not name
        assert any(ours[r] is not None and f"{r}_token" not in tok_config for r in ours), ours


def test_explicit_values_beat_class_defaults(tmp_path):
    path = make_dir(tmp_path / "d", CASES["llama_partial"][0], None, False)
    tok = lmstack.load_tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (None, tok.token_to_id("<|eot|>"), tok.token_to_id("<unk>"))


def test_default_missing_from_vocabulary_is_not_invented(tmp_path):
    # transformers appends "<unk>" as a new token past the vocabulary (an id the model has no row for); we
    # leave the role empty instead, and keep the defaults that the vocabulary does have
    specials = [s for s in SPECIALS if s != "<unk>"]
    path = make_dir(tmp_path / "d", {"tokenizer_class": "LlamaTokenizer"}, None, False, specials)
    ours, hf = ids(path)
    vocab_size = lmstack.load_tokenizer(path).vocab_size
    assert ours["unk"] is None and hf["unk"] >= vocab_size
    assert (ours["bos"], ours["eos"]) == (hf["bos"], hf["eos"]) != (None, None)
