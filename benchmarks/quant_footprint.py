"""Memory footprint of each compressed format: bytes on disk, and the peak resident memory of a process that
loads the model and decodes with it.

One model, the same weights for every row: the ~125M llama-base preset (vocab 32000, d_model 768, 12 layers,
GQA 12/3 heads, untied embedding and head), fixed-seed random weights (footprint does not depend on the values), saved
fp32. From it:
- lmstack quantized directories (lmstack.compress.quantize_cli.quantize): int8 per channel, int4 g128, NF4,
  FP8 e4m3 (compressed-tensors layout, qformat.py);
- the GGUF files of `lmstack export` (f32, q8_0, q4_0) and the ONNX full-sequence forward (fp32).

Disk: the bytes of the weight files (*.safetensors; the .gguf / .onnx file). Peak RSS: a fresh Python process
per row imports its runtime, notes its RSS, then loads the model and greedily decodes 32 tokens after a
16-token prompt (lmstack.LLM; onnxruntime runs one 48-token forward, having no decode loop here; llama.cpp
through llama-cpp-python when importable). The row reports peak RSS (VmHWM) minus the RSS after imports, so
the interpreter and the libraries are not counted, and ratio = fp32's / this row's (higher = smaller).

What is counted differs by runtime, and the rows say so: lmstack memory-maps fp32 safetensors (the weights are
file pages, counted in RSS once touched) and copies quantized codes into module buffers. The embedding and
the LM head (llama-base's untied 32000 x 768 pair: 197 MB of its 494 MB in fp32) are int8 per row in the int8,
int4 and fp8 directories (`lmstack quantize`'s default --head int8) and fp32 in the NF4 one; GGUF quantizes
them too (q8_0 in q8_0 files; q4_0 / q6_K in q4_0 ones, as llama.cpp's quantizer does). Their byte count
(arithmetic) is in each row's config.

Usage (the run that wrote results/quant_footprint.json; ~4 minutes on 2 cores):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quant_footprint.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import _llama_cpp
from _common import result, write_result

from lmstack.compress.quantize_cli import quantize
from lmstack.model.hf_io import save_model
from lmstack.model.presets import preset
from lmstack.model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]

CHILD = _llama_cpp.NO_EXTRA_BUFTS + r"""
import json, os, sys, time, resource
from pathlib import Path
kind, path, warm = sys.argv[1], sys.argv[2], sys.argv[3]
def rss_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
import random
rng = random.Random(0)
prompt = [rng.randrange(5, 500) for _ in range(16)]
if kind != "gguf":
    import torch
    torch.set_num_threads(2)
if kind == "lmstack":
    import lmstack
    import lmstack.infer.engine, lmstack.compress.qformat, lmstack.tokenizer  # libraries are not the model
    from lmstack.kernels.build import extension
    extension()  # the C++ kernels' shared library, loaded before the mark
    # the first load_model imports ~800 more modules (sympy through torch's meta device...): ~73 MB that are
    # the same for every model, so a 2-layer d64 model of the same format is loaded and run once first
    lmstack.LLM(warm, num_blocks=4, max_model_len=64).generate([{"prompt_token_ids": [5, 6, 7]}],
                                                              lmstack.SamplingParams(max_tokens=2))
elif kind == "onnx":
    import onnxruntime as ort, numpy as np
else:
    import llama_cpp
    if os.environ.get("LMSTACK_LLAMA_CPP_EXTRA_BUFTS", "0") != "1":  # as benchmarks/_llama_cpp.py: repacking crashed
        _no_extra_bufts(llama_cpp)
