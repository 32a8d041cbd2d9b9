"""The Sampler's device path (one read-back per step), run on CPU tensors: it is the code a GPU runs, so here it
must give exactly the CPU path's tokens and logprobs, read nothing back before its one transfer, and still
name a row that has no token left. (On a GPU: benchmarks/cuda_check.py, device_sampling.)"""
import pytest
import torch

from lmstack.infer import SamplingParams
from lmstack.infer import logits_processors as lp
from lmstack.infer.sampler import Sampler, seeded_generator
from lmstack.infer.sequence import Request

PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.8, seed=7, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.2),
    SamplingParams(temperature=1.2, top_k=20, min_p=0.05),
    SamplingParams(temperature=0.7, seed=11, top_k=5, repetition_penalty=1.2, logit_bias={3: 5.0}),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=[9]),
]


def _seqs(params=PARAMS):
    seqs = []
    for i, p in enumerate(params):
        seq = Request(f"r{i}", None, [1, 2, 3, 4 + i], p).seqs[0]
        seq.output_ids.extend([5, 6, 5, 30 + i])  # something for the penalties to count
        seq.generator = seeded_generator(p.seed, 0)  # as the request builder does (None without a seed)
        seqs.append(seq)
    return seqs


def _logits(rows=len(PARAMS), seed=0):
    return torch.randn(rows, 64, generator=torch.Generator().manual_seed(seed)) * 3


def test_device_path_equals_the_cpu_path_token_for_token():
    for trial in range(20):
        logits = _logits(seed=trial)
        cpu = Sampler(seed=trial)
        dev = Sampler(seed=trial, device="cpu")
        dev.single_transfer = True
        assert not cpu.single_transfer and dev.generator.device.type == "cpu"
        seqs_a, seqs_b = _seqs(), _seqs()
        tok_a, lp_a = cpu.sample(seqs_a, logits)
        tok_b, lp_b = dev.sample(seqs_b, logits)
        assert tok_a == tok_b
        idx = torch.tensor(tok_a)[:, None]
        torch.testing.assert_close(lp_b.gather(1, idx), lp_a.gather(1, idx))  # the chosen tokens' logprobs


def test_device_path_returns_whole_logprob_rows_only_when_asked():
    logits = _logits()
    s = Sampler(seed=0)
    s.single_transfer = True
    seqs = _seqs()
    _, rows = s.sample(seqs, logits)
    assert rows.stride(1) == 0  # not asked: the chosen logprob alone, no vocab-sized copy
    seqs = _seqs()
    seqs[3].logprobs = []
    _, rows = s.sample(seqs, logits)
    torch.testing.assert_close(rows, logits.log_softmax(dim=-1))


def test_device_path_reads_nothing_back_before_its_one_transfer(monkeypatch):
    reads, transferred = [], []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            if not transferred:
                reads.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    orig_cpu = torch.Tensor.cpu

    def cpu(self, *a, **k):
        transferred.append(tuple(self.shape))
        return orig_cpu(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    s = Sampler(seed=0)
    s.single_transfer = True
    tokens, _ = s.sample(_seqs(), _logits())
    assert reads == [] and transferred == [(3, len(PARAMS))]  # tokens, dead flags, chosen logprobs: one copy
    assert len(tokens) == len(PARAMS)


def test_device_path_names_a_row_with_no_token_left():
    logits = _logits(3)
    logits[1] = float("-inf")
    s = Sampler(seed=0)
    s.single_transfer = True
    with pytest.raises(lp.NoTokenAllowed, match="row 1"):
        s.sample(_seqs([SamplingParams(temperature=1.0)] * 3), logits)
