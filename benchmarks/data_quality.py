"""Data-stage numbers (rows I.1-I.15, IX.1) recomputed from the public data and the synthetic world.

Each section measures one technique against a named baseline on real or world data and records
counts with their n (accuracies also carry a binomial stderr):
- quality classifier (I.1, I.8, I.12): world quality corpus, test split; baseline: Gopher rules alone;
- langid (I.2): UDHR Article 1 in every language langdetect knows; language-temperature shares;
- decontamination (I.6): GSM8K train against GSM8K test, plus planted leaks;
- moderation (I.10): word-list toxicity and PII false positives on clean text (Shakespeare, GSM8K);
- zstd shards (I.11): byte-token shards of Tiny Shakespeare, compressed vs raw;
- char vs word quality rules (I.13): UDHR texts written without spaces;
- readability (I.14): Flesch-Kincaid grade per corpus and the share a [1, 12] window keeps;
- noise and paraphrase augmentation (I.9), topic balancing (I.15), counterfactual swaps (IX.1);
- the world generator (I.4): size, time and byte-identical output for one seed.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_quality.py   (about two minutes on 2 shared cores)
"""
from __future__ import annotations

import difflib
import gzip
import hashlib
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

from _common import result, write_result

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MACHINE = "2 cores, shared"


def stderr(p: float, n: int) -> float:
    return round(math.sqrt(p * (1 - p) / n), 4) if n else float("nan")


def shakespeare_paragraphs() -> list[str]:
    text = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- I.1, I.8, I.12
def quality_classifier() -> list[dict]:
    from lmstack.data.filters.classifier import HashedNgramClassifier, binary_metrics, split_heldout
    from lmstack.data.filters.quality import QualityConfig, quality_reason, quality_stats
    from lmstack.data.selflabel import self_train
    from lmstack.world import World

    recs = World(seed=0, size="small").corpus("quality")
    train = [r for r in recs if r["split"] == "train"]
    labelled = [r for r in train if r["labelled"]]
    pool = [r for r in train if not r["labelled"]]
    test = [r for r in recs if r["split"] == "test"]
    y = lambda rs: [int(r["label"] == "good") for r in rs]  # noqa: E731  positive = keep (good)
    tx, ty = [r["text"] for r in test], y(test)

    clf = HashedNgramClassifier().fit([r["text"] for r in labelled], y(labelled))
    ours = binary_metrics(ty, clf.predict_proba(tx) >= 0.5)
    qcfg = QualityConfig()
    gopher = binary_metrics(ty, [quality_reason(quality_stats(t, qcfg), qcfg) is None for t in tx])
    cfg = dict(world="seed 0, small", n_test=len(test), n_labelled_train=len(labelled), machine=MACHINE,
               classifier=ours, gopher_rules=gopher, positive="good (kept)")
    out = [result("data_quality", "quality_classifier_f1", True, ours["f1"], "Gopher rules alone", gopher["f1"],
                  **cfg)]
    out.append(result("data_quality", "quality_classifier_precision", True, ours["precision"], "Gopher rules alone",
                      gopher["precision"], **cfg))
    out.append(result("data_quality", "quality_classifier_recall", True, ours["recall"], "Gopher rules alone",
                      gopher["recall"], **cfg))

    # I.8: the human-labelled subset alone, with its own held-out fifth (what `train-classifier` reports).
    tr, ho = split_heldout(len(labelled), 0.2, 0, labels=y(labelled))
    lab_y = y(labelled)
    sub = HashedNgramClassifier().fit([labelled[i]["text"] for i in tr], [lab_y[i] for i in tr])
    held = binary_metrics([lab_y[i] for i in ho], sub.predict_proba([labelled[i]["text"] for i in ho]) >= 0.5)
    out.append(result("data_quality", "labelled_subset_heldout_f1", True, held["f1"], "Gopher rules alone (test)",
                      gopher["f1"], n_heldout=len(ho), n_train=len(tr), heldout=held, machine=MACHINE))

    # I.12: self-training on the unlabelled pool; ceiling = every train label revealed.
    st = self_train([r["text"] for r in labelled], lab_y, [r["text"] for r in pool], tx, ty, confidence=0.9,
                    rounds=3, max_per_round=1000, pool_labels=y(pool))
    ceiling = binary_metrics(ty, HashedNgramClassifier().fit([r["text"] for r in train], y(train)).predict_proba(tx)
                             >= 0.5)
    out.append(result("data_quality", "self_training_f1", True, st["after"]["f1"], "labelled subset only",
                      st["before"]["f1"], n_test=len(test), n_pool=len(pool), ceiling_all_labels_f1=ceiling["f1"],
                      pseudo_labelled=st["pseudo_labelled"], pseudo_label_accuracy=st["pseudo_label_accuracy"],
                      machine=MACHINE))
    return out


