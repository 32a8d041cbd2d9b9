"""The web chat page (/) in a real browser: headless Chromium driven by Playwright against a live server.

One server and one browser serve the whole module; each test opens a fresh browser context (its own
localStorage). The server is the real one (uvicorn on 127.0.0.1, a random tiny llama) with an API key, one
sequence at a time and no queue (so a second request is a real 503), a 24 KiB body cap (a real 413) and a
LoRA adapter named "math" (the model menu). A test that needs slow generation slows the engine's step; the
mid-stream error comes from a logits processor that fails one request inside the engine, as in
test_serve_hardening.py. Every test checks the browser console: uncaught page errors never, console
errors only the "Failed to load resource" lines Chromium itself prints for the HTTP errors the test provokes.

Not tested here, on purpose:
- Image upload: issue 16 asks for it "where a VLM is served", and lmstack serves no vision model yet. The page
  keeps a hidden hook (#image-hook) that a /v1/models card with "vision" in `capabilities` would show; the
  upload test belongs with the vision issue. The RAG toggle (#rag-hook) waits for the RAG issue the same way.
  Here we only check that both stay hidden on today's server.

Needs: `pip install playwright` (the dev extra) and Debian's chromium at /usr/bin/chromium (no browser is
downloaded from Playwright's CDN). When chromium is missing and we run as root (CI), the module fixture installs
it with apt-get (about 45 s, 112 MB download); otherwise it skips with the command to run.
A screenshot of the chat is saved under pytest's tmp dir; the test prints its path.
"""
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve_helpers import LiveServer, start_server

CHROMIUM = Path("/usr/bin/chromium")
INSTALL = "apt-get update && apt-get install -y chromium"
KEY = "sk-ui-test"
BODY_CAP = 24 * 1024
# Chromium prints this for every fetch answered with an HTTP error (or refused); the page itself logs nothing.
LOAD_FAILED = re.compile(r"^Failed to load resource: (the server responded with a status of (\d+)|net::(\w+))")


def _ensure_chromium() -> str:
    if CHROMIUM.exists():
        return str(CHROMIUM)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                pytest.skip(f"installing chromium failed ({' '.join(cmd)}: {done.stderr.strip()[-300:]}); run: {INSTALL}")
        if CHROMIUM.exists():
            return str(CHROMIUM)
    pytest.skip(f"Debian's chromium is missing at {CHROMIUM}; run as root: {INSTALL}")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing; run: pip install playwright")
    executable = _ensure_chromium()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def ui(model_dir):
    """The live server, plus `delay` (seconds added to each engine step) for tests that need a slow stream."""
    import lmstack
    from lmstack.infer import AsyncLLMEngine
    from lmstack.infer.lora_hook import LinearLoRA
    from lmstack.serve import ServerConfig, create_app

    tok = lmstack.load_tokenizer(model_dir)
    model = lmstack.load_model(model_dir)
    adapter = LinearLoRA.random(model, rank=4, std=0.5, targets=("q_proj", "v_proj"), seed=1)
    aengine = AsyncLLMEngine(model, tokenizer=tok, lora_adapters={"math": adapter}, max_num_seqs=1)
    config = ServerConfig(model_name="tiny-llama", api_key=KEY, max_queue=0, max_request_bytes=BODY_CAP)
    srv = LiveServer(create_app(aengine, config), aengine).start()
    engine, step = aengine.engine, aengine.engine.step
    srv.delay = 0.0

    def paced_step():
        if srv.delay:
            time.sleep(srv.delay)
        return step()

    engine.step = paced_step
    yield srv
    engine.step = step
    srv.stop()


