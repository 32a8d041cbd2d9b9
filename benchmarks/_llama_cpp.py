"""llama.cpp as a decode baseline: convert an HF-layout directory to GGUF with llama.cpp's own converter, then
time greedy decoding through llama-cpp-python. Absent (not built, no converter) -> `available()` says why and
the caller skips the row. Build it once with `bash benchmarks/setup_llama_cpp.sh` (about 10 minutes).

The converter needs a tokenizer; a random-weight benchmark model has none, so a tiny SentencePiece model is
trained for the conversion only (llama.cpp pads the vocabulary to the model's size; the token ids we feed are
ids, so the tokenizer plays no part in the timing).

Usage:
    ok, why = available()
    gguf = convert(model_dir, work_dir, "f32")          # or "q8_0"; quantize(gguf, "q4_0") for q4_0
    tokens, seconds = decode(gguf, prompt_ids, n_new=128, threads=2)
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("LMSTACK_LLAMA_CPP", Path.home() / ".cache" / "lmstack" / "llama_cpp"))
CONVERTER = CACHE / "src" / "convert_hf_to_gguf.py"


def available() -> tuple[bool, str]:
    try:
        import llama_cpp  # noqa: F401  # lazy: optional baseline, built by setup_llama_cpp.sh
    except ImportError:
        return False, "llama-cpp-python is not installed (bash benchmarks/setup_llama_cpp.sh)"
    if not CONVERTER.is_file():
        return False, f"no llama.cpp converter at {CONVERTER} (bash benchmarks/setup_llama_cpp.sh)"
    return True, ""


def _spm_tokenizer(directory: Path) -> None:
    import sentencepiece as spm  # lazy: dev extra, only the conversion needs it

    rng = random.Random(0)
    words = "the cat sat on a mat dog ran to park hello there how are you today yes no maybe".split()
    text = directory / "spm_text.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(directory / "tokenizer"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   minloglevel=2)


def convert(model_dir: str | Path, work: str | Path, outtype: str = "f32") -> Path:
    """model_dir (HF layout, config.json + safetensors) -> work/model-<outtype>.gguf."""
    work = Path(work)
    staged = work / "hf_for_gguf"
    if not staged.exists():
        shutil.copytree(model_dir, staged)
        for f in ("tokenizer.json", "tokenizer_config.json"):  # the converter must take the SentencePiece path
            (staged / f).unlink(missing_ok=True)
        _spm_tokenizer(staged)
    out = work / f"model-{outtype}.gguf"
    env = {**os.environ, "PYTHONPATH": str(CACHE / "src" / "gguf-py")}
    subprocess.run([sys.executable, str(CONVERTER), str(staged), "--outtype", outtype, "--outfile", str(out)],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def quantize(gguf: Path, kind: str = "q4_0") -> Path:
    """A GGUF quantized by llama.cpp's own llama_model_quantize (q4_0, q8_0, ...)."""
    import llama_cpp  # lazy: optional baseline

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    out = gguf.with_name(f"model-{kind}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    if llama_cpp.llama_model_quantize(str(gguf).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {gguf} to {kind}")
    return out


NO_EXTRA_BUFTS = r"""
def _no_extra_bufts(llama_cpp):
    # Llama() takes no such argument: its model params come from llama_model_default_params
    default_params = llama_cpp.llama_model_default_params
    def params():
        p = default_params()
        p.use_extra_bufts = False
        return p
    llama_cpp.llama.llama_cpp.llama_model_default_params = params
"""
"""Source text that a child script runs (benchmarks/quant_footprint.py's too): _no_extra_bufts(llama_cpp) turns
llama.cpp's weight repacking off for every Llama made after it (see EXTRA_BUFTS)."""

_WORKER = NO_EXTRA_BUFTS + r"""
import json, sys, time
import llama_cpp
from llama_cpp import Llama
if sys.argv[4] == "0":
    _no_extra_bufts(llama_cpp)
llm = Llama(sys.argv[1], n_ctx=int(sys.argv[3]), n_threads=int(sys.argv[2]), n_threads_batch=int(sys.argv[2]),
            n_batch=64, verbose=False)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    out = []
    start = time.perf_counter()
    # temp 0 is llama.cpp's greedy sampler; generate() never stops on EOS by itself
    for tok in llm.generate(job["prompt"], temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if len(out) == job["n"]:
            break
    print(json.dumps({"tokens": out, "seconds": time.perf_counter() - start}), flush=True)
llm.close()
"""


EXTRA_BUFTS = os.environ.get("LMSTACK_LLAMA_CPP_EXTRA_BUFTS", "0") == "1"
"""llama.cpp's extra buffer types (its run-time weight repacking into CPU-specific layouts) are off unless
LMSTACK_LLAMA_CPP_EXTRA_BUFTS=1: on the 2-core AVX-512 VM of 2026-12-07 (llama-cpp-python 0.3.36, native and
AMX-free builds alike) every q8_0 / q4_0 decode with them segfaulted, and without them q8_0 ran (f32 has no repack
either way). The benchmarks record which was used."""


class Decoder:
    """One loaded GGUF in a worker process of its own; `run` decodes greedily and returns (new tokens, seconds of
    the decode loop, timed inside the worker). A process of its own, so llama.cpp's OpenMP threads and torch's never
    share a process or compete while the other decodes, and a crash there (its weight repacking segfaulted here) is
    reported instead of killing the benchmark."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int = 512, extra_bufts: bool = EXTRA_BUFTS):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(gguf), str(threads), str(n_ctx),
                                      "1" if extra_bufts else "0"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker exited (status {self.proc.poll()})")
        return json.loads(line)

    def run(self, prompt: list[int], n_new: int) -> tuple[list[int], float]:
        self.proc.stdin.write(json.dumps({"prompt": list(prompt), "n": n_new}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        return reply["tokens"], reply["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
