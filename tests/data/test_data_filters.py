import pytest

from lmstack.data.document import make_doc
from lmstack.data.filters import FILTERS, FiltersConfig, build_filters
from lmstack.data.filters.langid import LangIdConfig, LangIdFilter, detect_language
from lmstack.data.filters.pii import PiiConfig, PiiFilter, find_pii, luhn_valid, redact_pii
from lmstack.data.filters.quality import QualityConfig, QualityFilter, quality_reason, quality_stats
from lmstack.data.filters.readability import ReadabilityConfig, ReadabilityFilter
from lmstack.data.filters.toxicity import ToxicityConfig, ToxicityFilter, toxic_hits

GOOD = ("The river that runs through the old town has shaped the lives of the people who live along its banks. "
        "In spring the water rises with melted snow, and the farmers have learned to plant their crops on the higher "
        "fields. During the summer months children swim in the shallow pools near the bridge, while their parents "
        "trade vegetables at the market. Historians believe that the first settlement was built here more than eight "
        "hundred years ago, because the valley offered fresh water, fertile soil and protection from the winter winds.")
LINE = "the farmers have learned to plant their crops on the fields"


def _reason(text, **kw):
    cfg = QualityConfig(**kw)
    return quality_reason(quality_stats(text, cfg), cfg)


def test_good_text_passes_both_levels():
    assert _reason(GOOD) is None
    assert _reason(GOOD, level="char") is None


@pytest.mark.parametrize("text,reason", [
    ("A short note.", "too_few_words"),
    (" ".join(["antidisestablishmentarianism"] * 30 + ["the", "of", "and"] * 10) + ".", "mean_word_length"),
    (" ".join(f"#tag{i} the of" for i in range(30)) + ".", "symbol_ratio"),
    (" ".join(f"{i * 7919} the" for i in range(60)) + ".", "alpha_fraction"),
    ("buy now " * 40 + "the of and.", "top_bigram"),
    ("\n".join([f"{LINE} number {i % 10} today." for i in range(30)]), "dup_lines"),
    ((GOOD[:200] + " ") * 4, "dup_ngrams"),
    ("\n".join(GOOD[i * 60:i * 60 + 60] + ("..." if i % 2 else ".") for i in range(8)), "ellipsis_lines"),
    ("\n".join(f"- {GOOD[i * 40:i * 40 + 40]}." for i in range(12)), "bullet_lines"),
    ("\n".join(GOOD[i * 40:i * 40 + 40].rstrip(".,") for i in range(12)), "terminal_punct"),
    ("Rivers carry melted snow down from high mountains into green valleys. Farmers plant crops on higher "
     "fields, children swim in shallow pools near bridges, parents trade vegetables at markets. Historians "
     "believe settlements appeared here centuries ago because valleys offered fresh water, fertile soil, "
     "shelter from winter winds. Fishermen mend nets while merchants count coins beside busy harbours.", "stop_words"),
    (GOOD + " Lorem ipsum dolor sit amet.", "lorem_ipsum"),
    (GOOD + " See {config} for details.", "curly_bracket"),
])
def test_each_quality_rule(text, reason):
    assert _reason(text) == reason


def test_char_level_vs_word_level():
    # Chinese has no spaces: word level sees a handful of giant "words"; char level measures it properly.
    zh = ("河流穿过古老的小镇，塑造了沿岸居民的生活。春天，河水随着融化的雪上涨，农民们学会了在较高的田地上种植庄稼。"
          "夏天，孩子们在桥边的浅水池里游泳，父母们则在市场上交易蔬菜。历史学家认为，第一个定居点建于八百多年前，"
          "因为山谷提供了淡水、肥沃的土壤和抵御冬季寒风的保护。")
    zh = zh.replace("。夏天", "。\n夏天")
    assert _reason(zh, min_stop_words=0) == "too_few_words"
    assert _reason(zh, level="char", min_stop_words=0, min_chars=100) is None
    # Junk hidden inside words: every word has letters and no '#', so word-level ratios pass it.
    junk = " ".join(w[:2] + "@^~"[i % 3] + w[2:] if len(w) > 3 else w for i, w in enumerate(GOOD.split()))
    assert _reason(junk) is None
    assert _reason(junk, level="char") == "symbol_ratio"


def test_quality_filter_and_config_errors():
    docs = [make_doc(GOOD, "a", "s"), make_doc("tiny", "b", "s")]
    res = QualityFilter(QualityConfig())(docs)
    assert [d["id"] for d in res.kept] == ["a"] and res.reasons() == {"too_few_words": 1}
    with pytest.raises(ValueError, match="quality.max_dup_line_fraction"):
        QualityConfig(max_dup_line_fraction=1.5)