# ---------------------------------------------------------------- I.2
def langid() -> list[dict]:
    from langdetect import DetectorFactory
    from lmstack.data.filters.langid import detect_language
    from lmstack.data.mixing import temperature_shares

    DetectorFactory.seed = 0
    import langdetect
    profiles = {p.name for p in (Path(langdetect.__file__).parent / "profiles").iterdir()}
    right = total = 0
    wrong = []
    for r in jsonl(DATA / "udhr" / "udhr_article1.jsonl"):
        tag = r["bcp47"]
        want = {"zh-Hans": "zh-cn", "zh-Hant": "zh-tw", "cmn-Hans": "zh-cn", "cmn-Hant": "zh-tw"}.get(tag,
                                                                                                 tag.split("-")[0])
        if want not in profiles:
            continue
        total += 1
        got = detect_language(r["text"])[0]
        right += got == want
        if got != want:
            wrong.append(f"{tag}->{got}")
    acc = right / total
    shares = temperature_shares({"major": 90, "minor": 10}, 3.0)
    return [result("data_quality", "langid_udhr_accuracy", True, acc, "chance (1 of the languages)",
                   1 / len(profiles), n=total, right=right, stderr=stderr(acc, total), wrong=wrong[:20],
                   machine=MACHINE),
            result("data_quality", "temperature3_minor_share", True, shares["minor"], "natural share", 0.10,
                   formula="p_i^(1/T) / sum_j p_j^(1/T), T=3, shares 90/10")]


# ---------------------------------------------------------------- I.6
def decontamination() -> list[dict]:
    from lmstack.data.decontaminate import DecontamConfig, Decontaminator

    test_path = DATA / "gsm8k" / "test.jsonl"
    train = jsonl(DATA / "gsm8k" / "train.jsonl")
    t0 = time.perf_counter()
    dec = Decontaminator(DecontamConfig(paths=[str(test_path)]))
    flagged, items = 0, set()
    for r in train:
        hit, _ = dec.hits(r["question"] + "\n" + r["answer"])
        if hit:
            flagged += 1
            items.update(hit)
    seconds = time.perf_counter() - t0
    rng = random.Random(0)
    tests = jsonl(test_path)
    filler = shakespeare_paragraphs()
    planted = rng.sample(range(len(tests)), 50)
    caught = sum(bool(dec.hits(f"{rng.choice(filler)}\n{tests[i]['question']}\n{rng.choice(filler)}")[0])
                 for i in planted)
    false_hits = sum(bool(dec.hits(p)[0]) for p in filler[:2000])
    return [result("data_quality", "gsm8k_train_problems_sharing_13grams_with_test", False, flagged,
                   "train problems", len(train), test_items_hit=len(items), seconds=round(seconds, 2), ngram=13,
                   machine=MACHINE),
            result("data_quality", "planted_leaks_caught", True, caught, "planted", 50,
                   shakespeare_false_hits=false_hits, shakespeare_checked=2000)]


# ---------------------------------------------------------------- I.10
def moderation() -> list[dict]:
    from lmstack.data.document import make_doc
    from lmstack.data.filters.pii import find_pii
    from lmstack.data.filters.toxicity import ToxicityConfig, ToxicityFilter

    paras = shakespeare_paragraphs()
    gsm = [r["question"] for r in jsonl(DATA / "gsm8k" / "train.jsonl")]
    tox = ToxicityFilter(ToxicityConfig())
    fp_sh = len(tox([make_doc(t, str(i), "s") for i, t in enumerate(paras)]).dropped[0]) if paras else 0
    fp_gsm = len(tox([make_doc(t, str(i), "g") for i, t in enumerate(gsm)]).dropped[0])
    gsm_full = [r["question"] + "\n" + r["answer"] for r in jsonl(DATA / "gsm8k" / "train.jsonl")]
    pii_fp = sum(bool(find_pii(t)) for t in gsm_full)
    return [result("data_quality", "toxicity_false_positives_shakespeare", False, fp_sh, "paragraphs", len(paras)),
            result("data_quality", "toxicity_false_positives_gsm8k", False, fp_gsm, "problems", len(gsm)),
            result("data_quality", "pii_false_positives_gsm8k", False, pii_fp, "problems with answers",
                   len(gsm_full))]


