"""`lmstack quantize`: every method writes a directory that lmstack.LLM, generate and eval open; bad input gets a
clear error and leaves the input directory byte for byte as it was."""
import hashlib
import json

import pytest
import torch

import lmstack
from lmstack.cli import main, run
from lmstack.compress.qlinear import QuantLinear
from lmstack.compress.quantize_cli import quantize
from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.hf_io import save_model
from lmstack.model.transformer import Transformer
from lmstack.tokenizer.train import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "the cat sat on the mat and the dog ran to the park. " * 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_tokenizer(texts=[TEXT], type="bpe", vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=64,
                      hf_model_type="llama")
    root = tmp_path_factory.mktemp("quantize")
    (root / "calib.txt").write_text(TEXT * 10)
    return save_model(Transformer(cfg).eval(), root / "m", tokenizer=tok)


def digest(path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_help_lists_the_methods(capsys):
    with pytest.raises(SystemExit) as info:
        run(["quantize", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--out", "--method", "--group_size", "--calib", "--act_order", "gptq", "smoothquant"):
        assert flag in out, flag


@pytest.mark.parametrize("method", ["int8", "int4", "nf4", "fp8", "gptq", "awq", "smoothquant"])
def test_each_method_makes_a_directory_the_engine_runs(tmp_path, model_dir, capsys, method):
    before = digest(model_dir)
    args = ["quantize", "--model", str(model_dir), "--method", method, "--out", str(tmp_path / method)]
    if method in ("int4", "gptq", "awq"):
        args += ["--group-size", "32"]
    if method in ("gptq", "awq", "smoothquant"):
        args += ["--calib", str(model_dir.parent / "calib.txt"), "--calib-samples", "8"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["linears"] == 14 and printed["method"] == method
    q_head = lmstack.load_model(tmp_path / method).lm_head
    if method == "nf4":  # QLoRA's storage: the head stays float
        assert printed["head"] == "fp32" and printed["head_bytes"] is None and isinstance(q_head, torch.nn.Linear)
    else:  # int8 codes with one scale per vocab row: a quarter of the fp32 head, plus 4 bytes a row
        assert printed["head"] == "int8" and isinstance(q_head, QuantLinear) and q_head.fmt == "int8"
        assert printed["head_bytes"] == q_head.out_features * (q_head.in_features + 4)
    bits = {"int4": 4, "gptq": 4, "awq": 4, "nf4": 4}.get(method, 8)
    assert bits < printed["bits_per_weight"] < bits + 1.5, printed  # codes plus their scales
    assert digest(model_dir) == before
    assert (tmp_path / method / "tokenizer.json").is_file()
    # The quantized model and the float one, teacher-forced on the same text: close, not equal.
    ids = torch.tensor([lmstack.load_tokenizer(model_dir).encode(TEXT)[:48]])
    with torch.no_grad():
        ref = lmstack.load_model(model_dir)(ids).log_softmax(-1)
        q = lmstack.load_model(tmp_path / method)
        got = q(ids).log_softmax(-1)
    assert not torch.equal(got, ref)
    assert (got.exp() - ref.exp()).abs().sum(-1).max() < 0.5  # total variation of the next-token distributions
    llm = lmstack.LLM(str(tmp_path / method))
    out = llm.generate(["the cat"], lmstack.SamplingParams(max_tokens=6, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 6


def test_head_flag_keeps_or_quantizes_the_head(tmp_path, model_dir):
    quantize(str(model_dir), str(tmp_path / "keep"), "int4", 32, head="fp32")
    kept = lmstack.load_model(tmp_path / "keep")
    assert type(kept.lm_head) is not QuantLinear
    torch.testing.assert_close(kept.lm_head.weight, lmstack.load_model(model_dir).lm_head.weight, rtol=0, atol=0)
    cfg = json.loads((tmp_path / "keep" / "config.json").read_text())["quantization_config"]
    assert cfg["ignore"] == ["lm_head"] and list(cfg["config_groups"]) == ["group_0"]
    quantize(str(model_dir), str(tmp_path / "q"), "int4", 32)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "mixed-precision" and cfg["ignore"] == []
    assert cfg["config_groups"]["group_1"]["targets"] == ["lm_head", "model.embed_tokens"]
    assert cfg["config_groups"]["group_1"]["format"] == "int-quantized"
    with pytest.raises(LmstackError, match="nf4 keeps the LM head in float"):
        quantize(str(model_dir), str(tmp_path / "x"), "nf4", head="int8")
    with pytest.raises(LmstackError, match="unknown --head 'int4'"):
        quantize(str(model_dir), str(tmp_path / "x"), "int8", head="int4")
    assert not (tmp_path / "x").exists()


def test_gptq_act_order_is_stored_without_a_permutation(tmp_path, model_dir):
    calib = str(model_dir.parent / "calib.txt")
    quantize(str(model_dir), str(tmp_path / "g"), "gptq", 32, calib, 8, act_order=True)
    quantize(str(model_dir), str(tmp_path / "p"), "int4", 32)
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
    layer = lmstack.load_model(tmp_path / "g").blocks[0].mlp.down_proj
    plain = lmstack.load_model(tmp_path / "p").blocks[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.perm is None
    assert torch.equal(layer.scales, plain.scales)  # static groups: the weight's own groups, RTN's parameters
    assert not torch.equal(layer.codes, plain.codes)  # ... and GPTQ's error feedback


def test_bad_input_is_refused_and_the_input_untouched(tmp_path, model_dir):
    before = digest(model_dir)
    calib = str(model_dir.parent / "calib.txt")
    quantize(str(model_dir), str(tmp_path / "q8"), "int8")
    with pytest.raises(LmstackError, match="already quantized"):
        quantize(str(tmp_path / "q8"), str(tmp_path / "again"), "int4", 32)
    with pytest.raises(LmstackError, match="group size 48 does not divide in_features 64"):
        quantize(str(model_dir), str(tmp_path / "x"), "int4", 48)
    with pytest.raises(LmstackError, match="needs calibration text: pass --calib"):
        quantize(str(model_dir), str(tmp_path / "x"), "gptq", 32)
    with pytest.raises(LmstackError, match="calibration data too short"):
        quantize(str(model_dir), str(tmp_path / "x"), "gptq", 32, calib, 10_000)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(LmstackError, match="holds no text"):
        quantize(str(model_dir), str(tmp_path / "x"), "awq", 32, str(tmp_path / "empty.jsonl"), 8)
    with pytest.raises(LmstackError, match="inside it"):
        quantize(str(model_dir), str(model_dir / "q"), "int8")
    with pytest.raises(LmstackError, match="does not apply to --method nf4"):
        quantize(str(model_dir), str(tmp_path / "x"), "nf4", 64)
    with pytest.raises(LmstackError, match="unknown --method 'int3'"):
        quantize(str(model_dir), str(tmp_path / "x"), "int3")
    from lmstack.compress.export import export
    with pytest.raises(LmstackError, match="is a quantized directory .int8.; export the full-precision model"):
        export(str(tmp_path / "q8"), str(tmp_path / "q8.gguf"), "gguf", "q8_0")
    assert digest(model_dir) == before
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def test_the_generate_command_opens_a_quantized_directory(tmp_path, model_dir, capsys):
    quantize(str(model_dir), str(tmp_path / "q4"), "int4", 32)
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "q4"), "--prompt", "the cat", "--max_tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_tensor_parallel_refuses_a_quantized_directory_by_name(tmp_path, model_dir):
    quantize(str(model_dir), str(tmp_path / "q4"), "int4", 32)
    with pytest.raises(LmstackError, match="qkv_proj is a QuantLinear holding packed codes"):
        lmstack.LLM(str(tmp_path / "q4"), tensor_parallel_size=2)
