"""Morpheme-aware pre-tokenization for agglutinative languages: a rule-based suffix splitter (Finnish, Turkish).

Finnish and Turkish build words by stacking suffixes (Turkish "ev-ler-iniz-den" = from your houses, Finnish
"talo-i-ssa-mme" = in our houses). Plain BPE learns frequent *whole* word forms and fragments rare ones at
arbitrary points. Here a regex isolates a chain of known suffixes at the end of each word before BPE runs,
so suffixes become shared pieces across stems.

The rule: at a position with at least 3 letters before it, a known suffix may be cut off if the rest of the
word is a chain of at most 3 more known suffixes. The regex scans left to right, so the longest chain wins.
It is a plain `Split` step in tokenizer.json, so HF `tokenizers` runs it too and the fast path stays exact.
This is a crude splitter (no vowel harmony or stem changes); the benchmark measures what it buys.

Usage:
    split_morphemes("özgürlüklerinden", "tr")  # -> ['özgür', 'lük', 'ler', 'in', 'den']
    split_morphemes("taloissamme", "fi")       # -> ['talo', 'issa', 'mme']
    step = morpheme_split_json("fi+tr")        # a tokenizer.json pre_tokenizer step
"""
from __future__ import annotations

import regex

from lmstack.errors import LmstackError

SUFFIXES = {
    "tr": (
        # plural, possessive
        "lar ler ları leri ım im um üm ın in un ün ımız imiz umuz ümüz ınız iniz unuz ünüz sı si su sü "
        # cases: locative, ablative, dative, accusative, genitive, instrumental, equative
        "da de ta te dan den tan ten ya ye yı yi yu yü nın nin nun nün yla yle la le ca ce ça çe na ne "
        # derivation: -ness, -less, -with, agent
        "lık lik luk lük sız siz suz süz lı li lu lü cı ci cu cü çı çi çu çü "
        # copula, infinitive, tense and relative suffixes
        "dır dir dur dür tır tir tur tür mak mek ması mesi acak ecek yor mış miş muş müş ki daki deki "
        "abil ebil ılır ilir ulur ülür dı di du dü tı ti tu tü"
    ).split(),
    "fi": (
        # local cases (singular and plural stems), translative, essive, abessive, comitative
        "ssa ssä sta stä lla llä lta ltä lle ksi na nä tta ttä issa issä ista istä illa illä ilta iltä ille "
        "iksi ina inä itta ittä ineen ien iden itten ihin seen siin hin "
        # partitive, possessives, clitics
        "ta tä ja jä ni si mme nne nsa nsä an än kin kaan kään ko kö han hän pa pä "
        # verb forms and derivations
        "minen mista maan mään massa mässä tava tävä ttava ttävä nut nyt neet isi lle"
    ).split(),
}
LANGS = ("fi", "tr", "fi+tr")


def suffix_pattern(lang: str) -> str:
    if lang not in LANGS:
        raise LmstackError(f"morphemes={lang!r} is not supported; choose one of {', '.join(LANGS)}")
    sufs = sorted({s for code in lang.split("+") for s in SUFFIXES[code]}, key=lambda s: (-len(s), s))
    alt = "|".join(sufs)
    # A suffix, preceded by >= 3 letters, followed only by known suffixes up to the end of the word.
    return rf"(?<=\p{{L}}{{3}})(?:{alt})(?=(?:{alt}){{0,3}}(?!\p{{L}}))"


def morpheme_split_json(lang: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": suffix_pattern(lang)}, "behavior": "Isolated", "invert": False}


_COMPILED: dict[str, regex.Pattern] = {}


def split_morphemes(word: str, lang: str) -> list[str]:
    rx = _COMPILED.get(lang) or _COMPILED.setdefault(lang, regex.compile(suffix_pattern(lang)))
    out, prev = [], 0
    for m in rx.finditer(word):
        if m.start() > prev:
            out.append(word[prev:m.start()])
        out.append(m.group())
        prev = m.end()
    if prev < len(word):
        out.append(word[prev:])
    return out