# ---------------------------------------------------------------- I.11
def zstd_shards() -> list[dict]:
    from lmstack.data.document import make_doc
    from lmstack.data.shards import ShardConfig, write_shards

    docs = [make_doc(t, str(i), "s") for i, t in enumerate(shakespeare_paragraphs())]
    with tempfile.TemporaryDirectory() as tmp:
        z = write_shards(docs, Path(tmp) / "z", ShardConfig(compression="zstd", zstd_level=10))
        raw = write_shards(docs, Path(tmp) / "raw", ShardConfig())
        zbytes = sum((Path(tmp) / "z" / e["file"]).stat().st_size for e in z["shards"])
        rbytes = sum((Path(tmp) / "raw" / e["file"]).stat().st_size for e in raw["shards"])
    return [result("data_quality", "zstd_shard_bytes_tinyshakespeare", False, zbytes, "uncompressed shards", rbytes,
                   tokenizer="bytes (uint16 ids)", zstd_level=10)]


# ---------------------------------------------------------------- I.13
def char_vs_word() -> list[dict]:
    from lmstack.data.filters.quality import QualityConfig, quality_reason, quality_stats

    recs = jsonl(DATA / "udhr" / "udhr_full.jsonl.gz")
    unspaced = []
    for r in recs:
        text = "\n".join(str(r.get(k, "")) for k in ("preamble",) if r.get(k))
        body = "\n".join(a.get("text", "") for a in r.get("articles") or [] if isinstance(a, dict))
        text = (text + "\n" + body).strip()
        if len(text) > 500 and text.count(" ") < len(text) / 40:
            unspaced.append((r["bcp47"], text))
    word = QualityConfig(min_stop_words=0)
    char = QualityConfig(level="char", min_stop_words=0)
    kept_word = sum(quality_reason(quality_stats(t, word), word) is None for _, t in unspaced)
    kept_char = sum(quality_reason(quality_stats(t, char), char) is None for _, t in unspaced)
    return [result("data_quality", "unspaced_udhr_kept_char_level", True, kept_char, "word level", kept_word,
                   n=len(unspaced), languages=[b for b, _ in unspaced], rule="fewer than 1 space per 40 chars")]


# ---------------------------------------------------------------- I.14
def readability_windows() -> list[dict]:
    from lmstack.data.filters.readability import readability

    corpora = {"shakespeare": shakespeare_paragraphs()[:3000],
               "gsm8k": [r["question"] for r in jsonl(DATA / "gsm8k" / "train.jsonl")][:3000],
               "boolq": [r["query"].split("\nQuestion:")[0].removeprefix("Passage: ")
                         for r in jsonl(DATA / "superglue" / "boolq_dev.jsonl")][:2000]}
    out = []
    for name, texts in corpora.items():
        grades = [readability(t)["fk_grade"] for t in texts]
        keep = sum(1.0 <= g <= 12.0 for g in grades) / len(grades)
        out.append(result("data_quality", f"fk_grade_median_{name}", False, statistics.median(grades),
                          "grade 12 (window top)", 12.0, n=len(grades), kept_share_window_1_12=round(keep, 4)))
    return out