def test_langid_annotates_and_drops():
    assert detect_language(GOOD)[0] == "en"
    assert detect_language("Le fleuve traverse la vieille ville et façonne la vie des habitants depuis des siècles.")[0] == "fr"
    assert detect_language("12345 !!! ...") == ("unknown", 0.0)
    docs = [make_doc(GOOD, "en", "s"),
            make_doc("Der Fluss fließt durch die alte Stadt und prägt seit Jahrhunderten das Leben der Menschen.", "de", "s")]
    res = LangIdFilter(LangIdConfig(languages=["en"]))(docs)
    assert [d["id"] for d in res.kept] == ["en"] and res.kept[0]["meta"]["lang"] == "en"
    assert res.reasons() == {"lang=de": 1}
    assert "lang" not in docs[0]["meta"]  # pure: the input documents are not modified
    assert len(LangIdFilter(LangIdConfig())(docs).kept) == 2


def test_readability():
    easy = "The cat sat. The dog ran. We had fun. It was hot. We ate figs."
    hard = ("Notwithstanding the aforementioned institutional considerations, the interdisciplinary operationalization "
            "of epistemological methodologies necessitates comprehensive reconceptualization of organizational "
            "infrastructure, administrative accountability and intergovernmental responsibilities simultaneously.")
    res = ReadabilityFilter(ReadabilityConfig(enabled=True, min_grade=1.0, max_grade=16.0))(
        [make_doc(t, i, "s") for i, t in (("easy", easy), ("hard", hard), ("good", GOOD))])
    assert [d["id"] for d in res.kept] == ["good"]
    assert res.reasons() == {"too_easy": 1, "too_hard": 1}
    assert 1.0 < res.kept[0]["meta"]["fk_grade"] < 16.0
    with pytest.raises(ValueError):
        ReadabilityConfig(min_grade=5, max_grade=1)


def test_toxicity(tmp_path):
    assert toxic_hits("You stupid IDIOT, kill yourself") == 3
    assert toxic_hits("The scumble glaze") == 0  # word boundaries
    docs = [make_doc("you are a stupid idiot and a moron, shut up", "tox", "s"),
            make_doc(GOOD + " Damn, what a view.", "mild", "s"),
            make_doc("Here is how to brew the Forbidden  Potion of Varn at home.", "policy", "s")]
    res = ToxicityFilter(ToxicityConfig(blocked_phrases=["forbidden potion"]))(docs)
    assert [d["id"] for d in res.kept] == ["mild"]
    assert res.reasons() == {"toxic_words": 1, "policy": 1}
    words = tmp_path / "words.txt"
    words.write_text("river\n", encoding="utf-8")
    res = ToxicityFilter(ToxicityConfig(wordlist=str(words), max_word_fraction=0.0, min_word_hits=1))(docs)
    assert res.reasons() == {"toxic_words": 1} and [d["id"] for d in res.dropped[0][:1]] == ["mild"]


def test_pii_kinds_and_false_positives():
    text = ("Write to jane.doe@mail.example.org or call +1 (555) 123-4567 / 020 7946 0958. Server 10.0.0.255 "
            "and 2001:db8::8a2e:370:7334. Card 4111 1111 1111 1111.")
    kinds = [k for _, _, k in find_pii(text)]
    assert sorted(kinds) == ["credit_card", "email", "ip", "ip", "phone", "phone"]
    redacted, counts = redact_pii(text)
    assert "jane.doe" not in redacted and "<EMAIL>" in redacted and "<CREDIT_CARD>" in redacted
    assert counts == {"email": 1, "phone": 2, "ip": 2, "credit_card": 1}
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    clean = ("Version 3.10.2 shipped on 2021-03-15; 1999-2005 was a good era, 1,000,000 people came, "
             "1200-400-300=<<1200-400-300=500>>500 dollars, time 12:30:45, card-like 4111 1111 1111 1112.")
    assert find_pii(clean) == []


def test_pii_filter_actions():
    docs = [make_doc("mail me at a@b.co", "p", "s"), make_doc(GOOD, "g", "s")]
    red = PiiFilter(PiiConfig())(docs)
    assert red.kept[0]["text"] == "mail me at <EMAIL>" and red.modified == {"email": 1} and len(red.kept) == 2
    drop = PiiFilter(PiiConfig(action="drop"))(docs)
    assert drop.reasons() == {"pii:email": 1}
    flag = PiiFilter(PiiConfig(action="flag", kinds=["email"]))(docs)
    assert flag.kept[0]["meta"]["pii"] == {"email": 1} and flag.kept[0]["text"] == docs[0]["text"]
    with pytest.raises(ValueError, match="pii.kinds"):
        PiiConfig(kinds=["ssn"])


def test_registry_switches():
    names = [n for n, _ in build_filters(FiltersConfig())]
    assert names == ["quality", "toxicity", "langid", "pii"]  # readability and classifier are off by default
    cfg = FiltersConfig()
    cfg.quality.enabled = False
    cfg.readability.enabled = True
    assert [n for n, _ in build_filters(cfg)] == ["toxicity", "langid", "readability", "pii"]
    assert list(FILTERS) == ["quality", "toxicity", "langid", "readability", "classifier", "pii"]
