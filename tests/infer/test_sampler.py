"""The Sampler and its batched processors: batching changes no row, seeded rows depend on their seed alone.

- The batched repetition and frequency/presence penalties give, row for row, what the one-row-at-a-time
  rules give (CTRL's divide/multiply over prompt + output; OpenAI's count and presence over the output).
- A seeded row draws the same token whatever else is in the batch; unseeded rows draw together.
- Sampler.sample takes the greedy fast path, and its log-probabilities are the raw rows' log-softmax.
- Unseeded rows, drawn together by inverting their CDFs, follow their distribution and never draw a banned token.
"""
import torch

from lmstack.infer import SamplingParams
from lmstack.infer import logits_processors as lp
from lmstack.infer.sampler import Sampler, seeded_generator
from lmstack.infer.sequence import Request


def _row(params, prompt, out, generator=None):
    return lp.SamplingRow(params, prompt, out, generator)


def _one_row_rep(x: torch.Tensor, penalty: float, seen: list[int]) -> torch.Tensor:
    x = x.clone()
    idx = torch.tensor(sorted(set(seen)), dtype=torch.long)
    v = x[idx]
    x[idx] = torch.where(v > 0, v / penalty, v * penalty)
    return x


def _one_row_freq(x: torch.Tensor, f: float, p: float, out: list[int]) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=x.shape[-1]).float()
    return x - f * counts - p * (counts > 0).float()


def test_batched_penalties_equal_the_one_row_rules():
    torch.manual_seed(0)
    vocab = 40
    logits = torch.randn(5, vocab) * 3
    rows = [
        _row(SamplingParams(repetition_penalty=1.7, frequency_penalty=0.5, presence_penalty=0.25), [1, 2, 3],
             [3, 3, 9]),
        _row(SamplingParams(), [4, 5], [6]),  # untouched
        _row(SamplingParams(repetition_penalty=0.6), [7], [7, 8, 8, 8, 39]),
        _row(SamplingParams(frequency_penalty=-1.0), [0], []),  # no output yet: nothing to count
        _row(SamplingParams(presence_penalty=1.5, repetition_penalty=1.2), [10, 11, 12, 13, 14, 15], [11, 30]),
    ]
    got = lp.frequency_presence(lp.repetition_penalty(logits.clone(), rows), rows)
    for i, r in enumerate(rows):
        want = logits[i]
        if r.params.repetition_penalty != 1.0:
            want = _one_row_rep(want, r.params.repetition_penalty, r.prompt_ids + r.output_ids)
        if r.output_ids and (r.params.frequency_penalty or r.params.presence_penalty):
            want = _one_row_freq(want, r.params.frequency_penalty, r.params.presence_penalty, r.output_ids)
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-6)
    assert torch.equal(got[1], logits[1]) and torch.equal(got[3], logits[3])


def test_a_seeded_row_draws_the_same_token_whatever_shares_its_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 64)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=123)
    alone = [lp.sample(lp.process(logits[:1], [_row(seeded, [1], [], seeded_generator(123, 0))]),
                       [_row(seeded, [1], [], seeded_generator(123, 0))])[0] for _ in range(3)]
    assert len(set(alone)) == 1
    others = [SamplingParams(temperature=0.7), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.3, top_k=5)]
    rows = [_row(seeded, [1], [], seeded_generator(123, 0))] + [_row(p, [1], []) for p in others]
    tokens = lp.sample(lp.process(logits, rows), rows, torch.Generator().manual_seed(9))
    assert tokens[0] == alone[0]
    assert tokens[2] == int(logits[2].argmax())  # the greedy row
    # the unseeded rows draw from the default generator: the same generator state gives the same tokens
    again = lp.sample(lp.process(logits, rows[:1] + rows[1:]), [_row(seeded, [1], [], seeded_generator(123, 0))]
                      + rows[1:], torch.Generator().manual_seed(9))
    assert again == tokens


def test_sampler_sample_greedy_fast_path_and_raw_logprobs():
    torch.manual_seed(2)
    logits = torch.randn(3, 50)
    seqs = []
    for i, p in enumerate([SamplingParams(temperature=0.0), SamplingParams(temperature=0.0),
                           SamplingParams(temperature=0.0, logprobs=2)]):
        seqs.append(Request(f"r{i}", None, [1, 2, 3], p).seqs[0])
    seqs[2].logprobs = []
    tokens, logprobs = Sampler(seed=0).sample(seqs, logits)
    assert tokens == logits.argmax(dim=-1).tolist()
    torch.testing.assert_close(logprobs, logits.log_softmax(dim=-1))
    # a penalised greedy row goes through the processors and can change its pick
    hot = int(logits[0].argmax())
    pen = Request("p", None, [hot], SamplingParams(temperature=0.0, repetition_penalty=100.0)).seqs[0]
    (tok,), _ = Sampler(seed=0).sample([pen], logits[:1])
    assert tok != hot or logits[0].topk(2).values[1] < 0


def test_unseeded_rows_draw_from_their_distribution_and_never_a_banned_token():
    target = torch.tensor([0.5, 0.0, 0.3, 0.0, 0.2])
    logits = target.log().expand(4000, 5).clone()  # log(0) = -inf: banned
    rows = [_row(SamplingParams(temperature=1.0), [1], []) for _ in range(4000)]
    tokens = torch.tensor(lp.sample(logits, rows, torch.Generator().manual_seed(0)))
    freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert freq[1] == 0 and freq[3] == 0
    # 4000 draws: the standard error of each frequency is at most 0.008; allow 4 of them
    assert (freq - target).abs().max() < 0.032, freq

