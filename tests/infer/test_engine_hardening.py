"""Issue 15 §1, engine side: one request must never hurt another.

Bad parameters are refused up front (finite-maths ranges, token ids inside the vocabulary, beams that
fit the KV pool); a request that fails inside a step fails alone (finish_reason 'error', RequestFailed
from the async engine) while a healthy stream beside it stays token-identical to a lone run; the
scheduler never spins idle; bad_words and stop strings cost time linear in their input.
"""
import asyncio
import math
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infer_helpers import random_prompts
from lmstack.errors import LmstackError
from lmstack.infer import AsyncLLMEngine, LLMEngine, RequestFailed, SamplingParams, SamplingParamsError
from lmstack.infer import logits_processors as lp
from lmstack.infer.bad_words import BadWords
from lmstack.infer.detokenizer import StopStrings

HEALTHY = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
SEEDED = dict(max_tokens=12, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)


def engine(model, tok=None, **kw):
    kw.setdefault("block_size", 4)
    kw.setdefault("num_blocks", 128)
    return LLMEngine(model, tok, **kw)


def run(eng, requests):
    """requests: [(id, prompt, params)] -> {id: final RequestOutput}; asserts the pool is idle after."""
    for rid, prompt, params in requests:
        eng.add_request(rid, prompt, params)
    done = {o.request_id: o for o in eng.run_to_completion()}
    assert eng.bm.num_free_blocks == eng.num_blocks
    eng.bm.check_consistency()
    return done


# ---- validation: the campaign's crashing values and their neighbours
@pytest.mark.parametrize("field,value", [
    ("temperature", 1e-40), ("temperature", 1e-6), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", 10**400), ("repetition_penalty", 1e-40), ("repetition_penalty", 0.0),
    ("repetition_penalty", float("inf")), ("frequency_penalty", float("nan")), ("presence_penalty", -float("inf")),
    ("top_p", float("nan")), ("min_p", float("inf")), ("length_penalty", float("nan")),
    ("stop_token_ids", [2**64]), ("stop_token_ids", [2**63]), ("stop_token_ids", [True]),
    ("logit_bias", {2**64: 1.0}), ("logit_bias", {1.5: 1.0}), ("logit_bias", {3: float("nan")}),
    ("max_tokens", 2**64), ("min_tokens", 2**64), ("top_k", 2**64), ("seed", 2**64), ("n", 2**64),
    ("best_of", 2**64), ("beam_width", 2**64), ("logprobs", 2**64), ("max_tokens", 3.0), ("n", True),
])
def test_values_that_break_the_maths_are_refused_naming_the_field(field, value):
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams(**{field: value})


def test_values_at_the_documented_bounds_are_accepted():
    SamplingParams(temperature=1e-5, repetition_penalty=0.01, top_k=2**63 - 1, seed=-(2**63), max_tokens=2**63 - 1,
                   stop_token_ids=[2**63 - 1], logit_bias={2**63 - 1: -100})
    SamplingParams(temperature=100, repetition_penalty=100, frequency_penalty=-2, presence_penalty=2, min_p=1.0)


ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                     st.text(max_size=6), st.lists(st.one_of(st.integers(-5, 2**65), st.text(max_size=3)), max_size=3),
                     st.dictionaries(st.one_of(st.integers(-3, 2**65), st.text(max_size=3)),
                                     st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True)), max_size=2))
FIELDS = ["n", "best_of", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
          "presence_penalty", "logit_bias", "bad_words", "stop", "stop_token_ids", "max_tokens", "min_tokens", "seed",
          "logprobs", "prompt_logprobs", "beam_width", "length_penalty", "regex", "choice", "lora", "output_kind"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE, max_size=4))
def test_any_parameter_values_are_accepted_or_refused_with_sampling_params_error(kwargs):
    """Arbitrary JSON-ish values never raise anything but SamplingParamsError (a 400 at the server)."""
    try:
        p = SamplingParams(**kwargs)
    except SamplingParamsError as e:
        assert "=" in str(e) or ":" in str(e)
        return
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
        assert math.isfinite(getattr(p, name))
    assert all(0 <= t < 2**63 for t in p.stop_token_ids or ()) and all(0 <= t < 2**63 for t in p.logit_bias or ())


