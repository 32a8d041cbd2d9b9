"""Web chat page: does the page keep up with the stream, and what does its markdown rendering cost?

The server is the real app under uvicorn in a background thread on loopback, serving a tiny random llama
(llama-tiny preset, context 256, the serve tests' 300-token BPE), its engine paced at PACE_S a step (about
200 tokens/s, as a fast real model streams): the stream's time is then mostly the pacing, not this shared
machine's CPU contention, and what differs between the clients is theirs. The page runs in headless Chromium
(Debian's /usr/bin/chromium) driven by Playwright.

- seconds_to_last_token_shown: one seeded 200-token reply (ignore_eos), from the form's submit to the last
  change of the reply's text in the DOM (a MutationObserver in the page, performance.now()), against a bare
  fetch() of the same body in the same browser (no UI: read the stream to its end, nothing parsed or shown).
  ratio = bare / page (1.0 = the UI adds nothing); config.paired_ratios lists bare / page for each pair. The page re-renders the whole reply's markdown at most every
  33 ms, so up to 33 ms of delay is expected. A raw SSE client outside the
  browser (httpx in this process, sending to reading [DONE]) runs alongside for reference (config.httpx_*):
  the browser's own transport is slower than it, with or without the page.
- seconds_to_first_token_shown: the same runs, to the first non-empty reply text in the DOM vs the first
  bytes of reply text the bare fetch reads (found by a regex on the raw stream, no JSON parsing).
- markdown_render_ms_16kb / _64kb: renderMarkdown() of a mixed reply (headings, lists, a table, code fences,
  inline marks) of 16 KB (about a 4,096-token reply) and 64 KB, in the page, against setting the same text as
  textContent (no markdown); each sample times a batch of calls (the page's clock ticks in 0.1 ms), median of
  11 samples. Both build DOM only; the browser's layout and paint afterwards are not in either number. ratio = textContent / renderMarkdown (below 1: the cost
  of rendering). The goal: a 16 KB re-render fits in one 16.7 ms frame.
Each run checks that the page stored exactly the raw client's text (same seed); config.texts_equal.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/web_ui.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from _common import result, write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "serve"))
CHROMIUM = "/usr/bin/chromium"
PACE_S = 0.005
BODY = {"model": "tiny-llama", "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 200,
        "ignore_eos": True, "temperature": 1.0, "seed": 5, "stream": True, "stream_options": {"include_usage": True}}
SAMPLE = """## Section {i}