class Tab:
    """A page in a fresh context, with its console errors, uncaught errors and chat requests recorded."""

    def __init__(self, browser, url: str, key: str | None = KEY):
        self.context = browser.new_context()
        if key:  # as if the user had saved the key before
            self.context.add_init_script(f"localStorage.setItem('lmstack-key', {json.dumps(key)})")
        self.page = self.context.new_page()
        self.console_errors, self.page_errors, self.requests = [], [], []
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and self.requests.append(r.post_data_json))
        self.page.goto(url)
        self.page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")

    def fill_settings(self, **values) -> None:
        if self.page.locator("#settings").is_hidden():
            self.page.click("#toggle-settings")
        for name, value in values.items():
            self.page.fill(f"#{name}", str(value))

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def wait_reply_done(self, timeout: float = 30_000) -> None:
        """Until no reply is streaming (the Send button is enabled again)."""
        self.page.wait_for_function("() => !document.querySelector('#send').disabled && "
                                    "!document.querySelector('.msg.streaming')", timeout=timeout)

    def stored_chats(self) -> dict:
        return json.loads(self.page.evaluate("localStorage.getItem('lmstack.chats.v1')") or "{}")

    def check_console(self, expected: tuple = ()) -> None:
        """No uncaught errors; console errors only Chromium's load failures with the expected statuses."""
        assert not self.page_errors, self.page_errors
        unexpected = []
        for text in self.console_errors:
            m = LOAD_FAILED.match(text)
            if not m or (m.group(2) or m.group(3)) not in {str(e) for e in expected}:
                unexpected.append(text)
        assert not unexpected, unexpected

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser, ui):
    t = Tab(browser, ui.url)
    yield t
    t.close()
    ui.delay = 0.0
    ui.wait_idle()


def errors_shown(page) -> list[dict]:
    return page.eval_on_selector_all(".msg.error", "els => els.map(e => ({kind: e.dataset.kind, text: e.innerText}))")


def test_a_keyed_server_prompts_for_the_key_then_offers_model_and_adapter(browser, ui):
    t = Tab(browser, ui.url, key=None)
    try:
        page = t.page
        page.wait_for_selector(".msg.error[data-kind=auth] input.key-prompt")
        assert "401" in errors_shown(page)[0]["text"]
        t.fill_settings(max_tokens=4)
        t.send("before the key")  # a reply needs the key too: one prompt, now offering to retry it
        page.wait_for_selector("text=Save key and retry")
        assert [e["kind"] for e in errors_shown(page)] == ["auth"]
        page.fill(".key-prompt", KEY)
        page.press(".key-prompt", "Enter")
        page.wait_for_function("() => document.querySelectorAll('#model option').length == 2")
        t.wait_reply_done()  # the retried reply
        assert page.locator(".msg.assistant .meta").inner_text().startswith("4 tokens")
        options = page.eval_on_selector_all("#model option", "os => os.map(o => [o.value, o.textContent])")
        assert options == [["tiny-llama", "tiny-llama"], ["math", "math (adapter on tiny-llama)"]]
        assert not page.query_selector(".msg.error")  # the prompt is gone once the key works
        page.select_option("#model", "math")
        t.send("hi")
        t.wait_reply_done()
        assert t.requests[-1]["model"] == "math"
        assert [r["messages"][-1]["content"] for r in t.requests] == ["before the key", "before the key", "hi"]
        assert page.evaluate("localStorage.getItem('lmstack-key')") == KEY
        assert page.locator(".msg.assistant .meta").all_inner_texts()[-1].startswith("4 tokens")
        t.check_console(expected=(401,))
    finally:
        t.close()


