"""Quantized model directories: compressed-tensors layout in, QuantLinear modules out.

A quantized directory is a normal model directory (config.json, model.safetensors, tokenizer, generation config)
whose config.json carries a `quantization_config`, and whose block Linears are stored as codes instead of a
`weight`. We write the layout of neuralmagic's compressed-tensors (what llm-compressor writes and vLLM /
transformers read), so other tools can open what `lmstack quantize` makes:

| our format | compressed-tensors format | tensors per Linear (HF name X)                                      |
|------------|---------------------------|---------------------------------------------------------------------|
| int4       | pack-quantized            | X.weight_packed int32 (O, ceil(I/8)), X.weight_scale (O, G),        |
|            |                           | X.weight_shape [O, I], X.weight_zero_point int32 (ceil(O/8), G) when |
|            |                           | asymmetric, X.weight_g_idx (I,) with GPTQ's act-order               |
| int8       | int-quantized (W8A16)     | X.weight int8 (O, I), X.weight_scale (O, G)                         |
| w8a8       | int-quantized + dynamic   | as int8, and input_activations: int8, per token, dynamic            |
|            | per-token activations     |                                                                     |
| fp8_e4m3/  | float-quantized           | X.weight float8 (O, I), X.weight_scale (O, 1)                       |
| fp8_e5m2   |                           |                                                                     |
| nf4        | (none: lmstack's own,     | X.weight_nf4.<buffer> for QLoRA's packed codes and double-quantized |
|            | quant_method "lmstack")   | absmax constants (compress/quant_storage.py)                        |

pack-quantized stores signed int4 offset by 8, eight per little-endian int32, element i at bits 4i; that is
byte-for-byte QuantLinear's nibble layout, so saving is a view, not a repack. Its zero points are signed too
(zero - 8), packed the same way along the output dimension. act-order keeps the codes in input order with a group
index per input column (weight_g_idx); QuantLinear keeps them in quantization order with `perm`, and the two are
converted on save and load. Scales are fp32 (this stack's compute dtype on CPU).

The LM head and the embedding are int8 with one scale per vocab row (quantize_head), in a second config group
(W8A16, format int-quantized) whose targets name them: `lm_head` and `model.embed_tokens` (X.weight int8 (V, D),
X.weight_scale (V, 1) each), or for a tied model the embedding alone, which transformers then ties to the head as
usual, so the pair is stored once. When the body is int4 or fp8 the two groups carry their own `format` and the
global one is "mixed-precision", as compressed-tensors writes mixed models. A directory whose head is not quantized
lists `lm_head` in `ignore`.

quantization_config also carries {"lmstack": {"format_version": 1, "method": ..., ...}}: what made it. A directory
whose quant_method or format this version does not know is refused with a message naming them.

Usage:
    save_quantized(model, "out_dir", tokenizer=tok, method="gptq")   # model holds QuantLinear modules
    model = lmstack.load_model("out_dir")                             # load_model calls load_quantized
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.compress.calibration import block_linears
from lmstack.compress.qlinear import FP8_DTYPES, QuantEmbedding, QuantLinear, pack_nibbles, replace_module
from lmstack.compress.quant_storage import QuantizedLinear
from lmstack.errors import LmstackError
from lmstack.kernels.quant import unpack_int4
from lmstack.model.hf_convert import EXPORTABLE, _rename, config_to_hf
from lmstack.model.hf_io import match_checkpoint, save_model
from lmstack.model.load_guard import read_json
from lmstack.model.transformer import Transformer

FORMAT_VERSION = 1
CT_FORMATS = {"int4": "pack-quantized", "int8": "int-quantized", "w8a8": "int-quantized",
              "fp8_e4m3": "float-quantized", "fp8_e5m2": "float-quantized"}
KNOWN = ({("compressed-tensors", f) for f in CT_FORMATS.values()} | {("compressed-tensors", "mixed-precision")}
         | {("lmstack", "nf4")})
NF4_PREFIX = "weight_nf4."


def quantization_config(path: str | Path) -> dict | None:
    """The quantization_config of a model directory's config.json (None when it has none), after checking that
    this version can read it."""
    cfg = read_json(path, "config.json", "model config", want_object=True)
    qc = cfg.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise LmstackError(f"{Path(path) / 'config.json'}: quantization_config must be an object")
    method, fmt = qc.get("quant_method"), qc.get("format")
    if (method, fmt) not in KNOWN:
        known = ", ".join(f"{m}/{f}" for m, f in sorted(KNOWN))
        raise LmstackError(f"{Path(path) / 'config.json'}: quantization_config says quant_method {method!r}, "
                           f"format {fmt!r}, which this version of lmstack cannot load (it reads {known}); "
                           "it was written by another tool or a newer lmstack")
    version = (qc.get("lmstack") or {}).get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LmstackError(f"{Path(path) / 'config.json'}: lmstack quantized format version {version!r} is newer "
                           f"than this lmstack reads ({FORMAT_VERSION}); upgrade lmstack")
    return qc


def _groups(qc: dict) -> tuple[dict, dict | None]:
    """(the block Linears' scheme, the head and embedding's scheme or None), each with its compressed-tensors
    "format" filled in. lmstack writes one group targeting "Linear" and at most one more naming the head and
    embedding."""
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not 1 <= len(groups) <= 2:
        raise LmstackError(f"quantization_config has {len(groups)} config_groups; lmstack reads one for the block "
                           "Linears and at most one for the LM head")
    body = head = None
    for name, scheme in groups.items():
        if not isinstance(scheme, dict) or not isinstance(scheme.get("weights"), dict):
            raise LmstackError(f"quantization_config's config group {name!r} has no 'weights' entry")
        fmt = scheme.get("format") or qc.get("format")
        if qc.get("quant_method") == "compressed-tensors" and fmt not in CT_FORMATS.values():
            raise LmstackError(f"quantization_config's config group {name!r} has format {fmt!r}, which this "
                               f"version of lmstack cannot load (it reads {', '.join(sorted(set(CT_FORMATS.values())))})")
        scheme = {**scheme, "format": fmt}
        targets = scheme.get("targets") or []
        if "Linear" in targets:
            body = scheme
        elif head is None and targets:
            head = scheme
        else:
            raise LmstackError(f"quantization_config's config group {name!r} targets {targets!r}; lmstack reads "
                               "a group targeting 'Linear' and one naming the LM head or tied embedding")
    if body is None:
        raise LmstackError("quantization_config has no config group targeting 'Linear'")
    return body, head


def hf_base(cfg, hf_names: bool, name: str) -> str:
    """The checkpoint's name for block Linear `name` (ours, e.g. blocks.0.attn.q_proj), without '.weight'."""
    if not hf_names:
        return name
    renamed = _rename(cfg.hf_model_type, name + ".weight")
    if renamed is None or renamed[1]:
        raise LmstackError(f"a quantized {cfg.hf_model_type} directory cannot carry {name}: its HF tensor is "
                           "fused or transposed; quantized directories support llama-style (one tensor per "
                           "projection) architectures")
    return renamed[0][: -len(".weight")]


