"""LocalLM against direct forward passes: lm-eval's split, batching, logits reuse, truncation, rolling, generation."""
import math
import warnings

import pytest
import torch

from lmstack.eval.lm import GenArgs, encode_pair, rolling_windows, split_long_pairs


def _direct(lm, ctx_ids, cont_ids):
    """log P(cont | ctx) and greedy flag from one unbatched forward over the whole sequence."""
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids)[0].float(), -1)
    n = len(ctx_ids)
    lps = [logp[n + i - 1, t].item() for i, t in enumerate(cont_ids)]
    greedy = all(logp[n + i - 1].argmax().item() == t for i, t in enumerate(cont_ids))
    return sum(lps), greedy


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole_text():
    def encode(text):  # one token per word, the space attached to the word that follows (like BPE)
        out, word = [], ""
        for ch in text:
            if ch == " " and word:
                out.append(word)
                word = ""
            word += ch
        return out + ([word] if word else [])
    ctx, cont = encode_pair("The sky is ", "blue", encode)
    assert ctx == ["The", " sky", " is"] and cont == [" blue"]
    ctx, cont = encode_pair("Answer:", " yes no", encode)
    assert cont == [" yes", " no"]


def test_loglikelihood_equals_a_direct_forward(tiny_lm):
    reqs = [("the cat sat on", " the mat"), ("the cat sat on ", "the mat"), ("birds sang in old", " trees."),
            ("one two", " three four five six seven")]
    got = tiny_lm.loglikelihood(reqs)
    for (c, x), (ll, greedy) in zip(reqs, got):
        ctx, cont = tiny_lm.rules.pair(c, x)
        ref_ll, ref_greedy = _direct(tiny_lm, ctx, cont)
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy
    # The trailing space of the context moved into the continuation: both spellings score the same text.
    assert got[0][0] == pytest.approx(got[1][0], abs=1e-5)


def test_greedy_flag_is_true_for_the_models_own_argmax_continuation(tiny_lm):
    ids = tiny_lm.encode("the dog ran")
    with torch.no_grad():
        nxt = tiny_lm.model(torch.tensor([ids]))[0, -1].argmax().item()
    cont = tiny_lm.tokenizer.decode([nxt])
    [(ll, greedy)] = tiny_lm._score([(ids, [nxt])])
    assert greedy and ll <= 0
    other = (nxt + 1) % tiny_lm.tokenizer.vocab_size
    [(_, greedy2)] = tiny_lm._score([(ids, [other])])
    assert not greedy2 and cont is not None


def test_empty_context_is_conditioned_on_the_prefix_token(tiny_lm):
    [(ll, _)] = tiny_lm.loglikelihood([("", "hello world")])
    cont = tiny_lm.encode("hello world", special=False)
    ref, _ = _direct(tiny_lm, [tiny_lm.prefix_token_id], cont)
    assert ll == pytest.approx(ref, abs=1e-4)


def test_batching_and_order_do_not_change_scores(tiny_model_dir, tiny_lm):
    from lmstack.eval.local_lm import LocalLM

    reqs = [(f"the cat {w}", f" {v}") for w in ("sat", "ran to the park and", "is") for v in ("mat", "dog", "a tree")]
    one = LocalLM(tiny_model_dir, batch_size=1, device="cpu").loglikelihood(reqs)
    many = tiny_lm.loglikelihood(reqs)
    rev = tiny_lm.loglikelihood(reqs[::-1])[::-1]
    for a, b, c in zip(one, many, rev):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and b[0] == pytest.approx(c[0], abs=1e-4)


def test_batches_run_longest_first_and_one_token_choices_share_a_forward(tiny_model_dir, monkeypatch):
    from lmstack.eval.local_lm import LocalLM

    lm = LocalLM(tiny_model_dir, batch_size=2, device="cpu")
    widths = []
    real_forward = lm.model.forward

    def spy(ids, *args, **kwargs):
        widths.append(tuple(ids.shape))
        return real_forward(ids, *args, **kwargs)
    monkeypatch.setattr(lm.model, "forward", spy)
    ctx = "the cat sat on the"
    # Find continuations that are exactly one token after the context, so all share the model input.
    singles = [x for x in (" a", " mat", " dog", " the", " cat", " sun") if len(lm.rules.pair(ctx, x)[1]) == 1]
    assert len(singles) >= 3
    lm.loglikelihood([(ctx, x) for x in singles])
    assert len(widths) == 1 and widths[0][0] == 1          # one forward of one row serves every choice
    widths.clear()
    lm.loglikelihood([("a", " b"), ("the cat sat on the mat and the dog", " ran"), ("one two three", " four")])
    lengths = [w[1] for w in widths]
    assert lengths == sorted(lengths, reverse=True)        # longest batch first


def test_too_long_context_is_truncated_from_the_left_with_a_warning(tiny_model_dir):
    from lmstack.eval.local_lm import LocalLM

    lm = LocalLM(tiny_model_dir, batch_size=4, max_length=16, device="cpu")
    context = "the cat sat on the mat and the dog ran to the park while birds sang in old trees"
    ctx, cont = lm.rules.pair(context, " today")
    assert len(ctx) + len(cont) > 17
    with pytest.warns(UserWarning, match="truncated from the left"):
        [(ll, _)] = lm.loglikelihood([(context, " today")])
    whole = (ctx + cont)[-17:]
    ref, _ = _direct(lm, whole[:len(whole) - len(cont)], cont)
    assert ll == pytest.approx(ref, abs=1e-4)


