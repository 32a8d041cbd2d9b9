// lmstack web chat: conversations, settings, streaming from /v1/chat/completions, and errors as messages.
//
// The page (chat.html) is served by `lmstack serve` at "/"; open http://127.0.0.1:8000/ after
//     lmstack serve --model runs/sft [--adapters math=runs/lora] [--api_key sk-...]
// Conversations and settings live in this browser's localStorage (keys "lmstack.chats.v1",
// "lmstack.settings.v1", and the API key in "lmstack-key"); nothing leaves the browser but requests to the
// server that served the page.
//
// Every failure ends as a message in the log, never a silent stall: 401 (with a field to enter the key),
// 400/404/413 (the server's message, which names the field), 503 (Retry-After, with a retry button that
// waits for it), 5xx, an error event mid-stream, a stream cut before [DONE], and network failure.
//
// Hooks for later features stay hidden until the server advertises them in a /v1/models card's
// `capabilities` list: "vision" shows #image-hook, "rag" shows #rag-hook (see applyCapabilities).

"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = document.body.dataset;
const STORE = "lmstack.chats.v1", SETTINGS = "lmstack.settings.v1", KEY = "lmstack-key";
// Sampling inputs sent as numbers when filled in (empty = leave it to the server).
const NUMBER_FIELDS = ["temperature", "top_p", "top_k", "min_p", "max_tokens", "repetition_penalty",
                       "presence_penalty", "frequency_penalty", "seed"];
const INTEGER_FIELDS = new Set(["top_k", "max_tokens", "seed"]);
const SETTING_FIELDS = [...NUMBER_FIELDS, "stop_strings", "extra", "system"];
const DEFAULTS = {};

let chats = {};          // id -> {id, title, messages: [{role, content}], updated}
let currentId = null;
let streaming = null;    // {controller, stopped} while a reply streams

// ---- storage --------------------------------------------------------------------------------------------

function load(key, fallback) {
  try {
    const v = JSON.parse(localStorage.getItem(key));
    return v && typeof v === "object" ? v : fallback;
  } catch (e) {
    return fallback;  // a corrupt entry (edited by hand) starts fresh rather than breaking the page
  }
}

function save(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (e) {
    showError({title: "Could not save to this browser's storage", message: String(e.message || e) +
               ". Delete some old conversations to free space."});
  }
}

function saveChats() { save(STORE, chats); }

// Keep only well-formed conversations from storage (it may hold an older format or a hand edit).
function validChats(stored) {
  const ok = {};
  for (const [id, c] of Object.entries(stored)) {
    if (!c || !Array.isArray(c.messages)) continue;
    const messages = c.messages.filter((m) => m && typeof m.role === "string" && typeof m.content === "string");
    ok[id] = {id, title: typeof c.title === "string" ? c.title : "chat", messages,
              updated: Number.isFinite(c.updated) ? c.updated : 0};
  }
  return ok;
}

function current() {
  if (!currentId || !chats[currentId]) newChat();
  return chats[currentId];
}

function newChat() {
  const id = "c" + Date.now().toString(36) + Math.random().toString(36).slice(2, 6);
  chats[id] = {id, title: "New chat", messages: [], updated: Date.now()};
  currentId = id;
  return chats[id];
}

// ---- rendering ------------------------------------------------------------------------------------------

// A message in the log; a user message at `index` of the conversation gets an edit button.
function bubble(role, text, index) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (role === "user" && index !== undefined) {
    const edit = div.appendChild(document.createElement("button"));
    edit.type = "button";
    edit.className = "edit";
    edit.textContent = "edit";
    edit.title = "edit this message: it and everything after it go back to the input box";
    edit.onclick = () => editMessage(index);
  }
  const body = div.appendChild(document.createElement("div"));
  body.className = "body";
  if (role === "assistant") renderMarkdown(body, text);
  else body.textContent = text;  // what the user typed shows as typed
  $("log").appendChild(div);
  scrollDown();
  return div;
}

function scrollDown() { $("log").scrollTop = $("log").scrollHeight; }

