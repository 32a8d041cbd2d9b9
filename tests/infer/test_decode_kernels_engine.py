"""The engine's steps with the C++ decode kernels (skinny GEMM + decode_ops) equal the same steps through torch's
ops: pure decode steps, mixed steps (prefill chunks beside decode tokens, where the decode attention writes into
its rows of the flat batch), speculative windows, and sliding-window layers."""
import pytest
import torch

from lmstack.infer.model_runner import ModelRunner
from lmstack.infer.sampling_params import SamplingParams
from lmstack.infer.sequence import Request
from lmstack.infer.step_plan import StepPlan
from lmstack.kernels import build, decode_ops

from infer_helpers import tiny_model


def _seq(n, table):
    s = Request("r", None, list(range(5, 5 + n)), SamplingParams()).seqs[0]
    s.block_table = table
    return s


BATCHES = {
    "decode": [(_seq(9, [14, 15, 16]), [3], 8), (_seq(13, [4, 5, 6, 8]), [7], 12), (_seq(2, [9]), [1], 1)],
    "mixed": [(_seq(20, [7, 3, 9, 1, 2]), list(range(20, 40)), 0), (_seq(9, [14, 15, 16]), [3], 8),
              (_seq(13, [4, 5, 6, 8]), [7], 12)],
    "window": [(_seq(9, [14, 15, 16]), [3, 4, 5], 6), (_seq(13, [4, 5, 6, 8]), [7], 12)],
}


@pytest.mark.parametrize("kind", list(BATCHES))
@pytest.mark.parametrize("sliding", [0, 5])
def test_kernel_steps_equal_torch_steps(kind, sliding, monkeypatch):
    if build.extension() is None:
        pytest.skip(f"kernels not buildable here: {build.info()['error']}")
    torch.manual_seed(0)
    model = tiny_model(300, seed=3, n_kv_heads=2, sliding_window=sliding, fused_projections=True)
    batch = BATCHES[kind]
    rows = list(range(sum(len(t) for _, t, _ in batch)))
    calls = []
    real = decode_ops.paged_decode_attention
    monkeypatch.setattr(decode_ops, "paged_decode_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    got = {}
    for on in (False, True):
        runner = ModelRunner(model, num_blocks=48, block_size=4)
        torch.manual_seed(1)  # the same pool contents before the step: earlier positions' K/V
        runner.cache.k.normal_()
        runner.cache.v.normal_()
        runner.kernels = on
        got[on] = runner.run(StepPlan.of(batch, rows))
    # the decode attention kernel ran once per layer for the decode rows (never with kernels off); a 3-token
    # speculative window takes the SDPA path
    n_decode = sum(len(t) == 1 for _, t, _ in batch)
    want = [] if kind == "window" else [torch.Size([n_decode, 4, 16])] * model.config.n_layers
    assert calls == want
    assert got[True].shape == got[False].shape
    assert torch.allclose(got[True], got[False], atol=2e-5, rtol=1e-4), (got[True] - got[False]).abs().max()