def test_continuation_longer_than_the_window_is_scored_in_pieces(tiny_model_dir):
    from lmstack.eval.local_lm import LocalLM

    lm = LocalLM(tiny_model_dir, batch_size=4, max_length=8, device="cpu")
    ctx, cont = lm.rules.pair("the cat", " sat on the mat and the dog ran to the park")
    assert len(cont) > 8
    with pytest.warns(UserWarning, match="scored in windows"):
        [(ll, _)] = lm._score([(ctx, cont)])
    pieces, owner = split_long_pairs([(ctx, cont)], 8)
    assert [len(c) for _, c in pieces][:-1] == [8] * (len(pieces) - 1) and sum(len(c) for _, c in pieces) == len(cont)
    ref = 0.0
    for pc, px in pieces:
        whole = (pc + px)[-9:]
        ref += _direct(lm, whole[:len(whole) - len(px)], px)[0]
    assert ll == pytest.approx(ref, abs=1e-4)


def test_rolling_windows_predict_every_token_once():
    tokens = list(range(100, 123))
    windows = rolling_windows(tokens, prefix_token=1, max_len=5)
    predicted = [t for _, pred in windows for t in pred]
    assert predicted == tokens
    for ctx, pred in windows:
        assert len(ctx) + len(pred) - 1 <= 5              # each window's input fits max_len
    assert windows[0][0] == [1]                           # first token conditioned on the prefix token
    # Later windows: the first predicted token sees the token right before it.
    assert windows[1][0][-1] == tokens[tokens.index(windows[1][1][0]) - 1]
    with pytest.raises(ValueError):
        rolling_windows(tokens, 1, 5, context_len=6)


def test_loglikelihood_rolling_is_the_full_sequence_score_when_it_fits(tiny_lm):
    text = "the cat sat on the mat."
    [total] = tiny_lm.loglikelihood_rolling([text])
    ids = tiny_lm.encode(text)
    ref, _ = _direct(tiny_lm, [tiny_lm.prefix_token_id], ids)
    assert total == pytest.approx(ref, abs=1e-4)


def test_loglikelihood_rolling_over_several_windows(tiny_model_dir):
    from lmstack.eval.local_lm import LocalLM

    lm = LocalLM(tiny_model_dir, batch_size=4, max_length=12, device="cpu")
    text = "the cat sat on the mat and the dog ran to the park while birds sang"
    ids = lm.encode(text)
    assert len(ids) > 24
    [total] = lm.loglikelihood_rolling([text])
    ref = sum(_direct(lm, c, p)[0] for c, p in rolling_windows(ids, lm.prefix_token_id, 12))
    assert total == pytest.approx(ref, abs=1e-4)
    # Less context per token than one unbounded pass: the numbers differ, but both are finite and negative.
    assert math.isfinite(total) and total < 0


def test_generate_until_is_greedy_and_cut_at_stop_strings(tiny_lm):
    from lmstack.infer.sampling_params import SamplingParams

    prompt = "the cat sat"
    [free] = tiny_lm.generate_until([(prompt, GenArgs(max_gen_toks=12))])
    ref = tiny_lm.llm().generate([tiny_lm.encode(prompt)], SamplingParams(max_tokens=12, temperature=0.0))
    assert free == ref[0].outputs[0].text
    assert len(free) > 2
    stop = free[len(free) // 2: len(free) // 2 + 1]
    before = dict(tiny_lm.stats, ttft_s=list(tiny_lm.stats["ttft_s"]))
    [cut] = tiny_lm.generate_until([(prompt, GenArgs(until=[stop], max_gen_toks=12))])
    assert stop not in cut and free.startswith(cut)
    assert tiny_lm.stats["generated_tokens"] > before["generated_tokens"]
    assert tiny_lm.stats["prompt_tokens"] - before["prompt_tokens"] == len(tiny_lm.encode(prompt))
    assert len(tiny_lm.stats["ttft_s"]) == len(before["ttft_s"]) + 1 and tiny_lm.stats["ttft_s"][-1] > 0


def test_bad_inputs_raise_clear_errors(tiny_model_dir, tmp_path):
    from lmstack.errors import LmstackError
    from lmstack.eval.local_lm import LocalLM

    with pytest.raises(LmstackError, match="no model directory"):
        LocalLM(tmp_path / "missing")
    with pytest.raises(LmstackError, match="batch_size"):
        LocalLM(tiny_model_dir, batch_size=0)
    lm = LocalLM(tiny_model_dir, max_length=16, device="cpu")
    with pytest.warns(UserWarning, match="generating at most 8 tokens"):
        out = lm.generate_until([("hi", GenArgs(max_gen_toks=16))])
    assert lm.stats["generated_tokens"] <= 8 and len(out) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(LmstackError, match="continuation is empty"):
            lm.loglikelihood([("the cat", "")])
