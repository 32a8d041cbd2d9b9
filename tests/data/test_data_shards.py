import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lmstack.data.document import make_doc
from lmstack.data.shard_tokenizer import ByteTokenizer, load_shard_tokenizer
from lmstack.data.shards import ShardConfig, ShardSet, entry_valid, read_manifest, token_dtype, write_shards
from lmstack.errors import LmstackError

TEXTS = [f"Document {i}: the river {'runs ' * (i % 7)}past the mill, caf\u00e9 #{i}." for i in range(50)]


def docs(texts=TEXTS, source="s"):
    return [make_doc(t, f"{source}/{i}", source) for i, t in enumerate(texts)]


def bpe_tokenizer(path, vocab_size=400):
    """A real byte-level BPE trained with HF tokenizers, saved as tokenizer.json (the shards load it by path)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3, trainer)
    tok.save(str(path))
    return path


def test_roundtrip_bytes_tokenizer(tmp_path):
    m = write_shards(docs(), tmp_path, ShardConfig(docs_per_shard=7, add_eos=True))
    assert m["dtype"] == "uint16" and len(m["shards"]) == 8 and m["written"] == 8 and m["resumed"] == 0
    assert m["total_docs"] == 50 and sorted(os.listdir(tmp_path))[0] == "manifest.json"
    s = ShardSet(tmp_path, verify=True)
    tok = ByteTokenizer()
    for i in (0, 6, 7, 49):
        ids = s.doc(i)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids[1:-1].tolist()) == TEXTS[i]
    assert s.n_tokens == m["total_tokens"] == sum(len(t.encode()) + 2 for t in TEXTS)
    assert isinstance(s.tokens[0], np.memmap) and s.tokens[0].dtype == np.dtype("<u2")
    assert np.array_equal(s.doc_lengths(), [len(t.encode()) + 2 for t in TEXTS])
    e = m["shards"][0]
    assert e["n_docs"] == 7 and e["sources"] == {"s": 7} and len(e["sha256"]) == 64


def test_bpe_tokenizer_by_path_with_worker_processes(tmp_path):
    path = bpe_tokenizer(tmp_path / "tok.json")
    cfg = ShardConfig(tokenizer=str(path), docs_per_shard=10)
    m1 = write_shards(docs(), tmp_path / "one", cfg, workers=1)
    m2 = write_shards(docs(), tmp_path / "two", cfg, workers=2)
    assert [e["sha256"] for e in m1["shards"]] == [e["sha256"] for e in m2["shards"]]
    tok = load_shard_tokenizer(str(path))
    s = ShardSet(tmp_path / "two")
    assert s.doc(13).tolist() == [tok.bos_id] + tok.encode_batch([TEXTS[13]])[0]
    assert m2["vocab_size"] == tok.vocab_size <= 400 and m2["bos_id"] == 0


def test_uint32_for_large_vocab(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab.update({"<unk>": 70_000, "<|bos|>": 70_001})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "big.json"))
    m = write_shards(docs(["w1 w69999 w5", "w65536"]), tmp_path / "out", ShardConfig(tokenizer=str(tmp_path / "big.json")))
    assert m["dtype"] == "uint32" and token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    assert ShardSet(tmp_path / "out").doc(0).tolist() == [70_001, 1, 69_999, 5]
    assert ShardSet(tmp_path / "out").doc(1).tolist() == [70_001, 65_536]


def test_zstd_compression(tmp_path):
    text = [" ".join(["the river runs past the old mill"] * (5 + i % 5)) for i in range(40)]
    m = write_shards(docs(text), tmp_path, ShardConfig(compression="zstd", docs_per_shard=20))
    assert all(e["file"].endswith(".bin.zst") for e in m["shards"])
    assert m["raw_bytes"] / m["bytes"] > 5
    write_shards(docs(text), tmp_path / "plain", ShardConfig(docs_per_shard=20))
    a, b = ShardSet(tmp_path), ShardSet(tmp_path / "plain")
    assert all(np.array_equal(a.doc(i), b.doc(i)) for i in range(40))
    with pytest.raises(LmstackError, match="different settings.*compression"):
        write_shards(docs(text), tmp_path, ShardConfig(docs_per_shard=20))


def _failing(items, after):
    for i, d in enumerate(items):
        if i == after:
            raise KeyboardInterrupt("simulated kill")
        yield d


def test_resume_after_interrupted_run(tmp_path):
    cfg = ShardConfig(docs_per_shard=5)
    with pytest.raises(KeyboardInterrupt):
        write_shards(_failing(docs(), 23), tmp_path, cfg)
    m = read_manifest(tmp_path)
    assert [e["index"] for e in m["shards"]] == [0, 1, 2, 3]  # the shard in progress is not listed
    # Leftovers a hard kill could leave: a temp file, and a renamed shard the manifest never listed.
    (tmp_path / ".shard_00004.bin.abc123.tmp").write_bytes(b"partial")
    (tmp_path / "shard_00004.bin").write_bytes(b"\x00\x01" * 3)
    before = {e["file"]: (tmp_path / e["file"]).stat().st_mtime_ns for e in m["shards"]}
    m2 = write_shards(docs(), tmp_path, cfg)
    assert m2["resumed"] == 4 and m2["written"] == 6
    assert not list(tmp_path.glob(".*.tmp"))
    assert all((tmp_path / f).stat().st_mtime_ns == t for f, t in before.items())  # reused, not rewritten
    assert all(entry_valid(tmp_path, e) for e in m2["shards"])
    fresh = write_shards(docs(), tmp_path / "fresh", cfg)
    assert [e["sha256"] for e in m2["shards"]] == [e["sha256"] for e in fresh["shards"]]


def test_corrupt_or_changed_shards_are_redone(tmp_path):
    cfg = ShardConfig(docs_per_shard=10)
    m = write_shards(docs(), tmp_path, cfg)
    victim = tmp_path / m["shards"][2]["file"]
    victim.write_bytes(victim.read_bytes()[:-2] + b"\xff\xff")
    with pytest.raises(LmstackError, match="checksum"):
        ShardSet(tmp_path, verify=True)
    again = write_shards(docs(), tmp_path, cfg)
    assert again["resumed"] == 4 and again["written"] == 1
    changed = docs(TEXTS[:30] + ["a new ending"] * 20)
    m3 = write_shards(changed, tmp_path, cfg)
    assert m3["resumed"] == 3 and m3["written"] == 2 and m3["total_docs"] == 50
    fewer = write_shards(docs(TEXTS[:15]), tmp_path, cfg)
    assert [e["index"] for e in fewer["shards"]] == [0, 1] and not (tmp_path / "shard_00004.bin").exists()


SLOW_WRITER = """
import sys, time
from lmstack.data.document import make_doc
from lmstack.data.shards import ShardConfig, write_shards
def slow():
    for i in range(400):
        if i >= 40:
            time.sleep(0.05)
        yield make_doc(f"document number {i} " * 20, str(i), "s")