def check_quantizable(cfg) -> None:
    """Refuse configs whose block Linears do not map one-to-one to checkpoint tensors."""
    if cfg.fused_projections:
        raise LmstackError("quantizing a model with fused_projections is not supported; load it with "
                           "fused_projections=false (the weights are the same) and quantize that")
    if cfg.hf_model_type in ("gpt2", "phi3"):
        raise LmstackError(f"quantized directories of {cfg.hf_model_type} models are not supported: their "
                           "checkpoint fuses q/k/v (and gate/up) into one tensor; use a llama/mistral/qwen2 model")
    if getattr(cfg, "n_experts", 0):
        raise LmstackError("quantizing mixture-of-experts models is not supported yet (experts are stacked "
                           "tensors, not Linears)")


# ---- int4 <-> compressed-tensors' int32 words

def _words(nibble_bytes: torch.Tensor) -> torch.Tensor:
    """(R, B) bytes -> (R, ceil(B / 4)) int32 words (little-endian, zero padded)."""
    pad = (-nibble_bytes.shape[1]) % 4
    b = torch.nn.functional.pad(nibble_bytes, (0, pad)) if pad else nibble_bytes
    # through 1-D: a (1, B) tensor can be "contiguous" with a stride that a dtype view refuses
    return b.contiguous().reshape(-1).view(torch.int32).reshape(b.shape[0], -1)


