"""`lmstack export`: its --help builds from the function's signature, and exports run through the CLI."""
import json
import subprocess
import sys

import gguf
import pytest
import torch

from lmstack.cli import main, run
from lmstack.model.config import ModelConfig
from lmstack.model.hf_io import save_model
from lmstack.model.transformer import Transformer
from lmstack.tokenizer.train import train_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_tokenizer(texts=["the cat sat on the mat " * 30], type="bpe", vocab_size=290, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=1, n_heads=4, max_seq_len=32,
                      hf_model_type="llama")
    return save_model(Transformer(cfg).eval(), tmp_path_factory.mktemp("cli") / "m", tokenizer=tok)


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as info:
        run(["export", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--out", "--format", "--gguf_type", "q4_0", "onnx"):
        assert flag in out, flag


def test_gguf_export_through_the_cli(tmp_path, model_dir, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", str(model_dir), "--format", "gguf", "--gguf-type", "q8_0", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["out"] == str(out) and printed["bytes"] == out.stat().st_size
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}


@pytest.mark.parametrize("extra,inputs", [([], ["input_ids"]),
                                           (["--past_key_values"], ["input_ids", "past_keys", "past_values"])])
def test_onnx_export_through_the_cli(tmp_path, model_dir, capsys, extra, inputs):
    onnx = pytest.importorskip("onnx", reason="onnx is not installed: pip install onnx onnxruntime")
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(model_dir), "--format", "onnx", "--out", str(out), *extra]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["format"] == "onnx" and printed["inputs"] == inputs
    assert [i.name for i in onnx.load(str(out)).graph.input] == inputs


def test_bad_input_is_one_line_and_status_2(tmp_path, model_dir):
    done = subprocess.run([sys.executable, "-m", "lmstack.cli", "export", "--model", str(model_dir), "--format",
                           "onnx", "--gguf-type", "q4_0", "--out", str(tmp_path / "m.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("lmstack: error: --gguf-type q4_0 applies to --format gguf only; the ONNX export "
                                   "is float32")
    assert not (tmp_path / "m.onnx").exists()