function renderChats() {
  const list = $("chats");
  list.replaceChildren();
  Object.values(chats).sort((a, b) => b.updated - a.updated).forEach((c) => {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    if (c.id === currentId) li.className = "current";
    const open = li.appendChild(document.createElement("button"));
    open.type = "button";
    open.className = "open";
    open.textContent = c.title;
    open.title = c.title;
    open.onclick = () => switchChat(c.id);
    const del = li.appendChild(document.createElement("button"));
    del.type = "button";
    del.className = "delete";
    del.textContent = "×";
    del.title = "delete this conversation";
    del.setAttribute("aria-label", "delete " + c.title);
    del.onclick = () => deleteChat(c.id);
    list.appendChild(li);
  });
}

function renderLog() {
  $("log").replaceChildren();
  current().messages.forEach((m, i) => {
    const div = bubble(m.role, m.content, i);
    if (m.note) addMeta(div, m.note);
  });
  updateActions();
}

function addMeta(div, text) {
  let meta = div.querySelector(".meta");
  if (!meta) { meta = div.appendChild(document.createElement("div")); meta.className = "meta"; }
  meta.textContent = text;
}

function updateActions() {
  const msgs = current().messages;
  $("stop").hidden = !streaming;
  $("send").disabled = !!streaming;
  $("regenerate").hidden = !!streaming || !msgs.length || msgs[msgs.length - 1].role !== "assistant";
  document.body.classList.toggle("busy", !!streaming);
}

function setStatus(text) { if ($("status").textContent !== text) $("status").textContent = text; }

function switchChat(id) {
  if (streaming) stop();
  currentId = id;
  renderChats();
  renderLog();
}

function deleteChat(id) {
  if (streaming && id === currentId) stop();
  delete chats[id];
  if (id === currentId) currentId = Object.values(chats).sort((a, b) => b.updated - a.updated)[0]?.id || null;
  saveChats();
  renderChats();
  renderLog();
}

// ---- errors ---------------------------------------------------------------------------------------------

class ServerError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

async function errorFromResponse(resp) {
  let message = resp.statusText || "no message";
  try {
    const text = await resp.text();
    try {
      const body = JSON.parse(text);
      message = body.error ? body.error.message + (body.error.param ? ` (field: ${body.error.param})` : "") : text;
    } catch (e) {
      if (text) message = text.slice(0, 500);
    }
  } catch (e) { /* the body could not be read; the status says enough */ }
  const retry = parseInt(resp.headers.get("Retry-After"), 10);
  return new ServerError(resp.status, message, Number.isFinite(retry) ? retry : null);
}

// Describe a failure for the user: {title, message, kind}.
function describe(err) {
  if (err instanceof ServerError) {
    const s = err.status;
    if (s === 401) return {kind: "auth", title: "The server needs an API key (401)", message: err.message};
    if (s === 413) return {kind: "too-large", title: "Request too large (413)", message: err.message +
                           ". Shorten the message or start a new chat."};
    if (s === 503) return {kind: "busy", title: "Server busy (503)", message: err.message +
                           (err.retryAfter != null ? `. Retry after ${err.retryAfter} s.` : ""), retryAfter: err.retryAfter};
    if (s === "stream") return {kind: "stream", title: "The reply failed mid-stream", message: err.message};
    if (s >= 500) return {kind: "server", title: `Server error (${s})`, message: err.message};
    return {kind: "refused", title: `The server refused the request (${s})`, message: err.message};
  }
  if (err instanceof TypeError) {
    return {kind: "network", title: "Could not reach the server", message: `${err.message} (${location.origin}).` +
            " Is `lmstack serve` still running?"};
  }
  return {kind: "client", title: "Error", message: String(err.message || err)};
}

