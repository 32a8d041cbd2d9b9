"""Quantized directories (compress/qformat.py): every format round-trips exactly through save_quantized and
load_model, transformers + compressed-tensors decompress our files to the weights we compute with, and what this
version cannot read is refused with a message naming it."""
import copy
import json

import pytest
import torch

import lmstack
from lmstack.compress.calibration import block_linears
from lmstack.compress.gptq import gptq_quantize
from lmstack.compress.qformat import save_quantized
from lmstack.compress.qlinear import QuantEmbedding, QuantLinear, quantize_head, quantize_linears, replace_module
from lmstack.compress.quant_storage import QuantizedLinear, quantize_model
from lmstack.compress.quantize_rtn import quantize_rtn
from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def base_model(hf_model_type="llama", **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, max_seq_len=32, hf_model_type=hf_model_type,
                      **kw)
    return Transformer(cfg).eval()


def _with_type(hf_type: str) -> Transformer:
    return base_model(hf_type, qkv_bias=True, tie_embeddings=False)


def quantized(kind: str, model: Transformer) -> Transformer:
    m = copy.deepcopy(model)
    if kind == "int4":
        quantize_linears(m, 4, 32)
    elif kind == "int4_sym":
        quantize_linears(m, 4, 16, symmetric=True)
    elif kind == "int8":
        quantize_linears(m, 8, None)
    elif kind == "int8_g32":
        quantize_linears(m, 8, 32)
    elif kind in ("fp8_e4m3", "fp8_e5m2"):
        quantize_linears(m, fmt=kind)
    elif kind == "w8a8":
        for n, lin in block_linears(m).items():
            replace_module(m, n, QuantLinear.from_weight(quantize_rtn(lin.weight, 8, None, True), lin.bias, "w8a8"))
    elif kind == "gptq_act_order":
        g = torch.Generator().manual_seed(1)
        for n, lin in block_linears(m).items():
            x = torch.randn(128, lin.in_features, generator=g) * torch.linspace(0.1, 3, lin.in_features)
            qw = gptq_quantize(lin.weight.detach(), 2 * x.T @ x / 128, 4, 16, act_order=True)
            assert qw.perm is not None and not torch.equal(qw.perm, torch.arange(lin.in_features))
            replace_module(m, n, QuantLinear.from_weight(qw, lin.bias, method="gptq"))
    elif kind == "nf4":
        quantize_model(m, "nf4")
    return m


KINDS = ["int4", "int4_sym", "int8", "int8_g32", "fp8_e4m3", "fp8_e5m2", "w8a8", "gptq_act_order", "nf4"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_round_trips_exactly(tmp_path, kind):
    m = quantized(kind, base_model())
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = m(ids)
    save_quantized(m, tmp_path / kind, method=kind)
    loaded = lmstack.load_model(tmp_path / kind)
    layer = loaded.blocks[0].attn.q_proj
    assert isinstance(layer, QuantizedLinear if kind == "nf4" else QuantLinear)
    assert not any(isinstance(x, torch.nn.Linear) for x in block_linears(loaded).values())
    with torch.no_grad():
        out = loaded(ids)
    # act-order gathers x's columns instead of permuting the weight: the same products, summed in another order
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 if kind == "gptq_act_order" else 0)


