"""Beam search against brute force on a 6-token vocabulary."""
import itertools

import pytest
import torch

from lmstack.infer import LLM, SamplingParams

from infer_helpers import tiny_model


@torch.no_grad()
def seq_logprob(model, prompt, toks):
    logits = model(torch.tensor([prompt + toks]))[0, len(prompt) - 1:-1].log_softmax(-1)
    return logits.gather(-1, torch.tensor(toks)[:, None]).sum().item()


def test_exhaustive_beam_equals_brute_force_argmax():
    model = tiny_model(6, seed=3)
    prompt = [1, 2, 3]
    llm = LLM(model, block_size=2, num_blocks=256)
    out = llm.generate([prompt], SamplingParams(use_beam_search=True, beam_width=36, n=3, max_tokens=3))[0]
    every = sorted(((seq_logprob(model, prompt, list(t)), list(t)) for t in itertools.product(range(6), repeat=3)),
                   reverse=True)
    assert [c.token_ids for c in out.outputs] == [t for _, t in every[:3]]
    for c, (lp, _) in zip(out.outputs, every):
        assert c.cumulative_logprob == pytest.approx(lp, abs=1e-4)
    assert llm.engine.bm.num_free_blocks == 256


@torch.no_grad()
def reference_beam(model, prompt, width, max_tokens, eos, penalty, n):
    """The same algorithm, written plainly: full forward passes, no cache, lists of tokens."""
    beams, finished = [([], 0.0)], []
    score = lambda t, c: c / len(t) ** penalty
    for step in range(max_tokens):
        cands = []
        for toks, cum in beams:
            lp = model(torch.tensor([prompt + toks]))[0, -1].log_softmax(-1)
            v, i = lp.topk(min(2 * width, lp.shape[-1]))
            cands += [(cum + a, toks, b) for a, b in zip(v.tolist(), i.tolist())]
        cands.sort(key=lambda c: c[0], reverse=True)
        beams = []
        for rank, (c, toks, t) in enumerate(cands):
            if t == eos:
                if rank < width:
                    finished.append((toks + [t], c))
                continue
            beams.append((toks + [t], c))
            if len(beams) == width:
                break
        if step == max_tokens - 1:
            finished += beams
        if len(finished) >= width:
            break
    return sorted(finished, key=lambda f: score(*f), reverse=True)[:n]


@pytest.mark.parametrize("width,penalty", [(2, 1.0), (3, 0.0), (4, 2.0)])
def test_beam_search_with_eos_and_length_penalty_matches_reference(width, penalty):
    model = tiny_model(6, seed=5, eos_token_id=0)
    prompt = [3, 4, 5, 1]
    llm = LLM(model, block_size=2, num_blocks=128)
    params = SamplingParams(use_beam_search=True, beam_width=width, n=width, max_tokens=6, length_penalty=penalty)
    got = llm.generate([prompt], params)[0].outputs
    want = reference_beam(model, prompt, width, 6, 0, penalty, width)
    assert [c.token_ids for c in got] == [t for t, _ in want]
    assert [c.cumulative_logprob for c in got] == pytest.approx([c for _, c in want], abs=1e-4)
    assert any(c.finish_reason == "stop" for c in got) or all(len(c.token_ids) == 6 for c in got)
    assert llm.engine.bm.num_free_blocks == 128