def _bytes(words: torch.Tensor, n_bytes: int) -> torch.Tensor:
    return words.contiguous().reshape(-1).view(torch.uint8).reshape(words.shape[0], -1)[:, :n_bytes]


def _pack_rows4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 (R, C) codes 0..15 -> int32 (R, ceil(C / 8)), element i at bits 4i of the row's stream."""
    return _words(pack_nibbles(codes))


def _unpack_rows4(words: torch.Tensor, cols: int) -> torch.Tensor:
    return unpack_int4(_bytes(words, (cols + 1) // 2), cols)


# ---- save

def _linear_tensors(base: str, m: nn.Module) -> dict[str, torch.Tensor]:
    """compressed-tensors (or lmstack NF4) tensors of one quantized Linear, bias excluded."""
    if isinstance(m, QuantizedLinear):
        if m.kind != "nf4":
            raise LmstackError("QuantizedLinear int8 storage is QLoRA's; save int8 through QuantLinear")
        return {f"{base}.{NF4_PREFIX}{n}": getattr(m, n).contiguous() for n in m._state_names}
    out = {f"{base}.weight_scale": m.scales.contiguous()}
    if m.fmt != "int4":
        out[f"{base}.weight"] = m.codes.contiguous()
        return out
    o, i = m.out_features, m.in_features
    codes = unpack_int4(m.codes, i)
    if m.perm is not None:  # stored column j is input column perm[j]: back to input order, with group indices
        inv = torch.empty_like(m.perm)
        inv[m.perm] = torch.arange(i)
        codes = codes[:, inv]
        g_idx = torch.empty(i, dtype=torch.int32)
        g_idx[m.perm] = (torch.arange(i) // m.group_size).to(torch.int32)
        out[f"{base}.weight_g_idx"] = g_idx
    out[f"{base}.weight_packed"] = _pack_rows4(codes)
    out[f"{base}.weight_shape"] = torch.tensor([o, i], dtype=torch.int64)
    if not bool((m.zeros == 8).all()):
        out[f"{base}.weight_zero_point"] = _pack_rows4(m.zeros.t().contiguous()).t().contiguous()
    return out


def _head_targets(cfg, hf_names: bool) -> list[str]:
    """The checkpoint names of the int8 head group: the head then the embedding, or the tied embedding alone.
    The first one holds the head's codes."""
    emb = hf_base(cfg, hf_names, "tok_emb")
    return [emb] if cfg.tie_embeddings else [hf_base(cfg, hf_names, "lm_head"), emb]


def _scheme(m: nn.Module, static_act_order: bool = False, channel: bool | None = None) -> dict[str, Any]:
    if isinstance(m, QuantizedLinear):
        return {"weights": {"num_bits": 4, "type": "nf4", "block_size": 64, "double_quant": m.double_quant},
                "input_activations": None, "output_activations": None, "targets": ["Linear"]}
    g = m.group_size
    # channel: one scale per output row in every layer; group: one group size for all (a layer whose
    # in_features equals it simply has one group). `channel` is decided over all layers by save_quantized.
    strategy = "channel" if (g == m.in_features if channel is None else channel) else "group"
    if m.fmt in FP8_DTYPES:
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False}
    else:
        sym = m.fmt != "int4" or bool((m.zeros == 8).all())
        weights = {"num_bits": m.bits, "type": "int", "symmetric": sym, "strategy": strategy,
                   "group_size": g if strategy == "group" else None, "dynamic": False,
                   "actorder": "group" if m.perm is not None else ("weight" if static_act_order else None),
                   "observer": "minmax"}
    acts = None
    if m.fmt == "w8a8":
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
                "observer": None}
    return {"targets": ["Linear"], "weights": weights, "input_activations": acts, "output_activations": None}


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantizedLinear))}


