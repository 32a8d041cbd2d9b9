"""PerfTracker: analytic FLOPs against a hand count, token/TTFT deltas, CPU time and phase-peak memory."""
import pytest

from lmstack.eval.perf import PerfTracker, flops_per_token
from lmstack.model.config import ModelConfig


def _tiny_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=100, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, mlp="gelu", d_ff=64,
                       norm="rmsnorm", tie_embeddings=True, max_seq_len=32)


def test_flops_per_token_matches_a_hand_count():
    cfg = _tiny_cfg()
    # Per block: q 16x16 + k 16x8 + v 16x8 + o 16x16 = 768, MLP 16x64 + 64x16 = 2048, two RMSNorm gains 32.
    block = 768 + 2048 + 32
    head = 100 * 16            # tied, but the output matmul still runs for every token
    attention = 2 * 2 * 2 * 10 * 16   # QK^T and AV, 2 layers, context 10, 2 heads x head_dim 8
    assert flops_per_token(cfg, 10) == 2 * (2 * block + head) + attention
    # Attention cost grows linearly with the context, everything else does not.
    assert flops_per_token(cfg, 20) - flops_per_token(cfg, 10) == 2 * 2 * 2 * 10 * 16


class _CountingLM:
    def __init__(self, config=None):
        self.config = config
        self.stats = {"prompt_tokens": 5, "generated_tokens": 1, "requests": 1, "ttft_s": [9.0]}

    def work(self, prompt: int, generated: int, ttft: float):
        self.stats["prompt_tokens"] += prompt
        self.stats["generated_tokens"] += generated
        self.stats["requests"] += 1
        self.stats["ttft_s"].append(ttft)


def test_summary_counts_only_what_happened_inside_the_block():
    lm = _CountingLM(_tiny_cfg())
    with PerfTracker(lm, joules_per_flop=2e-9) as perf:
        lm.work(30, 10, 0.2)
        lm.work(10, 10, 0.4)
        sum(i * i for i in range(200_000))  # some CPU work
    s = perf.summary(n_queries=2)
    assert (s["prompt_tokens"], s["generated_tokens"], s["requests"]) == (40, 20, 2)
    assert s["ttft_s"] == pytest.approx(0.3)
    assert s["cpu_s"] > 0 and s["wall_s"] > 0 and s["tokens_per_s"] == pytest.approx(60 / s["wall_s"], rel=1e-2)
    # 60 tokens over 2 requests: 30 per request, a causal token attends to 15 on average.
    assert s["flops_per_token"] == flops_per_token(lm.config, 15)
    assert s["total_flops"] == pytest.approx(60 * s["flops_per_token"])
    assert s["flops_per_query"] == pytest.approx(s["total_flops"] / 2)
    assert s["energy_j"] == pytest.approx(s["total_flops"] * 2e-9)


def test_remote_lm_has_no_flops_and_summary_needs_a_finished_block():
    lm = _CountingLM(config=None)
    perf = PerfTracker(lm)
    with pytest.raises(RuntimeError):
        perf.summary(1)
    with perf:
        lm.work(3, 0, 0.1)
    s = perf.summary(1)
    assert s["total_flops"] is None and s["energy_j"] is None and s["prompt_tokens"] == 3
    with pytest.raises(ValueError, match="joules_per_flop"):
        PerfTracker(lm, joules_per_flop=-1)


def test_peak_memory_is_per_phase_and_nested_trackers_keep_their_peaks():
    with PerfTracker(None) as outer:
        with PerfTracker(None) as inner:
            block = bytearray(80 * 2**20)
            block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
            del block
        with PerfTracker(None) as later:
            pass
    big, small = inner.summary(0), later.summary(0)
    if big["peak_mem_scope"] != "phase":
        pytest.skip("this kernel does not let us reset the peak-RSS mark")
    assert big["peak_mem_mb"] - small["peak_mem_mb"] > 60
    assert outer.summary(0)["peak_mem_mb"] >= big["peak_mem_mb"]
