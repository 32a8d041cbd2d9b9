"""Model-level GPTQ (gptq_model.py): one pass is gptq_quantize per block Linear and leaves the model alone; the
sequential variant quantizes block by block on the already quantized model and writes the weights back."""
from __future__ import annotations

import copy

import pytest
import torch

from lmstack.compress.calibration import block_linears, collect_stats
from lmstack.compress.gptq import gptq_quantize
from lmstack.compress.gptq_model import gptq_model
from lmstack.compress.quantize_rtn import dequantize
from lmstack.errors import LmstackError
from lmstack.model import Transformer
from lmstack.model.presets import preset

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("llama-tiny", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              max_seq_len=64, init_std=0.2, **kw)).eval()


@pytest.mark.parametrize("act_order", [False, True])
def test_one_pass_is_gptq_per_linear_and_leaves_the_model_alone(act_order):
    model = tiny()
    before = copy.deepcopy(model.state_dict())
    stats = collect_stats(model, CALIB)
    codes = gptq_model(model, stats, bits=4, group_size=16, act_order=act_order)
    linears = block_linears(model)
    assert set(codes) == set(linears) and len(codes) == 14
    for name, lin in linears.items():
        expect = gptq_quantize(lin.weight, stats[name].hessian, 4, 16, act_order=act_order)
        assert torch.equal(codes[name].codes, expect.codes), name
        assert (codes[name].perm is not None) == act_order
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sequential_writes_back_and_matches_one_pass_on_the_first_block():
    model = tiny()
    one_pass = gptq_model(model, collect_stats(model, CALIB), bits=4, group_size=16)
    seq_model = copy.deepcopy(model)
    seq = gptq_model(seq_model, None, bits=4, group_size=16, sequential=True, calib=CALIB)
    for name, lin in block_linears(seq_model).items():
        assert torch.equal(lin.weight, dequantize(seq[name])), name
        # block 0 sees the same inputs either way; block 1 sees block 0's quantized outputs
        same = torch.equal(seq[name].codes, one_pass[name].codes)
        assert same == name.startswith("blocks.0."), name


def test_bad_calls():
    model = tiny()
    with pytest.raises(LmstackError, match="needs calibration statistics"):
        gptq_model(model, None, group_size=16)
    with pytest.raises(LmstackError, match="give calib"):
        gptq_model(model, None, group_size=16, sequential=True)
    with pytest.raises(LmstackError, match="group size 24 does not divide in_features 32"):
        gptq_model(model, None, group_size=24, sequential=True, calib=CALIB)
    stats = collect_stats(model, CALIB)
    del stats["blocks.0.attn.o_proj"]
    with pytest.raises(LmstackError, match="no calibration statistics for blocks.0.attn.o_proj"):
        gptq_model(model, stats, group_size=16)
