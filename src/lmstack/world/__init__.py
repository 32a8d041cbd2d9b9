"""The synthetic world: lmstack's embedded default corpus, so nothing needs downloading.

A deterministic generator (seed + size) builds a small fictional world -- people with birth
dates, birth cities, universities, majors, employers, professions and hobbies; cities with
countries, populations, rivers and landmarks -- and derives from it every corpus the later
stages need, each as JSONL with train/val/test splits:

=============  ======================================================================================
pretrain       bioS-style biographies (many paraphrases per person), city/country descriptions,
               worked arithmetic, short stories, dialogues, and train QA pairs ("mixed training")
qa             knowledge questions; val/test hold out both the people and the phrasings (qa.py)
arithmetic     word problems with step-by-step solutions ending in `#### <answer>`, difficulty 1..5
instructions   verifiable instructions with a checker name + args (`check_instruction`)
preferences    prompt/chosen/rejected: correctness, helpfulness, instruction following, a fictional
               harmful category with refusals, and benign look-alikes (`is_harmful_request`)
passkey        long documents with a hidden pass key at a known depth
code           HumanEval-style tasks: prompt, canonical_solution, test with check(candidate), entry_point
chat           SFT conversations in `messages` format, incl. persona system prompts (conversations.PERSONAS)
quality        good vs bad documents (gibberish, word salad, spam, ...), 20% of train labelled, for the
               quality classifier and its self-training
=============  ======================================================================================
Expansion batches for `lmstack data add` (new documents plus planted duplicates, near-duplicates and
contamination) come from expansion.py on demand; they are not part of generate_world's output (writer.py).
The world's checkers -- refusal detection, answer matching, fact lookup -- live in checkers.py; the eval
harness and alignment both read replies with them.

Sizes (seed 0, all corpora, measured on a shared 2-core CPU; tokens ~ text bytes / 4):

=======  ======  =============  ===================  ==========  =======
size     people  pretrain docs  pretrain text        all files   time
=======  ======  =============  ===================  ==========  =======
small       500  10.0k          2.3 MB, ~0.6M tok    17 MB       ~1.5 s
medium    5,000  98k            22 MB, ~5.5M tok     145 MB      ~15 s
large    25,000  381k           104 MB, ~26M tok     553 MB      ~80 s
=======  ======  =============  ===================  ==========  =======
"All files" is every JSONL plus world.json; chat is the largest (its `messages` repeat the text as
JSON). Every count can be overridden in WorldConfig (tests build worlds of 40 people in ~0.1 s).

Usage:
    from lmstack.world import World, generate_world, check_instruction, is_harmful_request
    manifest = generate_world("data/world", size="small", seed=0)     # writes the files
    world = World(seed=0, size="small")                               # the same world, in memory
    p = world.people[0]
    world.fact(p, "birth_city"), world.qa_split(p)                    # ground truth for rewards
    qa_test = world.corpus("qa", split="test")
"""
from __future__ import annotations

import time

from lmstack.world.bios import paraphrase_bio
from lmstack.world.checkers import extract_answer
from lmstack.world.conversations import PERSONAS, apply_persona, detect_persona
from lmstack.world.code_tasks import run_code_task
from lmstack.world.config import CORPUS_NAMES, SIZE_PRESETS, WorldConfig
from lmstack.world.entities import PERSON_ATTRIBUTES
from lmstack.world.expansion import expansion_batch, write_expansion_batch
from lmstack.world.writer import generate_world, read_jsonl
from lmstack.world.instructions import CHECKERS, check_instruction
from lmstack.world.preferences import is_harmful_request
from lmstack.world.world import World


def synth(out: str, size: str = "small", seed: int = 0) -> None:
    """Generate the synthetic world (all corpora, train/val/test JSONL) into a folder.

    Args:
        out: Output folder; created if missing. Existing world files in it are replaced atomically.
        size: small (~2 MB of pretraining text, seconds), medium (~20 MB) or large (~100 MB).
        seed: Random seed; the same seed gives byte-identical files.
    """
    start = time.perf_counter()
    manifest = generate_world(out, size=size, seed=seed)
    seconds = time.perf_counter() - start
    print(f"{'corpus':<14}{'train':>9}{'val':>8}{'test':>8}{'MB':>9}")
    for corpus, counts in manifest["counts"].items():
        mb = sum(v["bytes"] for k, v in manifest["files"].items() if k.startswith(corpus + "/")) / 1e6
        print(f"{corpus:<14}{counts['train']:>9}{counts['val']:>8}{counts['test']:>8}{mb:>9.2f}")
    tokens = manifest["approx_pretrain_tokens"]
    print(f"pretraining text: {manifest['pretrain_bytes'] / 1e6:.1f} MB (~{tokens:,} tokens); "
          f"wrote {out}/manifest.json in {seconds:.1f} s")


__all__ = [
    "World", "WorldConfig", "generate_world", "synth", "read_jsonl", "check_instruction", "CHECKERS",
    "is_harmful_request", "paraphrase_bio", "extract_answer", "run_code_task", "PERSONAS", "apply_persona",
    "detect_persona", "PERSON_ATTRIBUTES", "CORPUS_NAMES", "SIZE_PRESETS", "expansion_batch", "write_expansion_batch",
]