@pytest.mark.parametrize("hf_type", ["qwen2", "llama"])  # llama cannot say qkv_bias: lmstack's own naming
def test_bias_and_untied_head_round_trip(tmp_path, hf_type):
    m = quantized("int4", _with_type(hf_type))
    ids = torch.randint(0, 96, (1, 10))
    save_quantized(m, tmp_path / "q")
    names = json.loads((tmp_path / "q" / "config.json").read_text())
    assert names["model_type"] == ("qwen2" if hf_type == "qwen2" else "lmstack")
    loaded = lmstack.load_model(tmp_path / "q")
    assert loaded.blocks[1].attn.k_proj.bias is not None
    assert isinstance(loaded.lm_head, torch.nn.Linear)  # the head stays full precision
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), m(ids), rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", ["int8", "int4", "gptq_act_order"])
def test_an_int8_head_round_trips_and_a_tied_embedding_is_stored_once(tmp_path, kind, tied):
    from safetensors import safe_open
    m = quantized(kind, base_model(tie_embeddings=tied))
    head = quantize_head(m)
    assert head.fmt == "int8" and head.group_size == 64 and tuple(head.scales.shape) == (96, 1)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = m(ids)
    save_quantized(m, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        stored = f.get_tensor("model.embed_tokens.weight")
    assert stored.dtype == torch.int8  # tied: the head's codes, stored once; untied: the embedding's own
    assert ("lm_head.weight" in keys) != tied and "lm_head.codes" not in keys
    group = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]["group_1"]
    assert group["targets"] == (["model.embed_tokens"] if tied else ["lm_head", "model.embed_tokens"])
    loaded = lmstack.load_model(tmp_path / "q")
    assert isinstance(loaded.lm_head, QuantLinear)
    assert isinstance(loaded.tok_emb, QuantEmbedding)
    if tied:  # the embedding gathers rows of the head's own codes: one copy in memory
        assert loaded.tok_emb.codes.data_ptr() == loaded.lm_head.codes.data_ptr()
        torch.testing.assert_close(loaded.tok_emb.weight, loaded.lm_head.weight_fp32(), rtol=0, atol=0)
    else:
        w = base_model(tie_embeddings=False).tok_emb.weight
        assert (loaded.tok_emb.weight - w).abs().max() <= w.abs().amax(1).max() / 254 + 1e-7  # half a step
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), ref, rtol=0, atol=1e-5 if kind == "gptq_act_order" else 0)
    with pytest.raises(LmstackError, match="already quantized"):
        quantize_head(loaded)


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_reads_an_int8_model_with_its_int8_head(tmp_path, tied):
    pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors")
    transformers = pytest.importorskip("transformers")
    m = quantized("int8", base_model(tie_embeddings=tied))
    quantize_head(m)
    save_quantized(m, tmp_path / "q")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "q", quantization_config=transformers.CompressedTensorsConfig(run_compressed=False)).eval()
    torch.testing.assert_close(hf.lm_head.weight.detach().float(), m.lm_head.weight_fp32(), rtol=0, atol=0)
    torch.testing.assert_close(hf.model.embed_tokens.weight.detach().float(), m.tok_emb.weight, rtol=0, atol=0)
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, m(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_mixed_precision_head_group_decompresses_with_compressed_tensors(tmp_path, tied):
    """An int4 body with an int8 head: two groups with their own formats. transformers 5.x loads dense layers
    with the first group's scheme only, so this checks each group against compressed-tensors' own compressor."""
    ct = pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors")
    from compressed_tensors.compressors import BaseCompressor
    from safetensors.torch import load_file
    m = quantized("int4", base_model(tie_embeddings=tied))
    quantize_head(m)
    save_quantized(m, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    head = qc["config_groups"]["group_1"]["targets"]
    for group, base, ours in (("group_0", "model.layers.1.mlp.down_proj", m.blocks[1].mlp.down_proj.weight_fp32()),
                              ("group_1", head[0], m.lm_head.weight_fp32()),
                              ("group_1", head[-1], m.tok_emb.weight)):
        scheme = qc["config_groups"][group]
        assert scheme["format"] == ("pack-quantized" if group == "group_0" else "int-quantized")
        state = {k[len(base) + 1:]: v for k, v in tensors.items() if k.startswith(base + ".")}
        out = BaseCompressor.get_value_from_registry(scheme["format"]).decompress(
            state, ct.quantization.QuantizationScheme.model_validate(scheme))
        torch.testing.assert_close(out["weight"].float(), ours, rtol=0, atol=0)


def test_int4_files_are_a_quarter_of_int8s(tmp_path):
    m = base_model()
    save_quantized(quantized("int8", m), tmp_path / "i8")
    save_quantized(quantized("int4", m), tmp_path / "i4")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "i4" / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.0.self_attn.q_proj.weight_packed")
        zp = f.get_tensor("model.layers.0.self_attn.q_proj.weight_zero_point")
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (64, 8)  # eight codes per int32
    assert zp.dtype == torch.int32 and tuple(zp.shape) == (8, 2)            # zero points packed along O
    cfg = json.loads((tmp_path / "i4" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["config_groups"]["group_0"]["weights"] == {
        "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32,
        "dynamic": False, "actorder": None, "observer": "minmax"}


@pytest.mark.parametrize("kind", ["int4", "int4_sym", "int8", "int8_g32", "fp8_e4m3", "w8a8"])
def test_transformers_with_compressed_tensors_reads_our_weights(tmp_path, kind):
    pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors")
    transformers = pytest.importorskip("transformers")
    m = quantized(kind, base_model())
    save_quantized(m, tmp_path / kind)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / kind, quantization_config=transformers.CompressedTensorsConfig(run_compressed=False)).eval()
    for i in range(2):
        for ours, theirs in ((m.blocks[i].attn.q_proj, hf.model.layers[i].self_attn.q_proj),
                             (m.blocks[i].mlp.down_proj, hf.model.layers[i].mlp.down_proj)):
            torch.testing.assert_close(theirs.weight.detach().float(), ours.weight_fp32(), rtol=0, atol=0)
    if kind != "w8a8":  # w8a8 rounds activations at run time; decompressed transformers runs them in fp32
        ids = torch.randint(0, 96, (1, 12))
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, m(ids), rtol=0, atol=1e-5)


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_formats_are_refused_by_name(tmp_path):
    save_quantized(quantized("int4", base_model()), tmp_path / "q")
    _edit_config(tmp_path / "q", lambda c: c["quantization_config"].update(quant_method="bitsandbytes"))
    with pytest.raises(LmstackError, match="'bitsandbytes'.*cannot load"):
        lmstack.load_model(tmp_path / "q")
    _edit_config(tmp_path / "q", lambda c: c["quantization_config"].update(quant_method="compressed-tensors"))
    _edit_config(tmp_path / "q", lambda c: c["quantization_config"]["lmstack"].update(format_version=7))
    with pytest.raises(LmstackError, match="format version 7 is newer"):
        lmstack.load_model(tmp_path / "q")


def test_a_missing_or_misshapen_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    save_quantized(quantized("int4", base_model()), tmp_path / "q")
    f = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(f))
    scale = tensors.pop("model.layers.1.mlp.up_proj.weight_scale")
    save_file(tensors, str(f))
    with pytest.raises(LmstackError, match="lacks 'model.layers.1.mlp.up_proj.weight_scale'"):
        lmstack.load_model(tmp_path / "q")
    tensors["model.layers.1.mlp.up_proj.weight_scale"] = scale[:, :1].contiguous()
    save_file(tensors, str(f))
    with pytest.raises(LmstackError, match=r"up_proj.weight_scale has shape \(\d+, 1\)"):
        lmstack.load_model(tmp_path / "q")


def test_fused_and_gpt2_models_are_refused(tmp_path):
    torch.manual_seed(0)
    gpt2 = Transformer(ModelConfig(vocab_size=96, d_model=64, n_layers=1, n_heads=4, max_seq_len=32,
                                   hf_model_type="gpt2")).eval()
    quantize_linears(gpt2, 8, None)
    with pytest.raises(LmstackError, match="gpt2.*fuses q/k/v"):
        save_quantized(gpt2, tmp_path / "g")
    with pytest.raises(LmstackError, match="no quantized Linear"):
        save_quantized(base_model(), tmp_path / "n")


@pytest.mark.parametrize("kind", ["int8", "int4", "w8a8", "fp8_e4m3"])
def test_the_engine_fuses_a_loaded_quantized_models_projections(tmp_path, kind):
    """LLM(dir) stacks q/k/v and gate/up QuantLinears by rows (4 quantized matmuls a layer instead of 7), with
    the split model's greedy tokens; act-order layers, whose column orders differ, stay split."""
    m = quantized(kind, base_model())
    quantize_head(m)
    save_quantized(m, tmp_path / "q")
    llm = lmstack.LLM(str(tmp_path / "q"))
    attn, mlp = llm.engine.model.blocks[0].attn, llm.engine.model.blocks[0].mlp
    assert isinstance(attn.qkv_proj, QuantLinear) and attn.q_proj is None
    assert attn.qkv_proj.split_sizes() == [64, 64, 64] and attn.qkv_proj.fmt == m.blocks[0].attn.q_proj.fmt
    assert isinstance(mlp.gate_up_proj, QuantLinear) and mlp.up_proj is None
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(llm.engine.model(ids), m(ids), rtol=0, atol=1e-5)
    params = lmstack.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = ids[0].tolist()
    split = lmstack.LLM(m).generate([prompt], params)[0].outputs[0].token_ids
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == split
    act = lmstack.LLM(quantized("gptq_act_order", base_model()))
    assert act.engine.model.blocks[0].attn.qkv_proj is None  # no fuse: LLM(model) does not own it ...
    from lmstack.model.fused_projections import projections_fusable
    assert not projections_fusable(quantized("gptq_act_order", base_model()))  # ... and its perms differ anyway
