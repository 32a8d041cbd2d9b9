"""Long-context memory for the one Transformer: caches that let a model read past its segment.

ModelConfig.memory switches one on (xl | compressive | knn); a memory model's forward then runs long inputs
segment by segment through a fresh memory (segments.py), so it trains and scores through the ordinary paths.

- xl.py: Transformer-XL segment-level recurrence (Dai et al. 2019): XLMemory, each layer's previous hidden
  states (gradient stopped), re-projected to keys/values with the current weights; xl_forward.
- knn.py: the Memorizing Transformer's kNN memory (Wu et al. 2022): KNNMemory, a store of earlier segments'
  keys/values that one layer retrieves top-k from, gated against local attention; save/load with a model
  fingerprint: the persistent memory of a chat across conversations.
- compressive.py: the Compressive Transformer (Rae et al. 2020): XL plus a FIFO memory of older states
  compressed by cmem_rate (a learned strided convolution, or pooling), trained by attention reconstruction.
- summary.py: AutoCompressor summary vectors (Chevalier et al. 2023): a wrapper that compresses a long prefix,
  segment by segment, into k soft vectors later tokens attend to (context compression, not a config switch).
- running.py: the segment loop they share (argument checks, run_segments, segment_loss).
- segments.py: new_memory (from the config), segment_forward (what model(ids) runs), generate_with_memory
  (decoding; the paged engine refuses memory models).

Usage:
    model = Transformer(ModelConfig(memory="xl", mem_len=128, seg_len=128, max_seq_len=256))
    logits = model(ids)                                    # any length: segments of 128, memory of 128
    out = generate_with_memory(model, prompt_ids, max_new_tokens=32)
"""
from lmstack.model.memory.compressive import CompressiveMemory, Compressor, attach_compressor, compressive_forward
from lmstack.model.memory.knn import KNNMemory, KNNStore, attach_knn_gate, knn_forward, load_knn_gate, save_knn_gate
from lmstack.model.memory.segments import generate_with_memory, new_memory, segment_forward
from lmstack.model.memory.summary import AutoCompressor, SummaryTokens, load_summary_tokens, save_summary_tokens
from lmstack.model.memory.xl import XLMemory, xl_forward

__all__ = ["XLMemory", "xl_forward", "KNNMemory", "KNNStore", "attach_knn_gate", "knn_forward", "load_knn_gate",
           "save_knn_gate", "new_memory", "segment_forward", "generate_with_memory", "AutoCompressor", "SummaryTokens",
           "load_summary_tokens", "save_summary_tokens", "CompressiveMemory", "Compressor", "attach_compressor",
           "compressive_forward"]