write_shards(slow(), sys.argv[1], ShardConfig(docs_per_shard=10))
"""


def test_hard_kill_leaves_no_valid_looking_shard(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(out)])
    deadline = time.time() + 60
    while time.time() < deadline:
        m = read_manifest(out) if (out / "manifest.json").exists() else None
        if m and len(m["shards"]) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    m = read_manifest(out)
    listed = {e["file"] for e in m["shards"]}
    assert 5 <= len(listed) < 40
    assert all(entry_valid(out, e) for e in m["shards"])  # everything the manifest lists is complete
    ShardSet(out, verify=True)
    unlisted = {p.name for p in out.glob("shard_*.bin")} - listed
    assert len(unlisted) <= 1  # at most the one shard renamed in the instant before its manifest update
    texts = [make_doc(f"document number {i} " * 20, str(i), "s") for i in range(400)]
    m2 = write_shards(texts, out, ShardConfig(docs_per_shard=10))
    assert m2["resumed"] == len(listed) and m2["total_docs"] == 400


def test_missing_manifest_and_bos_errors(tmp_path):
    with pytest.raises(LmstackError, match="no manifest.json"):
        ShardSet(tmp_path)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "nobos.json"))
    with pytest.raises(LmstackError, match="no BOS token"):
        write_shards(docs(), tmp_path / "x", ShardConfig(tokenizer=str(tmp_path / "nobos.json")))
    m = write_shards(docs(["a a"]), tmp_path / "y", ShardConfig(tokenizer=str(tmp_path / "nobos.json"), add_bos=False))
    assert m["total_tokens"] == 2
    assert json.loads((tmp_path / "y" / "manifest.json").read_text())["add_bos"] is False
