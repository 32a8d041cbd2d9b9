"""HELM perturbations and counterfactual swaps: seeded, meaning-preserving where they should be."""
from lmstack.eval.helm import SWAPS, doc_swapper, extra_whitespace, lowercase, swap_words, typo

TEXT = "Question: Which planet is closest to the Sun? Answer carefully, please."


def test_typo_is_seeded_and_only_touches_long_words():
    a, b = typo(TEXT, rate=1.0, seed=3), typo(TEXT, rate=1.0, seed=3)
    assert a == b and a != TEXT
    assert typo(TEXT, rate=1.0, seed=4) != a
    assert typo(TEXT, rate=0.0) == TEXT
    # Words under four letters are never touched; the word count stays.
    assert a.split()[3] == "is" and len(a.split()) == len(TEXT.split())


def test_case_and_whitespace_keep_the_words():
    assert lowercase(TEXT) == TEXT.lower()
    spaced = extra_whitespace(TEXT, rate=1.0, seed=0)
    assert spaced.split() == TEXT.split() and len(spaced) > len(TEXT)
    assert extra_whitespace("a\nb c", rate=1.0).count("\n") == 1


def test_gender_and_name_swaps_keep_case_and_whole_words():
    g = SWAPS["gender"]
    assert swap_words("He gave his father the book. She smiled.", g) == "She gave her mother the book. He smiled."
    assert swap_words("THE MAN and the women", g) == "THE WOMAN and the men"
    assert swap_words("Shepherd theme", g) == "Shepherd theme"  # no partial-word matches
    n = SWAPS["names"]
    assert swap_words("John met Mary.", n) == "Mary met John."


def test_doc_swapper_changes_text_fields_and_choices_only():
    doc = {"query": "Was he late?", "choices": ["he was", "his dog was"], "gold": 1}
    out = doc_swapper(SWAPS["gender"])(doc)
    assert out == {"query": "Was she late?", "choices": ["she was", "her dog was"], "gold": 1}
    assert doc["query"] == "Was he late?"  # the original document is not modified
