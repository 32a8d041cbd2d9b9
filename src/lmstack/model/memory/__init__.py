"""Long-context memory for the one Transformer: caches and wrappers that let a plain model read past its segment.

- xl.py: Transformer-XL segment-level recurrence (Dai et al. 2019): XLMemory, an AttentionCache holding each
  layer's previous-segment attention inputs (gradient stopped), and xl_forward, which runs a long sequence
  segment by segment through it.

Usage:
    from lmstack.model.memory import XLMemory, xl_forward
    logits, loss = xl_forward(model, ids, seg_len=128, mem_len=128, targets=targets)
"""
from lmstack.model.memory.knn import KNNMemory, KNNStore, attach_knn_gate, knn_forward, load_knn_gate, save_knn_gate
from lmstack.model.memory.xl import XLMemory, xl_forward

__all__ = ["XLMemory", "xl_forward", "KNNMemory", "KNNStore", "attach_knn_gate", "knn_forward", "load_knn_gate",
           "save_knn_gate"]
