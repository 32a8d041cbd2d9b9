"""espeak.py: deterministic, rate and pitch do what they say, bad input is refused by name."""
import threading

import numpy as np
import pytest

from lmstack.errors import LmstackError
from lmstack.multimodal.espeak import INSTALL, available, synthesize

pytestmark = pytest.mark.skipif(not available(), reason=f"espeak-ng cannot load; run: {INSTALL}")


def f0(samples, rate=16000, lo=50.0, hi=400.0):
    """Median fundamental over voiced 40 ms frames, from the autocorrelation peak in the 50..400 Hz lag band."""
    n, out = int(0.04 * rate), []
    energy = np.sqrt(np.mean(samples ** 2))
    for start in range(0, samples.size - n, n):
        fr = samples[start:start + n] - samples[start:start + n].mean()
        if np.sqrt(np.mean(fr ** 2)) < energy:  # voiced vowels are the loud frames
            continue
        ac = np.correlate(fr, fr, "full")[n - 1:]
        lags = np.arange(int(rate / hi), int(rate / lo))
        best = lags[np.argmax(ac[lags])]
        if ac[best] > 0.3 * ac[0]:
            out.append(rate / best)
    return float(np.median(out))


def test_same_text_same_audio():
    a, ra = synthesize("The river runs past the old mill.", voice="en-us", rate=160, pitch=40)
    synthesize("Something else first, faster and higher.", voice="en-gb-x-rp", rate=300, pitch=90)
    b, rb = synthesize("The river runs past the old mill.", voice="en-us", rate=160, pitch=40)
    assert ra == rb == 16000 and a.dtype == np.float32 and a.size > 16000
    assert np.array_equal(a, b)  # bit-identical although another utterance ran in between
    c, _ = synthesize("The river runs past the old mill.", voice="en-us", rate=160, pitch=41)
    assert not np.array_equal(a[:c.size], c[:a.size])


def test_longer_text_longer_audio():
    short, _ = synthesize("Hello.")
    long, _ = synthesize("Hello. The weather in the city is cold and wet today.")
    assert long.size > 2 * short.size


def test_faster_rate_shorter_audio():
    slow, _ = synthesize("Ada studied at the university of Amberhaven.", rate=100)
    fast, _ = synthesize("Ada studied at the university of Amberhaven.", rate=300)
    assert fast.size < 0.6 * slow.size


def test_pitch_moves_fundamental():
    text = "Aaah, oh, you are all alone on a long road."
    low = f0(synthesize(text, pitch=10, pitch_range=0)[0])
    high = f0(synthesize(text, pitch=90, pitch_range=0)[0])
    assert 55 < low < high and high > 1.3 * low


def test_voices_differ_and_threads_are_safe():
    results = {}

    def run(voice):
        results[voice] = synthesize("One two three four.", voice=voice)[0]

    threads = [threading.Thread(target=run, args=(v,)) for v in ("en", "en-us", "en-gb-x-rp")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(np.abs(x).max() > 0.05 for x in results.values())
    assert len({x.size for x in results.values()}) > 1


@pytest.mark.parametrize("kwargs, word", [
    ({"text": ""}, "empty"), ({"text": "   "}, "empty"), ({"text": "hi", "rate": 20}, "rate"),
    ({"text": "hi", "rate": 900}, "rate"), ({"text": "hi", "pitch": -1}, "pitch"),
    ({"text": "hi", "pitch_range": 101}, "pitch_range"), ({"text": "hi", "voice": "xx-nosuch"}, "voice"),
])
def test_bad_input_named(kwargs, word):
    with pytest.raises(LmstackError, match=word):
        synthesize(**kwargs)