Some **bold** text, *italic*, `inline code` and a [link](https://example.org/{i}).

1. first point
2. second point with `code`

| key | value |
|-----|------:|
| a   | {i}   |

```python
def f(x):
    return x * {i}  # <b>not html</b>
```

> a quote, and a plain paragraph
that spans two lines.
"""


def build_model(folder: Path) -> Path:
    import torch

    import lmstack
    from lmstack.model.presets import preset
    from lmstack.tokenizer import train_tokenizer
    from serve_helpers import make_text

    tok = train_tokenizer(texts=make_text(), type="bpe", vocab_size=300, special_tokens="chat", show_progress=False)
    torch.manual_seed(0)
    model = lmstack.Transformer(preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=256))
    path = folder / "tiny-llama"
    lmstack.save_model(model.eval(), path, tokenizer=tok)
    return path


def raw_client(url: str) -> tuple[float, float, str]:
    """(seconds to the first content delta, seconds to [DONE], text) for BODY over SSE."""
    text, first = [], None
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions", json=BODY) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:]).get("choices", []):
                    piece = choice["delta"].get("content")
                    if piece:
                        text.append(piece)
                        first = first if first is not None else time.perf_counter() - t0
    return first, time.perf_counter() - t0, "".join(text)


BARE_FETCH = """async (body) => { const t0 = performance.now(); let first = null;
    const r = await fetch('/v1/chat/completions', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                                   body: JSON.stringify(body)});
    const reader = r.body.getReader();
    const decoder = new TextDecoder(); let seen = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      if (first === null) {  // the first chunk carrying reply text (the role-only chunk comes before it)
        seen += decoder.decode(value, {stream: true});
        if (/"content":"[^"]/.test(seen)) first = performance.now() - t0;
      }
    }
    return [first / 1000, (performance.now() - t0) / 1000]; }"""


def page_run(page) -> tuple[float, float, str]:
    """(seconds to the first reply text in the DOM, seconds to its last change, stored text) for BODY."""
    page.click("#new-chat")
    page.evaluate("""() => { window.__t = {submit: null, first: null, last: null};
        document.getElementById('form').addEventListener('submit', () => { window.__t.submit = performance.now(); },
                                                         {capture: true, once: true});
        if (window.__obs) window.__obs.disconnect();
        window.__obs = new MutationObserver(() => {
            const b = document.querySelector('.msg.assistant .body');
            if (!b || !b.textContent) return;
            const now = performance.now();
            if (window.__t.first === null) window.__t.first = now;
            if (b.textContent !== window.__t.text) { window.__t.last = now; window.__t.text = b.textContent; }
        });
        window.__obs.observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#input", BODY["messages"][0]["content"])
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .meta", timeout=120_000)
    t = page.evaluate("window.__t")
    chats = json.loads(page.evaluate("localStorage.getItem('lmstack.chats.v1')"))
    current = max(chats.values(), key=lambda c: c["updated"])
    return (t["first"] - t["submit"]) / 1000, (t["last"] - t["submit"]) / 1000, current["messages"][-1]["content"]


def render_ms(page, kb: int) -> tuple[float, float]:
    """Median ms of renderMarkdown vs textContent for a reply of about `kb` KB."""
    text = ""
    i = 0
    while len(text) < kb * 1024:
        text += SAMPLE.replace("{i}", str(i))
        i += 1
    return tuple(page.evaluate("""(text) => {
        const target = document.createElement('div');
        document.getElementById('log').appendChild(target);
        const time = (f, batch) => { const ts = []; for (let k = 0; k < 12; k++) { const t = performance.now();
            for (let j = 0; j < batch; j++) f();
            ts.push((performance.now() - t) / batch); } ts.shift(); ts.sort((a, b) => a - b); return ts[5]; };
        const md = time(() => renderMarkdown(target, text), 10);
        const plain = time(() => { target.textContent = text; }, 1000);
        target.remove();
        return [md, plain]; }""", text))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from serve_helpers import start_server

    with tempfile.TemporaryDirectory() as tmp:
        srv = start_server(build_model(Path(tmp)))
        step = srv.aengine.engine.step

        def paced_step():
            time.sleep(PACE_S)
            return step()

        srv.aengine.engine.step = paced_step
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
                page = browser.new_page()
                page.goto(srv.url)
                page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
                page.click("#toggle-settings")
                for name in ("max_tokens", "temperature", "seed"):
                    page.fill(f"#{name}", str(BODY[name]))
                page.fill("#extra", '{"ignore_eos": true}')
                raw_client(srv.url), page_run(page)  # warm-up: first requests pay one-time costs
                pages, bares, raws, equal = [], [], [], True
                for k in range(args.repeats):  # alternating, order swapped each repeat, so load hits all alike
                    if k % 2:
                        bares.append(page.evaluate(BARE_FETCH, BODY))
                    pages.append(page_run(page))
                    if not k % 2:
                        bares.append(page.evaluate(BARE_FETCH, BODY))
                    raws.append(raw_client(srv.url))
                    equal = equal and pages[-1][2] == raws[-1][2]
                renders = {kb: render_ms(page, kb) for kb in (16, 64)}
                browser.close()
        finally:
            srv.stop()
    med = lambda xs, i: round(statistics.median(x[i] for x in xs), 4)  # noqa: E731
    config = {"machine": "2 cores, shared", "model": "llama-tiny random, context 256, 300-token BPE",
              "max_tokens": BODY["max_tokens"], "repeats": args.repeats, "browser": "headless Chromium (Debian)",
              "texts_equal": equal, "torch_threads": 1, "engine_pace_s_per_step": PACE_S}
    bare = "bare fetch in the same browser (no UI)"
    # bare / page per alternating pair: the spread shows how much of the gap is the shared machine's noise
    paired = sorted(round(b[1] / p[1], 3) for p, b in zip(pages, bares))
    results = [
        result("web_ui", "seconds_to_last_token_shown", False, med(pages, 1), bare, med(bares, 1), goal=1.0,
               httpx_seconds_to_done=med(raws, 1), paired_ratios=paired, paired_ratio_min=min(paired),
               paired_ratio_max=max(paired), **config),
        result("web_ui", "seconds_to_first_token_shown", False, med(pages, 0), bare, med(bares, 0),
               httpx_seconds_to_first_text=med(raws, 0), **config),
    ]
    for kb, (md, plain) in renders.items():
        results.append(result("web_ui", f"markdown_render_ms_{kb}kb", False, round(md, 3),
                              "textContent (no markdown)", round(plain, 4), goal=16.7 if kb == 16 else None,
                              chars=kb * 1024, **config))
    write_result("web_ui", results)


if __name__ == "__main__":
    main()