def test_token_ids_outside_the_vocabulary_are_refused_by_the_engine(tok, model):
    eng = engine(model, tok)
    v = eng.emit_vocab
    for params, message in ((SamplingParams(stop_token_ids=[v], min_tokens=2), f"stop_token_ids: token id {v} "),
                            (SamplingParams(stop_token_ids=[3, 99999], min_tokens=2),
                             "stop_token_ids: token id 99999 "),
                            (SamplingParams(logit_bias={v + 5: 1.0}), f"logit_bias: token id {v + 5} ")):
        with pytest.raises(LmstackError, match=message + rf"is outside the vocabulary \[0, {v}\)"):
            eng.make_request("r", "the of", params)
    with pytest.raises(LmstackError, match=f"prompt token id {v}"):
        eng.make_request("r", [5, v], SamplingParams())
    assert not eng.requests


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(temperature=st.one_of(st.just(0.0), st.floats(1e-5, 100)),
       rep=st.floats(0.01, 100), freq=st.floats(-2, 2), pres=st.floats(-2, 2),
       top_p=st.floats(1e-6, 1.0), min_p=st.floats(0, 1), top_k=st.integers(0, 2**63 - 1),
       bias=st.floats(-100, 100), scale=st.sampled_from([1.0, 1e4, 1e30, 3e38]), seed=st.integers(0, 2**32))
def test_any_accepted_parameters_sample_a_valid_token_from_any_finite_logits(
        temperature, rep, freq, pres, top_p, min_p, top_k, bias, scale, seed):
    """The robust maths: inside the ranges, no row can produce NaN (even from huge logits)."""
    params = SamplingParams(temperature=temperature, repetition_penalty=rep, frequency_penalty=freq,
                            presence_penalty=pres, top_p=top_p, min_p=min_p, top_k=top_k, logit_bias={1: bias},
                            seed=seed)
    g = torch.Generator().manual_seed(seed)
    logits = (torch.rand(2, 16, generator=g) * 2 - 1) * scale
    logits[1, 3] = float("nan")  # a broken model row: NaN is banned, not propagated
    rows = [lp.SamplingRow(params, [1, 2], [2, 2, 5], torch.Generator().manual_seed(seed)) for _ in range(2)]
    out = lp.process(logits, rows)
    assert not torch.isnan(out).any()
    tokens = lp.sample(out, rows)
    assert all(0 <= t < 16 for t in tokens) and tokens[1] != 3


def test_a_row_with_every_token_banned_raises_a_clear_error():
    logits = torch.full((1, 4), float("-inf"))
    with pytest.raises(LmstackError, match="every token is banned"):
        lp.sample(logits, [lp.SamplingRow(SamplingParams(temperature=0.0), [1], [])])


# ---- isolation: a poisoned request beside healthy streams
def _poison(monkeypatch):
    """A logits processor that raises for any batch holding a row with seed 666 (the poisoned request)."""
    def boom(logits, rows):
        if any(r.params.seed == 666 for r in rows):
            raise RuntimeError("poisoned processor")
        return logits
    monkeypatch.setitem(lp.PROCESSORS, "poison", boom)


class ExplodingStops:
    def scan(self, *a):
        raise RuntimeError("stop check exploded")


