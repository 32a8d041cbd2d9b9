"""The fact checker: claims split into atomic sentences with their subject, a planted contradiction flagged,
a claim about someone the evidence never names left unverifiable, revision dropping what is not supported,
and the LM judge's yes/no probability equal to the model's own next-token likelihoods."""
import math
import random

import pytest
import torch

import lmstack
from lmstack.model.presets import preset
from lmstack.errors import LmstackError
from lmstack.rag.bm25 import BM25
from lmstack.rag.factcheck import FEATURES, LABELS, FactChecker, LMJudge, NLIJudge, default_nli, split_claims
from lmstack.rag.types import Chunk, Hit
from lmstack.tokenizer import train_tokenizer
from lmstack.world import World
from lmstack.world.bios import paraphrase_bio
from lmstack.world.qa import answer_sentence


class BM25Retriever:
    """A retriever over a few texts, for the test (the real Index lives in rag/index.py)."""

    def __init__(self, texts: dict[str, str]):
        self.chunks = {d: Chunk(d, d, t, "test", 0, len(t)) for d, t in texts.items()}
        self.bm = BM25()
        self.bm.add(list(texts), list(texts.values()))

    def search(self, query, k=5, mode="hybrid"):
        return [Hit(self.chunks[i], s, r) for r, (i, s) in enumerate(self.bm.search(query, k), 1)]


@pytest.fixture(scope="module")
def world_index():
    world = World(seed=11, n_people=30)
    rng = random.Random(0)
    people = world.people[:20]  # the other 10 are in no document
    return world, BM25Retriever({f"bio-{p.id}": paraphrase_bio(p, rng, world) for p in people})


def test_claims_are_split_at_sentences_and_conjunctions_and_keep_their_subject():
    text = ("Ada Ashford was born in Amberhaven [1] and works for Zentrix Labs. She enjoys arts and crafts; "
            "her employer is Granite Pharma. Bo Brant is a pilot.")
    assert split_claims(text) == ["Ada Ashford was born in Amberhaven.", "Ada Ashford works for Zentrix Labs.",
                                  "Ada Ashford enjoys arts and crafts.", "Ada Ashford's employer is Granite Pharma.",
                                  "Bo Brant is a pilot."]
    assert split_claims("") == []


def test_a_planted_contradiction_is_flagged_and_the_truth_supported(world_index):
    world, index = world_index
    person = world.people[3]
    wrong = world.other_value("birth_city", person.birth_city, random.Random(1))
    text = (f"{answer_sentence(person, 'university')} {person.pronoun.capitalize()} was born in {wrong} "
            f"and works for {person.employer}.")
    verdicts = FactChecker(None, index).check(text)
    assert [v.label for v in verdicts] == ["supported", "contradicted", "supported"]
    assert verdicts[1].claim == f"{person.name} was born in {wrong}."
    assert person.university.lower() in verdicts[0].span_text.lower()
    assert all(abs(sum(v.probs.values()) - 1) < 1e-6 and v.score == max(v.probs.values()) for v in verdicts)


def test_a_claim_about_someone_no_document_names_is_unverifiable(world_index):
    world, index = world_index
    stranger = world.people[25]
    (v,) = FactChecker(None, index).check(answer_sentence(stranger, "hobby"))
    assert v.label == "unverifiable"


def test_revise_keeps_only_supported_claims(world_index):
    world, index = world_index
    person = world.people[5]
    wrong = world.other_value("employer", person.employer, random.Random(2))
    text = f"{answer_sentence(person, 'major')} {person.name} works for {wrong}."
    checker = FactChecker(None, index)
    assert checker.revise(text) == answer_sentence(person, "major")


def test_the_nli_judge_separates_true_from_swapped_facts_on_another_world():
    world = World(seed=5, n_people=60)
    rng = random.Random(4)
    index = BM25Retriever({f"bio-{p.id}": paraphrase_bio(p, rng, world) for p in world.people})
    judge = default_nli()
    right = total = 0
    for person in world.people[:15]:
        for attribute in ("birth_city", "major", "employer", "hobby"):
            true = world.fact(person, attribute)
            for value, label in ((true, "supported"), (world.other_value(attribute, true, rng), "contradicted")):
                claim = answer_sentence(person, attribute, value)
                probs, _ = judge.probs(claim, index.search(claim, 5))
                right += max(probs, key=probs.get) == label
                total += 1
    assert right / total >= 0.85, right / total


def test_the_nli_judge_round_trips_through_json(tmp_path):
    judge = default_nli()
    judge.save(str(tmp_path / "nli.json"))
    again = NLIJudge.load(str(tmp_path / "nli.json"))
    assert (again.weights == judge.weights).all() and again.weights.shape == (len(FEATURES), len(LABELS))
    (tmp_path / "bad.json").write_text('{"features": ["x"], "labels": [], "weights": []}')
    with pytest.raises(LmstackError, match="other features"):
        NLIJudge.load(str(tmp_path / "bad.json"))


def test_the_lm_judge_is_the_models_yes_no_likelihood(tmp_path, world_index):
    world, index = world_index
    texts = [paraphrase_bio(p, random.Random(0), world) for p in world.people[:5]] + ["yes no claim evidence"] * 20
    tok = train_tokenizer(texts=texts, type="bpe", vocab_size=300, special_tokens="chat", show_progress=False)
    torch.manual_seed(0)
    cfg = preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=1024)
    model = lmstack.Transformer(cfg).eval()
    lmstack.save_model(model, tmp_path / "m", tokenizer=tok)
    llm = lmstack.LLM(str(tmp_path / "m"), max_num_seqs=2)
    judge = LMJudge(llm)
    claim = answer_sentence(world.people[2], "major")
    hits = index.search(claim, 3)
    probs, _ = judge.probs(claim, hits)
    main = next(h for h in hits if world.people[2].last.lower() in h.chunk.text.lower())
    user = ("Evidence:\n" + " ".join(main.chunk.text.split()) + f"\n\nClaim: {claim}\n"
            "Is the claim supported by the evidence? Answer yes or no.")
    prefix = tok.render_messages([{"role": "user", "content": user}], add_generation_prompt=True).ids

    def logprob(answer):
        ids = prefix + tok.encode(answer)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).float()[0], -1)
        return sum(lp[i - 1, ids[i]].item() for i in range(len(prefix), len(ids)))

    expected = 1 / (1 + math.exp(logprob("no") - logprob("yes")))
    assert probs["supported"] == pytest.approx(expected, abs=1e-4)
    stranger = answer_sentence(world.people[25], "major")
    assert judge.probs(stranger, index.search(stranger, 3))[0]["unverifiable"] == 1.0
    with pytest.raises(LmstackError, match="lm judge needs"):
        FactChecker(None, index, judge="lm")
    with pytest.raises(LmstackError, match="judge='oracle'"):
        FactChecker(None, index, judge="oracle")
