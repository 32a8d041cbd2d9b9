"""Hard phrase bans in decoding (lmstack.safety.phrase_ban): the automaton against a brute-force check, 1,000
samples at temperature 1.5 with no banned phrase, greedy untouched when no ban is near, hard bans a request
cannot lift, and bad input.

The model is a tiny llama trained here for a few seconds on a word-salad corpus, so that its samples spell
the corpus' words and the phrases it would produce can be chosen from its own unbanned samples.
"""
import collections
import random

import pytest
import torch
import torch.nn.functional as F

import lmstack
from lmstack.errors import LmstackError
from lmstack.infer import LLMEngine, SamplingParams
from lmstack.infer.sampling_params import SamplingParamsError
from lmstack.model.presets import preset
from lmstack.safety.phrase_ban import PhraseBan, PhraseBanError, find_phrases, normalize, token_table
from lmstack.tokenizer import train_tokenizer

WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang in old trees near green hills "
         "under blue sky where people walk each day with friends who talk about time work life").split()


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + "." for _ in range(n_lines)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(texts=corpus(), type="bpe", vocab_size=300, special_tokens="chat", show_progress=False)


@pytest.fixture(scope="module")
def model(tok):
    """150 AdamW steps on the corpus: enough that samples are mostly the corpus' words (about 2 s)."""
    torch.manual_seed(0)
    cfg = preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=64, d_model=32, n_layers=1, n_heads=2)
    m = lmstack.Transformer(cfg)
    ids = torch.tensor([t for line in corpus() for t in tok.encode(" " + line)], dtype=torch.long)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(150):
            starts = torch.randint(0, len(ids) - 33, (16,), generator=g)
            batch = torch.stack([ids[s:s + 33] for s in starts.tolist()])
            loss = F.cross_entropy(m(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(before)
    return m.eval()


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _texts(engine: LLMEngine, n: int, params: SamplingParams, prompt: str = "the") -> list[list]:
    for i in range(n):
        engine.add_request(f"r{i}", prompt, params)
    outs = sorted(engine.run_to_completion(), key=lambda o: int(o.request_id[1:]))
    return [[c for c in o.outputs] for o in outs]


def _spans_boundary(tok, token_ids: list[int], phrase: str) -> bool:
    """Whether some occurrence of phrase in the tokens' text starts and ends in different tokens."""
    pieces = [tok.decode([t], skip_special_tokens=True) for t in token_ids]
    text = "".join(pieces)
    ends = []
    pos = 0
    for p in pieces:
        pos += len(p)
        ends.append(pos)
    low = text.lower()
    start = low.find(phrase)
    while start >= 0:
        first = next(i for i, e in enumerate(ends) if e > start)
        last = next(i for i, e in enumerate(ends) if e >= start + len(phrase))
        if first != last:
            return True
        start = low.find(phrase, start + 1)
    return False


def test_allowed_mask_matches_a_brute_force_check(tok):
    """Every step of random walks: a token is banned exactly when decoding it after the output so far would
    complete a phrase (across boundaries, inside one token, in any ASCII case, with whitespace runs)."""
    phrases = ["the cat", "ark w", "SKY", "e  d", "ooo"]
    ban = PhraseBan.build(tok, phrases[:2], hard=phrases[2:])
    assert len(ban.automata) == 2  # the hard bans and the request's own: two automata, masks and-ed
    rng = random.Random(0)
    vocab = tok.vocab_size
    checked = banned_seen = 0
    for walk in range(40):
        out: list[int] = []
        for _ in range(20):
            allowed = ban.allowed(out, key=walk)
            text = tok.decode(out, skip_special_tokens=True)
            assert not find_phrases(text, phrases)
            banned = (~allowed).nonzero()[:, 0].tolist()
            for t in banned + rng.sample(range(vocab), 20):  # every banned token, and a random sample
                bad = bool(find_phrases(tok.decode(out + [t], skip_special_tokens=True), phrases))
                assert bad == (not bool(allowed[t])), (text, t)
                checked += 1
            banned_seen += len(banned)
            # walk through the corpus' words half the time so that partial matches are common
            word = tok.encode(" " + rng.choice(WORDS))
            free = allowed.nonzero()[:, 0].tolist()
            out.append(word[0] if rng.random() < 0.5 and allowed[word[0]] else rng.choice(free))
    assert checked >= 40 * 20 * 20 and banned_seen > 50


def test_normalisation_and_non_ascii_case():
    assert normalize("  The\tCAT \n\n sat ") == "the cat sat"
    assert find_phrases("A big   CAT", ["big cat", "dog"]) == ["big cat"]

    class Chars:  # a character-per-token tokenizer over a few letters, enough to drive the automaton
        alphabet = ["a", "r", "g", "e", "Ä", "ä", " ", "R"]
        vocab_size = len(alphabet)
        special_ids = set()

        def id_to_token(self, i):
            return None

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.alphabet[i] for i in ids)

    tok = Chars()
    ban = PhraseBan.build(tok, ["ärger"])
    automaton = ban.automata[0]
    for text, hit in (("Ärger", True), ("ÄRGER", True), ("ärger", True), ("a rger", False), ("ärge r", False)):
        assert automaton.walk_text(text.encode())[1] is hit, text
    ids = [tok.alphabet.index(c) for c in "ÄRge"]  # ASCII case folds: "ÄRge" + "r" spells ÄRger
    allowed = ban.allowed(ids)
    assert not allowed[tok.alphabet.index("R")] and allowed[tok.alphabet.index("a")]


def test_thousand_samples_at_temperature_1_5_contain_no_banned_phrase(tok, model):
    params = SamplingParams(temperature=1.5, max_tokens=16, ignore_eos=True)
    plain = [c for cs in _texts(LLMEngine(model, tok, max_num_seqs=128, seed=0), 200, params) for c in cs]
    # the phrases this model produces most, in the words' middles and across word (token) boundaries
    counts = collections.Counter()
    for c in plain:
        t = normalize(c.text)
        counts.update({t[i:i + 4] for i in range(len(t) - 3)
                       if t[i + 1] == " " and t[i:i + 4].replace(" ", "").isalpha()})
    across = [p for p, _ in counts.most_common(3)]
    inside = [w[1:4] for w in ("park", "trees", "friends")]  # inside one token ("ark" of " park") or spanning
    phrases = across + inside
    for p in phrases:
        hits = [c for c in plain if find_phrases(c.text, [p])]
        assert len(hits) >= 5, (p, len(hits))  # the model does produce each phrase without the ban
    assert all(any(_spans_boundary(tok, c.token_ids, p) for c in plain if find_phrases(c.text, [p])) for p in across)
    # 1,000 samples: hard bans for half the phrases, the request's own for the rest; n=2 forks sequences
    engine = LLMEngine(model, tok, max_num_seqs=128, seed=1, banned_phrases=phrases[::2])
    banned = _texts(engine, 500, params.clone(n=2, banned_phrases=phrases[1::2]))
    samples = [c for cs in banned for c in cs]
    assert len(samples) == 1000
    assert all(len(c.token_ids) == 16 for c in samples)
    assert [c.text for c in samples if find_phrases(c.text, phrases)] == []


def test_greedy_output_unchanged_when_no_banned_phrase_is_near(tok, model):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = ["the cat", "birds sang", "people walk"]
    plain = [_texts(LLMEngine(model, tok, seed=0), 1, params, prompt)[0][0] for prompt in prompts]
    # phrases that never occur in the greedy outputs: the same tokens, through the processing path
    far = ["zebra", "xylophone quartet"]
    assert not any(find_phrases(c.text, far) for c in plain)
    banned = _texts(LLMEngine(model, tok, seed=0, banned_phrases=far), 1, params, prompts[0])[0][0]
    assert banned.token_ids == plain[0].token_ids
    for prompt, want in zip(prompts[1:], plain[1:]):  # a request's own bans, too
        got = _texts(LLMEngine(model, tok, seed=0), 1, params.clone(banned_phrases=far), prompt)[0][0]
        assert got.token_ids == want.token_ids
    # a phrase the greedy output does contain changes it, and is gone from it
    text = normalize(plain[0].text)
    near = text[len(text) // 2: len(text) // 2 + 4].strip() or text[:3]
    out = _texts(LLMEngine(model, tok, seed=0, banned_phrases=[near]), 1, params, prompts[0])[0][0]
    assert out.token_ids != plain[0].token_ids
    assert not find_phrases(out.text, [near])


def test_a_request_adds_bans_but_never_lifts_the_engines(tok, model):
    params = SamplingParams(temperature=1.5, max_tokens=16, ignore_eos=True)
    engine = LLMEngine(model, tok, seed=0, banned_phrases=["the"])
    for extra in (None, [], ["cat"]):
        outs = _texts(engine, 20, params.clone(banned_phrases=extra))
        texts = [c.text for cs in outs for c in cs]
        assert not any(find_phrases(t, ["the"]) for t in texts)
        if extra:
            assert not any(find_phrases(t, extra) for t in texts)
    # logit_bias pushing the banned word's tokens up does not bring them back
    the = tok.encode(" the")
    biased = params.clone(logit_bias={t: 100.0 for t in the})
    assert not any(find_phrases(c.text, ["the"]) for cs in _texts(engine, 10, biased) for c in cs)
    # the same engine without hard bans does produce "the" (so the checks above can fail)
    free = _texts(LLMEngine(model, tok, seed=0), 20, params)
    assert any(find_phrases(c.text, ["the"]) for cs in free for c in cs)


def test_token_table_is_built_once_per_tokenizer_and_automata_are_shared(tok):
    a = token_table(tok)
    assert token_table(tok) is a
    one, two = PhraseBan.build(tok, ["dog"], hard=["cat"]), PhraseBan.build(tok, ["bird"], hard=["cat"])
    assert one.automata[0] is two.automata[0]  # the hard bans compiled once, whatever the requests add


def test_empty_phrases_are_refused_by_name(tok, model):
    with pytest.raises(SamplingParamsError, match="banned_phrases"):
        SamplingParams(banned_phrases=[""])
    with pytest.raises(LmstackError, match="banned_phrases"):
        LLMEngine(model, tok, banned_phrases=["ok", " \n\t "])
    engine = LLMEngine(model, tok)
    with pytest.raises(SamplingParamsError, match="banned_phrases.*empty"):
        engine.add_request("x", "the", SamplingParams(banned_phrases=["  \n "]))


def test_phrase_lists_of_the_wrong_shape_are_refused(tok, model):
    with pytest.raises(SamplingParamsError, match="banned_phrases"):
        SamplingParams(banned_phrases="the")
    with pytest.raises(PhraseBanError, match="banned_phrases"):
        LLMEngine(model, tok, banned_phrases="the")
    with pytest.raises(PhraseBanError, match="over 256 bytes"):
        PhraseBan.build(tok, ["x" * 300])


@pytest.mark.parametrize("mode", ["draft", "beam"])
def test_speculation_and_beams_keep_the_bans(tok, model, mode):
    """Speculative verification (rows with guessed tokens appended) and beam search read the same masks: greedy
    speculation with bans is token-identical to plain decoding with bans, and no beam holds a phrase."""
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    plain = _texts(LLMEngine(model, tok, seed=0), 1, params, "the cat")[0][0]
    text = normalize(plain.text)
    phrases = [text[4:7].strip() or text[:3], text[10:14].strip() or text[:4]]
    base = _texts(LLMEngine(model, tok, seed=0, banned_phrases=phrases), 1, params, "the cat")[0][0]
    assert base.token_ids != plain.token_ids and not find_phrases(base.text, phrases)
    if mode == "draft":
        spec = {"method": "draft", "draft_model": model, "num_tokens": 3}
        engine = LLMEngine(model, tok, seed=0, banned_phrases=phrases, speculative=spec)
        got = _texts(engine, 1, params, "the cat")[0][0]
        assert got.token_ids == base.token_ids
        assert engine.stats()["spec_proposed_tokens"] > 0
    else:
        engine = LLMEngine(model, tok, seed=0, banned_phrases=phrases)
        beams = _texts(engine, 1, params.clone(use_beam_search=True, beam_width=3, n=3), "the cat")[0]
        assert len(beams) == 3 and not any(find_phrases(b.text, phrases) for b in beams)


def test_evicted_state_rows_are_rebuilt_the_same(tok):
    """The per-state row cache is bounded (least recently used rows go): a tiny bound gives the same masks."""
    phrases = ["the cat", "park"]
    small = PhraseBan.build(tok, phrases, hard=["sky"])
    for a in small.automata:
        a.max_rows = 2  # far below the states the walk visits: it must evict and rebuild
    ref = PhraseBan.build(tok, phrases, hard=["sky"])
    ids = tok.encode(" the cat sat in the park under the sky the cat the park sky")
    for step in range(len(ids)):
        out = ids[:step]
        got = small.allowed(out, key="a")
        want = ref.allowed(out, key="b")
        assert torch.equal(got, want)
    mixed = PhraseBan.build(tok, ["e"], hard=["a"])
    for a in mixed.automata:
        a._rows.clear()
        a.max_rows = 1
        for q in range(a.num_states):  # visit every state: the cache never holds more than its bound
            a.rows(q)
        assert len(a._rows) == 1


def test_the_one_transfer_sampler_path_keeps_the_bans(tok, model):
    """The GPU sampler's path (one read-back per step), run on CPU tensors: the masks apply there too."""
    params = SamplingParams(temperature=1.5, max_tokens=16, ignore_eos=True)
    engine = LLMEngine(model, tok, seed=0, banned_phrases=["the", "at"])
    engine.sampler.single_transfer = True
    texts = [c.text for cs in _texts(engine, 40, params) for c in cs]
    assert len(texts) == 40 and not any(find_phrases(t, ["the", "at"]) for t in texts)
    free = LLMEngine(model, tok, seed=0)
    free.sampler.single_transfer = True
    assert any(find_phrases(c.text, ["the", "at"]) for cs in _texts(free, 40, params) for c in cs)


def test_next_states_match_a_byte_walk_for_every_token(tok):
    """Each cached row's next states, banned tokens' included, are the automaton's byte-by-byte walk."""
    ban = PhraseBan.build(tok, ["the cat", "at", "e c"])
    a = ban.automata[0]
    table = token_table(tok)
    for text in (b"", b"the ", b"th", b"a"):  # states where no phrase has ended yet
        q = a.walk_text(text)[0]
        allowed, nxt = a.rows(q)
        for tid, raw in enumerate(table.token_bytes):
            want, hit = a.walk_text(raw, q)
            assert int(nxt[tid]) == want and bool(allowed[tid]) is not hit, (text, tid)