def test_a_poisoned_request_fails_alone_and_healthy_streams_stay_identical(tok, model, monkeypatch):
    prompt = "The first of the"
    lone = run(engine(model, tok), [("h", prompt, SamplingParams(**HEALTHY)), ("s", prompt, SamplingParams(**SEEDED))])
    _poison(monkeypatch)
    eng = engine(model, tok)
    boom_stops = eng.make_request("stopcheck", prompt, SamplingParams(max_tokens=12, temperature=0.0, stop=["zz"]))
    boom_stops.stops = ExplodingStops()  # fails while stop-checking its first new text
    eng.add_prepared(boom_stops)
    done = run(eng, [("h", prompt, SamplingParams(**HEALTHY)), ("s", prompt, SamplingParams(**SEEDED)),
                     ("bad", prompt, SamplingParams(max_tokens=12, temperature=0.7, top_k=5, seed=666)),
                     ("beambad", prompt, SamplingParams(use_beam_search=True, beam_width=3, max_tokens=6, seed=666)),
                     ("allbanned", prompt, SamplingParams(max_tokens=12, min_tokens=3,
                                                          stop_token_ids=list(range(eng.emit_vocab))))])
    for rid in ("h", "s"):
        assert done[rid].error is None and done[rid].outputs[0].finish_reason == "length"
        assert done[rid].outputs[0].token_ids == lone[rid].outputs[0].token_ids
        assert done[rid].outputs[0].text == lone[rid].outputs[0].text
    for rid, why in (("bad", "poisoned processor"), ("stopcheck", "stop check exploded"),
                     ("allbanned", "every token is banned"), ("beambad", "poisoned processor")):
        out = done[rid]
        assert out.finished and out.outputs[0].finish_reason == "error", rid
        assert why in out.error and rid in out.error and "\n" not in out.error
    assert eng.stats()["requests_failed"] == 4 and not eng.requests


def test_a_request_that_poisons_the_speculative_draft_fails_alone(tok, model, monkeypatch):
    """The draft samples with each request's processors too: when that raises, the step decodes without
    guesses, the poisoned request then fails in its own sampling, and the healthy stream is unchanged."""
    prompt = "The first of the"
    lone = run(engine(model, tok), [("h", prompt, SamplingParams(**HEALTHY))])["h"].outputs[0].token_ids

    def boom(logits, rows):
        if any(r.params.seed == 666 and len(r.output_ids) >= 2 for r in rows):
            raise RuntimeError("poisoned processor")
        return logits

    monkeypatch.setitem(lp.PROCESSORS, "poison", boom)
    eng = engine(model, tok, speculative={"method": "draft", "draft_model": model, "num_tokens": 3})
    done = run(eng, [("h", prompt, SamplingParams(**HEALTHY)),
                     ("bad", prompt, SamplingParams(max_tokens=12, temperature=0.7, top_k=5, seed=666))])
    assert done["h"].outputs[0].token_ids == lone and done["h"].error is None
    assert done["bad"].outputs[0].finish_reason == "error" and "poisoned processor" in done["bad"].error
    assert eng.stats()["spec_proposed_tokens"] > 0


def test_the_async_engine_raises_request_failed_for_the_poisoned_request_only(tok, model, monkeypatch):
    prompt = "The first of the"
    lone = run(engine(model, tok), [("h", prompt, SamplingParams(**HEALTHY))])["h"].outputs[0].token_ids
    _poison(monkeypatch)
    aengine = AsyncLLMEngine(model, engine=engine(model, tok))

    async def collect(rid, params):
        last = None
        async for out in aengine.generate(prompt, params, request_id=rid):
            last = out
        return last

    async def main():
        try:
            return await asyncio.gather(collect("h", SamplingParams(**HEALTHY)),
                                        collect("bad", SamplingParams(max_tokens=12, temperature=0.7, seed=666,
                                                                      top_k=5)),
                                        return_exceptions=True)
        finally:
            await aengine.shutdown()

    healthy, bad = asyncio.run(main())
    assert isinstance(bad, RequestFailed) and isinstance(bad, LmstackError)
    assert "poisoned processor" in str(bad) and bad.request_id == "bad"
    assert bad.output is not None and bad.output.outputs[0].finish_reason == "error"
    assert healthy.outputs[0].token_ids == lone and healthy.error is None
    assert aengine.engine.bm.num_free_blocks == aengine.engine.num_blocks and aengine.errors == 0


