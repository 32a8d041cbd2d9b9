"""Untrusted model directories (issue 15 §3): how fast hostile configs are refused, what lazy RoPE tables
save in memory, and that they cost decoding nothing.

Figures (benchmarks/results/untrusted_model_dir.json, one object per metric):
- refuse_seconds_layers_1e6: load_model on a tiny llama directory whose config.json says
  num_hidden_layers 10**6. Baseline: the loader before issue 15 (the parent of the fix's commit, run from
  `git archive` in a subprocess), killed after --old_timeout seconds, so its value is a lower bound.
- refuse_seconds_positions_2pow31: max_position_embeddings 2**31. The old loader would allocate the
  whole RoPE table (8+ GiB), which this shared machine cannot spare, so the baseline is loading the
  healthy directory (what a refusal costs next to a normal load).
- refuse_seconds_memory_estimate: vocab 2**22 x hidden 2**14 (~0.5 TiB in fp32), refused by the memory
  estimate; baseline again the healthy load.
- refuse_seconds_engine_kv_pool_2pow26: LLMEngine on a directory with max_position_embeddings 2**26 (inside
  the shape limit) whose one-sequence KV pool would need 32 GiB; refused against a 16 GiB limit (set so the
  run is the same on any machine). Baseline: building the engine on the healthy directory.
- peak_rss_mib_positions_2pow22 / _2pow31: peak resident memory (above the imports) of building a model
  and running a 256-token forward. Ours: lazy tables. Baselines: the old eager RotaryEmbedding (copied
  below verbatim) at 2**22 positions (2**31 would not fit this machine), and for 2**31 an honest
  max_seq_len of 256 (so ratio ~1 means the absurd field costs nothing).
- decode_tokens_per_s: greedy KV-cache decoding, lazy tables vs the old eager class swapped into the same
  model (max_seq_len 2**16), 32 new tokens, rounds alternating which goes first; medians of each and the
  median of the per-round ratios (the machine is shared, so single runs swing by 2x).

Usage:
    python benchmarks/untrusted_model_dir.py [--repeats 7] [--decode_repeats 31] [--old_timeout 30]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import peak_rss_mb, reset_peak_rss, result, rss_mb, write_result

ROOT = Path(__file__).resolve().parents[1]
FIX_COMMIT = "9177f17"  # "Untrusted model directories (issue 15 §3) ..."; its parent is the loader before


def old_rotary_class():
    """RotaryEmbedding as it was before issue 15: the whole table built at construction."""
    import torch
    from torch import nn

    from lmstack.model.positions import ROPE_SCALING

    class OldRotaryEmbedding(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            inv_freq, self.attention_scale = ROPE_SCALING[cfg.rope_scaling](cfg)
            self.register_buffer("inv_freq", inv_freq, persistent=False)
            self._build(cfg.max_seq_len)

        def _build(self, length: int) -> None:
            t = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.register_buffer("cos_table", emb.cos() * self.attention_scale, persistent=False)
            self.register_buffer("sin_table", emb.sin() * self.attention_scale, persistent=False)

        def forward(self, positions):
            needed = int(positions.max()) + 1 if positions.numel() else 0
            if needed > self.cos_table.shape[0]:
                self._build(max(needed, 2 * self.cos_table.shape[0]))
            return self.cos_table[positions], self.sin_table[positions]

    return OldRotaryEmbedding


def tiny_cfg(max_seq_len: int):
    from lmstack.model import ModelConfig

    return ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, max_seq_len=max_seq_len,
                       hf_model_type="llama")


def make_dirs(tmp: Path) -> dict[str, Path]:
    import torch

    from lmstack.model.hf_io import save_model
    from lmstack.model.transformer import Transformer

    torch.manual_seed(0)
    healthy = tmp / "healthy"
    save_model(Transformer(tiny_cfg(256)), healthy)
    (healthy / "lmstack_config.json").unlink()
    dirs = {"healthy": healthy}
    for name, changes in {"layers_1e6": {"num_hidden_layers": 10**6},
                          "positions_2pow31": {"max_position_embeddings": 2**31},
                          "memory_estimate": {"vocab_size": 2**22, "hidden_size": 2**14,
                                              "intermediate_size": 2**14, "num_attention_heads": 128},
                          "kv_pool_2pow26": {"max_position_embeddings": 2**26}}.items():
        d = tmp / name
        shutil.copytree(healthy, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
        dirs[name] = d
    return dirs


def time_load(path: Path) -> tuple[float, str]:
    from lmstack.errors import LmstackError
    from lmstack.model.hf_io import load_model

    start = time.perf_counter()
    try:
        load_model(path)
        outcome = "loaded"
    except LmstackError as e:
        outcome = str(e)
    return time.perf_counter() - start, outcome


def time_engine(path: Path) -> tuple[float, str]:
    from lmstack.errors import LmstackError
    from lmstack.infer.engine import LLMEngine
    from lmstack.model.load_guard import set_max_model_gib

    set_max_model_gib(16)
    start = time.perf_counter()
    try:
        LLMEngine(str(path), max_model_len=None if "kv_pool" in path.name else 256)
        outcome = "built"
    except LmstackError as e:
        outcome = str(e)
    finally:
        set_max_model_gib(None)
    return time.perf_counter() - start, outcome


def old_loader_seconds(path: Path, timeout: float) -> tuple[float, bool]:
    """Seconds the pre-fix loader spends on `path` in a subprocess; (timeout, True) if it was killed."""
    old = Path(tempfile.mkdtemp(prefix="lmstack_old_"))
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", f"{FIX_COMMIT}^", "src/lmstack"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        code = ("import time, torch; torch.set_num_threads(1); from lmstack.model.hf_io import load_model; "
                f"t = time.perf_counter()\ntry: load_model({str(path)!r})\nexcept Exception: pass\n"
                "print(time.perf_counter() - t)")
        env = {"PYTHONPATH": str(old / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
        try:
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 timeout=timeout, check=True).stdout
            return float(out.strip().splitlines()[-1]), False
        except subprocess.TimeoutExpired:
            return timeout, True
    finally:
        shutil.rmtree(old, ignore_errors=True)


def rss_worker(mode: str, max_seq_len: int) -> dict:
    """In a fresh process: peak RSS above the imports of building a model and a 256-token forward."""
    import torch

    from lmstack.model.transformer import Transformer

    torch.set_num_threads(1)
    old_class = old_rotary_class()
    cfg = tiny_cfg(max_seq_len)
    x = torch.randint(0, 256, (1, 256))
    reset_peak_rss()
    base = rss_mb()
    model = Transformer(cfg)
    if mode == "eager":
        model.rope = old_class(cfg)
    with torch.no_grad():
        model(x)
    return {"peak_mib": peak_rss_mb() - base, "table_rows": int(model.rope.cos_table.shape[0])}


def run_rss(mode: str, max_seq_len: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--rss_worker", mode, str(max_seq_len)], capture_output=True,
                         text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}).stdout
    return json.loads(out.strip().splitlines()[-1])


def decode_rates(repeats: int, new_tokens: int = 32) -> tuple[float, float, float]:
    """(median tok/s lazy, median tok/s eager, median of the per-round lazy/eager ratios)."""
    import torch

    from lmstack.model.reference_decode import reference_decode
    from lmstack.model.positions import RotaryEmbedding
    from lmstack.model.transformer import Transformer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = tiny_cfg(2**16)
    model = Transformer(cfg).eval()
    lazy, eager = RotaryEmbedding(cfg), old_rotary_class()(cfg)
    prompt = torch.randint(0, 256, (1, 16))
    outs, rates = {}, {"lazy": [], "eager": []}
    for i in range(repeats + 1):  # first round is warm-up
        for name, rope in (("lazy", lazy), ("eager", eager)) if i % 2 == 0 else (("eager", eager), ("lazy", lazy)):
            model.rope = rope
            start = time.perf_counter()
            out = reference_decode(model, prompt, new_tokens, temperature=0.0, cache="contiguous")
            seconds = time.perf_counter() - start
            outs[name] = out
            if i:
                rates[name].append(new_tokens / seconds)
    assert torch.equal(outs["lazy"], outs["eager"]), "lazy and eager tables must decode identically"
    pairs = [a / b for a, b in zip(rates["lazy"], rates["eager"])]
    return statistics.median(rates["lazy"]), statistics.median(rates["eager"]), statistics.median(pairs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--decode_repeats", type=int, default=31)
    ap.add_argument("--old_timeout", type=float, default=30.0)
    ap.add_argument("--rss_worker", nargs=2)
    args = ap.parse_args()
    if args.rss_worker:
        print(json.dumps(rss_worker(args.rss_worker[0], int(args.rss_worker[1]))))
        return
    import torch

    torch.set_num_threads(1)
    machine = "2 cores, shared"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_dirs(Path(tmp))
        time_load(dirs["healthy"])  # warm-up: the first meta-device build in a process is slow
        loads = [k for k in dirs if k != "kv_pool_2pow26"]
        times = {k: [] for k in loads + ["engine_healthy", "engine_kv_pool"]}
        outcomes = {}
        time_engine(dirs["healthy"])  # warm-up
        for _ in range(args.repeats):  # interleaved: contention hits every case alike
            for name in loads:
                seconds, outcomes[name] = time_load(dirs[name])
                times[name].append(seconds)
            for name, d in (("engine_healthy", dirs["healthy"]), ("engine_kv_pool", dirs["kv_pool_2pow26"])):
                seconds, outcomes[name] = time_engine(d)
                times[name].append(seconds)
        med = {k: statistics.median(v) for k, v in times.items()}
        assert outcomes["healthy"] == "loaded" and outcomes["engine_healthy"] == "built"
        assert "KV cache pool" in outcomes["engine_kv_pool"], outcomes["engine_kv_pool"]
        for name in ("layers_1e6", "positions_2pow31", "memory_estimate"):
            assert outcomes[name] != "loaded", name
        old_s, killed = old_loader_seconds(dirs["layers_1e6"], args.old_timeout)
        results.append(result("untrusted_model_dir", "refuse_seconds_layers_1e6", False, med["layers_1e6"],
                              f"loader before issue 15 ({FIX_COMMIT}^)" + (", killed: lower bound" if killed else ""),
                              old_s, goal=None, old_killed_after_timeout=killed, timeout_s=args.old_timeout,
                              message=outcomes["layers_1e6"][-160:], repeats=args.repeats, machine=machine))
        for name in ("positions_2pow31", "memory_estimate"):
            results.append(result("untrusted_model_dir", f"refuse_seconds_{name}", False, med[name],
                                  "loading the healthy tiny directory", med["healthy"], goal=None,
                                  message=outcomes[name][-200:], repeats=args.repeats, machine=machine))
        results.append(result("untrusted_model_dir", "refuse_seconds_engine_kv_pool_2pow26", False,
                              med["engine_kv_pool"], "building the engine on the healthy directory",
                              med["engine_healthy"], goal=None, limit_gib=16,
                              message=outcomes["engine_kv_pool"][-240:], repeats=args.repeats, machine=machine))
    lazy22, eager22 = run_rss("lazy", 2**22), run_rss("eager", 2**22)
    results.append(result("untrusted_model_dir", "peak_rss_mib_positions_2pow22", False, lazy22["peak_mib"],
                          "eager RoPE table (before issue 15)", eager22["peak_mib"], goal=None,
                          table_rows_ours=lazy22["table_rows"], table_rows_baseline=eager22["table_rows"],
                          used_length=256, head_dim=32, machine=machine))
    lazy31, honest = run_rss("lazy", 2**31 - 1), run_rss("lazy", 256)
    results.append(result("untrusted_model_dir", "peak_rss_mib_positions_2pow31", False, lazy31["peak_mib"],
                          "the same model with max_seq_len 256", honest["peak_mib"], goal=None,
                          table_rows_ours=lazy31["table_rows"], used_length=256, machine=machine,
                          note="max_seq_len 2**31-1 (ModelConfig; load_model refuses 2**31 by shape limit)"))
    lazy_rate, eager_rate, paired = decode_rates(args.decode_repeats)
    results.append(result("untrusted_model_dir", "decode_tokens_per_s", True, lazy_rate,
                          "eager RoPE table (before issue 15)", eager_rate, goal=0.97, max_seq_len=2**16,
                          new_tokens=32, prompt=16, d_model=128, n_layers=2, repeats=args.decode_repeats,
                          interleaved=True, median_paired_ratio=round(paired, 4), machine=machine))
    write_result("untrusted_model_dir", results)


if __name__ == "__main__":
    main()
