"""A SentencePiece tokenizer.model (BPE, byte fallback; Llama-2 style) loads through tokenizer/sentencepiece.py:
ids equal the `sentencepiece` package, transformers' slow SentencePiece backend and its fast LlamaTokenizer
on 2,000 multilingual UDHR lines; decoding gives the text back."""
import gzip
import json
from pathlib import Path
import shutil

import pytest

import lmstack
from lmstack.errors import LmstackError
from lmstack.tokenizer.sentencepiece import read_model_proto

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

UDHR = Path(__file__).resolve().parents[3] / "shared" / "data" / "udhr" / "udhr_full.jsonl.gz"
pytestmark = pytest.mark.skipif(not UDHR.is_file(), reason="needs ../shared/data/udhr")


def udhr_lines(per_language: int = 4, n: int = 2000) -> list[str]:
    """The first lines of each translation's articles, language after language (532 languages, many scripts)."""
    out = []
    with gzip.open(UDHR, "rt", encoding="utf-8") as f:
        for row in map(json.loads, f):
            lines = [s for a in row.get("articles") or [] for s in a["text"].split("\n") if s.strip()]
            out += lines[:per_language]
    return out[:n]


@pytest.fixture(scope="module")
def sample() -> list[str]:
    lines = udhr_lines()
    assert len(lines) == 2000
    return lines


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, sample) -> Path:
    """A tokenizer.model trained here as Llama-2's was: BPE, byte fallback, identity normalizer, digits split;
    a 0.995 character coverage leaves rare characters to the byte fallback."""
    d = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample), model_prefix=str(d / "m"), model_type="bpe", vocab_size=3000,
        byte_fallback=True, character_coverage=0.995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    model_dir = d / "llama2-style"
    model_dir.mkdir()
    shutil.copy(d / "m.model", model_dir / "tokenizer.model")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return model_dir


def test_ids_equal_sentencepiece_and_transformers_slow_and_fast(sp_dir, sample):
    ours = lmstack.load_tokenizer(sp_dir)
    ref = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    fast = transformers.AutoTokenizer.from_pretrained(str(sp_dir))
    slow = transformers.tokenization_utils_sentencepiece.SentencePieceBackend(
        vocab_file=str(sp_dir / "tokenizer.model"), bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert fast.is_fast and not slow.is_fast
    want = ref.encode(sample)
    assert [fast.encode(s, add_special_tokens=False) for s in sample] == want
    assert [slow.encode(s, add_special_tokens=False) for s in sample] == want
    assert [ours.encode(s) for s in sample] == want                    # our Python reference encoder
    assert ours.encode_batch(sample) == want                           # the Rust fast path on our spec
    assert sum(ref.id_to_piece(i).startswith("<0x") for ids in want for i in ids) > 0   # byte fallback used
    assert [ours.decode(ids) for ids in want] == [ref.decode(ids) for ids in want] == sample
    assert (ours.bos_id, ours.eos_id, ours.unk_id) == (1, 2, 0) == (fast.bos_token_id, fast.eos_token_id,
                                                                      fast.unk_token_id)


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": True}, {"add_bos_token": True, "add_eos_token": True}])
def test_add_bos_and_eos_token_as_transformers(sp_dir, sample, tmp_path, flags):
    d = tmp_path / "d"
    shutil.copytree(sp_dir, d)
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", **flags}))
    ours, fast = lmstack.load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d))
    for special in (True, False):
        assert ([ours.encode(s, add_special_tokens=special) for s in sample[:300]]
                == [fast.encode(s, add_special_tokens=special) for s in sample[:300]])
    ids = ours.encode("hello", add_special_tokens=True)
    assert (ids[0] == 1) == flags.get("add_bos_token", False) and (ids[-1] == 2) == flags.get("add_eos_token", False)


def test_saved_conversion_loads_in_transformers(sp_dir, sample, tmp_path):
    ours = lmstack.load_tokenizer(sp_dir)
    out = ours.save(tmp_path / "converted")
    assert (out / "tokenizer.json").is_file()
    again = transformers.AutoTokenizer.from_pretrained(str(out))
    assert [again.encode(s, add_special_tokens=False) for s in sample[:300]] == [ours.encode(s) for s in sample[:300]]


def test_bad_model_files_are_named(tmp_path, sp_dir):
    (tmp_path / "tokenizer.model").write_bytes(b"\xff\xff\xff")
    with pytest.raises(LmstackError, match="tokenizer.model is not a SentencePiece model"):
        lmstack.load_tokenizer(tmp_path)
    d = tmp_path / "uni"
    d.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(udhr_lines(1, 200)), model_prefix=str(d / "tokenizer"),
                                   model_type="unigram", vocab_size=600, character_coverage=0.98, minloglevel=2,
                                   num_threads=1)
    with pytest.raises(LmstackError, match="a SentencePiece unigram model; only BPE"):
        lmstack.load_tokenizer(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmstackError, match="holds no tokenizer.json"):
        lmstack.load_tokenizer(tmp_path / "empty")
    proto = read_model_proto((sp_dir / "tokenizer.model").read_bytes())
    assert proto["trainer"]["byte_fallback"] and proto["trainer"]["pad_id"] == -1


def test_llama_directory_with_only_a_tokenizer_model_generates_as_transformers(sp_dir, tmp_path):
    import torch

    from lmstack.infer import LLM, SamplingParams

    d = tmp_path / "llama"
    cfg = transformers.LlamaConfig(vocab_size=3000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(cfg).eval()
    hf_model.save_pretrained(d)
    shutil.copy(sp_dir / "tokenizer.model", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}))
    out = LLM(str(d)).generate(["Everyone has the right"], SamplingParams(temperature=0.0, max_tokens=5))[0]
    ids = transformers.AutoTokenizer.from_pretrained(str(d))("Everyone has the right", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf_model.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1]:].tolist()
    assert out.prompt_token_ids == ids[0].tolist() and out.prompt_token_ids[0] == 1     # BOS from add_bos_token
    assert out.outputs[0].token_ids == ref
    from lmstack.eval.local_lm import LocalLM
    from lmstack.model.commands import info

    lm = LocalLM(d, device="cpu")                         # eval, too, finds the tokenizer.model
    assert lm.prefix_token_id == 1 and lm.loglikelihood_rolling(["Everyone has the right"])[0] < 0
    info(model=str(d))                                    # `lmstack model info` checks tokenizer vs model