// An error bubble in the log; with a key field for 401 and a retry button where retrying can help.
function showError(info, retry) {
  const div = document.createElement("div");
  div.className = "msg error";
  div.setAttribute("role", "alert");
  div.dataset.kind = info.kind || "client";
  const title = div.appendChild(document.createElement("div"));
  title.className = "title";
  title.textContent = info.title;
  div.appendChild(document.createElement("div")).textContent = info.message;
  if (info.kind === "auth") {
    // one key prompt at a time: a newer one (which may also retry a reply) replaces any older one
    document.querySelectorAll(".msg.error[data-kind=auth]").forEach((old) => old.remove());
    const form = div.appendChild(document.createElement("form"));
    const input = form.appendChild(document.createElement("input"));
    input.type = "password";
    input.className = "key-prompt";
    input.placeholder = "API key (sk-...)";
    input.autocomplete = "off";
    const ok = form.appendChild(document.createElement("button"));
    ok.textContent = retry ? "Save key and retry" : "Save key";
    form.onsubmit = (e) => {
      e.preventDefault();
      $("key").value = input.value.trim();
      localStorage.setItem(KEY, $("key").value);
      div.remove();
      loadModels();
      if (retry) retry();
    };
    setTimeout(() => input.focus(), 0);
  } else if (retry && ["busy", "server", "network", "stream"].includes(info.kind)) {
    const buttons = div.appendChild(document.createElement("div"));
    buttons.className = "buttons";
    const again = buttons.appendChild(document.createElement("button"));
    again.type = "button";
    again.className = "retry";
    again.onclick = () => { div.remove(); retry(); };
    // After a 503, the button waits out Retry-After, counting down.
    let wait = info.kind === "busy" && info.retryAfter ? info.retryAfter : 0;
    const tick = () => {
      again.disabled = wait > 0;
      again.textContent = wait > 0 ? `Retry in ${wait} s` : "Retry";
      if (wait-- > 0) setTimeout(tick, 1000);
    };
    tick();
  }
  $("log").appendChild(div);
  scrollDown();
  return div;
}

// ---- settings and models --------------------------------------------------------------------------------

function readSettings() {
  const s = {};
  for (const f of SETTING_FIELDS) s[f] = $(f).value;
  s.model = $("model").value;
  return s;
}

function saveSettings() { save(SETTINGS, readSettings()); }

function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h.Authorization = "Bearer " + $("key").value;
  return h;
}

async function loadModels() {
  const select = $("model");
  const wanted = load(SETTINGS, {}).model || select.value || PAGE.model;
  let cards;
  try {
    const resp = await fetch(PAGE.modelsUrl, {headers: headers()});
    if (!resp.ok) throw await errorFromResponse(resp);
    cards = (await resp.json()).data || [];
  } catch (e) {
    const info = describe(e);
    info.title = "Could not list the models: " + info.title;
    showError(info, info.kind === "auth" ? null : loadModels);
    cards = [{id: PAGE.model}];
  }
  select.replaceChildren();
  for (const c of cards) {
    const opt = select.appendChild(document.createElement("option"));
    opt.value = c.id;
    opt.textContent = c.parent ? `${c.id} (adapter on ${c.parent})` : c.id;
    opt.dataset.capabilities = JSON.stringify(c.capabilities || []);
  }
  if (cards.some((c) => c.id === wanted)) select.value = wanted;
  applyCapabilities();
}

// Show the hooks for features the chosen model's card advertises; keep the rest hidden.
function applyCapabilities() {
  const opt = $("model").selectedOptions[0];
  const caps = opt ? JSON.parse(opt.dataset.capabilities || "[]") : [];
  document.querySelectorAll("[data-capability]").forEach((hook) => {
    hook.hidden = !caps.includes(hook.dataset.capability);
  });
}

