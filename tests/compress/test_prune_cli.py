"""`lmstack prune` end to end on a tiny model: every method writes a directory load_model and the engine open, with
the sparsity or the smaller shapes it reports; recovery keeps shapes and zeros; bad input is a clear error and the
input directory is never touched."""
import hashlib
import json
import subprocess
import sys

import pytest
import torch

import lmstack
from lmstack.cli import main, run
from lmstack.compress.prune_cli import prune
from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.hf_io import save_model
from lmstack.model.transformer import Transformer
from lmstack.tokenizer.train import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "the cat sat on the mat while the dog ran to the park and a bird sang in the tall tree. " * 30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_tokenizer(texts=[TEXT], type="bpe", vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=96,
                      max_seq_len=32, hf_model_type="llama", eos_token_id=0)
    return save_model(Transformer(cfg).eval(), tmp_path_factory.mktemp("prune") / "m", tokenizer=tok)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": TEXT[i:i + 400]}) for i in range(0, 2400, 200)) + "\n")
    return path


def digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def printed(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as info:
        run(["prune", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--out", "--method", "--sparsity", "--calib", "--calib_samples", "--recover_steps",
                 "sparsegpt", "channels"):
        assert flag in out, flag


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "2:4"])
def test_unstructured_methods_write_a_dense_directory_with_the_zeros(tmp_path, model_dir, calib, capsys, method):
    before = digest(model_dir)
    out = tmp_path / "out"
    assert main(["prune", str(model_dir), "--method", method, "--sparsity", "0.5", "--calib", str(calib),
                 "--calib-samples", "8", "--out", str(out)]) == 0
    report = printed(capsys)
    assert report["sparsity"] == 0.5 and report["params_after"] == report["params_before"]
    assert digest(model_dir) == before
    assert (out / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    pruned = lmstack.load_model(out)
    w = pruned.blocks[1].mlp.up_proj.weight
    assert ((w == 0).sum(1) == w.shape[1] // 2).all()  # every row half zero
    if method == "2:4":
        assert ((w.view(w.shape[0], -1, 4) == 0).sum(2) == 2).all()
    assert (pruned.tok_emb.weight != 0).all()  # the embedding is never pruned


@pytest.mark.parametrize("method,field,value", [("heads", "n_heads", 2), ("channels", "d_ff", 48),
                                                ("layers", "n_layers", 1)])  # 1.5 of 3 layers rounds to 2 dropped
def test_structured_methods_shrink_the_config_and_the_engine_runs_it(tmp_path, model_dir, calib, capsys, method,
                                                                      field, value):
    out = tmp_path / "out"
    assert main(["prune", "--model", str(model_dir), "--method", method, "--sparsity", "0.5", "--calib", str(calib),
                 "--calib-samples", "8", "--out", str(out)]) == 0
    report = printed(capsys)
    assert report["params_after"] < report["params_before"]
    pruned = lmstack.load_model(out)
    assert getattr(pruned.config, field) == value
    assert report["params_after"] == sum(p.numel() for p in pruned.parameters())
    outs = lmstack.LLM(str(out), max_num_seqs=1).generate(
        ["the cat"], lmstack.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert len(outs[0].outputs[0].token_ids) == 6


def test_recovery_lowers_the_loss_and_keeps_shapes_and_zeros(tmp_path, model_dir, calib, capsys):
    out = tmp_path / "h"
    prune(str(model_dir), str(out), "heads", 0.5, calib=str(calib), calib_samples=8, recover_steps=30,
          recover_lr=1e-2)
    log = printed(capsys)["recover"]
    assert log["steps"] == 30 and log["loss_last"] < log["loss_first"]
    assert lmstack.load_model(out).config.n_heads == 2
    out = tmp_path / "w"
    report = prune(str(model_dir), str(out), "wanda", 0.5, calib=str(calib), calib_samples=8, recover_steps=5)
    assert report["sparsity"] == 0.5
    w = lmstack.load_model(out).blocks[0].attn.q_proj.weight
    assert ((w == 0).sum(1) == 32).all()  # the merged LoRA update did not fill the zeros back in


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, model_dir, calib):
    before = digest(model_dir)
    out = str(tmp_path / "out")
    cases = [
        (dict(method="wanda"), "--calib"),
        (dict(method="magnitude", recover_steps=3), "--calib"),
        (dict(method="heads", sparsity=0.0, calib=str(calib)), "strictly between 0 and 1"),
        (dict(method="heads", sparsity=1.0, calib=str(calib)), "strictly between 0 and 1"),
        (dict(method="magnitude", sparsity=1.5), "strictly between 0 and 1"),
        (dict(method="2:4", sparsity=0.3, calib=str(calib)), "must be 0.5"),
        (dict(method="wanda", calib=str(calib), calib_samples=500), "calibration data too short"),
        (dict(method="wanda", calib=str(tmp_path / "nope.jsonl")), "not found"),
        (dict(method="magnitude", out=str(model_dir)), "model directory"),
        (dict(method="magnitude", out=str(model_dir / "sub")), "model directory"),
        (dict(method="pruneall"), "unknown --method"),
    ]
    for kw, message in cases:
        kw = {"model": str(model_dir), "out": out, **kw}
        with pytest.raises(LmstackError, match=message):
            prune(**kw)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(LmstackError, match="line 2"):
        prune(str(model_dir), out, "wanda", calib=str(bad))
    bad.write_bytes(b'\xff\xfe{"text": 1}')
    with pytest.raises(LmstackError, match="UTF-8"):
        prune(str(model_dir), out, "wanda", calib=str(bad))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(LmstackError, match="already exists"):
        prune(str(model_dir), str(full), "magnitude")
    assert (full / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists() and digest(model_dir) == before
    assert not list(tmp_path.glob(".out.tmp*")) and not list(model_dir.parent.glob(".*tmp*"))


def test_cli_error_is_one_line_and_status_2(tmp_path, model_dir):
    done = subprocess.run([sys.executable, "-m", "lmstack.cli", "prune", "--model", str(model_dir), "--method",
                           "sparsegpt", "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("lmstack: error: --method sparsegpt needs calibration text: pass --calib")
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