def save_quantized(model: nn.Module, path: str | Path, tokenizer: Any = None, method: str = "rtn",
                   extra: dict | None = None) -> Path:
    """Write `model` (its block Linears already QuantLinear / NF4 QuantizedLinear) as a quantized directory.

    Every quantized Linear must share one scheme (format, bits, group size, symmetry): compressed-tensors can
    express mixtures, but `lmstack quantize` never makes one and one group keeps the reader simple."""
    cfg = model.config
    check_quantizable(cfg)
    mods = quantized_modules(model)
    head = mods.pop("lm_head", None)
    if head is not None and (head.fmt != "int8" or head.group_size != head.in_features
                             or not isinstance(model.tok_emb, QuantEmbedding)):
        raise LmstackError(f"the LM head is {head.fmt} with group size {head.group_size} and the embedding a "
                           f"{type(model.tok_emb).__name__}; quantized directories carry both as int8 with one "
                           "scale per row (quantize_head)")
    if not mods:
        raise LmstackError("the model has no quantized Linear to save; quantize it first (quantize_linears)")
    channel = all(getattr(m, "group_size", 0) == getattr(m, "in_features", -1) for m in mods.values())
    schemes = {repr(_scheme(m, channel=channel)) for m in mods.values()}
    if len(schemes) != 1:
        raise LmstackError(f"the model's quantized Linears use {len(schemes)} different schemes; save_quantized "
                           "writes one")
    first = next(iter(mods.values()))
    fmt = "nf4" if isinstance(first, QuantizedLinear) else first.fmt
    hf_names = cfg.hf_model_type in EXPORTABLE
    if hf_names:  # save_model's own test: a config HF cannot express is written in lmstack's naming
        try:
            config_to_hf(cfg)
        except LmstackError:
            hf_names = False
    state = model.state_dict()
    drop = set()
    quantized: dict[str, torch.Tensor] = {}
    for name, m in mods.items():
        drop.update(k for k in state if k.startswith(name + ".") and not k.endswith(".bias"))
        quantized.update(_linear_tensors(hf_base(cfg, hf_names, name), m))
    groups = {"group_0": _scheme(first, bool((extra or {}).get("act_order")), channel)}
    global_format = "nf4" if fmt == "nf4" else CT_FORMATS[fmt]
    if head is not None:
        if fmt == "nf4":
            raise LmstackError("an NF4 model keeps its LM head in float; quantize_head is for compressed-tensors "
                               "formats")
        targets = _head_targets(cfg, hf_names)
        drop.update(k for k in state if k.startswith(("lm_head.", "tok_emb.")))
        quantized.update(_linear_tensors(targets[0], head))
        if not cfg.tie_embeddings:
            emb = model.tok_emb
            quantized.update({f"{targets[1]}.weight": emb.codes.contiguous(),
                              f"{targets[1]}.weight_scale": emb.scales.contiguous()})
        groups["group_1"] = {**_scheme(head, channel=True), "targets": targets}
        if CT_FORMATS["int8"] != global_format:  # e.g. an int4 body: each group says its own format
            groups["group_0"]["format"], groups["group_1"]["format"] = global_format, CT_FORMATS["int8"]
            global_format = "mixed-precision"
    float_state = {k: v for k, v in state.items() if k not in drop}
    qc = {"quant_method": "lmstack" if fmt == "nf4" else "compressed-tensors",
          "format": global_format,
          "quantization_status": "compressed",
          "config_groups": groups,
          "ignore": [] if head is not None else ["lm_head"], "kv_cache_scheme": None,
          "lmstack": {"format_version": FORMAT_VERSION, "method": method, "weight_format": fmt, **(extra or {})}}
    return save_model(model, path, tokenizer=tokenizer, state_dict=float_state, extra_tensors=quantized,
                      extra_config={"quantization_config": qc})


