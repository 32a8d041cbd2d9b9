"""Checks shared by the per-family parity tests (test_hf_parity_gemma2.py, test_hf_parity_phi3.py).

Each takes an HF model built by transformers (tiny, random, jittered) and asserts one claim within 1e-4 on
CPU fp32: an HF directory loads into lmstack with HF's logits; lmstack's model exports back to a directory
transformers loads with the same logits; greedy decoding through our engine equals transformers' generate;
the paged engine (chunked prefill, batched short chunks, single-token decode, scattered blocks) gives the
full forward's logits at every position.

Usage (from a test in tests/model):
    from family_parity import jitter, check_load_and_export, check_greedy_matches_hf, check_paged_logits
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmstack
from lmstack.infer import LLM, SamplingParams
from lmstack.infer.model_runner import ModelRunner
from lmstack.infer.sequence import Sequence

T = pytest.importorskip("transformers")
TOL = 1e-4


def jitter(model: torch.nn.Module, scale: float = 0.1, seed: int = 1) -> torch.nn.Module:
    """Perturb every weight, norms included: HF inits Gemma's (1 + w) norms to w = 0 and Llama's to 1, values
    that would hide a norm applied the wrong way."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def check_load_and_export(hf, tmp: Path, x: torch.Tensor):
    """HF dir -> lmstack (logits equal HF's) -> export -> transformers (logits equal ours). Returns our model."""
    hf.save_pretrained(tmp / "hf")
    ours = lmstack.load_model(tmp / "hf")
    with torch.no_grad():
        ref, out = hf(x).logits, ours(x)
    assert (out - ref).abs().max().item() < TOL, (out - ref).abs().max().item()
    lmstack.save_model(ours, tmp / "ours")
    back = T.AutoModelForCausalLM.from_pretrained(tmp / "ours").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        assert (back(x).logits - out).abs().max().item() < TOL
    return ours


def check_export_of_ours(model, tmp: Path, x: torch.Tensor, hf_class) -> None:
    """An lmstack-built model (a preset) exports to a directory transformers loads with the same logits."""
    lmstack.save_model(model, tmp)
    back = T.AutoModelForCausalLM.from_pretrained(tmp).eval()
    assert type(back) is hf_class
    with torch.no_grad():
        assert (back(x).logits - model(x)).abs().max().item() < TOL


def check_greedy_matches_hf(hf, ours, prompt: list[int], n: int = 16) -> list[int]:
    """Greedy tokens of our engine (paged KV cache) equal transformers' generate (its own KV cache)."""
    hf.generation_config.eos_token_id = None  # run all n steps, as ignore_eos does (min_new_tokens would mask EOS)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert len(theirs) == n
    llm = LLM(ours, block_size=4, num_blocks=64, max_batched_tokens=8)  # prefill crosses chunks and windows
    got = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]
    assert got.outputs[0].token_ids == theirs
    return theirs


def check_paged_logits(ours, ids: list[int], ref: torch.Tensor) -> None:
    """ModelRunner logits at every position equal `ref` (T, vocab): a long prefill chunk, a short chunk that
    extends it (batched-attention path), then one token at a time, on blocks laid out out of order."""
    block = 4
    runner = ModelRunner(ours, num_blocks=32, block_size=block)
    seq = Sequence(None, 0, ids, len(ids))
    n_blocks = -(-len(ids) // block)
    seq.block_table = list(range(n_blocks))[::-1]  # scattered: every gather goes through the block table
    steps, start = [20, 6] + [1] * (len(ids) - 26), 0
    got = []
    for n in steps:
        chunk = ids[start:start + n]
        got.append(runner.run([(seq, chunk, start)], list(range(n))))
        start += n
    got = torch.cat(got)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < TOL, (got - ref).abs().max().item()