// The request body from the conversation and the settings; throws a clear Error on bad settings.
function buildRequest(messages) {
  const s = readSettings();
  const body = {model: s.model || PAGE.model, messages: [], stream: true, stream_options: {include_usage: true}};
  if (s.system.trim()) body.messages.push({role: "system", content: s.system});
  body.messages.push(...messages.map((m) => ({role: m.role, content: m.content})));
  for (const f of NUMBER_FIELDS) {
    const raw = $(f).value.trim();
    if (raw === "") {
      if ($(f).validity.badInput) throw new Error(`${f} is not a number`);
      continue;
    }
    const v = Number(raw);
    if (!Number.isFinite(v) || (INTEGER_FIELDS.has(f) && !Number.isInteger(v))) {
      throw new Error(`${f}=${raw} is not ${INTEGER_FIELDS.has(f) ? "an integer" : "a number"}`);
    }
    body[f] = v;
  }
  const stops = s.stop_strings.split("\n").filter((x) => x !== "");
  if (stops.length) body.stop = stops;
  if (s.extra.trim()) {
    let extra;
    try {
      extra = JSON.parse(s.extra);
    } catch (e) {
      throw new Error("extra body is not valid JSON: " + e.message);
    }
    if (!extra || typeof extra !== "object" || Array.isArray(extra)) throw new Error("extra body must be a JSON object");
    Object.assign(body, extra);
  }
  return body;
}

// ---- streaming ------------------------------------------------------------------------------------------

// Reads the SSE stream, calling onText(text so far); returns {text, finish, usage}. Throws ServerError("stream") on an
// error event and when the stream ends without [DONE].
async function readStream(resp, onText) {
  const reader = resp.body.getReader(), decoder = new TextDecoder();
  let buffer = "", text = "", finish = null, usage = null, done = false;
  for (;;) {
    const {value, done: ended} = await reader.read();
    if (ended) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, cut).split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      buffer = buffer.slice(buffer.slice(cut).match(/^\r?\n\r?\n/)[0].length + cut);
      if (!event) continue;
      if (event === "[DONE]") { done = true; continue; }
      const chunk = JSON.parse(event);
      if (chunk.error) throw Object.assign(new ServerError("stream", chunk.error.message), {partial: text});
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices || []) {
        if (c.index) continue;  // the page asks for one sample
        if (c.delta && c.delta.content) { text += c.delta.content; onText(text); }
        if (c.finish_reason) finish = c.finish_reason;
      }
    }
  }
  if (!done) throw Object.assign(new ServerError("stream", "the connection closed before the reply finished"),
                                 {partial: text});
  return {text, finish, usage};
}

async function generate() {
  const chat = current();
  let body;
  try {
    body = buildRequest(chat.messages);
  } catch (e) {
    showError({kind: "client", title: "Check the settings", message: e.message});
    return;
  }
  const div = bubble("assistant", "");
  div.classList.add("streaming");
  const target = div.querySelector(".body");
  const controller = new AbortController();
  streaming = {controller, stopped: false};
  updateActions();
  const started = performance.now();
  // A reply that is slow to start or stalls says so, with the seconds waited (never a silent stall).
  let heard = started;
  const watch = setInterval(() => {
    const quiet = Math.round((performance.now() - heard) / 1000);
    if (!streaming.receiving) setStatus(`waiting for the server… ${quiet} s`);
    else if (quiet >= 5) setStatus(`no new tokens for ${quiet} s (Stop or Esc cancels)`);
  }, 1000);
  setStatus("waiting for the server…");
  let pending = null, text = "", painted = -1e9;
  const repaint = () => { pending = null; painted = performance.now(); renderMarkdown(target, text); scrollDown(); };
  // The whole reply's markdown is re-rendered (a few ms for 16 KB), at most every 33 ms (30 per second): at
  // once when the last paint is that old (so the first token shows without waiting), else when it will be.
  // Every frame (16 ms) doubled the page's CPU for no visible gain; with the server on the same machine,
  // that CPU is the server's.
  const paint = (t) => {
    text = t;
    heard = performance.now();
    if (pending) return;
    const since = performance.now() - painted;
    if (since >= 33) repaint();
    else pending = setTimeout(repaint, 33 - since);
    if (!streaming.receiving) streaming.receiving = true;
    setStatus("generating…");
  };
  let result = null, failure = null;
  try {
    const resp = await fetch(PAGE.chatUrl, {method: "POST", headers: headers(), body: JSON.stringify(body),
                                            signal: controller.signal});
    if (!resp.ok) throw await errorFromResponse(resp);
    if ((resp.headers.get("Content-Type") || "").startsWith("application/json")) {
      // "stream": false set through the extra body: one JSON answer
      const answer = await resp.json(), choice = answer.choices[0];
      result = {text: choice.message.content || "", finish: choice.finish_reason, usage: answer.usage};
    } else {
      result = await readStream(resp, paint);
    }
  } catch (e) {
    failure = e;
  }
  if (pending) clearTimeout(pending);
  clearInterval(watch);
  const stopped = streaming.stopped;
  streaming = null;
  div.classList.remove("streaming");
  setStatus("");
  const partial = result ? result.text : (failure && failure.partial) || text;
  renderMarkdown(target, partial);
  if (failure && !stopped) {
    if (!partial) div.remove();
    const info = describe(failure);
    showError(info, generate);
  }
  if (partial || (result && !failure)) {
    const seconds = (performance.now() - started) / 1000;
    let note;
    if (stopped) note = "stopped";
    else if (failure) note = "incomplete: the reply failed";
    else {
      const n = result.usage ? result.usage.completion_tokens : null;
      note = (n != null ? `${n} tokens · ${(n / seconds).toFixed(1)} tok/s · ` : "") + `finish: ${result.finish}`;
      if (result.finish === "length") note += " (max_tokens reached)";
      if (result.finish === "content_filter") note += " (the server's content filter stopped this reply)";
    }
    addMeta(div, note);
    chat.messages.push({role: "assistant", content: partial, note});
  }
  chat.updated = Date.now();
  saveChats();
  renderChats();
  updateActions();
}

