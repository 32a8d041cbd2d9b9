"""GGUF export: one model directory -> one .gguf file that llama.cpp (and its Python binding) runs.

Written through the `gguf` package's GGUFWriter, under llama.cpp's own names: the "llama" architecture for
our llama-style blocks (RoPE, RMSNorm, SwiGLU, GQA, tied or untied head) and "qwen2" for the same block with
q/k/v biases. Anything else the format cannot carry (ALiBi or learned positions, MoE, soft-capping, plain
MLPs, parallel blocks, post-norms, ...) is refused with an LmstackError naming the config field.

Two layout facts matter:
- Our weights are in HF layout, whose RoPE is "rotate half" (dimension i pairs with i + head_dim/2).
  llama.cpp's "llama" architecture rotates adjacent pairs (2i, 2i+1), so, as llama.cpp's own converter
  does, the q and k rows of each head are reordered: rows [0..h/2) and [h/2..h) are interleaved. Its
  "qwen2" architecture rotates halves (NEOX order), so qwen2 weights go in as they are.
- A padded vocabulary (config.real_vocab_size < vocab_size) gives its padding rows zero probability in our
  head; llama.cpp has no such mask, so only the real rows are written (the padding ids are never input and
  never output, so nothing else changes).

The tokenizer is embedded as llama.cpp's "gpt2" (byte-level BPE) model: tokens by id, their types, the
merges, and the bos/eos/pad ids. Ids the tokenizer leaves unused below the real vocabulary are written as
"[PADn]" tokens of type UNUSED. The pre-tokenizer regex is named when it is one llama.cpp knows
(llama3's -> "llama-bpe", GPT-2's -> "gpt-2"); any other is written as "default", and then llama.cpp's own
text tokenization may split text differently from ours (ids fed directly are unaffected).

--gguf-type: f32 and f16 store every matrix as such; q8_0 and q4_0 quantize every matrix with
gguf.quants.quantize (blocks of 32 along a row, one fp16 scale per block); a matrix whose rows are not a
multiple of 32 long is stored as f16 instead, as llama.cpp's converter does. Norm weights and biases stay
f32. The file is written to a temporary name beside `out` and renamed, so it is never half-written.

Usage:
    from lmstack.compress.export_gguf import export_gguf
    export_gguf("runs/tiny", "tiny-q8_0.gguf", gguf_type="q8_0")     # -> {"out": ..., "bytes": ..., ...}
"""
from __future__ import annotations

import os
from pathlib import Path
import tempfile
from typing import Any

import gguf
import numpy as np
import torch

from lmstack.compress.export import output_path
from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.hf_io import load_model
from lmstack.tokenizer.core import Tokenizer, has_tokenizer, load_tokenizer

Q = gguf.GGMLQuantizationType
GGUF_TYPES: dict[str, tuple[Q, int]] = {  # --gguf-type -> (matrix storage type, general.file_type)
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}

# llama3's pre-tokenizer regex (ours for the "gpt4" preset) and GPT-2's, by llama.cpp's names for them.
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
GPT2_REGEX = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

# config field -> (the value GGUF's llama/qwen2 block needs, what the refusal says)
REQUIRED: dict[str, tuple[Any, str]] = {
    "position": ("rope", "GGUF's llama/qwen2 blocks use RoPE only"),
    "norm": ("rmsnorm", "the llama block normalises with RMSNorm"),
    "norm_position": ("pre", "the llama block is pre-norm"),
    "norm_plus_one": (False, "llama's RMSNorm scales by w, not (1 + w)"),
    "qk_norm": (False, "llama/qwen2 have no q/k norm (that is qwen3)"),
    "embedding_norm": (False, "llama has no embedding norm"),
    "scale_embeddings": (False, "llama does not scale its embeddings"),
    "mlp": ("swiglu", "the llama block's MLP is SwiGLU"),
    "mlp_bias": (False, "the llama block's MLP has no biases"),
    "out_bias": (False, "the llama block's output projection has no bias"),
    "causal": (True, "a decoder is causal"),
    "n_experts": (0, "mixture-of-experts needs another architecture"),
    "attn_logit_softcap": (0.0, "llama has no attention soft-capping"),
    "final_logit_softcap": (0.0, "llama has no logit soft-capping"),
    "parallel_residual": (False, "the llama block is sequential"),
    "n_unique_layers": (0, "GGUF has no cross-layer sharing"),
    "sliding_window": (0, "the llama block attends to the full context"),
    "attention": ("softmax", "llama uses softmax attention"),
    "sparse_pattern": ("none", "llama uses dense attention"),
    "type_vocab_size": (0, "llama has no token-type embeddings"),
    "head": ("lm", "the export is of a language model head"),
}