# ---------------------------------------------------------------- I.9, I.15, IX.1
def augmentation() -> list[dict]:
    from lmstack.data.augment import add_noise, counterfactual, gender_counts
    from lmstack.world import World, paraphrase_bio

    paras = shakespeare_paragraphs()[:500]
    rng = random.Random(0)
    sims = [difflib.SequenceMatcher(None, p, add_noise(p, 0.05, rng), autojunk=False).ratio() for p in paras]
    world = World(seed=0, size="small")
    brng = random.Random(0)
    person = world.people[0]
    bios = [paraphrase_bio(person, brng, world) for _ in range(200)]
    grams = [{tuple(b.split()[i:i + 5]) for i in range(len(b.split()) - 4)} for b in bios]
    jacc = statistics.mean(len(grams[i] & grams[i + 1]) / max(1, len(grams[i] | grams[i + 1]))
                           for i in range(0, 199, 2))
    all_paras = shakespeare_paragraphs()
    before = gender_counts(all_paras)
    swapped = [counterfactual(p) for p in all_paras]
    copies = [t for t, n in swapped if n]
    after = gender_counts(all_paras + copies)
    return [result("data_quality", "noise_rate_0.05_similarity", True, statistics.mean(sims), "identical text", 1.0,
                   n=len(sims), measure="difflib ratio"),
            result("data_quality", "bio_paraphrases_distinct", True, len(set(bios)), "paraphrases drawn", len(bios),
                   mean_5gram_jaccard_between_pairs=round(jacc, 4)),
            result("data_quality", "counterfactual_male_to_female_ratio", False, after["male"] / after["female"],
                   "before augmentation", before["male"] / before["female"], swapped_copies=len(copies),
                   before=before, after=after)]


def topics() -> list[dict]:
    from lmstack.data.mixing import MixConfig, achieved_shares, mixture_copies
    from lmstack.data.topics import TopicConfig, TopicModel

    vocab = {"sport": "match goal team player coach league score stadium referee season".split(),
             "cook": "recipe oven flour butter sauce kitchen bake spice garlic onion".split(),
             "space": "orbit rocket planet star galaxy telescope comet moon launch crater".split()}
    common = "the a of and to in on with for was".split()
    rng = random.Random(0)
    texts, truth = [], []
    for topic, n in (("sport", 300), ("cook", 60), ("space", 40)):
        for _ in range(n):
            texts.append(" ".join(rng.choice(vocab[topic] if rng.random() < 0.5 else common) for _ in range(40)))
            truth.append(topic)
    model = TopicModel(TopicConfig(enabled=True, n_topics=3)).fit(texts)
    pred = model.predict(texts).tolist()
    purity = sum(max(sum(1 for p, t in zip(pred, truth) if p == c and t == topic) for topic in vocab)
                 for c in set(pred)) / len(texts)
    copies = mixture_copies({"source": ["s"] * len(texts), "topic": pred},
                            MixConfig(topics=TopicConfig(enabled=True, n_topics=3, strength=1.0)))
    after = achieved_shares(pred, copies)
    return [result("data_quality", "topic_purity", True, purity, "chance", 1 / 3, n=len(texts)),
            result("data_quality", "topic_balance_largest_share", False, max(after.values()), "before balancing",
                   300 / 400, shares_after=sorted(round(v, 4) for v in after.values()))]


# ---------------------------------------------------------------- I.4
def world_generator() -> list[dict]:
    from lmstack.world import generate_world

    digests, seconds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(2):
            out = Path(tmp) / f"w{run}"
            t0 = time.perf_counter()
            manifest = generate_world(out, size="small", seed=0)
            seconds.append(time.perf_counter() - t0)
            digests.append({str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                            for p in sorted(out.rglob("*")) if p.is_file()})
    same = sum(digests[0][k] == digests[1].get(k) for k in digests[0])
    return [result("data_quality", "world_small_identical_files", True, same, "files written", len(digests[0]),
                   seconds=round(min(seconds), 2), pretrain_mb=round(manifest["pretrain_bytes"] / 1e6, 2),
                   pretrain_docs=manifest["counts"].get("pretrain"), machine=MACHINE)]


SECTIONS = [quality_classifier, langid, decontamination, moderation, zstd_shards, char_vs_word, readability_windows,
            augmentation, topics, world_generator]

if __name__ == "__main__":
    import sys

    only = set(sys.argv[1:])
    results = []
    for section in SECTIONS:
        if only and section.__name__ not in only:
            continue
        t0 = time.perf_counter()
        results += section()
        print(f"{section.__name__}: {time.perf_counter() - t0:.1f} s", flush=True)
    if not only:
        write_result("data_quality", results)
    else:
        print(json.dumps(results, indent=1)[:6000])