function stop() {
  if (!streaming) return;
  streaming.stopped = true;
  streaming.controller.abort();  // closes the connection; the server aborts the request and frees its blocks
}

function send(text) {
  const chat = current();
  if (!chat.messages.length) chat.title = text.slice(0, 60).replace(/\s+/g, " ");
  chat.messages.push({role: "user", content: text});
  bubble("user", text, chat.messages.length - 1);
  chat.updated = Date.now();
  saveChats();
  renderChats();
  return generate();
}

// Edit: the message and everything after it leave the conversation; its text goes back to the input box.
function editMessage(index) {
  const msgs = current().messages;
  if (streaming || !msgs[index] || msgs[index].role !== "user") return;
  $("input").value = msgs[index].content;
  msgs.splice(index);
  saveChats();
  renderLog();
  $("input").focus();
}

function regenerate() {
  const msgs = current().messages;
  if (streaming || !msgs.length || msgs[msgs.length - 1].role !== "assistant") return;
  msgs.pop();
  renderLog();
  return generate();
}

// ---- wiring ---------------------------------------------------------------------------------------------

function init() {
  for (const f of SETTING_FIELDS) DEFAULTS[f] = $(f).value;
  const stored = load(SETTINGS, {});
  for (const f of SETTING_FIELDS) if (typeof stored[f] === "string") $(f).value = stored[f];
  for (const f of SETTING_FIELDS) $(f).addEventListener("change", saveSettings);
  $("key").value = localStorage.getItem(KEY) || "";
  $("key").addEventListener("change", () => { localStorage.setItem(KEY, $("key").value); loadModels(); });
  $("model").addEventListener("change", () => { applyCapabilities(); saveSettings(); });
  $("reset-settings").onclick = () => {
    for (const f of SETTING_FIELDS) $(f).value = DEFAULTS[f];
    saveSettings();
  };
  $("toggle-settings").onclick = () => { $("settings").hidden = !$("settings").hidden; };
  $("new-chat").onclick = () => { if (streaming) stop(); newChat(); renderChats(); renderLog(); $("input").focus(); };
  $("stop").onclick = stop;
  $("regenerate").onclick = regenerate;
  $("form").onsubmit = (e) => {
    e.preventDefault();
    const text = $("input").value;
    if (!text.trim() || streaming) return;
    $("input").value = "";
    send(text);
  };
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && streaming) stop(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("form").requestSubmit(); }
  });
  chats = validChats(load(STORE, {}));
  const recent = Object.values(chats).sort((a, b) => b.updated - a.updated)[0];
  currentId = recent ? recent.id : null;
  renderChats();
  renderLog();
  loadModels();
  $("input").focus();
}

init();
