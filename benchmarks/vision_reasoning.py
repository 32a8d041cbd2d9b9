"""Vision reasoning (issue 24 XII.5, XII.10, XII.15): multimodal chain-of-thought, multimodal RAG, multimodal memory.

One tokenizer (multimodal/text.py) and one CLIP (multimodal/clip.py), trained first on captions of the train split's
scenes and of other worlds' flags and badges (and moved, noisy photos of them). Two VLMs (multimodal/vlm.py, LLaVA:
the CLIP's ViT frozen, a projector, a 3-layer LM) from the same seed, trained for the same steps on the same
batches, which differ in one thing: the target of the multi-step questions,
"Answer: X" (direct) or the rationale then "Answer: X" (cot.py). The rest of each batch is shared: VQA on the shapes
world's train split, and reading flags and badges of other worlds (World seeds 1..12; the tested world is seed 0,
so no tested flag is ever trained on). The same CLIP embeds the pictures of the retrieval index.

Rows:
  cot        accuracy on the test split's multi-step questions, direct vs rationale (n, stderr), the rationale's
             step accuracy and first wrong step (errors by step); baseline: direct.
  rag        world_link questions about world seed 0 (flag/badge reading by name; joins from a shown photo, a
             moved-and-noisy variant of the stored picture): with retrieval (the rag Index holding the pictures:
             bm25 on the stored caption for a name, CLIP image vectors for a photo) vs the VLM alone.
  rag_recall recall@1 of the photo -> stored picture hop: CLIP image vectors vs raw-pixel cosine (baseline).
  memory     a picture from conversation 1 asked about in conversation 3: memory on (mm_memory.ConversationMemory
             on disk, reopened for conversation 3, bm25 recall) vs off; recall@1 of bm25, dense CLIP and hybrid.
The readers of rag and memory are the rationale VLM (it learned the same VQA and flag reading as the direct one).

    flock /tmp/lmstack-bench-A.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vision_reasoning.py   # ~8 min
    .venv/bin/python benchmarks/vision_reasoning.py --quick                                                   # ~1 min
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import RESULTS, result

from lmstack.model import ModelConfig
from lmstack.multimodal.clip import CLIP, CLIPConfig, TextConfig, clip_loss, tokenize
from lmstack.multimodal.cot import cot_examples, score_chain, stderr, summarize
from lmstack.multimodal.images import to_pixels
from lmstack.multimodal.mm_memory import ASKED_TYPES, ConversationMemory, answer_dialogue, build_dialogues, \
    remember_dialogue
from lmstack.multimodal.mm_rag import ClipEmbedder, ImageIndex, VLMReader, add_link_records, answer_link_question, \
    reading_prompt
from lmstack.multimodal.shapes import Scene, render
from lmstack.multimodal.text import IMAGE_TOKEN, shapes_tokenizer
from lmstack.multimodal.vision_world import build_vision_world
from lmstack.multimodal.vit import VisionConfig
from lmstack.multimodal.vlm import VLM, VLMConfig
from lmstack.multimodal.world_link import build_world_link, describe, link_questions, picture_scene
from lmstack.world import World

NAME = "vision_reasoning"
IGNORE = -100


def acc(xs: list[bool]) -> dict:
    n = len(xs)
    p = sum(xs) / n if n else 0.0
    return {"accuracy": p, "n": n, "stderr": stderr(p, n)}


class Bank:
    """Pictures rendered once, each example points at one (or at none)."""

    def __init__(self, size: int):
        self.size, self.keys, self.scenes = size, {}, []

    def add(self, key: str, scene: Scene) -> int:
        if key not in self.keys:
            self.keys[key] = len(self.scenes)
            self.scenes.append(scene)
        return self.keys[key]

    def tensor(self) -> torch.Tensor:
        return torch.cat([to_pixels([render(s) for s in self.scenes[i:i + 256]], self.size)
                          for i in range(0, len(self.scenes), 256)])


def build_data(args, tok):
    vw = build_vision_world(args.n_images, args.size, seed=0)
    train = [r for r in vw if r["split"] == "train"]
    test = [r for r in vw if r["split"] == "test"]
    bank = Bank(args.size)
    shared, multistep = [], {m: [] for m in ("direct", "rationale")}
    for rec in train:
        i = bank.add(rec["id"], Scene.from_dict(rec["scene"]))
        shared += [(i, f"{IMAGE_TOKEN} Question: {q['question']}", f"Answer: {q['answer']}")
                   for q in rec["vqa"] if q["type"] in ASKED_TYPES]
    for mode in multistep:
        multistep[mode] = [(bank.keys[e["record"]], e["prompt"], e["target"]) for e in cot_examples(train, mode=mode)]
    reading, clip_texts = [], [(bank.keys[r["id"]], r["captions"]) for r in train]
    for seed in range(1, 1 + args.aux_worlds):  # other worlds' flags and badges: never the tested ones
        aux = World(seed=seed, n_people=args.n_people)
        recs = build_world_link(aux, size=args.size, max_people=args.n_people)
        by_id = {r["id"]: r for r in recs}
        for q in link_questions(aux, recs):
            if q["needs"] == "image":
                i = bank.add(f"{seed}/{q['record']}", Scene.from_dict(by_id[q["record"]]["scene"]))
                reading.append((i, reading_prompt(q), f"Answer: {q['answer']}"))
        for r in recs:  # CLIP learns each design from the picture and from photos of it (moved, noisy)
            text = [describe(tuple(r["design"].values()), r["kind"])]
            clip_texts.append((bank.keys[f"{seed}/{r['id']}"], text))
            for v in (1, 2):
                clip_texts.append((bank.add(f"{seed}/{r['id']}/v{v}",
                                            picture_scene(aux, r["entity"], r["kind"], args.size, variant=v)), text))
    return vw, train, test, bank, shared, reading, multistep, clip_texts


def encode(vlm, tok, prompt: str, target: str) -> tuple[list[int], list[int]]:
    p = vlm.expand_prompt([tok.bos_id] + tok.encode(prompt))
    t = tok.encode(" " + target) + [tok.eos_id]
    return p + t, [IGNORE] * len(p) + t


def new_vlm(args, tok, clip: CLIP) -> VLM:
    """LLaVA's recipe: the vision tower is the trained CLIP's ViT, frozen; the projector and the LM learn."""
    torch.manual_seed(0)
    vlm = VLM(VLMConfig(
        vision=clip.config.vision,
        lm=ModelConfig(vocab_size=tok.vocab_size, d_model=args.d, n_layers=args.lm_layers, n_heads=4,
                       max_seq_len=160, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id),
        image_token_id=tok.token_to_id(IMAGE_TOKEN), freeze_vision=True))
    vlm.vision.load_state_dict(clip.vision.state_dict())
    return vlm


def train_vlm(args, tok, pixels, pools: list[tuple[float, list]], clip: CLIP) -> tuple[VLM, dict]:
    """AdamW, warmup + cosine; each row's pool drawn by weight from a seeded stream (the same for both models)."""
    vlm = new_vlm(args, tok, clip)
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    rng = random.Random(0)
    weights = [w for w, _ in pools]
    start, losses, tokens = time.perf_counter(), [], 0
    vlm.train()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        rows = []
        for _ in range(args.batch):
            pool = rng.choices(pools, weights)[0][1]
            rows.append(pool[rng.randrange(len(pool))])
        enc = [encode(vlm, tok, p, t) for _, p, t in rows]
        width = max(len(ids) for ids, _ in enc)
        ids = torch.tensor([i + [tok.eos_id] * (width - len(i)) for i, _ in enc])
        labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in enc])
        tokens += int((labels != IGNORE).sum())
        out = vlm(ids, pixels=pixels[[i for i, _, _ in rows]], labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(out.loss.item())
    vlm.eval()
    return vlm, {"steps": args.steps, "batch": args.batch, "trainable_params": sum(p.numel() for p in params), "seconds": round(time.perf_counter() - start, 1),
                 "target_tokens": tokens, "loss_first": losses[0], "loss_last": sum(losses[-20:]) / 20}


def train_clip(args, tok, bank_pixels, texts: list[tuple[int, list[str]]]) -> tuple[CLIP, dict]:
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(vision=VisionConfig(image_size=args.size, patch_size=args.patch, d_model=args.d, n_layers=2,
                                               n_heads=4),
                           text=TextConfig(vocab_size=tok.vocab_size, d_model=args.d, n_layers=2, n_heads=4,
                                           max_seq_len=64, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                           pad_token_id=tok.pad_id), embed_dim=64))
    opt = torch.optim.AdamW(clip.parameters(), lr=1e-3, weight_decay=0.01)
    rng, start, losses = random.Random(1), time.perf_counter(), []
    for step in range(args.clip_steps):
        picked = rng.sample(texts, args.clip_batch)
        ids = tokenize(tok, [rng.choice(c) for _, c in picked], 64)
        loss = clip(bank_pixels[[i for i, _ in picked]], ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    clip.eval()
    return clip, {"steps": args.clip_steps, "batch": args.clip_batch, "seconds": round(time.perf_counter() - start, 1),
                  "loss_first": losses[0], "loss_last": sum(losses[-10:]) / 10}


def run_cot(vlm, tok, test, mode: str) -> tuple[dict, list]:
    reader = VLMReader(vlm, tok, max_new_tokens=96 if mode == "rationale" else 16)  # "Answer:" alone is 8 tokens
    scores, samples = [], []
    for ex in cot_examples(test, mode=mode):
        scene = Scene.from_dict(next(r for r in test if r["id"] == ex["record"])["scene"])
        text = reader.read(ex["prompt"], to_pixels([render(scene)], vlm.config.vision.image_size))
        scores.append(score_chain(text, ex["item"], scene))
        if len(samples) < 3:
            samples.append({"question": ex["item"]["question"], "generated": text, "gold": ex["target"]})
    return summarize(scores), samples


def run_rag(args, vlm, tok, clip) -> tuple[dict, dict]:
    world = World(seed=0, n_people=args.n_people)
    records = build_world_link(world, size=args.size, max_people=args.n_people)
    by_id = {r["id"]: r for r in records}
    questions = link_questions(world, records)
    reader = VLMReader(vlm, tok, max_new_tokens=24)
    index = ImageIndex.create(ClipEmbedder(clip, tok))
    add_link_records(index, records)
    stored = torch.cat([index.get(r["id"]).pixels for r in records])  # what the index holds, read back

    def shown(q):
        if not q["shown"]:
            return None
        rec = by_id[q["record"]]
        return to_pixels([render(picture_scene(world, rec["entity"], rec["kind"], args.size, variant=1))], args.size)

    out = {"with": defaultdict(list), "without": defaultdict(list), "hit": defaultdict(list)}
    pixel_hits = []
    for q in questions:
        px = shown(q)
        on = answer_link_question(q, index, reader, world, retrieval=True, shown=px)
        off = answer_link_question(q, index, reader, world, retrieval=False, shown=px)
        out["with"][q["type"]].append(on["correct"])
        out["without"][q["type"]].append(off["correct"])
        out["hit"]["name->picture" if q["needs"] == "image" else "photo->picture (clip)"].append(on["hit"])
        if px is not None:  # the baseline hop: nearest stored picture by raw-pixel cosine
            sims = F.normalize(stored.reshape(len(records), -1), dim=-1) @ F.normalize(px.reshape(-1), dim=0)
            pixel_hits.append(records[int(sims.argmax())]["id"] == q["record"])
    index.close()
    summary = {k: {t: acc(v) for t, v in out[k].items()} for k in ("with", "without", "hit")}
    for k in ("with", "without"):
        summary[k]["all"] = acc([x for v in out[k].values() for x in v])
    summary["hit"]["photo->picture (raw pixels)"] = acc(pixel_hits)
    return summary, {"n_cities": len(world.cities), "n_badges": args.n_people, "questions": len(questions)}


def run_memory(args, vlm, tok, clip, test) -> dict:
    world = World(seed=0, n_people=args.n_people)
    dialogues = build_dialogues(test, world, n=args.n_dialogues, seed=0)
    by_id = {r["id"]: r for r in test}
    reader = VLMReader(vlm, tok, max_new_tokens=16)
    embedder = ClipEmbedder(clip, tok)
    on, off, recall = [], [], defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        for d in dialogues:
            memory = ConversationMemory.create(embedder, path=Path(tmp) / d["id"])
            remember_dialogue(memory, d, by_id)
            memory.close()
            memory = ConversationMemory.open(Path(tmp) / d["id"], embedder)  # conversation 3: a later process
            on.append(answer_dialogue(d, reader, memory=memory)["correct"])
            for mode in ("bm25", "dense", "hybrid"):
                hits = memory.recall(d["question"], k=1, mode=mode)
                recall[mode].append(bool(hits) and hits[0].metadata.get("record") == d["target"])
            memory.close()
            off.append(answer_dialogue(d, reader, memory=None)["correct"])
    return {"on": acc(on), "off": acc(off), "recall@1": {m: acc(v) for m, v in recall.items()},
            "types": dict(Counter(d["type"] for d in dialogues))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smoke run: few images and steps")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--clip-steps", type=int, default=600)
    args = ap.parse_args()
    args.size, args.patch, args.d, args.lm_layers, args.batch, args.lr = 32, 8, 64, 3, 16, 2e-3
    args.n_images, args.n_people, args.n_dialogues, args.clip_batch, args.aux_worlds = 1600, 20, 60, 48, 12
    if args.quick:
        args.steps, args.clip_steps, args.n_images, args.n_people, args.n_dialogues = 30, 10, 120, 4, 6
        args.aux_worlds = 2
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tok = shapes_tokenizer(vocab_size=512)
    vw, train, test, bank, shared, reading, multistep, clip_texts = build_data(args, tok)
    pixels = bank.tensor()
    timings = {"data_s": round(time.perf_counter() - t0, 1)}
    print(f"data: {len(train)} train / {len(test)} test images, {len(shared)} vqa, {len(reading)} reading, "
          f"{len(multistep['direct'])} multi-step; {timings['data_s']} s", flush=True)

    clip, clip_stats = train_clip(args, tok, pixels, clip_texts)
    print(f"clip: {clip_stats}", flush=True)
    models, train_stats = {}, {}
    for mode in ("direct", "rationale"):
        pools = [(0.5, multistep[mode]), (0.3, shared), (0.2, reading)]
        models[mode], train_stats[mode] = train_vlm(args, tok, pixels, pools, clip)
        print(f"vlm {mode}: {train_stats[mode]}", flush=True)

    t = time.perf_counter()
    cot = {}
    samples = {}
    for mode in ("direct", "rationale"):
        cot[mode], samples[mode] = run_cot(models[mode], tok, test, mode)
        print(f"cot {mode}: {cot[mode]}", flush=True)
    majority = Counter(e[2] for e in multistep["direct"]).most_common(1)[0][0].split()[-1]
    cot["majority_answer"] = {"answer": majority, **acc([e["item"]["answer"] == majority
                                                          for e in cot_examples(test, mode="direct")])}
    timings["cot_eval_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    rag, rag_config = run_rag(args, models["rationale"], tok, clip)
    print(f"rag: with {rag['with']['all']} without {rag['without']['all']} hits {rag['hit']}", flush=True)
    timings["rag_eval_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    memory = run_memory(args, models["rationale"], tok, clip, test)
    print(f"memory: {memory}", flush=True)
    timings["memory_eval_s"] = round(time.perf_counter() - t, 1)
    timings["total_s"] = round(time.perf_counter() - t0, 1)

    config = {"vision": "the trained CLIP's ViT, frozen (LLaVA)", "image_size": args.size, "patch": args.patch, "d_model": args.d, "lm_layers": args.lm_layers,
              "fusion": "projector", "n_images": args.n_images, "train_images": len(train), "test_images": len(test),
              "vlm_train": train_stats, "clip_train": clip_stats, "threads": 1, "timings": timings,
              "quick": args.quick, "mixture": {"multistep": 0.5, "vqa": 0.3, "flag_reading": 0.2},
              "aux_worlds": args.aux_worlds, "clip_pairs": len(clip_texts)}
    rows = [
        dict(result(NAME, "cot_multistep_accuracy", True, cot["rationale"]["accuracy"], "direct answer",
                    cot["direct"]["accuracy"], goal=1.0, **config), ours_detail=cot["rationale"],
             baseline_detail=cot["direct"], majority_answer=cot["majority_answer"], samples=samples),
        dict(result(NAME, "rag_accuracy", True, rag["with"]["all"]["accuracy"], "VLM alone (no retrieval)",
                    rag["without"]["all"]["accuracy"], **rag_config), by_type={"with": rag["with"],
                                                                            "without": rag["without"]}),
        dict(result(NAME, "rag_photo_recall@1", True, rag["hit"]["photo->picture (clip)"]["accuracy"],
                    "raw-pixel cosine", rag["hit"]["photo->picture (raw pixels)"]["accuracy"], **rag_config),
             recall=rag["hit"]),
        dict(result(NAME, "memory_accuracy", True, memory["on"]["accuracy"], "memory off",
                    memory["off"]["accuracy"], n_dialogues=args.n_dialogues), detail=memory),
    ]
    for r in rows:  # a zero baseline makes the ratio infinite: JSON has no inf, so say it in words
        if r["baseline"]["value"] == 0:
            r["ratio"], r["ratio_note"] = None, "baseline is 0: the ratio is unbounded"
        print(f"{r['metric']}: ours={r['ours']:.4g} {r['baseline']['name']}={r['baseline']['value']:.4g} "
              f"ratio={r['ratio']}")
    path = RESULTS / f"{NAME}.json" if not args.quick else Path(tempfile.gettempdir()) / f"{NAME}_quick.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a crashed run never leaves half a results file
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
