"""`lmstack export`: a model directory -> one file for edge runtimes, GGUF (llama.cpp) or ONNX (onnxruntime).

Usage:
    lmstack export --model runs/tiny --format gguf --gguf-type q8_0 --out tiny-q8_0.gguf
    lmstack export --model runs/tiny --format onnx --out tiny.onnx
    lmstack export --model runs/tiny --format onnx --past_key_values --out tiny-kv.onnx

The formats live in export_gguf.py and export_onnx.py; this module only picks one and prints what was
written (one JSON line: path, bytes, types). The model directory is only read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from lmstack.compress.qformat import quantization_config
from lmstack.errors import LmstackError

INSTALL = "pip install gguf onnx onnxruntime  (or: pip install 'lmstack[export]')"


def output_path(model_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """`out` as a Path, refused when it is a directory, lies inside the model directory, or has no parent."""
    path, model_dir = Path(out), Path(model_dir)
    if path.is_dir():
        raise LmstackError(f"--out {path} is a directory; give the file to write")
    if path.resolve().is_relative_to(model_dir.resolve()):
        raise LmstackError(f"--out {path} is inside the model directory {model_dir}, which export leaves untouched")
    if not path.parent.exists():
        raise LmstackError(f"--out {path}: the folder {path.parent} does not exist")
    return path


def export(model: str, out: str, format: Literal["gguf", "onnx"] = "gguf",
           gguf_type: Literal["f32", "f16", "q8_0", "q4_0"] = "f32", past_key_values: bool = False) -> dict[str, Any]:
    """Export a model directory as one GGUF or ONNX file.

    Args:
        model: Model directory (config.json + safetensors; GGUF also needs its tokenizer.json).
        out: File to write (.gguf or .onnx); written to a temporary name and renamed, never half-written.
        format: gguf (llama.cpp: llama or qwen2 architecture, tokenizer embedded) or onnx (full-sequence forward,
            input_ids -> logits, dynamic batch and sequence).
        gguf_type: Storage of the GGUF matrices: f32, f16, q8_0 or q4_0 (norms and biases stay f32).
        past_key_values: ONNX only: export the decoder with past key/values (input_ids, past_keys, past_values ->
            logits, present_keys, present_values) instead of the full-sequence forward.
    """
    if Path(model).is_dir() and (qc := quantization_config(model)) is not None:
        made = (qc.get("lmstack") or {}).get("method") or qc.get("format")
        raise LmstackError(f"{model} is a quantized directory ({made}); export the full-precision model instead: "
                           "GGUF quantizes on export (--gguf-type q8_0 / q4_0) and the ONNX export is float32")
    if format == "gguf":
        if past_key_values:
            raise LmstackError("--past_key_values applies to --format onnx only; a GGUF runtime keeps its own cache")
        try:
            from lmstack.compress.export_gguf import export_gguf  # lazy: the gguf package is an optional extra
        except ImportError as e:
            raise LmstackError(f"GGUF export needs the gguf package ({e}): {INSTALL}") from None
        written = export_gguf(model, out, gguf_type=gguf_type)
    elif format == "onnx":
        if gguf_type != "f32":
            raise LmstackError(f"--gguf-type {gguf_type} applies to --format gguf only; the ONNX export is float32")
        try:
            from lmstack.compress.export_onnx import export_onnx  # lazy: the onnx package is an optional extra
        except ImportError as e:
            raise LmstackError(f"ONNX export needs ({e}): {INSTALL}") from None
        written = export_onnx(model, out, past_key_values=past_key_values)
    else:
        raise LmstackError(f"unknown --format {format!r}; choose gguf or onnx")
    print(json.dumps(written))
    return written


COMMANDS = export