# ---- load

def _module_from(qc: dict, scheme: dict, get, names: set[str], base: str, lin: nn.Linear, where: str) -> nn.Module:
    """The quantized module for Linear `lin` from the checkpoint's tensors under `base`, as config group
    `scheme` (from _groups) describes them."""
    o, i = lin.out_features, lin.in_features
    has_bias = lin.bias is not None

    def need(suffix: str) -> torch.Tensor:
        key = f"{base}.{suffix}"
        if key not in names:
            raise LmstackError(f"{where}: the quantized checkpoint lacks {key!r}, which its quantization_config "
                               "needs")
        return get(key)

    def shape_check(t: torch.Tensor, shape: tuple, what: str) -> None:
        if tuple(t.shape) != tuple(shape):
            raise LmstackError(f"{where}: {base}.{what} has shape {tuple(t.shape)}, but the config needs "
                               f"{tuple(shape)}")

    w = scheme["weights"]
    if qc["quant_method"] == "lmstack":  # NF4
        m = QuantizedLinear(torch.zeros(o, i), torch.zeros(o) if has_bias else None, "nf4",
                            bool(w.get("double_quant", True)))
        for n in list(m._state_names):
            t = need(NF4_PREFIX + n)
            shape_check(t, getattr(m, n).shape, NF4_PREFIX + n)
            setattr(m, n, t.clone())
        return m
    fmt_name = scheme["format"]
    acts = scheme.get("input_activations")
    if fmt_name == "float-quantized":
        codes = need("weight")
        fmt = {v: k for k, v in FP8_DTYPES.items()}.get(codes.dtype)
        if fmt is None:
            raise LmstackError(f"{where}: {base}.weight is {codes.dtype}, not an fp8 dtype")
        m = QuantLinear(i, o, fmt, None, has_bias, method="fp8")
    else:
        bits = int(w.get("num_bits", 0))
        if w.get("type") != "int" or bits not in (4, 8) or (fmt_name == "pack-quantized") != (bits == 4):
            raise LmstackError(f"{where}: lmstack reads int4 pack-quantized and int8 int-quantized weights; this "
                               f"one is {w.get('type')} {bits}-bit {fmt_name}")
        strategy = w.get("strategy")
        g = i if strategy == "channel" else w.get("group_size")
        if strategy not in ("channel", "group") or not isinstance(g, int) or g <= 0 or i % g:
            raise LmstackError(f"{where}: weight strategy {strategy!r} with group_size {w.get('group_size')!r} "
                               f"does not fit in_features {i}")
        if bits == 8 and not w.get("symmetric", True):
            raise LmstackError(f"{where}: asymmetric int8 weights are not supported")
        fmt = "int4" if bits == 4 else ("w8a8" if acts else "int8")
        g_idx = f"{base}.weight_g_idx" in names
        m = QuantLinear(i, o, fmt, g, has_bias, act_order=g_idx, method=(qc.get("lmstack") or {}).get("method", "?"))
        scales = need("weight_scale").float()
        shape_check(scales, (o, i // g), "weight_scale")
        m.scales.copy_(scales)
        if bits == 8:
            codes = need("weight")
            shape_check(codes, (o, i), "weight")
            if codes.dtype != torch.int8:
                raise LmstackError(f"{where}: {base}.weight is {codes.dtype}; int-quantized needs int8")
            m.codes.copy_(codes)
            return m
        packed = need("weight_packed")
        shape_check(packed, (o, (i + 7) // 8), "weight_packed")
        codes = _unpack_rows4(packed, i)
        if not w.get("symmetric", True):
            zp = need("weight_zero_point")
            shape_check(zp, ((o + 7) // 8, i // g), "weight_zero_point")
            m.zeros.copy_(_unpack_rows4(zp.t().contiguous(), o).t())
        if g_idx:
            gi = get(f"{base}.weight_g_idx").long()
            shape_check(gi, (i,), "weight_g_idx")
            perm = torch.sort(gi, stable=True).indices
            if not torch.equal(gi[perm], torch.arange(i) // g):
                raise LmstackError(f"{where}: {base}.weight_g_idx does not give every group exactly {g} columns")
            codes = codes[:, perm]
            m.perm.copy_(perm)
        m.codes.copy_(pack_nibbles(codes))
        return m
    shape_check(codes, (o, i), "weight")
    m.codes.copy_(codes)
    scales = need("weight_scale").float().reshape(-1, 1)
    shape_check(scales, (o, 1), "weight_scale")
    m.scales.copy_(scales)
    return m


def load_quantized(path: Path, cfg, hf_names: bool, qc: dict, reader, dtype, device) -> nn.Module:
    """load_model's path for a directory with a quantization_config: the model with QuantLinear (or NF4
    QuantizedLinear) modules in its blocks, everything else loaded as load_model would."""
    check_quantizable(cfg)
    where = str(Path(path) / "config.json")
    get, names = reader.get, reader.keys()
    with torch.device("meta"):
        model = Transformer(cfg)
    ignore = [str(x) for x in qc.get("ignore") or []]
    body, head_scheme = _groups(qc)
    used: set[str] = set()
    for name, lin in block_linears(model).items():
        base = hf_base(cfg, hf_names, name)
        if any(base == x or base.endswith("." + x) or (x.startswith("re:") and re.match(x[3:], base))
               for x in ignore):
            continue  # stays a float Linear, loaded below
        m = _module_from(qc, body, get, names, base, lin, where)
        used.update(k for k in names if k.startswith(base + ".") and not k.endswith(".bias"))
        if lin.bias is not None:  # the bias stays a float tensor under the usual name
            key = f"{base}.bias"
            if key not in names:
                raise LmstackError(f"{where}: the checkpoint lacks {key!r}")
            m.bias.data = get(key).float().clone()
            used.add(key)
        replace_module(model, name, m)
    if head_scheme is not None:
        targets = _head_targets(cfg, hf_names)
        if head_scheme["targets"] != targets:
            raise LmstackError(f"{where}: the head's config group targets {head_scheme['targets']!r}; this "
                               f"{'tied' if cfg.tie_embeddings else 'untied'} model stores its int8 head and "
                               f"embedding as {targets!r}")
        with torch.device("meta"):
            shape = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        tables = [_module_from(qc, head_scheme, get, names, base, shape, where) for base in targets]
        for base, q in zip(targets, tables):
            if q.fmt != "int8" or q.group_size != q.in_features:
                raise LmstackError(f"{where}: {base} must be int8 with one scale per row; its group says "
                                   f"{q.fmt} with group size {q.group_size}")
            used.update(k for k in names if k.startswith(base + "."))
        model.lm_head = tables[0]
        model.tok_emb = QuantEmbedding.from_int8(tables[-1])  # tied: the head's own codes
    qnames = {n for n in quantized_modules(model)} | ({"tok_emb"} if head_scheme is not None else set())
    expected = {k: v for k, v in model.state_dict().items()
                if not any(k.startswith(q + ".") for q in qnames)}
    weights = match_checkpoint(path, cfg, hf_names, expected, get, names, dtype, device, frozenset(used))
    model.load_state_dict(weights, assign=True, strict=False)
    model.materialize_buffers(device)
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise LmstackError(f"{path}: nothing in the checkpoint filled {still_meta[0]!r}")
    if torch.device(device).type != "cpu":
        model.to(device)
    return model.eval()