def test_a_failed_forward_fails_its_requests_with_request_failed_and_the_engine_serves_on(tok, model, monkeypatch):
    aengine = AsyncLLMEngine(model, engine=engine(model, tok))
    real, calls = aengine.engine.runner.run, []

    def flaky(plan, *a, **kw):
        if len(plan.seqs) == 2 and not calls:  # the first forward that holds both requests
            calls.append(1)
            raise RuntimeError("device lost")
        return real(plan, *a, **kw)

    monkeypatch.setattr(aengine.engine.runner, "run", flaky)

    async def last(rid):
        out = None
        async for out in aengine.generate("the of", SamplingParams(**HEALTHY), request_id=rid):
            pass
        return out

    async def main():
        try:
            first = await asyncio.gather(last("a"), last("b"), return_exceptions=True)
            return first, await last("c")
        finally:
            await aengine.shutdown()

    (a, b), c = asyncio.run(main())
    assert all(isinstance(x, RequestFailed) and "device lost" in str(x) for x in (a, b))
    assert c.error is None and len(c.outputs[0].token_ids) == HEALTHY["max_tokens"] and aengine.errors == 1
    assert aengine.engine.bm.num_free_blocks == aengine.engine.num_blocks


def test_make_request_runs_off_the_event_loop(tok, model, monkeypatch):
    """A slow request preparation (huge bad_words, a huge prompt) must not stall other coroutines."""
    aengine = AsyncLLMEngine(model, engine=engine(model, tok))
    real = aengine.engine.make_request

    def slow(*a, **kw):
        time.sleep(0.6)  # holds no lock the loop needs, like tokenising a huge input
        return real(*a, **kw)

    monkeypatch.setattr(aengine.engine, "make_request", slow)

    async def main():
        gaps, stop = [], asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        async def request():
            try:
                async for _ in aengine.generate("the of", SamplingParams(max_tokens=2, temperature=0.0)):
                    pass
            finally:
                stop.set()

        await asyncio.gather(ticker(), request())
        await aengine.shutdown()
        return gaps

    gaps = asyncio.run(main())
    assert len(gaps) > 20 and max(gaps) < 0.3, max(gaps)  # on the loop it would be one 0.6 s gap


# ---- the scheduler never spins; beams are capped by the pool
def test_a_beam_that_can_never_fit_the_pool_is_refused_up_front(model):
    eng = LLMEngine(model, None, max_num_seqs=16)  # the default pool: 256 blocks of 16 for a 256-token context
    with pytest.raises(SamplingParamsError, match=r"beam_width=64 with max_tokens=200 may need \d+ KV blocks"):
        eng.make_request("beam", [5, 6, 7, 8, 9], SamplingParams(use_beam_search=True, beam_width=64, max_tokens=200))
    eng.make_request("ok", [5, 6, 7, 8, 9], SamplingParams(use_beam_search=True, beam_width=16, max_tokens=200))


@pytest.mark.parametrize("width,max_num_seqs", [(16, 4), (64, 16)])
def test_an_oversized_beam_beside_small_requests_finishes_in_bounded_steps(model, width, max_num_seqs):
    """Even a beam far beyond the pool (the capacity check switched off) cannot livelock the engine:
    paused hypotheses are preempted so waiting work runs, and every request finishes."""
    eng = LLMEngine(model, None, max_num_seqs=max_num_seqs, block_size=4, num_blocks=40)
    eng.builder.check_beam_fits = lambda *a: None
    prompts = random_prompts(4, 3, 12, 400, seed=1)
    small = {f"s{i}": p for i, p in enumerate(prompts[1:])}
    lone = run(LLMEngine(model, None, block_size=4, num_blocks=40),
               [(rid, p, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)) for rid, p in small.items()])
    for rid, p in small.items():
        eng.add_request(rid, p, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    eng.step()
    eng.add_request("beam", prompts[0], SamplingParams(use_beam_search=True, beam_width=width, max_tokens=40,
                                                       ignore_eos=True))
    done, calls = {}, 0
    while eng.has_unfinished_requests():
        calls += 1
        assert calls < 4000, "the engine is spinning"
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert eng.scheduler.num_preemptions > 0  # the pool really was contended
    assert all(o.error is None for o in done.values()) and len(done["beam"].outputs[0].token_ids) == 40
    for rid in small:
        assert done[rid].outputs[0].token_ids == lone[rid].outputs[0].token_ids
    assert eng.bm.num_free_blocks == eng.num_blocks
    eng.bm.check_consistency()


def test_a_request_that_cannot_fit_the_empty_pool_fails_alone(model):
    big = LLMEngine(model, None, block_size=4, num_blocks=128)
    too_long = big.make_request("long", list(range(20, 120)), SamplingParams(max_tokens=4))
    eng = LLMEngine(model, None, block_size=4, num_blocks=8)  # 32 slots: the 100-token prompt never fits
    eng.add_prepared(too_long)
    done = run(eng, [("h", [5, 6, 7], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))])
    assert done["h"].error is None and len(done["h"].outputs[0].token_ids) == 8
    assert done["long"].outputs[0].finish_reason == "error" and "does not fit the KV pool" in done["long"].error


