"""multimodal/unified.py: image codes in the LM's vocabulary, one decoder that writes and reads pictures."""
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.images import to_pixels
from lmstack.multimodal.shapes import COLOURS, Obj, Scene, render
from lmstack.multimodal.text import shapes_tokenizer
from lmstack.multimodal.unified import IGNORE, UnifiedVocab, caption_pairs, collate, colour_fractions, \
    generate_captions, generate_image_codes, image_to_text_row, text_to_image_row, train_unified, unified_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return shapes_tokenizer(vocab_size=320, n_images=20)


def test_vocabulary_layout_and_code_round_trip(tok):
    v = UnifiedVocab(tok.vocab_size, codebook_size=16, image_tokens=4)
    assert (v.boi, v.eoi, v.offset, v.size) == (tok.vocab_size, tok.vocab_size + 1, tok.vocab_size + 2,
                                                tok.vocab_size + 18)
    codes = torch.tensor([[0, 5, 15, 3]])
    assert torch.equal(v.codes_of(v.image_ids(codes)), codes)
    with pytest.raises(LmstackError, match=f"token id {v.eoi} is not an image code"):
        v.codes_of(torch.tensor([v.offset, v.eoi]))
    with pytest.raises(LmstackError, match=f"token id {v.size} is not an image code"):
        v.codes_of(torch.tensor([v.size]))
    with pytest.raises(LmstackError, match="token id 7 is not an image code"):
        v.codes_of(torch.tensor([7]))
    with pytest.raises(LmstackError, match="outside the codebook"):
        v.image_ids(torch.tensor([16]))


def test_rows_score_only_the_answer(tok):
    v = UnifiedVocab(tok.vocab_size, codebook_size=16, image_tokens=3)
    codes = torch.tensor([1, 2, 3])
    ids, labels = text_to_image_row(v, tok, "a red circle", codes)
    n_prompt = 1 + len(tok.encode("a red circle")) + 1
    assert ids[0] == tok.bos_id and ids[n_prompt - 1] == v.boi and ids[-1] == v.eoi
    assert labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == [v.offset + 1, v.offset + 2,
                                                                              v.offset + 3, v.eoi]
    ids, labels = image_to_text_row(v, tok, codes, "a red circle")
    assert ids[:5] == [v.boi, v.offset + 1, v.offset + 2, v.offset + 3, v.eoi]
    assert labels[:5] == [IGNORE] * 5 and labels[5:] == tok.encode("a red circle") + [tok.eos_id]
    batch_ids, batch_labels = collate([([1, 2, 3], [IGNORE, 2, 3]), ([4], [4])], pad_id=9)
    assert batch_ids.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch_labels.tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]


def test_one_decoder_learns_both_directions(tok):
    """Three pictures (as codes) and their captions, memorised: the same model writes each picture from its
    caption and each caption from its picture."""
    torch.manual_seed(0)
    v = UnifiedVocab(tok.vocab_size, codebook_size=8, image_tokens=4)
    captions = ["a small red circle.", "a large blue star.", "a green square and a pink cross."]
    codes = torch.tensor([[0, 1, 2, 3], [7, 6, 5, 4], [2, 2, 5, 5]])
    model = unified_model(v, d_model=48, n_layers=2, n_heads=4, max_seq_len=32)
    history = train_unified(model, v, tok, captions, codes, steps=70, batch_size=12, lr=1e-2, seed=0)
    assert history[-1]["loss"] < 0.05, history
    assert generate_captions(model, v, tok, codes, max_tokens=16) == captions
    assert torch.equal(generate_image_codes(model, v, tok, captions, temperature=0.0), codes)


def test_constrained_decoding_gives_valid_output_even_untrained(tok):
    torch.manual_seed(0)
    v = UnifiedVocab(tok.vocab_size, codebook_size=8, image_tokens=5)
    model = unified_model(v, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
    codes = generate_image_codes(model, v, tok, ["a red circle.", "a blue star and a red cross.", "x."], seed=1)
    assert codes.shape == (3, 5) and int(codes.min()) >= 0 and int(codes.max()) < 8
    again = generate_image_codes(model, v, tok, ["a red circle.", "a blue star and a red cross.", "x."], seed=1)
    assert torch.equal(codes, again)  # seeded sampling
    texts = generate_captions(model, v, tok, codes, max_tokens=6)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    with pytest.raises(LmstackError, match=r"shape \(N, 5\)"):
        generate_captions(model, v, tok, torch.zeros(1, 4, dtype=torch.long))


def test_training_input_errors_are_named(tok):
    v = UnifiedVocab(tok.vocab_size, codebook_size=8, image_tokens=4)
    model = unified_model(v, d_model=32, n_layers=1, n_heads=2, max_seq_len=8)
    with pytest.raises(LmstackError, match="one caption per image"):
        train_unified(model, v, tok, ["a"], torch.zeros(2, 4, dtype=torch.long), steps=1)
    with pytest.raises(LmstackError, match="codes have 3 per image"):
        train_unified(model, v, tok, ["a"], torch.zeros(1, 3, dtype=torch.long), steps=1)
    with pytest.raises(LmstackError, match="over max_seq_len=8"):
        train_unified(model, v, tok, ["a large red circle and a blue star."], torch.zeros(1, 4, dtype=torch.long),
                      steps=1)


def test_caption_pairs_reads_colour_shape_pairs():
    assert caption_pairs("In this image you can see a small red circle and a large blue stars.") == {
        ("red", "circle"), ("blue", "star")}
    assert caption_pairs("From left to right: a green cross, an orange diamond.") == {("green", "cross"),
                                                                                     ("orange", "diamond")}
    assert caption_pairs("a red, blue circle") == {("blue", "circle")}
    assert caption_pairs("nothing here") == set()


def test_colour_fractions_measure_each_named_colour():
    scene = Scene(32, "gray", "noise", 3, (Obj("square", "red", "large", 10, 10, 4), Obj("circle", "cyan", "small",
                                                                                        24, 24, 3)))
    frac = colour_fractions(to_pixels([render(scene)], 32))[0]
    names = list(COLOURS)
    assert frac[names.index("red")] == pytest.approx(81 / 1024)  # a 9x9 square
    assert 0.01 < float(frac[names.index("cyan")]) < 0.05
    others = [float(frac[i]) for i, n in enumerate(names) if n not in ("red", "cyan")]
    assert others == [0.0] * 6  # the noisy gray background is none of the colours
    # a decoder's blur: a dulled red still counts as red, a grey-ish pixel as no colour
    dull = torch.tensor([[200, 60, 50], [140, 125, 120]], dtype=torch.float32) / 127.5 - 1  # (2 pixels, RGB)
    frac = colour_fractions(dull.T.reshape(1, 3, 1, 2))[0]
    assert frac[names.index("red")] == 0.5 and float(frac.sum()) == 0.5
    far = torch.tensor([0.0, 0.0, 1.0]).reshape(1, 3, 1, 1)  # (128, 128, 255): nearest entry purple, 109 away
    assert float(colour_fractions(far).sum()) == 0.0 and float(colour_fractions(far, tolerance=120).sum()) == 1.0
    with pytest.raises(LmstackError, match=r"shape \(N, 3, S, S\)"):
        colour_fractions(torch.zeros(3, 32, 32))