def check_exportable(cfg: ModelConfig) -> str:
    """The GGUF architecture for cfg ("llama" or "qwen2"); LmstackError naming the first field it cannot carry."""
    for field, (need, why) in REQUIRED.items():
        if getattr(cfg, field) != need:
            raise LmstackError(f"GGUF export cannot carry {field}={getattr(cfg, field)!r} (needs {need!r}: {why})")
    if cfg.query_pre_attn_scalar not in (0.0, float(cfg.head_dim)):
        raise LmstackError(f"GGUF export cannot carry query_pre_attn_scalar={cfg.query_pre_attn_scalar!r} "
                           f"(llama scales attention by head_dim**-0.5, head_dim={cfg.head_dim})")
    if cfg.rope_scaling not in ("none", "linear"):
        raise LmstackError(f"GGUF export cannot carry rope_scaling={cfg.rope_scaling!r} (supported: none, linear)")
    return "qwen2" if cfg.qkv_bias else "llama"


def rope_pairs_adjacent(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows (n_heads*head_dim, ...) from rotate-half order to llama.cpp's adjacent-pair order, per head."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Our state dict (split projections) -> {llama.cpp tensor name: fp32 tensor}, in writing order."""
    n_real = cfg.real_vocab_size or cfg.vocab_size
    permute = arch == "llama"
    out = {"token_embd.weight": state["tok_emb.weight"][:n_real]}
    for i in range(cfg.n_layers):
        p, b = f"blocks.{i}.", f"blk.{i}."
        q, k = state[p + "attn.q_proj.weight"], state[p + "attn.k_proj.weight"]
        out[b + "attn_norm.weight"] = state[p + "attn_norm.weight"]
        out[b + "attn_q.weight"] = rope_pairs_adjacent(q, cfg.n_heads) if permute else q
        out[b + "attn_k.weight"] = rope_pairs_adjacent(k, cfg.n_kv_heads) if permute else k
        out[b + "attn_v.weight"] = state[p + "attn.v_proj.weight"]
        if cfg.qkv_bias:  # qwen2 only (NEOX rope: no permutation)
            for x in "qkv":
                out[b + f"attn_{x}.bias"] = state[p + f"attn.{x}_proj.bias"]
        out[b + "attn_output.weight"] = state[p + "attn.o_proj.weight"]
        out[b + "ffn_norm.weight"] = state[p + "mlp_norm.weight"]
        out[b + "ffn_gate.weight"] = state[p + "mlp.gate_proj.weight"]
        out[b + "ffn_up.weight"] = state[p + "mlp.up_proj.weight"]
        out[b + "ffn_down.weight"] = state[p + "mlp.down_proj.weight"]
    out["output_norm.weight"] = state["final_norm.weight"]
    if not cfg.tie_embeddings:  # llama.cpp reuses token_embd when there is no output tensor
        out["output.weight"] = state["lm_head.weight"][:n_real]
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def _pre_tokenizer_name(spec: dict) -> str:
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split" and "pattern" in p]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if splits == [LLAMA3_REGEX]:
        return "llama-bpe"
    if splits == [GPT2_REGEX] or (not splits and byte_level and byte_level[0].get("use_regex", True)):
        return "gpt-2"
    return "default"


def tokenizer_fields(tok: Tokenizer, n_vocab: int) -> dict[str, Any]:
    """The GGUF "gpt2" tokenizer of a byte-level BPE Tokenizer: tokens/types by id (padded to n_vocab), merges."""
    spec = tok.spec
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") != "BPE" or not any(p.get("type") == "ByteLevel" for p in parts):
        raise LmstackError(f"GGUF export embeds byte-level BPE tokenizers only; this tokenizer is "
                           f"{model.get('type')!r} with pre_tokenizer {pre.get('type')!r}")
    tokens: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in tokens}
    for added in spec.get("added_tokens") or []:
        tokens[int(added["id"])] = added["content"]
        types[int(added["id"])] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    too_big = [i for i in tokens if i >= n_vocab]
    if too_big:
        raise LmstackError(f"the tokenizer has ids up to {max(too_big)}, but the model's vocabulary holds {n_vocab} "
                           "real tokens (config vocab_size/real_vocab_size); the tokenizer does not fit the model")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": [tokens.get(i, f"[PAD{i}]") for i in range(n_vocab)],
            "types": [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(n_vocab)],
            "merges": merges, "pre": _pre_tokenizer_name(spec)}