# ---- linear-time word lists
def test_bad_words_index_bans_exactly_what_the_word_list_bans():
    bw = BadWords([[4, 5], [2], [7, 8, 9], [4, 6], [], [999]], vocab_size=100)
    assert sorted(bw.banned([])) == [2]
    assert sorted(bw.banned([1, 4])) == [2, 5, 6]
    assert sorted(bw.banned([7, 8])) == [2, 9]
    assert sorted(bw.banned([8, 7])) == [2]


def test_twenty_thousand_bad_words_convert_in_linear_time(tok, model):
    eng = engine(model, tok)
    words = [f"w{i}q{i % 89}z" for i in range(20_000)]
    start = time.perf_counter()
    req = eng.make_request("bw", "the of", SamplingParams(bad_words=words, max_tokens=3, temperature=0.0))
    took = time.perf_counter() - start
    assert took < 8, took  # the old list-membership dedupe took 34 s here (benchmarks/engine_hardening.py)
    assert len(req.bad_word_ids) > 20_000
    one = eng.make_request("one", "the of", SamplingParams(bad_words=["of", "wq9"], max_tokens=3)).bad_word_ids
    for spelling in ("of", " of", "wq9", " wq9"):  # each spelling's last token is banned right after its prefix
        ids = tok.encode(spelling)
        assert ids[-1] in one.banned([7] + ids[:-1])


def _brute_first_end(text, new_from, stops):
    """The first stop (longest on ties) to end inside text[new_from:], written plainly."""
    for e in range(new_from + 1, len(text) + 1):
        hits = [s for s in stops if text[:e].endswith(s) and e - len(s) >= 0]
        if hits:
            s = max(hits, key=len)
            return e - len(s), s
    return None


def _brute_hold(text, stops):
    return max([k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])],
               default=0)


@settings(max_examples=300, deadline=None)
@given(stops=st.lists(st.text("ab c", min_size=1, max_size=5), min_size=1, max_size=6),
       pieces=st.lists(st.text("ab c", max_size=4), max_size=12))
def test_stop_strings_scanned_piece_by_piece_match_a_brute_force_scan(stops, pieces):
    index = StopStrings(stops)
    text, hold = "", 0
    for piece in pieces:
        old = len(text)
        text += piece
        hit, hold = index.scan(text, old, hold)
        want = _brute_first_end(text, old, stops)
        assert hit == want
        if hit is not None:
            return
        assert hold == _brute_hold(text, stops)


def test_a_thousand_long_stop_strings_cost_each_token_little():
    stops = [f"{i:04d}" + "x" * 996 for i in range(1000)]
    index = StopStrings(stops)
    text, hold = "", 0
    start = time.perf_counter()
    for k in range(2000):
        old = len(text)
        text += f" w{k % 7}"
        hit, hold = index.scan(text, old, hold)
        assert hit is None
    per_token = (time.perf_counter() - start) / 2000
    assert per_token < 5e-4, per_token  # the old per-token rescan of every stop took milliseconds
    assert math.isfinite(per_token)
