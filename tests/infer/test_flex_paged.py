"""attention_backend='flex': the paged short-chunk attention through flex_attention's score_mod equals SDPA with
its materialised mask (eager flex_attention on this CPU; compiled on a GPU: benchmarks/cuda_check.py)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from infer_helpers import random_prompts, tiny_model
from lmstack.errors import LmstackError
from lmstack.infer.engine import LLMEngine
from lmstack.infer.flex_paged import flex_short
from lmstack.infer.sampling_params import SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # eager flex_attention warns it is unfused


@pytest.mark.parametrize("window", [0, 5])
def test_flex_short_equals_sdpa_with_the_mask(window):
    g = torch.Generator().manual_seed(0)
    b, hkv, group, tq, length, d = 3, 2, 3, 2, 24, 16
    qs = torch.randn(b, hkv, group * tq, d, generator=g)
    k, v = torch.randn(b, hkv, length, d, generator=g), torch.randn(b, hkv, length, d, generator=g)
    q_pos = torch.tensor([[5, 6], [20, 23], [10, 10]])  # rows of different lengths; the last padded
    k_pos = torch.arange(length)
    visible = k_pos[None, None, :] <= q_pos[:, :, None]
    if window:
        visible &= k_pos[None, None, :] > q_pos[:, :, None] - window
    want = F.scaled_dot_product_attention(qs, k, v, attn_mask=visible.repeat(1, group, 1)[:, None], scale=0.3)
    torch.testing.assert_close(flex_short(qs, k, v, q_pos, window, 0.3), want, rtol=1e-5, atol=1e-5)


def test_engine_with_flex_equals_sdpa():
    model = tiny_model(300)
    prompts = random_prompts(4, 3, 20, 300, seed=5)
    outs = []
    for backend in ("sdpa", "flex"):
        eng = LLMEngine(model, max_num_seqs=4, block_size=4, num_blocks=64, attention_backend=backend)
        assert eng.runner.cache.attention_backend == backend
        for i, p in enumerate(prompts):
            eng.add_request(f"r{i}", p, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            done = eng.run_to_completion()
        outs.append({o.request_id: (o.outputs[0].token_ids, o.outputs[0].cumulative_logprob) for o in done})
    for rid, (tokens, logprob) in outs[0].items():
        assert outs[1][rid][0] == tokens
        assert outs[1][rid][1] == pytest.approx(logprob, abs=1e-4)


def test_unknown_backend_is_refused_by_name():
    with pytest.raises(LmstackError, match="attention_backend must be 'sdpa' or 'flex', got 'triton'"):
        LLMEngine(tiny_model(300), block_size=4, num_blocks=16, attention_backend="triton")
