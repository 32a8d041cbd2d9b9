"""Small corpora made in the test process, and trained tokenizers shared across the tokenizer tests."""
import random

import pytest

from lmstack.tokenizer import train_tokenizer

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no will more what up out "
         "said time about other into than its only some could new them these two may first then do any like "
         "my now over such our man me even most made after also did many before must through back years where "
         "much your way well down should because each just those people how too little state good very make "
         "world still own see men work long get here between both life being under never day same another know "
         "while last might us great old year off come since against go came right used take three").split()
EXTRA = ["héllo", "naïve", "Straße", "日本語", "中文字", "ไทย", "مرحبا", "Привет", "🙂", "e\u0301", "ﬁ", "①", "x²"]


def make_corpus(n_lines: int = 600, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        kind = rng.random()
        if kind < 0.75:
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            if rng.random() < 0.2:
                words.insert(rng.randrange(len(words)), rng.choice(EXTRA))
            line = " ".join(words).capitalize() + rng.choice([".", "!", "?", ",", ";"])
        elif kind < 0.9:
            a, b = rng.randint(0, 9999), rng.randint(0, 999)
            line = f"{a} + {b} = {a + b}; {a} * 3 = {a * 3}"
        else:
            name = rng.choice(WORDS)
            line = f"def {name}_{i}(x, y):\n    if x > {i}:\n        return x + y\n    return {name}_{i}(y, x)"
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus() -> str:
    return make_corpus()


@pytest.fixture(scope="session")
def bpe_tok(corpus):
    return train_tokenizer(texts=[corpus], type="bpe", vocab_size=600, show_progress=False)


@pytest.fixture(scope="session")
def unigram_tok(corpus):
    return train_tokenizer(texts=[corpus[:12000]], type="unigram", vocab_size=400, show_progress=False)


@pytest.fixture(scope="session")
def wordpiece_tok(corpus):
    return train_tokenizer(texts=[corpus], type="wordpiece", vocab_size=500, show_progress=False)


_SAMPLES = [
    "The first man said: \"no\".",
    "  leading spaces and\ttabs\n\nnewlines   end  ",
    "héllo naïve Straße 日本語 ไทย مرحبا Привет 🙂 e\u0301 ﬁ ① x² \x00 end",
    "12345 + 678 = 13023; 3.14159",
    "def f(x):\n    return x  # comment\n",
    "Text with <|user_start|> a special token and <|bos|> another.",
    "",
    " ",
    "a",
]


@pytest.fixture(scope="session")
def samples() -> list[str]:
    """Awkward texts every tokenizer must handle: unicode, whitespace runs, digits, code, special tokens."""
    return list(_SAMPLES)