def test_tokens_stream_with_the_chosen_settings_and_a_screenshot_is_saved(tab, ui, tmp_path_factory):
    page = tab.page
    tab.fill_settings(system="You are terse.", temperature=0.8, top_p=0.9, top_k=40, max_tokens=48, seed=7,
                      repetition_penalty=1.1, stop_strings="zzz\nqqq", extra='{"ignore_eos": true}')
    ui.delay = 0.01  # ~10 ms a token: streaming shows as many DOM updates, not one
    # Record the reply's text at every DOM change while it streams.
    page.evaluate("""() => { window.__lens = [];
        new MutationObserver(() => { const m = document.querySelector('.msg.assistant .body');
                                     if (m) window.__lens.push(m.textContent.length); })
          .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
    tab.send("hello there, how are you?")
    tab.wait_reply_done()
    body = tab.requests[-1]
    assert body["messages"] == [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "hello there, how are you?"}]
    assert {k: body[k] for k in ("temperature", "top_p", "top_k", "max_tokens", "seed", "repetition_penalty",
                                 "stop", "ignore_eos", "stream", "model")} == {
        "temperature": 0.8, "top_p": 0.9, "top_k": 40, "max_tokens": 48, "seed": 7, "repetition_penalty": 1.1,
        "stop": ["zzz", "qqq"], "ignore_eos": True, "stream": True, "model": "tiny-llama"}
    lens = [n for n in page.evaluate("window.__lens") if n > 0]
    assert len(set(lens)) >= 3, f"the reply arrived in {len(set(lens))} DOM updates: {lens}"
    assert lens == sorted(lens)  # it only grows while streaming
    # What the page stored is what the server generates for the same request (seeded), token for token.
    with httpx.Client(base_url=ui.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        plain = c.post("/v1/chat/completions", json={**body, "stream": False, "stream_options": None}).json()
    stored = list(tab.stored_chats().values())[0]["messages"]
    assert stored[0] == {"role": "user", "content": "hello there, how are you?"}
    assert stored[1]["content"] == plain["choices"][0]["message"]["content"] != ""
    meta = page.locator(".msg.assistant .meta").inner_text()
    assert meta.startswith("48 tokens") and "finish: length (max_tokens reached)" in meta
    shot = tmp_path_factory.mktemp("web_ui") / "chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 5000
    print(f"\nweb UI screenshot: {shot}")
    tab.check_console()


def test_stop_mid_stream_frees_the_server_and_regenerate_replaces_the_reply(tab, ui):
    page = tab.page
    tab.fill_settings(max_tokens=200, extra='{"ignore_eos": true}', temperature=1.0, seed=11)
    ui.delay = 0.05  # 200 tokens would take 10 s
    tab.send("tell me a long story")
    page.wait_for_function("() => (document.querySelector('.msg.assistant .body') || {}).textContent?.length > 5")
    assert page.locator("#stop").is_visible()
    t0 = time.monotonic()
    page.click("#stop")
    tab.wait_reply_done(timeout=5_000)
    shown = page.locator(".msg.assistant .body").inner_text()
    idle = ui.wait_idle(timeout=5)
    assert idle["running"] == 0 and idle["num_blocks_free"] == idle["num_blocks_total"]
    assert time.monotonic() - t0 < 5, "the server kept generating after the page stopped"  # 10 s if not stopped
    time.sleep(0.3)
    assert page.locator(".msg.assistant .body").inner_text() == shown  # nothing more arrives
    assert page.locator(".msg.assistant .meta").inner_text() == "stopped"
    assert not page.query_selector(".msg.error")  # stopping is not an error
    stopped = list(tab.stored_chats().values())[0]["messages"]
    assert [m["role"] for m in stopped] == ["user", "assistant"] and stopped[1]["content"]

    ui.delay = 0.0
    tab.fill_settings(max_tokens=6, temperature=1.0, seed=3)
    page.click("#regenerate")
    tab.wait_reply_done()
    assert tab.requests[-1]["messages"] == [{"role": "user", "content": "tell me a long story"}]
    messages = list(tab.stored_chats().values())[0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert page.locator(".msg.assistant").count() == 1
    assert page.locator(".msg.assistant .meta").inner_text().startswith("6 tokens")
    tab.check_console()


def test_history_survives_a_reload_and_chats_switch_edit_and_delete(tab):
    page = tab.page
    tab.fill_settings(max_tokens=3)
    tab.send("first chat question")
    tab.wait_reply_done()
    page.click("#new-chat")
    tab.send("second chat question")
    tab.wait_reply_done()
    page.reload()
    page.wait_for_selector("#chats li:nth-child(2)")
    titles = page.eval_on_selector_all("#chats .open", "bs => bs.map(b => b.textContent)")
    assert titles == ["second chat question", "first chat question"]  # newest first
    assert page.locator(".msg.user .body").inner_text() == "second chat question"
    assert page.input_value("#max_tokens") == "3"  # settings survive too
    page.click("#chats li:nth-child(2) .open")
    assert page.locator(".msg.user .body").inner_text() == "first chat question"
    assert page.locator(".msg.assistant").count() == 1
    page.click(".msg.user .edit")  # edit: the message and its reply leave the chat, the text returns to the input
    assert page.input_value("#input") == "first chat question" and page.locator(".msg").count() == 0
    page.fill("#input", "first chat, edited")
    page.press("#input", "Enter")
    tab.wait_reply_done()
    assert [m["content"] for m in tab.stored_chats()[page.eval_on_selector("#chats li.current", "li => li.dataset.id")][
        "messages"]][0] == "first chat, edited"
    # the edited chat is now the newest (first), titled by its new first message; delete the other ("second") chat
    assert page.eval_on_selector_all("#chats .open", "bs => bs.map(b => b.textContent)") == [
        "first chat, edited", "second chat question"]
    page.click("#chats li:nth-child(2) .delete")
    assert page.eval_on_selector_all("#chats .open", "bs => bs.map(b => b.textContent)") == ["first chat, edited"]
    page.reload()
    page.wait_for_selector("#chats li")
    assert page.eval_on_selector_all("#chats .open", "bs => bs.map(b => b.textContent)") == ["first chat, edited"]
    assert [m["content"] for m in list(tab.stored_chats().values())[0]["messages"]][0] == "first chat, edited"
    tab.check_console()


MARKDOWN_REPLY = """## Plan

Some **bold**, *italic*, ~~gone~~ and `inline <b>code</b>` with a [link](https://example.org/x).

1. first
2. second

| name | value |
|------|------:|
| a    | 1     |

```python
print("<script>window.__pwned = 1</script>")
```

<img src=x onerror="window.__pwned = 2"> and [bad](javascript:window.__pwned=3)
> quoted"""


def test_markdown_and_code_render_and_model_html_stays_text(tab):
    page = tab.page
    chat = {"c1": {"id": "c1", "title": "md", "updated": 1,
                   "messages": [{"role": "user", "content": "<b>not bold</b>"},
                                {"role": "assistant", "content": MARKDOWN_REPLY}]}}
    page.evaluate(f"localStorage.setItem('lmstack.chats.v1', {json.dumps(json.dumps(chat))})")
    page.reload()
    page.wait_for_selector(".msg.assistant h2")
    msg = page.locator(".msg.assistant .body")
    assert msg.locator("h2").inner_text() == "Plan"
    assert msg.locator("strong").inner_text() == "bold" and msg.locator("em").inner_text() == "italic"
    assert msg.locator("del").inner_text() == "gone"
    assert msg.locator("p code").inner_text() == "inline <b>code</b>"
    assert msg.locator("a").count() == 1 and msg.locator("a").get_attribute("href") == "https://example.org/x"
    assert msg.locator("ol li").all_inner_texts() == ["first", "second"]
    assert msg.locator("table td").all_inner_texts() == ["a", "1"]
    assert msg.locator(".code .code-lang").inner_text() == "python"
    assert msg.locator("pre code").inner_text() == 'print("<script>window.__pwned = 1</script>")'
    assert msg.locator("blockquote").inner_text() == "quoted"
    # HTML from the model or the user is text: no element made from it, no script run
    assert page.locator(".msg img, .msg script, .msg b").count() == 0
    assert "<img src=x" in msg.inner_text() and "javascript:" in msg.inner_text()
    assert page.locator(".msg.user .body").inner_text() == "<b>not bold</b>"
    assert page.evaluate("window.__pwned") is None
    tab.check_console()


def test_a_400_names_the_field_and_a_413_says_too_large(tab):
    page = tab.page
    tab.fill_settings(extra="{not json")  # caught in the page: a message, and no request sent
    tab.send("hello")
    page.wait_for_selector(".msg.error[data-kind=client]")
    assert "extra body is not valid JSON" in errors_shown(page)[-1]["text"] and not tab.requests
    tab.fill_settings(extra="")
    tab.fill_settings(temperature=-1, max_tokens=4)
    tab.send("hello")
    page.wait_for_selector(".msg.error[data-kind=refused]")
    err = errors_shown(page)[-1]
    assert err["kind"] == "refused" and "(400)" in err["text"] and "temperature" in err["text"]
    tab.fill_settings(temperature=0.5)
    tab.send("x" * (BODY_CAP + 100))
    page.wait_for_selector(".msg.error[data-kind=too-large]")
    err = errors_shown(page)[-1]
    assert err["kind"] == "too-large" and "(413)" in err["text"] and str(BODY_CAP) in err["text"]
    tab.wait_reply_done()
    tab.check_console(expected=(400, 413))


def test_a_503_shows_retry_after_and_its_retry_button_works_once_the_slot_frees(tab, ui):
    page = tab.page
    # ignore_eos: the retried reply is sampled, and a sampled EOS would end it before the 4 tokens checked below
    tab.fill_settings(max_tokens=4, extra='{"ignore_eos": true}')
    ui.delay = 0.05
    hog_started, release = threading.Event(), threading.Event()

    def hog():  # holds the only slot (max_num_seqs=1, max_queue=0) until released
        with httpx.Client(base_url=ui.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
            with c.stream("POST", "/v1/completions", json={"prompt": "the cat", "max_tokens": 200,
                                                           "ignore_eos": True, "stream": True}) as r:
                assert r.status_code == 200
                for _ in r.iter_lines():
                    hog_started.set()
                    if release.is_set():
                        break

    thread = threading.Thread(target=hog)
    thread.start()
    try:
        assert hog_started.wait(20)
        tab.send("are you there?")
        page.wait_for_selector(".msg.error[data-kind=busy]")
        err = errors_shown(page)[-1]
        assert "(503)" in err["text"] and "Retry after 1 s" in err["text"], err
        assert page.locator(".msg.error .retry").is_disabled()  # it waits out Retry-After
    finally:
        release.set()
        thread.join(30)
    ui.delay = 0.0
    ui.wait_idle()
    page.wait_for_selector(".msg.error .retry:enabled", timeout=5_000)
    page.click(".msg.error .retry")
    tab.wait_reply_done()
    assert not page.query_selector(".msg.error")
    assert page.locator(".msg.assistant .meta").inner_text().startswith("4 tokens")
    tab.check_console(expected=(503,))


def test_an_error_event_mid_stream_keeps_the_partial_reply_and_says_so(tab, ui, monkeypatch):
    from lmstack.infer import logits_processors as lp

    def fail_late(logits, rows):  # the request with seed 666 fails inside the engine after 4 tokens
        if any(r.params.seed == 666 and len(r.output_ids) >= 4 for r in rows):
            raise RuntimeError("poisoned processor")
        return logits

    monkeypatch.setitem(lp.PROCESSORS, "poison", fail_late)
    page = tab.page
    tab.fill_settings(seed=666, top_k=5, max_tokens=30, extra='{"ignore_eos": true}')
    tab.send("go")
    page.wait_for_selector(".msg.error[data-kind=stream]")
    tab.wait_reply_done()
    err = errors_shown(page)[-1]
    assert "failed mid-stream" in err["text"] and "poisoned processor" in err["text"]
    assert page.locator(".msg.assistant .body").inner_text() != ""  # the tokens before the failure stay
    assert page.locator(".msg.assistant .meta").inner_text() == "incomplete: the reply failed"
    assert page.locator(".msg.error .retry").is_enabled()
    tab.check_console()


def test_a_server_gone_is_a_network_error_message_not_a_stall(browser, model_dir):
    srv = start_server(model_dir)
    t = Tab(browser, srv.url, key=None)
    try:
        srv.stop()
        t.fill_settings(max_tokens=4)
        t.send("anyone?")
        t.page.wait_for_selector(".msg.error[data-kind=network]", timeout=10_000)
        err = errors_shown(t.page)[-1]
        assert "Could not reach the server" in err["text"] and srv.url in err["text"]
        t.wait_reply_done()
        assert t.page.locator(".msg.user .body").inner_text() == "anyone?"  # kept, to retry later
        t.check_console(expected=("ERR_CONNECTION_REFUSED",))
    finally:
        t.close()


def test_the_page_loads_nothing_from_outside_and_keeps_later_hooks_hidden(tab, ui):
    page = tab.page
    csp = httpx.get(ui.url + "/").headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    urls = page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(ui.url) for u in urls), urls
    assert page.locator("#image-hook").is_hidden() and page.locator("#rag-hook").is_hidden()
    assert httpx.get(ui.url + "/static/../app.py").status_code == 404
    assert httpx.get(ui.url + "/static/chat.html").status_code == 404  # only the listed assets
    tab.check_console()


def test_the_page_assets_need_the_key_wherever_the_page_does(model_dir):
    """On a non-loopback host the page needs the key (issue 15); so do its scripts and styles."""
    srv = start_server(model_dir, api_key="sk-x", host="0.0.0.0")  # binds loopback; host sets the policy
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for path in ("/", "/static/chat.js", "/static/markdown.js", "/static/chat.css"):
                assert c.get(path).status_code == 401, path
                ok = c.get(path, headers={"Authorization": "Bearer sk-x"})
                assert ok.status_code == 200 and ok.content, path
            assert c.get("/static/chat.js", headers={"Authorization": "Bearer sk-x"}).headers[
                "content-type"].startswith("text/javascript")
    finally:
        srv.stop()


def test_a_slow_start_shows_the_wait_and_escape_cancels(tab, ui):
    page = tab.page
    tab.fill_settings(max_tokens=50)
    ui.delay = 1.5  # the first token needs a prefill step: over a second of silence
    tab.send("slow")
    page.wait_for_function("() => /waiting for the server… [1-9] s/.test(document.getElementById('status').textContent)",
                           timeout=5_000)
    page.keyboard.press("Escape")
    tab.wait_reply_done(timeout=5_000)
    assert page.locator("#status").inner_text() == "" and not page.query_selector(".msg.error")
    tab.check_console()


def test_corrupt_storage_does_not_break_the_page(tab):
    page = tab.page
    page.evaluate("""() => { localStorage.setItem('lmstack.chats.v1', JSON.stringify(
        {a: 5, b: {messages: "no"}, c: {title: "kept", updated: 1, messages: [{role: "user", content: "hi"}, 7]}}));
        localStorage.setItem('lmstack.settings.v1', '{truncated'); }""")
    page.reload()
    page.wait_for_selector("#chats li")
    assert page.eval_on_selector_all("#chats .open", "bs => bs.map(b => b.textContent)") == ["kept"]
    assert page.locator(".msg.user .body").inner_text() == "hi"
    assert page.input_value("#temperature") == "0.7"  # the defaults, since the stored settings were unreadable
    tab.check_console()


def test_a_non_streaming_answer_asked_for_in_the_extra_body_is_shown(tab):
    page = tab.page
    tab.fill_settings(max_tokens=5, extra='{"stream": false}')
    tab.send("one shot")
    tab.wait_reply_done()
    assert tab.requests[-1]["stream"] is False
    assert page.locator(".msg.assistant .meta").inner_text().startswith("5 tokens")
    stored = list(tab.stored_chats().values())[0]["messages"]
    assert stored[-1]["role"] == "assistant" and stored[-1]["content"]
    tab.check_console()