before = rss_kb("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
t = time.perf_counter()
if kind == "lmstack":
    llm = lmstack.LLM(path, num_blocks=16, max_model_len=128)  # the same small KV pool for every row
    out = llm.generate([{"prompt_token_ids": prompt}], lmstack.SamplingParams(max_tokens=32, temperature=0,
                                                                              ignore_eos=True))
    n = len(out[0].outputs[0].token_ids)
elif kind == "onnx":
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ids = np.array([prompt * 3], dtype=np.int64)
    sess.run(None, {sess.get_inputs()[0].name: ids})
    n = 0
else:
    llm = llama_cpp.Llama(model_path=path, n_ctx=128, n_threads=2, verbose=False)
    llm.eval(prompt)
    n = 0
    for _ in range(32):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
        n += 1
print(json.dumps({"before_kb": before, "peak_kb": rss_kb("VmHWM"), "seconds": time.perf_counter() - t,
                  "tokens": n}))
"""


# metric-name suffix of each row (citable: no spaces), from its label
SHORT = {"fp32 (lmstack, safetensors)": "fp32", "int8 (lmstack, compressed-tensors)": "int8",
         "int4 (lmstack, compressed-tensors)": "int4_g128", "nf4 (lmstack)": "nf4",
         "fp8 (lmstack, compressed-tensors)": "fp8_e4m3", "gguf f32 (llama.cpp)": "gguf_f32",
         "gguf q8_0 (llama.cpp)": "gguf_q8_0", "gguf q4_0 (llama.cpp)": "gguf_q4_0",
         "onnx fp32 (onnxruntime)": "onnx_fp32"}


def child(kind: str, path: Path, warm: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), str(warm)], capture_output=True, text=True,
                         env=env, timeout=600)
    if out.returncode:
        raise RuntimeError(f"{kind} {path}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def weight_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-base")
    ap.add_argument("--work", help="folder for the model files (default: a temporary one)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = preset(args.preset)
    work = Path(args.work or tempfile.mkdtemp(prefix="quant_footprint-"))
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "fp32"
    model = Transformer(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    emb_bytes = 4 * model.tok_emb.weight.numel() if hasattr(model, "tok_emb") else 4 * cfg.vocab_size * cfg.d_model
    if not (fp32 / "config.json").exists():
        # GGUF embeds a tokenizer: a small byte-level BPE (ids past its vocabulary are written as unused pads)
        from lmstack.tokenizer.train import train_tokenizer
        text = " ".join(f"token{i % 97} word{i % 13} the cat sat on mat {i}" for i in range(3000))
        tok = train_tokenizer(texts=[text], type="bpe", vocab_size=min(1000, cfg.vocab_size), show_progress=False)
        save_model(model, fp32, tokenizer=tok)
    del model
    rows_in: list[tuple[str, str, Path]] = [("fp32 (lmstack, safetensors)", "lmstack", fp32)]
    for method, extra in (("int8", {}), ("int4", {"group_size": min(128, cfg.d_model)}), ("nf4", {}), ("fp8", {})):
        out = work / method
        if not (out / "config.json").exists():
            quantize(str(fp32), str(out), method, **extra)
        rows_in.append((f"{method} (lmstack, compressed-tensors)" if method != "nf4" else "nf4 (lmstack)", "lmstack",
                        out))
    # warm-up models for the child processes: the same formats on a 2-layer d64 model
    small = preset(args.preset, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=512, max_seq_len=128)
    warm_dirs = {}
    save_model(Transformer(small).eval(), work / "warm-fp32")
    for label, kind, path in rows_in:
        method = label.split()[0]
        if method == "fp32":
            warm_dirs[label] = work / "warm-fp32"
        else:
            warm_dirs[label] = work / f"warm-{method}"
            if not (warm_dirs[label] / "config.json").exists():
                quantize(str(work / "warm-fp32"), str(warm_dirs[label]), method,
                         **({"group_size": 64} if method == "int4" else {}))
    skipped = {}
    try:
        from lmstack.compress.export import export
        for t in ("f32", "q8_0", "q4_0"):
            f = work / f"model-{t}.gguf"
            if not f.exists():
                export(str(fp32), str(f), "gguf", t)
            rows_in.append((f"gguf {t} (llama.cpp)", "gguf", f))
        f = work / "model.onnx"
        if not f.exists():
            export(str(fp32), str(f), "onnx")
        rows_in.append(("onnx fp32 (onnxruntime)", "onnx", f))
    except Exception as e:  # noqa: BLE001 - the rows say why they are missing
        skipped["export"] = f"{type(e).__name__}: {e}"
    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False

    measured = {}
    for label, kind, path in rows_in:
        disk = weight_bytes(path)
        if kind == "gguf" and not have_llama:
            measured[label] = {"disk": disk, "rss": None, "why": "llama-cpp-python is not installed "
                                                                  "(bash benchmarks/setup_llama_cpp.sh)"}
            continue
        r = child(kind, path, warm_dirs.get(label))
        measured[label] = {"disk": disk, "rss": (r["peak_kb"] - r["before_kb"]) * 1024, "seconds": r["seconds"],
                           "tokens": r["tokens"]}
        print(label, measured[label], flush=True)

    base = measured["fp32 (lmstack, safetensors)"]
    rows = []
    for label, m in measured.items():
        # arithmetic: the bytes of the embedding and LM head tables in lmstack's formats: fp32 in fp32 and NF4,
        # int8 codes plus one fp32 scale per row otherwise (GGUF and ONNX rows: the fp32 figure, for reference)
        tables = 1 if cfg.tie_embeddings else 2
        fp32_tables = label.split()[0] in ("fp32", "nf4") or "gguf" in label or "onnx" in label
        common = dict(preset=args.preset, params=n_params, file=label,
                      lmstack_embedding_and_head_bytes_arithmetic=(
                          tables * emb_bytes if fp32_tables else tables * (emb_bytes // 4 + 4 * cfg.vocab_size)))
        key = SHORT[label]
        rows.append(result("quant_footprint", f"disk_bytes_{key}", False, m["disk"], "fp32 safetensors",
                           base["disk"], rss_skipped=m.get("why"), **common))
        if m["rss"] is not None:
            rows.append(result("quant_footprint", f"peak_rss_bytes_{key}", False, m["rss"],
                               "fp32 lmstack.LLM", base["rss"], seconds=round(m["seconds"], 2),
                               tokens=m["tokens"], **common))
    for k, why in skipped.items():
        print(f"skipped {k}: {why}")
    write_result("quant_footprint", rows)


if __name__ == "__main__":
    main()
