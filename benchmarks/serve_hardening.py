"""Serve hardening: does /health stay responsive while one heavy request runs, and how fast is a huge prompt refused?

The server is the real app (`lmstack.serve.create_app`) under uvicorn in a background thread on loopback, serving
a tiny random llama (llama-tiny preset, context 256) with a 512-token byte-level BPE trained on Tiny Shakespeare
(from ../shared/data; the synthetic world's words when that folder is absent). For each heavy request a prober
thread GETs /health every 20 ms on its own keep-alive connection while the request is in flight; we report the
worst and the median /health latency, the heavy request's status code and its own time. Cases:

- bad_words_60k: 60,000 bad words (the campaign's 224 s freeze); now refused by the bad_words cap (400).
- bad_words_at_cap: as many bad words as the cap allows, each as long as the cap allows (accepted, 200).
- tokenize_0.96MB: /tokenize on 0.96 MB of text (the campaign's 1.33 s stall; accepted, 200).
- prompt_546k_tokens: a 1 MB completions prompt (~546k tokens of the campaign's tokenizer) -> 413.
- stop_1000x1000: 1,000 stop strings of 1,000 characters; now refused by the stop cap (400).
- stop_at_cap: as many stop strings as the cap allows, each at the length cap (accepted, 200).

Each case runs `--repeats` times; health_worst_ms is the worst probe over all repeats. Baseline: the idle server
(the same probe with no heavy request), and the campaign's numbers before the fix, quoted in each result's config
as "reported_before" (this script runs only the code as it is now). ratio = idle worst / heavy worst (1.0 = the
heavy request costs /health nothing). Goal: worst /health latency under 100 ms in every case.

decode_slowdown_*: a greedy 160-token stream's time beside a 200-token neighbour carrying stop strings, over its time
beside the same neighbour without them (alternating, median; 1.0 = the stop strings cost the stream nothing): at the
caps, and at the campaign's 1,000 x 1,000 characters on the second server, whose stop caps are lifted.

seconds_to_413: the 1 MB prompt against a second server in the same process whose byte bound is switched off
(limits.prompt_bytes_per_token = 10**9), which encodes the prompt first and then answers 413 on its token count,
as the campaign's server did (though now in the worker pool); the two alternate, median of the repeats.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/serve_hardening.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from _common import result, write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "serve"))
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
REPORTED_BEFORE = {
    "bad_words_60k": "every endpoint, /health too, frozen for 224 s",
    "tokenize_0.96MB": "everything stalled for 1.33 s",
    "prompt_546k_tokens": "the whole prompt encoded before answering 413",
    "stop_1000x1000": "every concurrent decode 7x slower",
}


def build_model(folder: Path) -> tuple[Path, str]:
    import torch

    import lmstack
    from lmstack.model.presets import preset
    from lmstack.tokenizer import train_tokenizer
    from serve_helpers import make_text

    text = DATA.read_text(encoding="utf-8") if DATA.is_file() else "\n".join(make_text(20000))
    tok = train_tokenizer(texts=text.splitlines()[:4000], type="bpe", vocab_size=512, special_tokens="chat",
                          show_progress=False)
    torch.manual_seed(0)
    model = lmstack.Transformer(preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=256))
    path = folder / "tiny-llama"
    lmstack.save_model(model.eval(), path, tokenizer=tok)
    return path, text


def probe(url: str, stop: threading.Event, period: float = 0.02) -> list[float]:
    """/health latencies (seconds) until `stop` is set."""
    times = []
    with httpx.Client(base_url=url, timeout=600) as c:
        while not stop.is_set():
            t = time.perf_counter()
            assert c.get("/health").status_code == 200
            times.append(time.perf_counter() - t)
            time.sleep(period)
    return times


def run_case(url: str, method: str, path: str, body: dict | None, timeout: float) -> dict:
    # json.dumps escapes non-ASCII (httpx's json= would not), so any text can be sent as is; encoded before the
    # probes start, since this client shares the server's process (and GIL)
    content = json.dumps(body).encode()
    stop = threading.Event()
    lat: list[float] = []
    th = threading.Thread(target=lambda: lat.extend(probe(url, stop)))
    th.start()
    time.sleep(0.1)  # a few idle probes first, so the heavy request surely overlaps running probes
    t = time.perf_counter()
    try:
        with httpx.Client(base_url=url, timeout=timeout) as c:
            status = c.request(method, path, content=content, headers={"content-type": "application/json"}).status_code
    except httpx.TimeoutException:
        status = -1
    took = time.perf_counter() - t
    time.sleep(0.05)
    stop.set()
    th.join()
    return {"status": status, "request_s": round(took, 4), "health_worst_ms": round(1000 * max(lat), 2),
            "health_median_ms": round(1000 * statistics.median(lat), 2), "probes": len(lat)}


def stream_beside(url: str, neighbour: dict) -> float:
    """Seconds to stream a greedy 160-token completion while `neighbour` (a non-streamed request) runs."""
    th = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", json=neighbour, timeout=600))
    th.start()
    time.sleep(0.05)
    t = time.perf_counter()
    body = {"prompt": "the king said", "max_tokens": 160, "ignore_eos": True, "temperature": 0.0, "stream": True}
    with httpx.Client(base_url=url, timeout=600) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for _ in r.iter_lines():
            pass
    took = time.perf_counter() - t
    th.join()
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one heavy request")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each case")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from lmstack.serve.commands import build_app
    from lmstack.serve.engine_bridge import ServerConfig
    from lmstack.serve.limits import RequestLimits
    from serve_helpers import LiveServer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, text = build_model(Path(tmp))
        config = ServerConfig(model_name="tiny-llama")
        lim = config.limits
        app, aengine = build_app(str(model_dir), config, max_num_seqs=8)
        srv = LiveServer(app, aengine).start()
        lifted = RequestLimits(prompt_bytes_per_token=10**9, max_stop=1000, max_stop_chars=1000)
        app_b, aengine_b = build_app(str(model_dir), ServerConfig(model_name="tiny-llama", limits=lifted),
                                     max_num_seqs=8)
        srv_b = LiveServer(app_b, aengine_b).start()
        try:
            words = text.split()
            big = (text * 2)[:960_000]
            prompt_1mb = (text * 2)[:1_000_000 - 200]
            n_tokens = len(aengine.tokenizer.encode(prompt_1mb))
            gen = {"prompt": "the king", "max_tokens": 16, "ignore_eos": True}
            long_word = ("x" * lim.max_bad_word_chars)
            cases = {
                "idle": None,
                "bad_words_60k": ("POST", "/v1/completions", {**gen, "bad_words": (words * 3)[:60_000]}),
                "bad_words_at_cap": ("POST", "/v1/completions",
                                     {**gen, "bad_words": [f"{w}{i}{long_word}"[:lim.max_bad_word_chars]
                                                           for i, w in enumerate((words * 2)[:lim.max_bad_words])]}),
                "tokenize_0.96MB": ("POST", "/tokenize", {"prompt": big}),
                "prompt_546k_tokens": ("POST", "/v1/completions", {"prompt": prompt_1mb, "max_tokens": 1}),
                "stop_1000x1000": ("POST", "/v1/completions",
                                   {**gen, "stop": [f"{i:04d}" + "y" * 996 for i in range(1000)]}),
                "stop_at_cap": ("POST", "/v1/completions",
                                {**gen, "stop": [f"{i:04d}" + "y" * (lim.max_stop_chars - 4)
                                                 for i in range(lim.max_stop)]}),
            }
            runs = {}
            for name, case in cases.items():
                reps = []
                for _ in range(args.repeats):
                    if case is None:
                        stop = threading.Event()
                        threading.Timer(1.0, stop.set).start()
                        lat = probe(srv.url, stop)
                        reps.append({"status": 200, "request_s": 0.0, "health_worst_ms": round(1000 * max(lat), 2),
                                     "health_median_ms": round(1000 * statistics.median(lat), 2),
                                     "probes": len(lat)})
                    else:
                        reps.append(run_case(srv.url, *case, timeout=args.timeout))
                runs[name] = {"status": sorted({r["status"] for r in reps}),
                              "request_s": statistics.median(r["request_s"] for r in reps),
                              "health_worst_ms": max(r["health_worst_ms"] for r in reps),
                              "health_median_ms": statistics.median(r["health_median_ms"] for r in reps),
                              "probes": sum(r["probes"] for r in reps)}
                print(name, runs[name], flush=True)
            # the 413: ours (byte bound) and the encode-first server, alternating
            body = {"prompt": prompt_1mb, "max_tokens": 1}
            t413: dict[str, list] = {"ours": [], "encode_first": []}
            for _ in range(args.repeats):
                for key, url in (("ours", srv.url), ("encode_first", srv_b.url)):
                    t413[key].append(run_case(url, "POST", "/v1/completions", body, args.timeout))
            print("413", t413, flush=True)
            # concurrent decode beside many long stop strings
            plain = {"prompt": "the queen", "max_tokens": 200, "ignore_eos": True}
            slow: dict[str, dict[str, list]] = {}
            for name, url, stops in (("stop_at_cap", srv.url, cases["stop_at_cap"][2]["stop"]),
                                     ("stop_1000x1000_caps_lifted", srv_b.url, cases["stop_1000x1000"][2]["stop"])):
                slow[name] = {"plain": [], "stops": []}
                stream_beside(url, plain)  # warm-up
                for _ in range(args.repeats):
                    slow[name]["plain"].append(stream_beside(url, plain))
                    slow[name]["stops"].append(stream_beside(url, {**plain, "stop": stops}))
            print("decode", slow, flush=True)
        finally:
            srv.stop()
            srv_b.stop()
    idle = runs["idle"]["health_worst_ms"]
    common = {"machine": "2 cores, shared", "model": "llama-tiny preset, context 256, random weights",
              "tokenizer": "byte-level BPE, 512 tokens, trained on Tiny Shakespeare",
              "limits": {k: getattr(lim, k) for k in vars(lim)}, "probe_period_s": 0.02}
    out = []
    for name, r in runs.items():
        if name == "idle":
            continue
        cfg = {**common, **r, "reported_before": REPORTED_BEFORE.get(name, "not measured by the campaign")}
        if name == "prompt_546k_tokens":
            cfg["prompt_tokens"] = n_tokens
            cfg["prompt_bytes"] = len(prompt_1mb.encode())
        out.append(result("serve_hardening", f"health_worst_ms_{name}", False, r["health_worst_ms"],
                          "idle server", idle, goal=100.0, **cfg))
    ours = statistics.median(r["request_s"] for r in t413["ours"])
    base = statistics.median(r["request_s"] for r in t413["encode_first"])
    out.append(result("serve_hardening", "seconds_to_413_prompt_546k_tokens", False, ours,
                      "encode first, then 413 (byte bound off)", base, goal=None, **common,
                      status={k: sorted({r["status"] for r in v}) for k, v in t413.items()},
                      health_worst_ms={k: max(r["health_worst_ms"] for r in v) for k, v in t413.items()},
                      prompt_tokens=n_tokens, prompt_bytes=len(prompt_1mb.encode()),
                      reported_before=REPORTED_BEFORE["prompt_546k_tokens"]))
    for name, v in slow.items():
        out.append(result("serve_hardening", f"decode_slowdown_{name}", False, statistics.median(v["stops"]),
                          "the same neighbour without stop strings", statistics.median(v["plain"]), goal=None,
                          **common, seconds_plain=v["plain"], seconds_with_stops=v["stops"],
                          reported_before=REPORTED_BEFORE["stop_1000x1000"]))
    write_result("serve_hardening", out)


if __name__ == "__main__":
    main()