def _storage(t: torch.Tensor, qtype: Q) -> tuple[np.ndarray, Q]:
    """(the array to write, its GGML type): matrices in qtype (f16 when rows do not fill quant blocks)."""
    data = t.numpy()
    if data.ndim == 1 or qtype == Q.F32:
        return data, Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        qtype = Q.F16
    return gguf.quants.quantize(data, qtype), qtype


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, gguf_type: str = "f32") -> dict[str, Any]:
    """Write model_dir (config, weights, tokenizer) as one GGUF file; returns what was written."""
    model_dir = Path(model_dir)
    if gguf_type not in GGUF_TYPES:
        raise LmstackError(f"unknown --gguf-type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    out = output_path(model_dir, out)
    model = load_model(model_dir, dtype=torch.float32)
    cfg = model.config
    arch = check_exportable(cfg)
    if not has_tokenizer(model_dir):
        raise LmstackError(f"{model_dir} has no tokenizer.json; GGUF embeds the tokenizer, so save the model with "
                           "one (save_model(model, dir, tokenizer=tok))")
    tok = load_tokenizer(model_dir)
    if cfg.fused_projections:
        model.unfuse_projections()
    n_vocab = cfg.real_vocab_size or cfg.vocab_size
    vocab = tokenizer_fields(tok, n_vocab)
    tensors = gguf_tensors(cfg, model.state_dict(), arch)
    qtype, file_type = GGUF_TYPES[gguf_type]

    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(cfg.name or model_dir.name)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.d_ff)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        if cfg.rope_scaling == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(cfg.rope_factor)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(n_vocab)
        w.add_file_type(int(file_type))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        bos = cfg.bos_token_id if cfg.bos_token_id is not None else tok.bos_id
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else tok.eos_id
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else tok.pad_id
        for add, tid in ((w.add_bos_token_id, bos), (w.add_eos_token_id, eos), (w.add_pad_token_id, pad)):
            if tid is not None:
                add(int(tid))
        # whether our tokenizer puts bos in front of a prompt: llama.cpp's tokenize() should do the same
        w.add_add_bos_token(bos is not None and tok.encode("a", add_special_tokens=True)[:1] == [bos])
        types: dict[str, int] = {}
        for name, t in tensors.items():
            data, stored = _storage(t, qtype)
            w.add_tensor(name, data, raw_dtype=stored)
            types[stored.name] = types.get(stored.name, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"out": str(out), "format": "gguf", "architecture": arch, "gguf_type": gguf_type,
            "bytes": out.stat().st_size, "tensors": len(tensors), "tensor_types": types,
            "pre_tokenizer": vocab["pre"], "n_vocab": n_vocab}
