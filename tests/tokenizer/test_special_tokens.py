"""Special-token precedence and add_bos_token/add_eos_token (tokenizer/special_tokens.py), each rule checked
against transformers' AutoTokenizer on the same small directory."""
import json
from pathlib import Path

import pytest

import hf_tiny
import lmstack
from lmstack.errors import LmstackError
from lmstack.tokenizer.special_tokens import model_special_ids

transformers = pytest.importorskip("transformers")

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|eot|>"]
SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def lines(n: int = 300) -> list[str]:
    if SHAKESPEARE.is_file():
        text = [s for s in SHAKESPEARE.read_text(encoding="utf-8").splitlines() if s.strip()]
        return text[:n]
    words = "the cat sat on a mat and dog ran to park while birds sang in old trees".split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 9)) for i in range(n)]


@pytest.fixture(scope="module")
def tok_json(tmp_path_factory) -> dict:
    return json.loads(hf_tiny.bpe(lines(), SPECIALS, vocab_size=400, byte_alphabet=False).to_str())


def make_dir(path: Path, spec: dict, config: dict, special_map: dict | None = None, post_processor=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "post_processor": post_processor}
    (path / "tokenizer.json").write_text(json.dumps(spec))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    if special_map is not None:
        (path / "special_tokens_map.json").write_text(json.dumps(special_map))
    return path


def check_parity(path: Path) -> None:
    ours = lmstack.load_tokenizer(path)
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    for role in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{role}_id") == getattr(hf, f"{role}_token_id"), role
    for special in (True, False):
        for text in lines():
            assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special), text
    return ours


def test_tokenizer_config_strings_and_added_token_dicts(tok_json, tmp_path):
    path = make_dir(tmp_path / "d", tok_json, {"bos_token": {"__type": "AddedToken", "content": "<s>", "special": True}, "eos_token": "</s>",
                                               "pad_token": "<pad>", "unk_token": {"__type": "AddedToken", "content": "<unk>"}})
    ours = check_parity(path)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (1, 2, 3, 0)


def test_legacy_special_tokens_map_overrides_tokenizer_config(tok_json, tmp_path):
    # no added_tokens_decoder: transformers merges special_tokens_map.json over tokenizer_config.json
    path = make_dir(tmp_path / "d", tok_json, {"eos_token": "</s>"}, {"eos_token": {"content": "<|eot|>"},
                                                                      "bos_token": "<s>"})
    ours = check_parity(path)
    assert ours.eos_id == 4 and ours.bos_id == 1


def test_modern_tokenizer_config_ignores_special_tokens_map(tok_json, tmp_path):
    decoder = {str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                        "single_word": False} for i, s in enumerate(SPECIALS)}
    path = make_dir(tmp_path / "d", tok_json, {"eos_token": "</s>", "added_tokens_decoder": decoder},
                    {"eos_token": "<|eot|>", "pad_token": "<pad>"})
    ours = check_parity(path)
    assert ours.eos_id == 2 and ours.pad_id is None


@pytest.mark.parametrize("flags", [{"add_bos_token": False}, {"add_eos_token": True}, {}])
@pytest.mark.parametrize("adds_bos", [True, False])
def test_with_a_tokenizer_json_its_post_processor_rules_not_the_flags(tok_json, tmp_path, flags, adds_bos):
    # transformers 5 drops tokenizer_config's add_bos_token/add_eos_token when tokenizer.json exists
    bos_pp = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                       {"Sequence": {"id": "A", "type_id": 0}}],
              "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
              "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    path = make_dir(tmp_path / "d", tok_json, {"bos_token": "<s>", "eos_token": "</s>", **flags},
                    post_processor=bos_pp if adds_bos else None)
    ours = check_parity(path)
    assert ours.encode("hello", add_special_tokens=True)[:1] == ([1] if adds_bos else ours.encode("hello")[:1])


def test_model_configs_do_not_change_the_tokenizer_but_name_generation_ids(tok_json, tmp_path):
    path = make_dir(tmp_path / "d", tok_json, {"bos_token": "<s>", "eos_token": "</s>"})
    (path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 3, "pad_token_id": 0}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    ours = check_parity(path)
    assert ours.eos_id == 2                                             # the tokenizer's own EOS
    assert model_special_ids(path) == {"bos": 1, "eos": [2, 4], "pad": 0}   # generation_config first
    (path / "generation_config.json").unlink()
    assert model_special_ids(path)["eos"] == [3]


def test_bad_entries_name_the_file_and_field(tok_json, tmp_path):
    path = make_dir(tmp_path / "d", tok_json, {"bos_token": 5})
    with pytest.raises(LmstackError, match="tokenizer_config.json: bos_token"):
        lmstack.load_tokenizer(path)
    path = make_dir(tmp_path / "f", tok_json, {}, {"eos_token": ["</s>"]})
    with pytest.raises(LmstackError, match="special_tokens_map.json: eos_token"):
        lmstack.load_tokenizer(path)
