"""espeak-ng word events (espeak.synthesize_with_words): the samples are synthesize's, the word times are
monotonic, inside the audio, and line up with the pauses a comma makes."""
import numpy as np
import pytest

from lmstack.multimodal import espeak

pytestmark = pytest.mark.skipif(not espeak.available(), reason="espeak-ng (espeakng-loader) is not installed")


def test_word_events_are_monotonic_inside_the_audio_and_leave_synthesize_unchanged():
    text = "Ada Ashford was born in Amberhaven."
    plain, rate = espeak.synthesize(text, voice="en-us", rate=160, pitch=40)
    samples, rate2, words = espeak.synthesize_with_words(text, voice="en-us", rate=160, pitch=40)
    assert rate == rate2 == 16000 and np.array_equal(samples, plain)
    assert [w for w, _, _ in words] == text.split()
    times = [t for _, a, b in words for t in (a, b)]
    assert all(a <= b for a, b in zip(times, times[1:]))
    assert times[0] == 0.0 and times[-1] <= samples.size / rate
    assert all(b - a > 0.05 for _, a, b in words)  # every word lasts
    again = espeak.synthesize_with_words(text, voice="en-us", rate=160, pitch=40)
    assert again[2] == words and np.array_equal(again[0], samples)  # reproducible


def test_word_times_line_up_with_the_silence_between_words():
    samples, rate, words = espeak.synthesize_with_words("Apple, banana, cherry.")
    for (_, _, end), (_, start, _) in zip(words, words[1:]):
        assert start - end > 0.05  # the comma's pause lies between the words, outside both
        gap = samples[int(end * rate) + 80: int(start * rate) - 80]
        assert gap.size and np.abs(gap).max() < espeak.SILENCE * 3
        assert np.abs(samples[int(start * rate): int(start * rate) + 1600]).max() > 0.05  # speech starts
    number = espeak.synthesize_with_words("7815 and 42")[2]  # one text word read as several: one span
    assert [w for w, _, _ in number] == ["7815", "and", "42"] and number[0][2] > 0.5
