"""multimodal/text.py: the shapes world's tokenizer."""
import pytest

from lmstack.errors import LmstackError
from lmstack.multimodal.text import IMAGE_TOKEN, shapes_texts, shapes_tokenizer
from lmstack.multimodal.vision_world import build_vision_world


def test_tokenizer_round_trips_world_text_and_keeps_image_token_whole():
    tok = shapes_tokenizer(vocab_size=400, n_images=40)
    image_id = tok.token_to_id(IMAGE_TOKEN)
    assert image_id == tok.vocab_size - 1
    for text in shapes_texts(build_vision_world(n_images=5, size=64, seed=3))[:50]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and (len(ids) < len(text) or len(text) == 1)  # merges learned
    assert tok.encode(f"{IMAGE_TOKEN} What colour is the circle?")[0] == image_id
    assert shapes_tokenizer(vocab_size=400, n_images=40).encode("a red star") == tok.encode("a red star")


def test_too_small_vocab_is_named():
    with pytest.raises(LmstackError, match="vocab_size=100"):
        shapes_tokenizer(vocab_size=100)
