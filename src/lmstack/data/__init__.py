"""lmstack.data: collection and preprocessing, from raw files to token shards and training batches.

    readers/          text / JSONL / CSV / Parquet -> documents ({"id", "text", "source", "meta"}), bad records counted
    filters/          quality heuristics (word or char level), langid, readability, toxicity, PII, classifier
    dedup/            exact hash, MinHash-LSH (numpy), SimHash
    decontaminate.py  n-gram overlap with eval sets
    augment.py        counterfactual gender swaps, noise
    mixing.py         source weights, language temperature, DoReMi-lite adaptive weights; topics.py balance
    shards.py         tokenized binary shards + manifest (resumable); loader.py: packed (B, T) batches
    pipeline.py       read -> filter -> dedup -> decontaminate -> mix -> shard; expand.py: `data add`
    world/            the synthetic world, the embedded default corpus

Usage:
    from lmstack.config import load_config
    from lmstack.data.pipeline import PipelineConfig, run_pipeline
    from lmstack.data.loader import LoaderConfig, TokenLoader
    report = run_pipeline(load_config(PipelineConfig, "pipeline.yaml"))
    x, y = next(TokenLoader("data/pipeline/shards", LoaderConfig(batch_size=8, seq_len=256)))
"""
